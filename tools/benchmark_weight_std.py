#!/usr/bin/env python
"""What Weight Standardization costs in a GN Mask R-CNN R50-FPN (a benchmark, not a test).

Builds configs/mask_rcnn_gn.yaml (random weights) without WS, with mmcv's WS and with timm's
(MODEL.GN.WEIGHT_STANDARDIZATION), and measures side by side in one run:
  standardize         standardizing every WS convolution's weight once (the whole model's: what
                      each forward adds without the cache), without autograd, and forward+backward
                      with it (what each training step adds: the trainable convs);
  backbone inference  the R50-FPN backbone's median forward (eval, no_grad): WS with the cache
                      (standardized weights reused until a weight changes), WS with the cache
                      emptied before each call, no WS;
  backbone training   forward + backward + SGD step of the backbone (sum of its outputs as the
                      loss; WS is in autograd; the frozen stem and res2 use the cache).
The heads' cost is left out (random weights make the ROI heads' work depend on the proposals);
their WS convs are 8 of the model's.
Writes a markdown table and JSON under benchmarks/results/ (file named after the machine).

    python tools/benchmark_weight_std.py                         # 2 images of 512x768, CPU
    python tools/benchmark_weight_std.py --quick                 # small images, few repetitions
    python tools/benchmark_weight_std.py --device cuda --height 800 --width 1333
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from bench_utils import command_line, result_stem, write_result_files  # tools/ is the script's directory

import gn_det
from gn_det.layers.weight_std import standardize_weight
from gn_det.modeling.weight_std import WSConv2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml")
VARIANTS = ("", "mmcv", "timm")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], reps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build(variant: str, device: str) -> torch.nn.Module:
    cfg = gn_det.get_config(CONFIG, ["MODEL.DEVICE", device, "MODEL.GN.WEIGHT_STANDARDIZATION", variant,
                                     "MODEL.ROI_HEADS.NUM_CLASSES", 3])
    torch.manual_seed(0)
    return gn_det.build_model(cfg)


def measure(variant: str, images: torch.Tensor, reps: int, device: str) -> Dict:
    """One variant's row: its WS convs, the standardization's cost, inference and a training step."""
    model = build(variant, device)
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    row: Dict = {"weight_standardization": variant or "off", "ws_convs": len(convs),
                 "ws_params": sum(m.weight.numel() for m in convs)}
    if convs:
        with torch.no_grad():
            row["standardize_no_grad_ms"] = median_ms(
                lambda: [standardize_weight(m.weight, m.weight_standardization) for m in convs],
                reps * 4, 2, device)

        def standardize_with_grad():
            total = sum(standardize_weight(m.weight, m.weight_standardization).sum() for m in convs
                        if m.weight.requires_grad)
            total.backward()

        row["standardize_fwd_bwd_ms"] = median_ms(standardize_with_grad, reps * 4, 2, device)
        model.zero_grad(set_to_none=True)
    backbone = model.backbone.eval()
    with torch.no_grad():
        row["inference_ms"] = median_ms(lambda: backbone(images), reps, 1, device)
        if convs:
            def uncached():
                for m in convs:
                    m.__dict__.pop("_ws_cache", None)
                backbone(images)

            row["inference_uncached_ms"] = median_ms(uncached, reps, 1, device)
    backbone.train()
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=1e-4)

    def step():
        sum(out.float().mean() for out in backbone(images).values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row["train_step_ms"] = median_ms(step, reps, 1, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="256x384 images, 2 repetitions")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    if args.quick:
        args.height, args.width, args.reps = 256, 384, 2
    device = args.device
    machine = (torch.cuda.get_device_name() if device.startswith("cuda")
               else f"CPU {platform.machine()} x{os.cpu_count()}")
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, args.height, args.width, device=device) * 50
    rows: List[Dict] = []
    for variant in VARIANTS:
        row = measure(variant, images, args.reps, device)
        rows.append(row)
        print(row, flush=True)

    base = rows[0]
    meta = {"machine": machine, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "device": device, "images": args.images, "size": [args.height, args.width], "reps": args.reps,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "command": command_line("tools/benchmark_weight_std.py", sys.argv[1:])}
    lines = [f"# Weight Standardization cost: {machine}", "",
             f"{meta['date']}, torch {meta['torch']}, {device}, Mask R-CNN R50-FPN (configs/mask_rcnn_gn.yaml; times "
             "of its backbone, standardization of all its WS convs), "
             f"{args.images} images of {args.height}x{args.width}, median of {args.reps} (standardize: of "
             f"{4 * args.reps}); load average at the end {meta['load_average']}. Command: `{meta['command']}`.", "",
             "| WS | convs | weights | standardize, no grad ms | standardize fwd+bwd ms | backbone inference ms "
             "| inference, cache emptied ms | backbone training step ms | step vs no WS |",
             "|---|---|---|---|---|---|---|---|---|"]
    def cell(r: Dict, key: str) -> str:
        return f"{r[key]:.1f}" if key in r else "-"

    for r in rows:

        lines.append(f"| {r['weight_standardization']} | {r['ws_convs']} | {r['ws_params'] / 1e6:.1f} M "
                     f"| {cell(r, 'standardize_no_grad_ms')} | {cell(r, 'standardize_fwd_bwd_ms')} | {cell(r, 'inference_ms')} "
                     f"| {cell(r, 'inference_uncached_ms')} | {cell(r, 'train_step_ms')} "
                     f"| {r['train_step_ms'] / base['train_step_ms']:.3f}x |")
    stem = result_stem(args.out_dir, "weight_std", machine, "quick" if args.quick else "")
    print(write_result_files(stem, meta, rows, "\n".join(lines)))


if __name__ == "__main__":
    main()
