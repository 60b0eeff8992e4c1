#!/usr/bin/env python
"""Pretrain a detection config's ResNet on gn_det's embedded 10-class shapes images and write
weights that MODEL.WEIGHTS loads (gn_det.train.pretrain): the GN paper's pretrained backbones
(Table 4/5) at small scale, nothing downloaded.

    python tools/pretrain_backbone.py --config configs/demo/mask_rcnn_gn_shapes.yaml --out-dir out/pre_bn \\
        --seed 7 MODEL.RESNETS.NORM BN        # then detection with MODEL.RESNETS.NORM FrozenBN
    python tools/pretrain_backbone.py --config configs/demo/mask_rcnn_gn_shapes.yaml --out-dir out/pre_gn \\
        --seed 7 MODEL.RESNETS.NORM FastGN

Writes <out-dir>/backbone.pth, then <out-dir>/pretrain.json (settings, the resolved config's hash,
validation error, seconds, commit and the blobs of this tool and gn_det/train/pretrain.py). With
--resume, an out-dir whose pretrain.json records the same resolved config, overrides and settings
is kept as it is; one that records another pretraining is refused, and so is a finished one
without --resume: a finished pretraining is never overwritten (a run killed before its record was
written is done again). One run at a time per out-dir (train_net's OUTPUT_DIR lock).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import gn_det
from gn_det.errors import exit_on_user_error
from gn_det.modeling import validate_gn_config
from gn_det.train.pretrain import PretrainSettings, pretrain_backbone, pretraining_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROG = "pretrain_backbone"


def parse_args(argv=None):
    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config-file", dest="config", required=True, help="a YAML detection config")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--resume", action="store_true", help="keep a finished run with the same settings")
    for field in dataclasses.fields(PretrainSettings):  # a flag per setting, its type the default's
        default = getattr(defaults, field.name)
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def _blobs(*paths: str) -> dict:
    """Each path's git blob hash (what ran, whatever the commit says)."""
    out = {}
    for path in paths:
        proc = subprocess.run(["git", "-C", ROOT, "hash-object", os.path.join(ROOT, path)], capture_output=True,
                              text=True)
        out[path] = proc.stdout.strip() or None
    return out


def main(argv=None) -> int:
    import torch
    from batch_size_study import git_state  # (beside this script: the studies' commit record)

    from gn_det.train.checkpoint import atomic_write, hold_output_dir

    args = parse_args(argv)
    if len(args.opts) % 2:
        print(f"{PROG}: error: config overrides come in KEY VALUE pairs; got {args.opts}", file=sys.stderr)
        return 2
    try:
        settings = PretrainSettings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(PretrainSettings)})
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    with exit_on_user_error(PROG):  # a config file, key or value that is wrong: named, no traceback
        cfg = gn_det.get_config(args.config, args.opts)
        validate_gn_config(cfg)
    try:
        cfg = pretraining_config(cfg)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    # What the pretraining depends on: the resolved config (the file's contents, not its name), the
    # overrides and the settings. A record that differs in any of them is another pretraining's.
    wanted = {"config": os.path.relpath(os.path.abspath(args.config), ROOT), "opts": args.opts,
              "config_sha256": hashlib.sha256(cfg.dump().encode()).hexdigest(),
              "settings": dataclasses.asdict(settings)}
    record_path = os.path.join(args.out_dir, "pretrain.json")
    weights = os.path.join(args.out_dir, "backbone.pth")
    state = dict(git_state(), tool_blob=_blobs("tools/pretrain_backbone.py", "gn_det/train/pretrain.py"))
    with exit_on_user_error(PROG), hold_output_dir(args.out_dir, "pretraining"):  # one run per folder
        if os.path.isfile(record_path):
            with open(record_path) as f:
                earlier = json.load(f)
            if {k: earlier.get(k) for k in wanted} != wanted:
                print(f"{PROG}: error: {record_path} records another pretraining (config, overrides or settings "
                      "differ); give another --out-dir", file=sys.stderr)
                return 2
            if not args.resume:
                print(f"{PROG}: error: {record_path} records this pretraining, finished: add --resume to keep it, "
                      "or give another --out-dir", file=sys.stderr)
                return 2
            if os.path.isfile(weights):
                print(f"{PROG}: {args.out_dir} holds this pretraining already (--resume): kept")
                return 0
            print(f"{PROG}: {record_path} records this pretraining but its weights {weights} are gone: "
                  "pretraining again", file=sys.stderr)
        if args.threads:
            torch.set_num_threads(args.threads)
        record = pretrain_backbone(cfg, settings, weights)
        record.update(wanted, threads=torch.get_num_threads(), **state)
        atomic_write(record_path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
