#!/usr/bin/env python
"""The GN paper's detection claims at small scale, with several seeds per row: the demo Mask
R-CNN (configs/demo/mask_rcnn_gn_shapes.yaml: R18-FPN, from scratch, embedded shapes dataset)
trained with the same norm in backbone, FPN, box and mask heads:

  FastGN@1, @2, @4     gn_det's GN (the demo's 16 groups) at 1, 2 and 4 images per batch
  FastGNWS@1, @2       GN + Weight Standardization (MODEL.GN.WEIGHT_STANDARDIZATION mmcv)
  BN@1, @2             detectron2's "BN" (batch statistics of the 1-2 images)
  FrozenBN@2           detectron2's FrozenBN with identity statistics and no pretraining: no
                       normalization, no affine and no conv biases (detectron2 drops them where a
                       norm is set); not the paper's frozen BN, which is ImageNet-pretrained
  G1@2, G8@2, G32@2    the group sweep at 2 images: G = 1 (layer norm), 8, 32 (16 is FastGN@2)
  CPG1@2, CPG16@2      ... and by channels per group: 1 (instance norm), 16

Controls (CONTROLS; not in the default rows, name them with --rows):
  BN@4                 BN at 4 images, so that BN's change with the batch size is measured
  FastGN@1-steps4      GN at 1 image for GN@4's 500 iterations (equal steps, 1/4 of the epochs)
  FastGN@4-halflr      GN at 4 images at half the linearly scaled learning rate (0.01)
  NoNormBias@2         no norm at all (NORM ""): the FPN and heads then build their convolutions
                       with biases; detectron2's ResNet builds its own without biases whatever the
                       norm (bias=False in its code), so the backbone has none (as recorded)
  NoNormBiasAll@2      NoNormBias@2 with biases in the ResNet's convolutions too: gn_det's builder
                       option MODEL.RESNETS.CONV_BIAS (RESNET_CONV_BIAS: its overrides)
  FastGN@4-nopad       GN at 4 images with MODEL.GN.IGNORE_PADDING (each image's statistics over its
                       own region, anchors in the padding excluded): GN@4's deficit: the padding?
  FastGN@1-nopad, @2   the same at 1 and 2 images (a single image is still padded to the size
                       divisibility): does the padding change GN at every batch size?

Pretrained (the paper's Table 4/5 setting; table "pretrained", not in the default rows): the ResNet
pretrained on the embedded 10-class shapes images (tools/pretrain_backbone.py, PRETRAIN_FLAGS, the
run's seed; once per norm and seed under <work-dir>/pretrained/, shared by the rows), then loaded by
MODEL.WEIGHTS; the FPN and heads start from scratch, everything trains (FREEZE_AT 0, the demo's):
  FrozenBN@2-pre       pretrained with BN, then FrozenBN with its statistics kept; FPN and heads
                       without norm (their convolutions with biases): the paper's BN* baseline
  FrozenBN@2-pre-gnheads  the same ResNet, GN in FPN and heads (the paper's "+GN heads")
  FastGN@2-pre         pretrained with GN; GN in ResNet, FPN and heads (the paper's GN)

The same number of epochs everywhere: iterations scale as 1/batch, the learning rate linearly
with the batch. Each run is a real tools/train_net.py run (SEED set per run) evaluated by
COCOEvaluator on gn_det_shapes_val (60 images: box_AP, mask_AP), then its final weights by a
train_net --eval-only run on gn_det_shapes_val300 (300 images; OUTPUT_DIR <run>/val300), whose
AP each get a standard error over the validation images (gn_det.train.ap_bootstrap: 200
resamples of the images, seed 0) in the record's "val300" field (--no-val300: not). Runs that
finished earlier get it with --resume or --val300-only (which trains nothing).
Writes <name>.{json,md,png} (--name, default detection_study): every run, and per
row the mean, sample std and range of box and mask AP over the seeds, in tables (norms by batch
size; the group sweep; the controls; the 300-image AP and its SE beside them where runs have
it), the differences the claims rest on judged by tools/batch_size_study.py's NOISE_RULE (on the
300-image AP too, in columns of their own), and a plot. Finished runs are kept under --work-dir and
reused with --resume, so a long study can be stopped and continued; a run stopped part-way
continues (exactly) from its last checkpoint, written every fifth of the run. Each run's record
holds its seed, iterations, learning rate, warm-up, validation set and size, padding setting,
threads and commit.

    python tools/detection_norm_study.py --seeds 7,8 --resume   # every row, 2 seeds
    python tools/detection_norm_study.py --rows BN@4,FastGN@1-steps4,FastGN@4-halflr,NoNormBias@2 --seeds 7,8 \
        --name detection_controls --resume
    python tools/detection_norm_study.py --quick                # 1% of the iterations, for tests
    python tools/detection_norm_study.py --rows BN@4,NoNormBias@2 --seeds 7,8 --work-dir DIR --val300-only \
        --name detection_controls_val300               # finished runs in DIR (model_final.pth) on val300
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

from batch_size_study import NOISE_RULE, git_state, noise_compare  # (tools/, the script's directory: one rule for every study)
from gn_det.train.ap_bootstrap import results_with_se
from gn_det.train.data.datasets import SHAPES_VAL300, shapes_root
from gn_det.train.data.shapes import ensure_shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:  # gn_det's layout after the move of its training modules; the older one
    from gn_det.train.engine import final_ap
except ImportError:  # pragma: no cover
    from gn_det.engine import final_ap

CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")
REFERENCE = {"ims": 4, "lr": 0.02, "iters": 500, "steps": (380, 460)}  # the demo config's schedule
DEMO_GROUPS = 16  # the demo config's MODEL.GN.NUM_GROUPS: FastGN@2 is the sweep's G = 16 point


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the study: a norm, its settings and the images per batch."""

    name: str  # what --rows takes, e.g. "FastGN@2"
    label: str
    norm: str  # the norm name in every NORM key
    ims: int
    opts: Tuple[str, ...] = ()  # further config overrides (KEY VALUE ...)
    table: str = "norms"  # "norms" (by batch size), "groups" (the sweep at 2 images) or "controls"
    groups: str = ""  # the sweep's setting, e.g. "G = 8"
    iters_ims: int = 0  # train for the iterations (and schedule) of this many images per batch; 0: row.ims
    lr_scale: float = 1.0  # times the learning rate linear in the batch
    head_norm: Optional[str] = None  # the FPN's and heads' norm where it differs from the ResNet's (``norm``)
    pretrain: str = ""  # the norm the ResNet is pretrained with (tools/pretrain_backbone.py, seeded as the run); "": none


