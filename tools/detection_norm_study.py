#!/usr/bin/env python
"""The GN paper's detection claim at small scale: the demo Mask R-CNN
(configs/demo/mask_rcnn_gn_shapes.yaml, from scratch, embedded shapes dataset) trained with
gn_det's GN, with detectron2's "BN" (batch statistics, which with 1-2 images are computed on
1-2 images), and with frozen BN (no pretraining: a fixed identity affine), at 2 and 1 images
per batch. The same number of epochs everywhere: iterations scale as 1/batch, the learning
rate linearly with the batch. Reports box and mask AP (COCOEvaluator) as a markdown table and
JSON; each run is a real tools/train_net.py run.

    python tools/detection_norm_study.py            # ~30 min on 2 CPU cores
    python tools/detection_norm_study.py --quick    # a few iterations per row, for tests
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from gn_det.engine import final_ap  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")
# (label, norm name, images per batch)
ROWS = [
    ("gn_det GN", "FastGN", 2),
    ("gn_det GN", "FastGN", 1),
    ('detectron2 "BN" (batch statistics)', "BN", 2),
    ('detectron2 "BN" (batch statistics)', "BN", 1),
    ("frozen BN, no pretraining", "FrozenBN", 2),
]
REFERENCE = {"ims": 4, "lr": 0.02, "iters": 500, "steps": (380, 460)}  # the demo config's schedule


def run(label: str, norm: str, ims: int, out_dir: str, scale_iters: float, extra) -> dict:
    factor = REFERENCE["ims"] / ims
    iters = max(2, int(REFERENCE["iters"] * factor * scale_iters))
    steps = tuple(int(s * factor * scale_iters) for s in REFERENCE["steps"])
    opts = [f"{key} {norm}" for key in NORM_KEYS]
    opts += [
        f"SOLVER.IMS_PER_BATCH {ims}", f"SOLVER.BASE_LR {REFERENCE['lr'] * ims / REFERENCE['ims']}",
        f"SOLVER.MAX_ITER {iters}", f"SOLVER.STEPS {steps if scale_iters == 1 else '()'}",
        f"SOLVER.WARMUP_ITERS {min(int(100 * factor), iters)}", f"SOLVER.CHECKPOINT_PERIOD {10 * iters}",
        f"OUTPUT_DIR {out_dir}",
    ]
    args = [a for opt in opts for a in opt.split(" ", 1)] + list(extra)
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", CONFIG, *args],
                          cwd=ROOT, capture_output=True, text=True)
    row = {"norm": label, "norm_name": norm, "images_per_batch": ims, "iterations": iters, "seconds": time.time() - start}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else f"exit {proc.returncode}"
        return row
    row.update(final_ap(out_dir))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", default="", help="run only these rows, e.g. 'FastGN@2,BN@1' (default: all)")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "output", "detection_norm_study"))
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "reproduction"))
    args = parser.parse_args()
    rows_to_run = ROWS[:1] + ROWS[3:4] if args.quick else ROWS
    if args.rows:
        wanted = args.rows.split(",")
        rows_to_run = [r for r in ROWS if f"{r[1]}@{r[2]}" in wanted]
    scale = 0.01 if args.quick else 1.0
    extra = ["DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TEST", "128"] if args.quick else []
    start = time.time()
    rows = []
    for label, norm, ims in rows_to_run:
        out = os.path.join(args.work_dir, f"{norm}_{ims}img")
        row = run(label, norm, ims, out, scale, extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = "python tools/detection_norm_study.py" + (" --quick" if args.quick else "") + (f" --rows {args.rows}" if args.rows else "")
    meta = {"machine": f"CPU {platform.machine()} x{os.cpu_count()}", "date": time.strftime("%Y-%m-%d"),
            "command": command, "total_seconds": time.time() - start}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "detection_study" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Detection norm study ({meta['machine']}, {meta['date']})", "",
             f"Command: `{command}`; demo Mask R-CNN R18-FPN from scratch on gn_det_shapes, the same epochs for every "
             f"row; total run time {meta['total_seconds'] / 60:.0f} min.", "",
             "| norm | images per batch | iterations | box AP | mask AP |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['norm']} | {r['images_per_batch']} | {r['iterations']} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['norm']} | {r['images_per_batch']} | {r['iterations']} | {r['box_AP']:.1f} | {r['mask_AP']:.1f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
