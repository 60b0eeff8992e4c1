#!/usr/bin/env python
"""What gn_det's pre-training annotation check costs at COCO's scale (a benchmark, not a test).

Writes a synthetic COCO instances file the size of train2017's (118,287 images, 860,001
annotations; every annotation a box inside its image and a polygon of 6 to 40 points inside
the box, 1% crowd RLE masks; about COCO's file size) to a temporary file, then times, on one
thread:
  load   ``json.load`` of the file (what the existing category and image checks already pay);
  check  ``gn_det.train.data.checks.annotation_problems`` over the loaded dict
         (``DATALOADER.CHECK_ANNOTATIONS error``/``warn``; ``none`` skips it);
best of --repeat runs each. Deletes the file afterwards unless --keep. Writes a markdown table
and JSON under benchmarks/results/ (named after the machine).

    python tools/benchmark_annotation_checks.py                 # COCO train2017's counts
    python tools/benchmark_annotation_checks.py --images 5000 --annotations 36000   # a quick look
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

from bench_utils import command_line, result_stem, write_result_files  # tools/ is the script's directory

from gn_det.train.data.checks import annotation_problems

COCO_TRAIN2017_IMAGES = 118287
COCO_TRAIN2017_ANNOTATIONS = 860001


def synthetic_coco(images: int, annotations: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sizes = np.array([(640, 480), (480, 640), (640, 427), (500, 375), (640, 512)])
    shape = sizes[rng.integers(0, len(sizes), images)]
    records = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": int(w), "height": int(h),
                "license": 1, "date_captured": "2013-11-14 16:28:13"} for i, (w, h) in enumerate(shape.tolist())]
    image_of = rng.integers(0, images, annotations)
    w_img, h_img = shape[image_of, 0].astype(float), shape[image_of, 1].astype(float)
    bw = np.round(rng.uniform(0.02, 0.6, annotations) * w_img, 2)
    bh = np.round(rng.uniform(0.02, 0.6, annotations) * h_img, 2)
    bx = np.round(rng.uniform(0, 1, annotations) * (w_img - bw), 2)
    by = np.round(rng.uniform(0, 1, annotations) * (h_img - bh), 2)
    points = rng.integers(6, 41, annotations)
    offsets = np.concatenate([[0], np.cumsum(points)])
    unit = rng.uniform(0, 1, (int(offsets[-1]), 2))
    crowd = rng.uniform(0, 1, annotations) < 0.01
    anns = []
    for k in range(annotations):
        x, y, w, h = float(bx[k]), float(by[k]), float(bw[k]), float(bh[k])
        image = records[int(image_of[k])]
        if crowd[k]:
            segmentation = {"size": [image["height"], image["width"]], "counts": "a" * 200}
        else:
            p = unit[offsets[k]:offsets[k + 1]] * (w, h) + (x, y)
            p[0], p[1] = (x, y), (x + w, y + h)  # the polygon spans its box
            segmentation = [np.round(p, 2).ravel().tolist()]
        anns.append({"id": k + 1, "image_id": image["id"], "category_id": int(k % 80) + 1, "iscrowd": int(crowd[k]),
                     "area": round(w * h * 0.6, 2), "bbox": [x, y, w, h], "segmentation": segmentation})
    categories = [{"id": i + 1, "name": f"class{i + 1}", "supercategory": "thing"} for i in range(80)]
    return {"info": {}, "licenses": [], "images": records, "annotations": anns, "categories": categories}


def best(func, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=COCO_TRAIN2017_IMAGES)
    parser.add_argument("--annotations", type=int, default=COCO_TRAIN2017_ANNOTATIONS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the JSON file (its path is printed)")
    parser.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()

    start = time.perf_counter()
    coco = synthetic_coco(args.images, args.annotations)
    fd, path = tempfile.mkstemp(prefix="gn_det_annotations_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(coco, f)
    written = time.perf_counter() - start
    numbers = sum(len(a["segmentation"][0]) for a in coco["annotations"] if isinstance(a["segmentation"], list))
    del coco
    try:
        size = os.path.getsize(path)
        holder = {}

        def load():
            with open(path) as f:
                holder["coco"] = json.load(f)

        load_s = best(load, args.repeat)
        errors, filtered = annotation_problems(holder["coco"])
        assert errors == [] and filtered == [], (errors[:3], filtered[:3])  # every entry good: the check ran through all
        check_s = best(lambda: annotation_problems(holder["coco"]), args.repeat)
    finally:
        if args.keep:
            print("kept", path)
        else:
            os.remove(path)

    machine = f"CPU {platform.machine()} x{os.cpu_count()}"
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta = {"machine": machine, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "cores": os.cpu_count(), "images": args.images, "annotations": args.annotations, "json_bytes": size,
            "polygon_numbers": numbers, "write_s": written, "peak_rss_mib": peak_mib, "repeat": args.repeat,
            "command": command_line("tools/benchmark_annotation_checks.py", sys.argv[1:])}
    rows = [{"step": name, "seconds": s, "us_per_annotation": s / args.annotations * 1e6}
            for name, s in (("json.load (paid already)", load_s), ("annotation_problems (the new check)", check_s))]
    lines = [f"# Pre-training annotation check (DATALOADER.CHECK_ANNOTATIONS error): {machine}", "",
             f"{meta['date']}, a synthetic COCO file of {args.images:,} images and {args.annotations:,} annotations "
             f"({size / 2**20:.0f} MiB of JSON; {numbers:,} polygon coordinates, 1% crowd RLE), one thread, "
             f"{os.cpu_count()} cores shared with other work, best of {args.repeat}. Peak RSS {peak_mib:,.0f} MiB "
             f"(the generator's lists included). Command: `{meta['command']}`.", "",
             "| step | seconds | µs per annotation |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']:.2f} | {r['us_per_annotation']:.2f} |" for r in rows]
    print(write_result_files(result_stem(args.out_dir, "annotation_checks", machine), meta, rows, "\n".join(lines)))


if __name__ == "__main__":
    main()
