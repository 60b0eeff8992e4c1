#!/usr/bin/env python
"""Activation memory of a Mask R-CNN R50-FPN training step with each norm (a benchmark, not a test).

For frozen BN, detectron2's GN, gn_det's GN, and gn_det's GN with output recomputation
(MODEL.GN.RECOMPUTE_OUTPUT), built as tools/benchmark_train.py builds them, on one fixed
synthetic batch, at each size:
  - bytes saved for backward in one training step (unique storages, by saved-tensor hooks;
    device-free), parameters apart, and where the activation bytes go (module that made a
    tensor -> module that saved it);
  - the RSS a training forward leaves held (RSS after the forward minus before; glibc is
    told to return large blocks to the OS);
  - on a GPU, the peak memory of a step (torch.cuda.max_memory_allocated);
  - the step time of gn_det's GN with and without recomputation, the two stepped in turn
    (medians side by side, same run).
Writes benchmarks/results/memory_<machine>.md and .json.

    python tools/benchmark_memory.py                  # 512x768 and 800x1333, 2 images (CPU: an hour or more on 2 cores)
    python tools/benchmark_memory.py --sizes 800x1333 --iters 0 --held-repeats 0 --suffix 800x1333  # saved bytes only
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from typing import Dict, List

import torch
from bench_utils import command_line, result_stem, write_result_files  # tools/ is the script's directory
from benchmark_train import MODELS, calibrate_frozen_bn
from detectron2.utils.events import EventStorage

import gn_det
from gn_det.diagnostics.bench import memory as mb
from gn_det.train.data import synthetic_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECOMPUTE = "gn_det GN + recompute"
NAMES = ["frozen-BN", "d2 GN", "gn_det GN", RECOMPUTE]
TOP_LABELS = 8


def build(name: str, device: str, batch) -> torch.nn.Module:
    config, opts = MODELS["gn_det GN" if name == RECOMPUTE else name]
    opts = list(opts) + (["MODEL.GN.RECOMPUTE_OUTPUT", True] if name == RECOMPUTE else [])
    cfg = gn_det.get_config(config, opts + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    torch.manual_seed(0)
    model = gn_det.build_model(cfg)
    calibrate_frozen_bn(model, batch)
    model.train()
    return model


def measure_size(height: int, width: int, args) -> List[Dict]:
    batch = synthetic_batch(args.images, height, width, boxes_per_image=args.boxes, num_classes=80)
    if args.device == "cuda":
        for item in batch:
            item["image"] = item["image"].cuda()
    rows = []
    timed = {}
    for name in args.models.split(","):
        model = build(name, args.device, batch)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        with EventStorage(0):
            saved = mb.saved_bytes(model, batch)  # also warms the allocator and oneDNN's caches for what follows
            held = mb.held_after_forward(model, batch, repeats=args.held_repeats) if args.held_repeats else None
            peak = mb.cuda_peak(model, batch) if args.device == "cuda" else None
        row = {"size": f"{height}x{width}", "model": name, "activation_mib": saved["activation_bytes"] / 2**20,
               "parameter_mib": saved["parameter_bytes"] / 2**20, "held_after_forward_mib": held,
               "cuda_peak": peak,
               "by_label_mib": {k: v / 2**20 for k, v in list(saved["by_label"].items())[:TOP_LABELS]}}
        print(json.dumps({k: v for k, v in row.items() if k != "by_label_mib"}), flush=True)
        rows.append(row)
        if name.startswith("gn_det") and args.iters:
            timed[name] = (model, optimizer)
        else:
            del model, optimizer
    # Step times with and without recomputation, stepped in turn so both see the same machine.
    times: Dict[str, List[float]] = {name: [] for name in timed}
    with EventStorage(0):
        for _ in range(args.iters):
            for name, (model, optimizer) in timed.items():
                times[name] += mb.step_times(model, optimizer, batch, warmup=0, iters=1)
    for row in rows:
        if row["model"] in times:
            row["step_s"] = statistics.median(times[row["model"]])
            row["step_times_s"] = times[row["model"]]
    return rows


def write_results(stem: str, meta: Dict, rows: List[Dict]) -> str:
    lines = [f"# Training-step memory: {meta['machine']}", "",
             f"{meta['date']}, torch {meta['torch']}; {meta['batch']}. Command: `{meta['command']}`.", "",
             "Saved for backward: the unique storages autograd keeps for backward in one training step "
             "(saved-tensor hooks), parameters apart. Held after forward: RSS after a training forward minus "
             f"before (median of {meta['held_repeats']}; glibc returns blocks from 1 MiB to the OS). "
             "Ratios are to frozen BN at the same size.", "",
             "| size | model | saved activations (MiB) | / frozen BN | saved parameters (MiB) | held after forward (MiB) "
             "| / frozen BN | saved in all, / frozen BN | CUDA peak (MiB) | step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        base = next((r for r in rows if r["size"] == size and r["model"] == "frozen-BN"), None)
        for r in (r for r in rows if r["size"] == size):
            ratio = f"{r['activation_mib'] / base['activation_mib']:.2f}" if base else ""
            measured_held = r["held_after_forward_mib"] is not None and base and base["held_after_forward_mib"]
            held_ratio = f"{r['held_after_forward_mib'] / base['held_after_forward_mib']:.2f}" if measured_held else ""
            held = f"{r['held_after_forward_mib']:.0f}" if r["held_after_forward_mib"] is not None else "not measured"
            total = (f"{(r['activation_mib'] + r['parameter_mib']) / (base['activation_mib'] + base['parameter_mib']):.2f}"
                     if base else "")
            peak = f"{r['cuda_peak']['peak_mib']:.0f}" if r.get("cuda_peak") else "n/a (CPU)"
            step = f"{r['step_s']:.2f}" if "step_s" in r else ""
            lines.append(f"| {size} | {r['model']} | {r['activation_mib']:.0f} | {ratio} | {r['parameter_mib']:.0f} | "
                         f"{held} | {held_ratio} | {total} | {peak} | {step} |")
    timed = [r for r in rows if "step_s" in r]
    if timed:
        lines += ["", f"Step time (forward, backward, SGD step): median of {meta['iters']} steps each, the two "
                  "models stepped in turn."]
        for size in dict.fromkeys(r["size"] for r in timed):
            plain = next((r for r in timed if r["size"] == size and r["model"] == "gn_det GN"), None)
            recomputed = next((r for r in timed if r["size"] == size and r["model"] == RECOMPUTE), None)
            if plain and recomputed:
                lines.append(f"- {size}: {plain['step_s']:.2f} s without recomputation, {recomputed['step_s']:.2f} s "
                             f"with ({recomputed['step_s'] / plain['step_s'] - 1:+.1%}).")
    lines += ["", "## Where the saved activation bytes go", "",
              f"Module that made the tensor -> module that saved it, top {TOP_LABELS} per model (MiB).", ""]
    for r in rows:
        items = "; ".join(f"{k}: {v:.0f}" for k, v in r["by_label_mib"].items())
        lines.append(f"- {r['size']} {r['model']}: {items}")
    return write_result_files(stem, meta, rows, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--sizes", default="512x768,800x1333", help="HxW,...")
    parser.add_argument("--models", default=",".join(NAMES), help="a subset of: " + ", ".join(NAMES))
    parser.add_argument("--boxes", type=int, default=16, help="ground-truth boxes (and masks) per image")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per model (with and without recompute); 0: not timed")
    parser.add_argument("--held-repeats", type=int, default=3, help="0: RSS held after forward not measured")
    parser.add_argument("--suffix", default="", help="added to the result files' names (e.g. one run per size)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    mb.return_freed_memory_to_os()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {platform.machine()} x{os.cpu_count()}"
    meta = {"machine": machine, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "batch": f"{args.images} images, {args.boxes} boxes+masks each, fp32", "iters": args.iters,
            "held_repeats": args.held_repeats, "command": command_line("tools/benchmark_memory.py", sys.argv[1:])}
    stem = result_stem(args.out_dir, "memory", machine, args.suffix)
    rows: List[Dict] = []
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.split("x"))
        rows += measure_size(height, width, args)
        text = write_results(stem, meta, rows)  # after every size: a run cut short keeps what it measured
    print(text)


if __name__ == "__main__":
    main()
