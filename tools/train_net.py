#!/usr/bin/env python
"""Train and evaluate GN Mask R-CNN with gn_det.

    python tools/train_net.py --config configs/mask_rcnn_gn.yaml                # train on COCO 2017, evaluate
    python tools/train_net.py --config configs/mask_rcnn_gn.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config configs/mask_rcnn_gn.yaml --resume       # continue an interrupted run
    python tools/train_net.py --config configs/mask_rcnn_gn.yaml --num-gpus 8   # data-parallel (GN needs no cross-GPU stats)
    python tools/train_net.py --config configs/demo/mask_rcnn_gn_shapes.yaml    # the embedded dataset, CPU-sized

`--config-file` is accepted too, as in detectron2; trailing KEY VALUE pairs override the config.
COCO is read from $DETECTRON2_DATASETS/coco (default ./datasets/coco).
A mistake in what you gave (a config key or value, a missing dataset or weights file, weights
that are refused, an unknown norm) ends with "train_net: error: <what, where, the fix>" and
exit status 2, before training starts; any other error keeps its traceback.
"""
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

import gn_det
from gn_det.checkpoint import SafeCheckpointer, check_weights_exist
from gn_det.data import check_datasets_exist, register_shapes_dataset
from gn_det.engine import Trainer
from gn_det.errors import exit_on_user_error
from gn_det.lazy import build_lazy_model, lazy_dataset_names, lazy_test, lazy_train, load_lazy_config
from gn_det.modeling import validate_gn_config

PROG = "train_net"


def is_lazy(args) -> bool:
    return args.config_file.endswith(".py")


def setup(args):
    """The config: a YAML file (detectron2's CfgNode with gn_det's keys, trailing KEY VALUE
    overrides) or a LazyConfig .py file (trailing key=value overrides), checked."""
    if is_lazy(args):
        return load_lazy_config(args.config_file, args.opts)
    cfg = gn_det.get_config(args.config_file, args.opts, allow_unsafe=args.allow_unsafe_yaml)
    validate_gn_config(cfg)  # before anything is built or loaded
    cfg.freeze()
    return cfg


def check_inputs(cfg, args):
    """What the run will read exists: its datasets and the weights it loads (once, in the
    parent: a COCO annotation file takes seconds to parse)."""
    if is_lazy(args):
        check_datasets_exist(lazy_dataset_names(cfg, args.eval_only))
    else:
        check_datasets_exist(list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))
    check_weights_exist(cfg, resume=args.resume)


def main_lazy(cfg, args):
    if args.eval_only:
        model = build_lazy_model(cfg)
        SafeCheckpointer(model, weights_key="train.init_checkpoint").resume_or_load(cfg.train.init_checkpoint,
                                                                                   resume=args.resume)
        return lazy_test(cfg, model)
    return lazy_train(cfg, resume=args.resume)


def main(args):
    with exit_on_user_error(PROG):  # in each worker process, for what only loading finds (refused weights)
        register_shapes_dataset()
        cfg = setup(args)
        default_setup(cfg, args)  # logging, config.yaml (or .py) in the output folder, seeds
        if is_lazy(args):
            return main_lazy(cfg, args)
        if args.eval_only:
            model = Trainer.build_model(cfg)
            SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            results = Trainer.test(cfg, model)
            verify_results(cfg, results)
            return results
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="alias of --config-file")
    parser.add_argument("--allow-unsafe-yaml", action="store_true",
                        help="read configs with YAML tags that construct Python objects (only for files you trust)")
    return parser


if __name__ == "__main__":
    parser = argument_parser()
    args = parser.parse_args()
    if not args.config_file:
        parser.error("give a config: --config configs/mask_rcnn_gn.yaml")
    print("Command Line Args:", args)
    with exit_on_user_error(PROG):  # and a worker's exit with status 2: its message is printed
        register_shapes_dataset()  # generate the embedded dataset once, before worker processes start
        check_inputs(setup(args), args)  # a user error ends here, once, before any worker starts
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
