#!/usr/bin/env python
"""What GN over each image's own region costs (MODEL.GN.IGNORE_PADDING, issue 35): forward +
backward of gn_det's GN + ReLU (the fused layer) on the dense-map layer shapes, without regions
and with them, side by side in one run, medians and their ratio. On CUDA the op's own path runs
(the Triton kernels, tuning off, so both sides run the kernels); on CPU the PyTorch path (with
regions: gn_det's masked operations; without: ATen's GroupNorm kernels under the op).

The regions: image 0 fills 70% of the padded height and width, image 1 all of it (a landscape
and a portrait image share about that much), so the masked kernels skip work and still cover
every tile kind.

    python tools/benchmark_padding.py            # on a GPU: the Mask R-CNN shapes, bf16 and fp32
    python tools/benchmark_padding.py --quick    # CPU-sized shapes, few repetitions
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import gn_det
from bench_utils import command_line, result_stem, write_result_files  # (beside this script)
from gn_det.diagnostics.bench.layer_shapes import CPU_SHAPES, MASK_RCNN_SHAPES
from gn_det.policy.timing import DeviceTimer

DENSE = ("stem", "res", "FPN")  # the layers that ignore padding (never the ROI heads)


def machine_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3", or "CPU x86_64 x2" (the other benchmarks' names)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} x{os.cpu_count()}"


def regions(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    sizes = [[max(1, int(h * 0.7)), max(1, int(w * 0.7))]] + [[h, w]] * (n - 1)
    return torch.tensor(sizes, dtype=torch.int32, device=device)


def time_layer(shape, dtype, memory_format, device, masked: bool, warmup: int, reps: int) -> float:
    layer = gn_det.GroupNorm(32, shape[1], activation="relu").to(device)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn_like(x)
    valid = regions(shape[0], shape[2], shape[3], device) if masked else None
    timer = DeviceTimer(device)

    def step():
        y = gn_det.group_norm(x, 32, layer.weight, layer.bias, activation="relu", valid=valid)
        y.backward(dy)

    for _ in range(warmup):
        step()
    return statistics.median(timer(step) for _ in range(reps))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized shapes, few repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: bfloat16,float32 on CUDA, "
                                                       "float32 on CPU)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    gn_det.set_autotune(False)  # both sides on the op's own path
    shapes = {k: v for k, v in (MASK_RCNN_SHAPES if cuda and not args.quick else CPU_SHAPES).items()
              if k.startswith(DENSE)}
    if args.quick:
        shapes = dict(list(shapes.items())[:2])
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("bfloat16,float32" if cuda else "float32")).split(",")]
    reps = args.reps or (5 if args.quick else 30 if cuda else 10)
    warmup = 2 if args.quick else 5
    rows, lines = [], []
    started = time.time()
    for name, shape in shapes.items():
        for dtype in dtypes:
            for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
                plain = time_layer(shape, dtype, fmt, device, False, warmup, reps)
                masked = time_layer(shape, dtype, fmt, device, True, warmup, reps)
                rows.append({"layer": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                             "format": fmt_name, "plain_ms": plain * 1e3, "masked_ms": masked * 1e3,
                             "ratio": masked / plain})
                lines.append(f"| {name} {tuple(shape)} | {rows[-1]['dtype']} | {fmt_name} | {plain * 1e3:.3f} | "
                             f"{masked * 1e3:.3f} | {masked / plain:.2f}x |")
                print(lines[-1], flush=True)
    machine = machine_name(device)
    ratios = [r["ratio"] for r in rows]
    meta = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "command": command_line("tools/benchmark_padding.py", sys.argv[1:] if argv is None else argv),
            "reps": reps, "warmup": warmup, "threads": torch.get_num_threads(), "seconds": time.time() - started,
            "median_ratio": statistics.median(ratios)}
    path = "the op's own path: the Triton kernels" if cuda else "the PyTorch path (CPU)"
    text = "\n".join([
        f"# GN over image regions (IGNORE_PADDING): {machine}", "",
        f"{meta['date']}, torch {torch.__version__}, {path}, {meta['threads']} CPU thread(s); "
        f"forward + backward of GN + ReLU, median of {reps} after "
        f"{warmup} warm-up; regions: image 0 70% x 70% of the padded map, the others whole. Command: "
        f"`{meta['command']}`.", "",
        "| layer | dtype | format | without regions ms | with regions ms | ratio |", "|---|---|---|---|---|---|",
        *lines, "", f"Median ratio: {meta['median_ratio']:.2f}x.", ""])
    stem = result_stem(args.out_dir, "padding", machine, "quick" if args.quick else "")
    print(write_result_files(stem, meta, rows, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
