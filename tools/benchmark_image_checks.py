#!/usr/bin/env python
"""What gn_det's pre-training image check costs at COCO's scale (a benchmark, not a test).

Writes COUNT distinct JPEG files (random noise, WIDTHxHEIGHT, so each is different and
compresses as little as a photo's detail) under ROOT, then times
``gn_det.train.data.checks.check_images`` (``DATALOADER.CHECK_IMAGES headers``, its default worker
count) over all of them:
  cold  the files' pages evicted from the page cache first (``posix_fadvise(DONTNEED)`` per
        file after a sync: only these files, not the machine's whole cache; on a virtual
        machine the host may still cache the disk);
  warm  the same check run again at once (the files in the page cache).
The header check reads the header and the last KiB of each file, so the files' size matters
little to it; their size is in the results. Deletes the files afterwards unless --keep.
Writes a markdown table and JSON under benchmarks/results/ (named after the machine).

    python tools/benchmark_image_checks.py                       # 118,287 files (COCO train2017)
    python tools/benchmark_image_checks.py --count 2000          # a quick look
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time

import numpy as np
from PIL import Image

from bench_utils import command_line, result_stem, write_result_files  # tools/ is the script's directory

from gn_det.train.data.checks import check_images

COCO_TRAIN2017_IMAGES = 118287


def write_images(root: str, count: int, width: int, height: int) -> list:
    """``count`` distinct JPEGs under ``root``; their COCO ``images`` records."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(os.path.join(root, name),
                                                                                       quality=90)
        records.append({"file_name": name, "width": width, "height": height})
    return records


def evict(root: str, records: list) -> None:
    """Drop these files' pages from the page cache (written back first)."""
    os.sync()
    for record in records:
        fd = os.open(os.path.join(root, record["file_name"]), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_check(root: str, records: list) -> float:
    start = time.perf_counter()
    problems = check_images(records, root)
    seconds = time.perf_counter() - start
    assert problems == [], problems[:5]  # every file is good: the check ran through all of them
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=COCO_TRAIN2017_IMAGES)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--root", default=os.path.join("output", "image_check_benchmark"),
                        help="where the JPEGs are written (emptied first; deleted afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()

    shutil.rmtree(args.root, ignore_errors=True)
    try:
        start = time.perf_counter()
        records = write_images(args.root, args.count, args.width, args.height)
        written = time.perf_counter() - start
        sizes = [os.path.getsize(os.path.join(args.root, r["file_name"])) for r in records]
        evict(args.root, records)
        cold = timed_check(args.root, records)
        warm = timed_check(args.root, records)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)

    workers = check_images.__defaults__[-1]
    machine = f"CPU {platform.machine()} x{os.cpu_count()}"
    meta = {"machine": machine, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "cores": os.cpu_count(), "workers": workers, "count": args.count,
            "image": f"{args.width}x{args.height} JPEG (random noise, quality 90)",
            "bytes_total": sum(sizes), "bytes_mean": sum(sizes) / len(sizes), "write_s": written,
            "command": command_line("tools/benchmark_image_checks.py", sys.argv[1:])}
    rows = [{"cache": name, "seconds": s, "us_per_image": s / args.count * 1e6, "images_per_s": args.count / s}
            for name, s in (("cold", cold), ("warm", warm))]
    lines = [f"# Pre-training image check (DATALOADER.CHECK_IMAGES headers): {machine}", "",
             f"{meta['date']}, {args.count:,} files of {meta['image']}, {meta['bytes_mean'] / 1024:.1f} KiB each on "
             f"average ({meta['bytes_total'] / 2**20:.0f} MiB in all), {workers} threads (check_images' default), "
             f"{os.cpu_count()} cores shared with other work. Command: `{meta['command']}`.", "",
             "| page cache | seconds | µs per image | images per second |", "|---|---|---|---|"]
    lines += [f"| {r['cache']} | {r['seconds']:.1f} | {r['us_per_image']:.0f} | {r['images_per_s']:,.0f} |" for r in rows]
    lines += ["", ("cold: these files' pages evicted (posix_fadvise DONTNEED after a sync) before the check; the "
                   "virtual disk's host may still cache them. warm: the same check again at once.")]
    print(write_result_files(result_stem(args.out_dir, "image_checks", machine), meta, rows, "\n".join(lines)))


if __name__ == "__main__":
    main()
