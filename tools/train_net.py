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
that are refused, an unknown norm, a bad or broken image, a bad flag, an OUTPUT_DIR that cannot
be created, a GN_DET_* variable gn_det does not read or whose value it refuses) ends with
"train_net: error: <what, where, the fix>" and exit status 2, before training starts; so does a
diverged run, at the iteration it diverged. Any other error keeps its traceback.
One run per output folder: a run (training or --eval-only) holds OUTPUT_DIR/gn_det_run.lock for
its whole life; a second run into the same folder ends with "train_net: error:" naming the
folder and the holder, before it writes anything (a lock whose holder is gone is taken over;
docs/RELIABILITY.md). --eval-only refuses weights that leave a trainable parameter of the model
unloaded, unless --allow-partial-weights.
SIGINT (Ctrl-C) and SIGTERM stop training cleanly, after the step under way (a second signal,
2 seconds or more after the first: at once): one line saying where the last checkpoint is, exit
status 130 / 143.
"""
import multiprocessing
import os
import signal
import sys

PROG = "train_net"

try:
    from detectron2.engine import default_argument_parser, default_setup, launch
    from detectron2.evaluation import verify_results
    from detectron2.utils import comm

    import gn_det
    from gn_det.train.checkpoint import SafeCheckpointer, check_output_dir_free, check_weights_exist, hold_output_dir
    from gn_det.train.data import check_datasets_exist, register_shapes_dataset
    from gn_det.train.data.checks import DataSettings
    from gn_det.train.engine import Trainer, check_batch_split
    from gn_det.errors import ConfigError, check_environment, exit_on_user_error
    from gn_det.lazy import build_lazy_model, lazy_dataset_names, load_lazy_config
    from gn_det.train.lazy_loop import lazy_test, lazy_train
    from gn_det.modeling import validate_gn_config
    from gn_det.train.stopping import STOP_SIGNALS, Stopped, stop_on_signals
except (ValueError, OSError) as exc:  # gn_det reads its GN_DET_* variables at import, and names a bad one
    if "GN_DET_" not in str(exc):
        raise
    print(f"{PROG}: error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


def _forward(signum, frame):
    """In the parent of worker processes: they stop (each cleanly), the parent waits for them."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)


def last_checkpoint_note(output_dir: str) -> str:
    pointer = os.path.join(output_dir, "last_checkpoint")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        return f"the last checkpoint is {os.path.join(output_dir, name)}; continue with --resume"
    return f"no checkpoint was written yet in {output_dir}"


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


def output_dir(cfg, args) -> str:
    return cfg.train.output_dir if is_lazy(args) else cfg.OUTPUT_DIR


def check_inputs(cfg, args):
    """What the run will read exists: its datasets (their images' headers too) and the weights
    it loads (once, in the parent: a COCO annotation file takes seconds to parse); the output
    folder can be written; the batch splits over the processes."""
    out = output_dir(cfg, args)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"OUTPUT_DIR={out!r} cannot be created ({exc.strerror}: {exc.filename}); choose a folder "
                          "you can write to") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"OUTPUT_DIR={out!r} is not writable; choose a folder you can write to")
    if args.machine_rank == 0:  # (on the other machines, process 0 of the run may hold it already)
        check_output_dir_free(out)  # another run's: refused at once (the run takes the lock itself, in main)
    if is_lazy(args):
        # (a LazyConfig takes DATALOADER.CHECK_ANNOTATIONS as +train.check_annotations=warn)
        annotations = DataSettings(check_annotations=str(cfg.train.get("check_annotations", "error"))).check_annotations
        check_datasets_exist(lazy_dataset_names(cfg, args.eval_only), annotations=annotations)
    else:
        if not args.eval_only:
            check_batch_split(cfg, args.num_gpus * args.num_machines)
        settings = DataSettings.from_cfg(cfg)
        train = [] if args.eval_only else list(cfg.DATASETS.TRAIN)
        check_datasets_exist(list(cfg.DATASETS.TEST) + train, images=settings.check_images,
                             skip_bad=train if settings.bad_images == "skip" else (),
                             annotations=settings.check_annotations)
    check_weights_exist(cfg, resume=args.resume)


def main_lazy(cfg, args):
    if args.eval_only:
        model = build_lazy_model(cfg)
        checkpointer = SafeCheckpointer(model, save_dir=cfg.train.output_dir, weights_key="train.init_checkpoint")
        checkpointer.require_all_parameters = not args.allow_partial_weights
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)  # --resume: the folder's last checkpoint
        return lazy_test(cfg, model)
    return lazy_train(cfg, resume=args.resume)


def run(cfg, args):
    default_setup(cfg, args)  # logging, config.yaml (or .py) in the output folder, seeds
    if is_lazy(args):
        return main_lazy(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.require_all_parameters = not args.allow_partial_weights
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(args):
    stop_on_signals()  # during a training step: after the step
    cfg = None
    try:
        with exit_on_user_error(PROG):  # in each worker process, for what only loading finds (refused weights)
            register_shapes_dataset()
            cfg = setup(args)
            # one run per output folder, before anything is written there: process 0 holds the lock, every process
            # learns whether it could
            with hold_output_dir(output_dir(cfg, args), purpose="evaluation" if args.eval_only else "training"):
                return run(cfg, args)
    except Stopped as stop:
        if comm.get_rank() == 0:
            where = last_checkpoint_note(output_dir(cfg, args)) if cfg is not None else "before training started"
            print(f"{PROG}: stopped by {stop}; {where}", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.prog = PROG
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="alias of --config-file")
    parser.add_argument("--allow-unsafe-yaml", action="store_true",
                        help="read configs with YAML tags that construct Python objects (only for files you trust)")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="with --eval-only: evaluate even if the weights leave some trainable parameters of the model "
                             "at their initial values (refused by default)")
    return parser


if __name__ == "__main__":
    parser = argument_parser()
    args = parser.parse_args()
    if not args.config_file:
        parser.error("give a config: --config configs/mask_rcnn_gn.yaml")
    if args.num_gpus < 1:
        parser.error(f"--num-gpus {args.num_gpus}: give the number of processes per machine, 1 or more (one per GPU; "
                     "on CPU, processes)")
    flags = [opt for opt in args.opts if opt in parser._option_string_actions]
    if flags:
        parser.error(f"{flags[0]} comes after the config's KEY VALUE pairs, where it would be read as one; put the flags "
                     f"first: train_net.py --config FILE {flags[0]} KEY VALUE ...")
    print("Command Line Args:", args)
    with exit_on_user_error(PROG):  # and a worker's exit with status 2: its message is printed
        check_environment()
        register_shapes_dataset()  # generate the embedded dataset once, before worker processes start
        check_inputs(setup(args), args)  # a user error ends here, once, before any worker starts
        if args.num_gpus * args.num_machines > 1:
            for sig in STOP_SIGNALS:
                signal.signal(sig, _forward)  # the workers stop cleanly and say where; this process waits
        try:
            launch(
                main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
        except Exception as exc:
            code = getattr(exc, "exit_code", None)  # a worker stopped by a signal: it said where the checkpoint is
            if code in [128 + sig for sig in STOP_SIGNALS]:
                raise SystemExit(code) from None
            raise