def _gn(name: str, ims: int, label: str = "gn_det GN", opts: Tuple[str, ...] = (), table: str = "norms",
        groups: str = "", **kw) -> Row:
    return Row(name, label, "FastGN", ims, opts, table, groups, **kw)


ROWS: List[Row] = [
    _gn("FastGN@1", 1), _gn("FastGN@2", 2), _gn("FastGN@4", 4),
    _gn("FastGNWS@1", 1, "gn_det GN + WS (mmcv)", ("MODEL.GN.WEIGHT_STANDARDIZATION", "mmcv")),
    _gn("FastGNWS@2", 2, "gn_det GN + WS (mmcv)", ("MODEL.GN.WEIGHT_STANDARDIZATION", "mmcv")),
    Row("BN@1", 'detectron2 "BN" (batch statistics)', "BN", 1),
    Row("BN@2", 'detectron2 "BN" (batch statistics)', "BN", 2),
    Row("FrozenBN@2", "no normalization, no affine, no bias (FrozenBN, identity statistics)", "FrozenBN", 2),
    _gn("G1@2", 2, "GN, G = 1 (layer norm)", ("MODEL.GN.NUM_GROUPS", "1"), "groups", "G = 1"),
    _gn("G8@2", 2, "GN, G = 8", ("MODEL.GN.NUM_GROUPS", "8"), "groups", "G = 8"),
    _gn("G32@2", 2, "GN, G = 32", ("MODEL.GN.NUM_GROUPS", "32"), "groups", "G = 32"),
    _gn("CPG1@2", 2, "GN, 1 channel per group (instance norm)",
        ("MODEL.GN.NUM_GROUPS", "0", "MODEL.GN.CHANNELS_PER_GROUP", "1"), "groups", "C/G = 1"),
    _gn("CPG16@2", 2, "GN, 16 channels per group",
        ("MODEL.GN.NUM_GROUPS", "0", "MODEL.GN.CHANNELS_PER_GROUP", "16"), "groups", "C/G = 16"),
]
# The controls that separate the causes (issue 36): not in the default rows.
# detectron2's ResNet has bias=False in every conv whatever the norm; gn_det's builder option gives
# them biases (only without a norm, and with gn_det's builder name: other configs are refused).
RESNET_CONV_BIAS = ("MODEL.RESNETS.CONV_BIAS", "True", "MODEL.BACKBONE.NAME", "build_fastgn_resnet_fpn_backbone")
CONTROLS: List[Row] = [
    Row("BN@4", 'detectron2 "BN" (batch statistics)', "BN", 4),
    _gn("FastGN@1-steps4", 1, "gn_det GN, GN@4's iterations (1/4 of the epochs)", table="controls", iters_ims=4),
    _gn("FastGN@4-halflr", 4, "gn_det GN, half the linear-scaled lr", table="controls", lr_scale=0.5),
    Row("NoNormBias@2", "no normalization; conv biases in FPN and heads, none in the ResNet", "", 2),
    Row("NoNormBiasAll@2", "no normalization; conv biases everywhere (FPN, heads, ResNet)", "", 2, RESNET_CONV_BIAS),
    *(_gn(f"FastGN@{ims}-nopad", ims, "gn_det GN, padding excluded (IGNORE_PADDING)",
          ("MODEL.GN.IGNORE_PADDING", "True"), table="controls") for ims in (4, 1, 2)),
    # The paper's Table 4/5 setting: backbones pretrained on the embedded classification set.
    Row("FrozenBN@2-pre", "ResNet pretrained with BN, frozen (statistics kept); FPN and heads without norm",
        "FrozenBN", 2, table="pretrained", head_norm="", pretrain="BN"),
    Row("FrozenBN@2-pre-gnheads", "ResNet pretrained with BN, frozen (statistics kept); GN in FPN and heads",
        "FrozenBN", 2, table="pretrained", head_norm="FastGN", pretrain="BN"),
    _gn("FastGN@2-pre", 2, "ResNet pretrained with GN; GN in ResNet, FPN and heads", table="pretrained",
        pretrain="FastGN"),
]
ALL_ROWS: List[Row] = ROWS + CONTROLS
ROWS_BY_NAME = {row.name: row for row in ALL_ROWS}
# The differences the claims rest on: (a, b, what a - b says)
COMPARISONS = [
    ("FastGN@2", "BN@2", "GN vs BN at 2 images"), ("FastGN@1", "BN@1", "GN vs BN at 1 image"),
    ("BN@2", "BN@4", "BN: 2 vs 4 images"), ("BN@1", "BN@2", "BN: 1 vs 2 images"),
    ("FastGN@1", "FastGN@4", "GN: 1 vs 4 images, same epochs"), ("FastGN@2", "FastGN@4", "GN: 2 vs 4 images, same epochs"),
    ("FastGN@1", "FastGN@2", "GN: 1 vs 2 images, same epochs"),
    ("FastGN@1-steps4", "FastGN@4", "GN: 1 vs 4 images, equal steps"),
    ("FastGN@4-halflr", "FastGN@4", "GN@4: half vs linear-scaled lr"),
    ("FastGNWS@1", "FastGN@1", "WS added to GN, 1 image"), ("FastGNWS@2", "FastGN@2", "WS added to GN, 2 images"),
    ("FrozenBN@2", "BN@2", "no norm (no bias) vs BN, 2 images"),
    ("NoNormBias@2", "FrozenBN@2", "no norm: with vs without FPN/head biases"),
    ("NoNormBiasAll@2", "NoNormBias@2", "no norm: ResNet biases added to FPN/head biases"),
    ("NoNormBiasAll@2", "FrozenBN@2", "no norm: with vs without all conv biases"),
    ("NoNormBiasAll@2", "BN@2", "no norm (all biases) vs BN, 2 images"),
    ("FastGN@4-nopad", "FastGN@4", "GN@4: padding excluded vs included"),
    ("FastGN@2-nopad", "FastGN@2", "GN@2: padding excluded vs included"),
    ("FastGN@1-nopad", "FastGN@1", "GN@1: padding excluded vs included"),
    ("FastGN@1-nopad", "FastGN@4-nopad", "GN, padding excluded: 1 vs 4 images, same epochs"),
    ("FastGN@2-pre", "FrozenBN@2-pre", "pretrained: GN vs frozen BN (paper Table 4/5)"),
    ("FrozenBN@2-pre-gnheads", "FrozenBN@2-pre", "pretrained frozen BN: GN in FPN/heads added"),
    ("FastGN@2-pre", "FrozenBN@2-pre-gnheads", "pretrained, GN heads: GN vs frozen BN ResNet"),
    ("FastGN@2-pre", "FastGN@2", "GN: pretrained vs from scratch"),
    ("G32@2", "FastGN@2", "G = 32 vs 16"), ("G8@2", "FastGN@2", "G = 8 vs 16"), ("G1@2", "G32@2", "G = 1 vs 32"),
    ("CPG1@2", "G32@2", "instance norm vs G = 32"), ("CPG16@2", "G32@2", "16 channels per group vs G = 32"),
]
VAL_DATASET = "gn_det_shapes_val"
VAL300_DATASET = SHAPES_VAL300  # the larger split: each run's final weights evaluated there too
VAL300_DIR = "val300"  # its evaluation's OUTPUT_DIR, inside the run's
PADDING = "included in GN's statistics (each image's groups cover the batch's padding)"
PADDING_EXCLUDED = "excluded (MODEL.GN.IGNORE_PADDING: each image's statistics over its own region)"
QUICK_ROWS = ("FastGN@2", "BN@1")
CHECKPOINTS_PER_RUN = 5
# Pretraining (rows with ``pretrain``): tools/pretrain_backbone.py with these flags, once per norm
# and seed, into <work-dir>/pretrained/<norm>_seed<seed> (shared by the rows that use it).
PRETRAIN_FLAGS = ("--epochs", "8", "--train-images", "4000", "--val-images", "1000", "--image-size", "64")
PRETRAIN_FLAGS_QUICK = ("--epochs", "1", "--train-images", "64", "--val-images", "32", "--image-size", "64")
PRETRAINED_WEIGHTS = "backbone.pth"


