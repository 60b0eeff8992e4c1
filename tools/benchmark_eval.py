#!/usr/bin/env python
"""Benchmark of COCO evaluation implementations on a COCO-sized synthetic set (a benchmark, not
a test).

Times, side by side in one run on the same set: pycocotools' Python COCOeval (what detectron2's
COCOEvaluator runs when detectron2 has no compiled ops), faster-coco-eval's COCOeval (what
gn_det's FastCOCOEvaluator runs then), and detectron2's C++ COCOeval_opt where detectron2 was
built with its ops. Each run constructs the class on fresh pycocotools COCO objects and runs
evaluate + accumulate + summarize, for bbox and segm. The set (gn_det.diagnostics.bench.cocoeval):
5000 images of COCO's sizes, ~7.3 polygon-mask objects per image over 80 classes, 100
detections per image with RLE masks; generated in memory from a seed. Checks that every
implementation's 12 COCO stats agree with pycocotools' to --tolerance AP points, and writes a
markdown table and JSON under benchmarks/results/, named after the machine.

    python tools/benchmark_eval.py              # the COCO-sized set, 3 repeats (minutes)
    python tools/benchmark_eval.py --quick      # 100 images, 1 repeat (seconds)

Exit status 1 when the stats disagree beyond the tolerance.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import List

from bench_utils import command_line, result_stem

import gn_det
from gn_det.diagnostics.bench.cocoeval import STAT_NAMES, benchmark, synthetic_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def markdown(meta: dict, rows: List[dict], tolerance: float) -> str:
    """The result file's text: the set, the timing method, one table row per (IoU type,
    implementation), and the agreement check."""
    lines = [f"# COCO evaluation benchmark: {meta['machine']}", "",
             f"{meta['date']}, gn_det {meta['gn_det']}. Set: {meta['set']}. Timing: {meta['timing']}. "
             f"Command: `{meta['command']}`.", "",
             "| IoU type | implementation | eval s | speed-up vs pycocotools | loadRes s | AP | AP50 | AP75 "
             "| max abs diff vs pycocotools (points) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['iou_type']} | {r['implementation']} | not run: {r['note']} | | | | | | |")
            continue
        s = r["stats"]
        lines.append(f"| {r['iou_type']} | {r['note']} | {r['seconds']:.2f} | {r['speedup']:.1f}x | "
                     f"{r['load_seconds']:.2f} | {s[0]:.2f} | {s[1]:.2f} | {s[2]:.2f} | {r['max_abs_diff']:.4f} |")
    worst = max((r["max_abs_diff"] for r in rows if "seconds" in r), default=0.0)
    lines += ["", "eval s: constructing the COCOeval class on fresh pycocotools COCO objects, then evaluate + "
              "accumulate + summarize. loadRes s: pycocotools' `COCO.loadRes` of the detections (detectron2 "
              "runs it before any of them; not in eval s).", "",
              f"Agreement: the largest difference of any of the 12 COCO stats ({', '.join(STAT_NAMES)}) from "
              f"pycocotools' is {worst:.4f} points; tolerance {tolerance} points: "
              f"{'agree' if worst <= tolerance else 'DISAGREE'}.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 images, 1 repeat")
    parser.add_argument("--images", type=int, default=None, help="images in the set (default 5000; --quick 100)")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation, median "
                        "reported (default 3; --quick 1)")
    parser.add_argument("--iou-types", default="bbox,segm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest allowed stat difference, AP points")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--suffix", default="", help="appended to the result files' names")
    args = parser.parse_args()
    images = args.images or (100 if args.quick else 5000)
    repeats = args.repeats or (1 if args.quick else 3)
    iou_types = [t for t in args.iou_types.split(",") if t]
    if images < 1 or repeats < 1 or args.dets < 1 or not set(iou_types) <= {"bbox", "segm"} or not iou_types:
        parser.error("--images, --dets and --repeats must be >= 1, --iou-types from bbox,segm")

    start = time.perf_counter()
    dataset, detections = synthetic_coco(images, args.dets, seed=args.seed)
    made = f"{len(dataset['images'])} images, {len(dataset['annotations'])} ground-truth objects, " \
           f"{len(detections)} detections, seed {args.seed}"
    print(f"set: {made} (generated in {time.perf_counter() - start:.1f} s)", flush=True)
    rows = benchmark(dataset, detections, iou_types, repeats, log=lambda line: print(line, flush=True))

    machine = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    meta = {"machine": machine, "gn_det": gn_det.__version__, "date": datetime.date.today().isoformat(),
            "set": made, "repeats": repeats, "tolerance": args.tolerance,
            "timing": f"median of {repeats} runs each (perf_counter), the implementations taking turns"
                      if repeats > 1 else "one run each (perf_counter)",
            "command": command_line("tools/benchmark_eval.py", sys.argv[1:])}
    stem = result_stem(args.out_dir, "eval", machine, args.suffix)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(meta, rows, args.tolerance)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {stem}.md and {stem}.json")
    worst = max((r["max_abs_diff"] for r in rows if "seconds" in r), default=0.0)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
