#!/usr/bin/env python
"""Memory over a long CPU run: trains the demo GN Mask R-CNN (configs/demo/mask_rcnn_gn_shapes.yaml)
on the embedded dataset for --iters iterations and samples the process's resident memory
(VmRSS) every --every iterations. After warm-up (--warmup iterations: the demo trains at
five input sizes, and the allocator and oneDNN caches grow until each shape has been seen) it
reports the growth and the least-squares slope of RSS against iteration. A leak shows as a
steady slope; allocator noise as a few tens of MiB up and down with no trend.

    python tools/memory_check.py                 # 300 iterations (~4 min on 2 CPU cores)
    python tools/memory_check.py --iters 30      # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import time

from detectron2.engine import HookBase

import gn_det
from gn_det.train.data import register_shapes_dataset
from gn_det.train.engine import Trainer
from gn_det.diagnostics.bench.memory import rss_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RssSampler(HookBase):
    def __init__(self, every: int):
        self.every = every
        self.samples = []

    def after_step(self):
        if (self.trainer.iter + 1) % self.every == 0:
            self.samples.append({"iteration": self.trainer.iter + 1, "rss_mib": rss_mib()})


def _slope(xs, ys) -> float:
    """Least-squares slope of ys against xs (NaN for fewer than two points)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=150, help="iterations before growth is counted")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "memory_check"))
    parser.add_argument("--json", default="", help="write the samples here (default: <output>/memory.json)")
    args = parser.parse_args()
    register_shapes_dataset()
    cfg = gn_det.get_config(os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml"), [
        "SOLVER.MAX_ITER", args.iters, "SOLVER.STEPS", "()", "DATASETS.TEST", "()", "OUTPUT_DIR", args.output,
        "SOLVER.CHECKPOINT_PERIOD", 10 * args.iters,
    ])
    trainer = Trainer(cfg)
    sampler = RssSampler(args.every)
    trainer.register_hooks([sampler])
    start = time.time()
    trainer.train()
    after = [s for s in sampler.samples if s["iteration"] >= args.warmup]
    growth = after[-1]["rss_mib"] - after[0]["rss_mib"] if len(after) > 1 else float("nan")
    slope = _slope([s["iteration"] for s in after], [s["rss_mib"] for s in after]) * 100
    result = {
        "iterations": args.iters, "warmup": args.warmup, "seconds": time.time() - start,
        "rss_at_warmup_mib": after[0]["rss_mib"] if after else None, "rss_at_end_mib": after[-1]["rss_mib"] if after else None,
        "growth_after_warmup_mib": growth, "slope_mib_per_100_iters": slope,
        "range_after_warmup_mib": [min(s["rss_mib"] for s in after), max(s["rss_mib"] for s in after)] if after else None,
        "peak_mib": max(s["rss_mib"] for s in sampler.samples),
        "samples": sampler.samples,
        "command": "python tools/memory_check.py" + ("" if args.iters == 300 else f" --iters {args.iters}"),
    }
    path = args.json or os.path.join(args.output, "memory.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"RSS after warm-up (iteration {args.warmup}): {result['rss_at_warmup_mib']:.0f} MiB; at iteration "
          f"{args.iters}: {result['rss_at_end_mib']:.0f} MiB; growth {growth:+.1f} MiB; slope {slope:+.1f} MiB per 100 "
          f"iterations; peak {result['peak_mib']:.0f} MiB "
          f"({result['seconds']:.0f} s). Samples: {path}")


if __name__ == "__main__":
    main()