def pretrained_dir(out_dir: str, row: Row, seed: int) -> str:
    """Where the pretraining of ``row``'s ResNet for ``seed`` is: beside the rows' folders in
    the work dir (``out_dir`` is <work-dir>/<row>/seed<k>)."""
    quick = os.path.basename(os.path.dirname(out_dir)).endswith("_quick")
    return os.path.join(os.path.dirname(os.path.dirname(out_dir)), "pretrained",
                        f"{row.pretrain}_seed{seed}" + ("_quick" if quick else ""))


def ensure_pretrained(row: Row, seed: int, out_dir: str, quick: bool, threads: int = 0) -> dict:
    """The record (tools/pretrain_backbone.py's pretrain.json) of the pretrained ResNet that
    ``row``'s run for ``seed`` starts from, pretrained now if it is not there yet (a real
    process, resumable), or ``{"error": ...}``."""
    folder = pretrained_dir(out_dir, row, seed)
    command = [sys.executable, os.path.join(ROOT, "tools", "pretrain_backbone.py"), "--config", CONFIG,
               "--out-dir", folder, "--seed", str(seed), "--resume", *(PRETRAIN_FLAGS_QUICK if quick else PRETRAIN_FLAGS),
               *(["--threads", str(threads)] if threads else []), "MODEL.RESNETS.NORM", row.pretrain]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=_env(threads))
    if proc.returncode != 0:
        return {"error": f"pretraining failed: {_last_error(proc)}"}
    with open(os.path.join(folder, "pretrain.json")) as f:
        record = json.load(f)
    return {k: record[k] for k in ("norm", "settings", "val_error", "seconds", "weights", "commit", "dirty", "tool_blob",
                                   "note") if k in record}


