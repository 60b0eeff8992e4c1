#!/usr/bin/env python
"""Drive gn_det's GN forward+backward at a few Mask R-CNN shapes, for a kernel profiler.

Nothing is timed here: run it under Nsight Compute to read each Triton kernel's duration,
DRAM throughput and active warps (what `tools/gpu_checks.sh ncu` runs):

    ncu --target-processes all --clock-control none --csv --log-file ncu_kernels.csv \
        --kernel-name regex:'^_(group|stats|forward|backward)_' \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__warps_active.avg.pct_of_peak_sustained_active python tools/profile_kernels.py

Each configuration runs twice (the first run compiles the kernels); stderr lists the
configurations in launch order, with the kernel path each one takes.
"""
from __future__ import annotations

import argparse
import sys

import torch

import gn_det
from gn_det.diagnostics.bench.layer_shapes import MASK_RCNN_SHAPES as GPU_SHAPES  # the layer benchmark's shapes

PROFILED = ("stem N=1", "FPN P2", "res4", "box head", "mask head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default=",".join(PROFILED), help="comma-separated names from: " + ", ".join(GPU_SHAPES))
    args = parser.parse_args()
    gn_det.set_autotune(False)  # profile the kernels, not whichever path tuning would pick
    dtype = getattr(torch, args.dtype)
    for name in args.shapes.split(","):
        shape = GPU_SHAPES[name]
        layer = gn_det.GroupNorm(32, shape[1], activation="relu").to(args.device)
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x = torch.randn(shape, device=args.device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
            grad = torch.randn_like(x)
            path = gn_det.policy.dispatch_path(x, 32, "relu")
            for run in (1, 2):
                print(f"{name} {tuple(shape)} {args.dtype} {fmt_name} run {run}: {path}", file=sys.stderr)
                with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    layer(x).backward(grad)
            if args.device == "cuda":
                torch.cuda.synchronize()


if __name__ == "__main__":
    main()