def config_overrides(row: Row, seed: int, out_dir: str, scale_iters: float = 1.0) -> Tuple[List[str], int]:
    """tools/train_net.py's ``KEY VALUE`` overrides for one run of ``row`` and its iterations:
    the demo's epochs at ``row.ims`` images (times ``scale_iters``), lr linear in the batch."""
    factor = REFERENCE["ims"] / (row.iters_ims or row.ims)
    iters = max(2, int(REFERENCE["iters"] * factor * scale_iters))
    steps = tuple(int(s * factor * scale_iters) for s in REFERENCE["steps"])
    norms = [row.norm] + [row.norm if row.head_norm is None else row.head_norm] * (len(NORM_KEYS) - 1)
    opts = [item for key, norm in zip(NORM_KEYS, norms) for item in (key, norm)] + list(row.opts)
    if row.pretrain:
        opts += ["MODEL.WEIGHTS", os.path.join(pretrained_dir(out_dir, row, seed), PRETRAINED_WEIGHTS)]
    lr = REFERENCE["lr"] * row.ims / REFERENCE["ims"] * row.lr_scale
    opts += [
        "SOLVER.IMS_PER_BATCH", str(row.ims), "SOLVER.BASE_LR", str(lr),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps if scale_iters == 1 else "()"),
        "SOLVER.WARMUP_ITERS", str(min(int(100 * factor), iters)),
        # A checkpoint every fifth of the run: a killed study loses at most that much of one run
        # (train_net's resume is exact, so a resumed run ends where an uninterrupted one would).
        "SOLVER.CHECKPOINT_PERIOD", str(max(1, iters // CHECKPOINTS_PER_RUN)),
        "SEED", str(seed), "OUTPUT_DIR", out_dir,
    ]
    return opts, iters


def run(row: Row, seed: int, out_dir: str, scale_iters: float, extra: Sequence[str], resume: bool,
        threads: int = 0, val300: bool = True) -> dict:
    """One train_net run of ``row`` with ``seed`` (or, with ``resume``, its record from an
    earlier finished run in ``out_dir``); ``threads``: torch's CPU threads (0: its default).
    With ``val300``, a finished run's record gets its "val300" field (``add_val300``) where it
    has none yet, a reused one's too."""
    record_path = os.path.join(out_dir, "study_run.json")
    if resume and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        return add_val300(record, row, seed, out_dir, extra, threads) if val300 else record
    command, iters = train_command(row, seed, out_dir, scale_iters, extra, resume)
    opts = dict(zip(*[iter(config_overrides(row, seed, out_dir, scale_iters)[0])] * 2))
    env = _env(threads)
    pretrained = ensure_pretrained(row, seed, out_dir, scale_iters < 1, threads) if row.pretrain else None
    start = time.time()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env) \
        if not (pretrained or {}).get("error") else None
    record = {"row": row.name, "norm": row.label, "norm_name": row.norm, "images_per_batch": row.ims,
              "settings": " ".join(row.opts), "seed": seed, "iterations": iters, "seconds": time.time() - start,
              "lr": float(opts["SOLVER.BASE_LR"]), "warmup_iters": int(opts["SOLVER.WARMUP_ITERS"]),
              "lr_steps": opts["SOLVER.STEPS"], "val_dataset": VAL_DATASET, "val_images": _val_images(out_dir),
              "padding": PADDING_EXCLUDED if "MODEL.GN.IGNORE_PADDING" in row.opts else PADDING,
              "threads": threads or None, **git_state()}
    if pretrained is not None:
        record["pretrained"] = pretrained  # (its own seconds; not in the run's)
    if proc is None or proc.returncode != 0:
        record["error"] = pretrained["error"] if proc is None else _last_error(proc)
        return record
    record.update(final_ap(out_dir))
    _write_record(record_path, record)  # the training's result is kept before val300 is evaluated
    for name in os.listdir(out_dir):  # the record holds what the study needs; keep the final weights only
        if name.endswith(".pth") and name != "model_final.pth":
            os.remove(os.path.join(out_dir, name))
    return add_val300(record, row, seed, out_dir, extra, threads) if val300 else record


def _env(threads: int) -> dict:
    return dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))


def _last_error(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else f"exit {proc.returncode}"


def _write_record(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)  # a killed study leaves the old record or the new one, never half of one


def add_val300(record: dict, row: Row, seed: int, out_dir: str, extra: Sequence[str], threads: int = 0) -> dict:
    """A finished run's ``record`` with its "val300" field (``evaluate_val300``), written to its
    study_run.json too; a failed run, or one whose record has the field already (without
    "error"), is returned as it is. Returns the record."""
    if "error" in record or ("val300" in record and "error" not in record["val300"]):
        return record
    record["val300"] = evaluate_val300(row, seed, out_dir, extra, threads)
    _write_record(os.path.join(out_dir, "study_run.json"), record)
    print(f"{row.name} seed {seed}: val300 {json.dumps(record['val300'])}", flush=True)
    return record


def val300_command(row: Row, seed: int, out_dir: str, extra: Sequence[str]) -> List[str]:
    """The tools/train_net.py --eval-only command that evaluates the run's final weights
    (``out_dir``/model_final.pth) on VAL300_DATASET: the run's own overrides (the same model),
    OUTPUT_DIR ``out_dir``/val300."""
    opts, _ = config_overrides(row, seed, os.path.join(out_dir, VAL300_DIR))
    return [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", CONFIG, "--eval-only", *opts,
            "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"), "DATASETS.TEST", f"('{VAL300_DATASET}',)",
            *extra]


def val300_results(out_dir: str) -> str:
    """Where the val300 evaluation of the run in ``out_dir`` writes its detections."""
    return os.path.join(out_dir, VAL300_DIR, "inference", VAL300_DATASET, "coco_instances_results.json")


def val300_annotations() -> str:
    """VAL300_DATASET's COCO annotations, as train_net (run in ROOT) finds them (generated if
    not there yet)."""
    return ensure_shapes_dataset(os.path.join(ROOT, shapes_root()))["val300"][0]


def evaluate_val300(row: Row, seed: int, out_dir: str, extra: Sequence[str], threads: int = 0) -> dict:
    """The run's final weights evaluated on VAL300_DATASET (``val300_command``; detections
    written after the weights are reused), box and mask AP each with its bootstrap standard
    error over the images (``gn_det.train.ap_bootstrap.results_with_se``): ``{"dataset",
    "images", "box_AP", "mask_AP", "box_AP_se", "mask_AP_se", "bootstrap", "seconds"}``, or
    ``{"dataset", "error"}``."""
    weights = os.path.join(out_dir, "model_final.pth")
    if not os.path.isfile(weights):
        return {"dataset": VAL300_DATASET, "error": f"no final weights {weights} to evaluate"}
    results = val300_results(out_dir)
    start = time.time()
    if not (os.path.isfile(results) and os.path.getmtime(results) >= os.path.getmtime(weights)):
        proc = subprocess.run(val300_command(row, seed, out_dir, extra), cwd=ROOT, capture_output=True, text=True,
                              env=_env(threads))
        if proc.returncode != 0:
            return {"dataset": VAL300_DATASET, "error": _last_error(proc)}
    return {"dataset": VAL300_DATASET, **results_with_se(val300_annotations(), results),
            "seconds": time.time() - start}


def _val_images(out_dir: str) -> Optional[int]:
    """The validation images evaluated: from the COCO json COCOEvaluator writes, else (it writes
    none for a dataset registered with its json file) the embedded split's annotations."""
    for folder, _, files in os.walk(out_dir):
        for name in files:
            if name == f"{VAL_DATASET}_coco_format.json":
                with open(os.path.join(folder, name)) as f:
                    return len(json.load(f)["images"])
    with open(ensure_shapes_dataset(os.path.join(ROOT, shapes_root()))["val"][0]) as f:
        return len(json.load(f)["images"])


def train_command(row: Row, seed: int, out_dir: str, scale_iters: float, extra: Sequence[str],
                  resume: bool) -> Tuple[List[str], int]:
    """The tools/train_net.py command of one run, and its iterations. With ``resume``, a run that
    was stopped part-way (``last_checkpoint`` in ``out_dir``, no record yet) continues from its
    last checkpoint instead of starting over."""
    opts, iters = config_overrides(row, seed, out_dir, scale_iters)
    again = ["--resume"] if resume and os.path.isfile(os.path.join(out_dir, "last_checkpoint")) else []
    return [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", CONFIG, *again,
            *opts, *extra], iters


def summarize(runs: Sequence[dict]) -> List[dict]:
    """Per row (in ROWS' order): seeds run, and box/mask AP mean, sample std (NaN for one
    seed), min and max over the runs that finished; failed runs are counted apart. Where runs
    have their "val300" field: "val300", the same over those runs' 300-image AP, with
    "box_AP_se"/"mask_AP_se" the mean of their bootstrap standard errors."""
    summary = []
    for row in ALL_ROWS:
        mine = [r for r in runs if r["row"] == row.name]
        if not mine:
            continue
        done = [r for r in mine if "error" not in r]
        entry = {"row": row.name, "norm": row.label, "images_per_batch": row.ims, "table": row.table,
                 "groups": row.groups, "iterations": mine[0]["iterations"], "seeds": [r["seed"] for r in done],
                 "failed": [r["seed"] for r in mine if "error" in r]}
        for metric in ("box_AP", "mask_AP"):
            entry[metric] = _stats([r[metric] for r in done])
        on300 = [r for r in done if "error" not in r.get("val300", {"error": "not evaluated"})]
        if on300:
            entry["val300"] = {"dataset": on300[0]["val300"]["dataset"], "images": on300[0]["val300"]["images"],
                               "bootstrap": on300[0]["val300"]["bootstrap"], "seeds": [r["seed"] for r in on300]}
            for metric in ("box_AP", "mask_AP"):
                entry["val300"][metric] = _stats([r["val300"][metric] for r in on300])
                ses = [r["val300"][f"{metric}_se"] for r in on300 if not math.isnan(r["val300"][f"{metric}_se"])]
                entry["val300"][f"{metric}_se"] = statistics.fmean(ses) if ses else math.nan
        summary.append(entry)
    return summary


def _stats(values: Sequence[float]) -> dict:
    """values (NaN left out), mean, sample std (NaN for one), min, max and n."""
    values = [v for v in values if not math.isnan(v)]
    return {"values": values, "mean": statistics.fmean(values) if values else math.nan,
            "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "min": min(values, default=math.nan), "max": max(values, default=math.nan), "n": len(values)}


def _cell(stat: dict) -> str:
    if not stat["n"]:
        return "n/a"
    if stat["n"] == 1:
        return f"{stat['mean']:.1f} (1 seed)"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f} ({stat['min']:.1f}–{stat['max']:.1f})"


def _cell300(entry: dict, metric: str) -> str:
    """A 300-image cell: as ``_cell``, and the bootstrap SE of one run's AP (the seeds' mean)."""
    if "val300" not in entry or not entry["val300"][metric]["n"]:
        return "n/a"
    stat, se = entry["val300"][metric], entry["val300"][f"{metric}_se"]
    if stat["n"] == 1:
        return f"{stat['mean']:.1f} ± {se:.1f} SE (1 seed)"
    return f"{_cell(stat)}; SE {se:.1f}"


def _sweep(summary: Sequence[dict]) -> List[dict]:
    """The group sweep's rows by group count: the demo's own 16 groups (FastGN@2) among them."""
    sweep = [e for e in summary if e["table"] == "groups"]
    demo = [e for e in summary if e["row"] == "FastGN@2"]
    at = next((i for i, e in enumerate(sweep) if e["row"] == "G32@2"), len(sweep))
    return sweep[:at] + demo + sweep[at:] if sweep else []


def markdown(summary: Sequence[dict], meta: dict) -> str:
    """The study's tables: norms by images per batch, and the group sweep at 2 images; with
    300-image AP (``summarize``'s "val300") where any row has it."""
    lines = [f"# Detection norm study ({meta['machine']}, {meta['date']})", "",
             f"Command: `{meta['command']}`; demo Mask R-CNN R18-FPN from scratch on gn_det_shapes, the same epochs "
             f"for every row; the runs' training and evaluation took {meta['run_seconds'] / 3600:.1f} h in all "
             f"({meta['run_seconds_min'] / 60:.0f}–{meta['run_seconds_max'] / 60:.0f} min a run; runs reused by "
             "--resume count with their own time). AP: mean ± sample std over the seeds (min–max).", ""]
    on300 = [e["val300"] for e in summary if "val300" in e]
    header = ["| row | norm | images per batch | iterations | seeds | box AP | mask AP |",
              "|---|---|---|---|---|---|---|"]
    if on300:
        boot = on300[0]["bootstrap"]
        lines[-2] += (f" box AP, mask AP: on {VAL_DATASET} (60 images). 300 images: the same runs' final weights on "
                      f"{on300[0]['dataset']} ({on300[0]['images']} images), mean ± sample std over the seeds that "
                      "have it (min–max); SE: the standard error of one run's AP over the validation images, "
                      f"bootstrapped ({boot['resamples']} resamples of the images, seed {boot['seed']}; the mean over "
                      "the seeds). The seeds' spread does not hold that error (every run sees the same images), and "
                      "a difference between two rows has less of it than each AP (the same images: paired).")
        header = ["| row | norm | images per batch | iterations | seeds | box AP | mask AP | box AP, 300 images "
                  "| mask AP, 300 images |", "|---|---|---|---|---|---|---|---|---|"]
    if meta.get("missing"):
        lines += [f"**PARTIAL**: {len(meta['missing'])} of the command's runs are not here yet (not finished): "
                  f"{', '.join(meta['missing'])}.", ""]
    for table, title in (("norms", "Norms by images per batch"), ("groups", "Group sweep at 2 images per batch"),
                         ("controls", "Controls: equal steps, half the learning rate"),
                         ("pretrained", "Pretrained ResNets (the paper's Table 4/5 setting)")):
        entries = _sweep(summary) if table == "groups" else [e for e in summary if e["table"] == table]
        if not entries:
            continue
        lines += [f"## {title}", ""] + header
        for e in entries:
            label = (e["groups"] or f"G = {DEMO_GROUPS} (the demo's)") if table == "groups" else e["norm"]
            seeds = ", ".join(map(str, e["seeds"])) + (f"; failed: {e['failed']}" if e["failed"] else "")
            cells = [_cell(e["box_AP"]), _cell(e["mask_AP"])]
            if on300:
                cells += [_cell300(e, "box_AP"), _cell300(e, "mask_AP")]
            lines.append(f"| {e['row']} | {label} | {e['images_per_batch']} | {e['iterations']} | {seeds} "
                         f"| {' | '.join(cells)} |")
        lines.append("")
    lines += comparisons_markdown(summary)
    return "\n".join(lines)


def comparisons(summary: Sequence[dict]) -> List[dict]:
    """COMPARISONS whose two rows are in ``summary``, each judged by NOISE_RULE on box and mask
    AP; where both rows have 300-image AP, "val300": the same rule on those."""
    by = {e["row"]: e for e in summary}
    out = []
    for a, b, what in COMPARISONS:
        if a in by and b in by:
            c = {"a": a, "b": b, "what": what,
                 **{m: noise_compare(by[a][m]["values"], by[b][m]["values"]) for m in ("box_AP", "mask_AP")}}
            if "val300" in by[a] and "val300" in by[b]:
                c["val300"] = {m: noise_compare(by[a]["val300"][m]["values"], by[b]["val300"][m]["values"])
                               for m in ("box_AP", "mask_AP")}
            out.append(c)
    return out


def _verdict(c: dict) -> str:
    if c["verdict"] == "too few seeds":
        return f"{c['diff']:+.1f} (too few seeds)"
    words = {"a higher": "a higher", "b higher": "b higher"}.get(c["verdict"], "inside the noise")
    return f"{c['diff']:+.1f} ± {c['two_se']:.1f}: {words}"


def comparisons_markdown(summary: Sequence[dict]) -> List[str]:
    rows = comparisons(summary)
    if not rows:
        return []
    lines = ["## Differences", "", f"a - b: difference of the means ± 2 standard errors over seeds. Rule: {NOISE_RULE}.",
             "", "| a | b | what | box AP, a - b | mask AP, a - b |", "|---|---|---|---|---|"]
    on300 = any("val300" in c for c in rows)
    if on300:
        lines[2] += (" The 300-image columns judge the same runs' AP on the 300-image split by the same rule (over "
                     "the seeds evaluated there); the other two, the 60-image AP.")
        lines[4:6] = ["| a | b | what | box AP, a - b | mask AP, a - b | box AP, 300 images, a - b "
                      "| mask AP, 300 images, a - b |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        cells = [_verdict(c["box_AP"]), _verdict(c["mask_AP"])]
        if on300:
            cells += [_verdict(c["val300"][m]) if "val300" in c else "n/a" for m in ("box_AP", "mask_AP")]
        lines.append(f"| {c['a']} | {c['b']} | {c['what']} | {' | '.join(cells)} |")
    return lines + [""]


def plot(summary: Sequence[dict], runs: Sequence[dict], path: str) -> Optional[str]:
    """Box AP against images per batch (GN, GN+WS, BN; frozen BN), and the group sweep, each
    seed a dot and the mean with its std as an error bar. Returns the path, or None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for norm, marker in (("FastGN", "o"), ("FastGNWS", "s"), ("BN", "^"), ("FrozenBN", "x"), ("NoNormBias", "+"),
                         ("NoNormBiasAll", "P")):
        entries = [e for e in summary if e["table"] == "norms" and e["row"].split("@")[0] == norm]
        if not entries:
            continue
        xs = [e["images_per_batch"] for e in entries]
        means = [e["box_AP"]["mean"] for e in entries]
        stds = [0 if math.isnan(e["box_AP"]["std"]) else e["box_AP"]["std"] for e in entries]
        left.errorbar(xs, means, yerr=stds, marker=marker, capsize=3, label=entries[0]["norm"])
        dots = [(r["images_per_batch"], r["box_AP"]) for r in runs if r["row"] in {e["row"] for e in entries}
                and "error" not in r]
        left.scatter([d[0] for d in dots], [d[1] for d in dots], s=8, color="gray", zorder=3)
    left.set(xlabel="images per batch", ylabel="box AP", title="Norms by batch size", xticks=[1, 2, 4])
    left.legend(fontsize=7)
    sweep = _sweep(summary)
    if sweep:
        labels = [e["groups"] or f"G = {DEMO_GROUPS}" for e in sweep]
        means = [e["box_AP"]["mean"] for e in sweep]
        stds = [0 if math.isnan(e["box_AP"]["std"]) else e["box_AP"]["std"] for e in sweep]
        right.bar(range(len(sweep)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.7)
        for i, e in enumerate(sweep):
            values = [r["box_AP"] for r in runs if r["row"] == e["row"] and "error" not in r]
            right.scatter([i] * len(values), values, s=8, color="black", zorder=3)
        right.set_xticks(range(len(sweep)))
        right.set_xticklabels(labels, fontsize=8)
    right.set(ylabel="box AP", title="Group sweep, 2 images per batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_rows(text: str) -> List[Row]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS_BY_NAME]
    if unknown:
        raise SystemExit(f"detection_norm_study: error: unknown rows {', '.join(unknown)}; rows: "
                         f"{', '.join(ROWS_BY_NAME)}")
    return [ROWS_BY_NAME[n] for n in names]


def canonical_command(args, rows: Sequence[Row], seeds: Sequence[int]) -> str:
    """The command with its rows, seeds, files and threads spelled out, and --resume: run again,
    it reuses the finished runs and makes the same tables."""
    parts = ["python tools/detection_norm_study.py"] + (["--quick"] if args.quick else [])
    parts += ["--rows", ",".join(r.name for r in rows), "--seeds", ",".join(map(str, seeds))]
    if args.name:
        parts += ["--name", args.name]
    default_work = os.path.join(ROOT, "output", "detection_norm_study")
    for flag, value, default in (("--work-dir", args.work_dir, default_work),
                                 ("--out-dir", args.out_dir, os.path.join(ROOT, "docs", "reproduction"))):
        if os.path.abspath(value) != default:
            parts += [flag, os.path.relpath(value, ROOT) if os.path.abspath(value).startswith(ROOT) else value]
    if args.no_val300:
        parts += ["--no-val300"]
    return " ".join(parts + ["--threads", str(args.threads), "--resume"])


def section_of(command: str) -> Tuple[bool, Tuple[str, ...], Tuple[int, ...]]:
    """What a recorded command's tables hold: (--quick, rows, seeds), the defaults where absent."""
    words = command.split()
    quick = "--quick" in words
    rows = words[words.index("--rows") + 1] if "--rows" in words else ",".join(QUICK_ROWS if quick else
                                                                                  [r.name for r in ROWS])
    seeds = words[words.index("--seeds") + 1] if "--seeds" in words else ("7" if quick else "7,8")
    return quick, tuple(rows.split(",")), tuple(int(x) for x in seeds.split(","))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1%% of the iterations, rows FastGN@2,BN@1, one seed")
    parser.add_argument("--rows", default="", help=f"run these rows (default: the 13 of ROWS): {','.join(ROWS_BY_NAME)}")
    parser.add_argument("--seeds", default="", help="comma-separated SEED values, each row runs with each "
                                                    "(default 7,8; --quick: 7)")
    parser.add_argument("--resume", action="store_true", help="reuse runs that finished in --work-dir")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "output", "detection_norm_study"))
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "reproduction"))
    parser.add_argument("--name", default="", help="the tables' files: <out-dir>/<name>.{md,json,png} "
                        "(default detection_study, _quick with --quick): give each section its own")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads in each run (OMP_NUM_THREADS; "
                        "0: torch's default, every core)")
    parser.add_argument("--from-json", default="", metavar="JSON",
                        help="run nothing: make the tables from the runs an earlier study recorded in JSON (its rows "
                             "and seeds that --rows/--seeds name)")
    parser.add_argument("--val300-only", action="store_true",
                        help=f"train nothing: evaluate the runs that finished in --work-dir (their model_final.pth) on "
                             f"{VAL300_DATASET} where their record has no 'val300' yet, then make the tables from the "
                             "finished runs (a run not finished is left out, with a note)")
    parser.add_argument("--no-val300", action="store_true",
                        help=f"evaluate the runs on {VAL_DATASET} only (records without 'val300', as before)")
    args = parser.parse_args(argv)
    exclusive = [flag for flag, on in (("--val300-only", args.val300_only), ("--no-val300", args.no_val300),
                                       ("--from-json", bool(args.from_json))) if on]
    if len(exclusive) > 1:
        parser.error(f"{' and '.join(exclusive)} exclude each other")
    rows = parse_rows(args.rows) if args.rows else (parse_rows(",".join(QUICK_ROWS)) if args.quick else ROWS)
    seeds = [int(s) for s in (args.seeds or ("7" if args.quick else "7,8")).split(",")]
    scale = 0.01 if args.quick else 1.0
    extra = ["DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TEST", "128"] if args.quick else []
    stem = os.path.join(args.out_dir, args.name or ("detection_study" + ("_quick" if args.quick else "")))
    if os.path.isfile(stem + ".json"):  # another section's tables are not overwritten
        with open(stem + ".json") as f:
            earlier = json.load(f)["meta"].get("command", "")
        if section_of(earlier) != section_of(canonical_command(args, rows, seeds)):
            raise SystemExit(f"detection_norm_study: {stem}.json holds the tables of `{earlier}`: give this "
                             "command its own --name")
    start = time.time()
    runs = []
    if args.from_json:
        with open(args.from_json) as f:
            recorded = json.load(f)["rows"]
        names = {r.name for r in rows}
        runs = [r for r in recorded if r["row"] in names and r["seed"] in seeds]
    for row in ([] if args.from_json else rows):
        for seed in seeds:
            out = os.path.join(args.work_dir, row.name.replace("@", "_") + ("_quick" if args.quick else ""), f"seed{seed}")
            if args.val300_only and not os.path.isfile(os.path.join(out, "study_run.json")):
                print(f"detection_norm_study: {row.name} seed {seed}: no finished run in {out} (--val300-only trains "
                      "nothing); left out", file=sys.stderr, flush=True)
                continue
            record = run(row, seed, out, scale, extra, args.resume or args.val300_only, args.threads,
                         val300=not args.no_val300)
            runs.append(record)
            print(json.dumps(record), flush=True)
    if not runs:
        raise SystemExit("detection_norm_study: no runs to make tables of (--val300-only: none finished in "
                         f"{args.work_dir}; --from-json: none of these rows and seeds)")
    command = canonical_command(args, rows, seeds)
    if args.from_json:
        command = command.replace(" --resume", "") + " --from-json " + os.path.relpath(os.path.abspath(args.from_json), ROOT)
    meta = {"machine": f"CPU {platform.machine()} x{os.cpu_count()}", "date": time.strftime("%Y-%m-%d"),
            "command": command, "total_seconds": time.time() - start, "seeds": seeds,
            "run_seconds": sum(r["seconds"] for r in runs),
            "run_seconds_min": min(r["seconds"] for r in runs), "run_seconds_max": max(r["seconds"] for r in runs),
            "rule": NOISE_RULE, "threads": args.threads or None,
            "missing": [f"{row.name} seed {seed}" for row in rows for seed in seeds
                        if not any(r["row"] == row.name and r["seed"] == seed for r in runs)], **git_state()}
    summary = summarize(runs)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.name or ("detection_study" + ("_quick" if args.quick else "")))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": runs, "summary": summary}, f, indent=1)
    text = markdown(summary, meta)
    figure = plot(summary, runs, stem + ".png")
    if figure:
        text += f"\nPlot: `{os.path.basename(figure)}`.\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
