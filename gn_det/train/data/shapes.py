"""The embedded dataset: a small COCO-format instance-segmentation dataset of shapes,
generated deterministically on first use as real JSON + JPEG files.

Each image (128-256 px a side) has a textured background and 2-6 shapes of three classes
(circle, rectangle, triangle), in random colours, sizes and rotations, overlapping: a later
shape may hide up to 35% of an earlier one. Annotations are the *visible* region of each
shape, as polygons traced from its visible mask, with COCO's bbox (XYWH) and area.

Splits (``SPLITS``), each from its own seed: ``train`` (300 images), ``val`` (60: what the demo
and the tests evaluate on) and ``val300`` (300: a validation split large enough for the
detection study's AP differences; the same generator, drawn independently of ``val``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

CLASSES = ("circle", "rectangle", "triangle")
# split -> (number of images, seed offset). "val" (60 images) is what the demo and the tests evaluate on;
# "val300" is a larger validation split for the studies, whose AP differences need more images.
SPLITS = {"train": (300, 0), "val": (60, 1), "val300": (300, 2)}
VERSION = 1  # bump when the generator changes: files with another version are regenerated
_MAX_HIDDEN = 0.35  # a new shape may hide at most this fraction of an earlier one
_MIN_VISIBLE_PIXELS = 40


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colour gradient with noise, so that shapes are found by shape, not by a flat backdrop."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xs * math.cos(angle) + ys * math.sin(angle)) / max(height, width)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    image = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    image += rng.normal(0, 12, (height, width, 3))
    return image


def _shape_mask(rng: np.random.Generator, cls: int, height: int, width: int) -> np.ndarray:
    size = rng.uniform(0.15, 0.45) * min(height, width)
    cx = rng.uniform(size / 2, width - size / 2)
    cy = rng.uniform(size / 2, height - size / 2)
    mask = np.zeros((height, width), np.uint8)
    if CLASSES[cls] == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(size / 2)), 1, thickness=-1, lineType=cv2.LINE_8)
        return mask
    angle = rng.uniform(0, math.pi)
    if CLASSES[cls] == "rectangle":
        aspect = rng.uniform(0.5, 1.0)
        half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * [size / 2, size * aspect / 2]
    else:  # an equilateral triangle
        half = np.array([[math.cos(a), math.sin(a)] for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]) * size / 2
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = half @ rot.T + [cx, cy]
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def _polygons(mask: np.ndarray) -> List[List[float]]:
    """The outlines of a binary mask as COCO polygons (each at least 3 points)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) >= 3 and cv2.contourArea(contour) >= 4:
            polygons.append([float(v) + 0.5 for v in contour.reshape(-1)])  # pixel centres
    return polygons


def _image(rng: np.random.Generator) -> Tuple[np.ndarray, List[Dict]]:
    height, width = (int(v) for v in rng.integers(128, 257, size=2))
    image = _background(rng, height, width)
    masks: List[np.ndarray] = []
    classes: List[int] = []
    for _ in range(int(rng.integers(2, 7))):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASSES)))
            mask = _shape_mask(rng, cls, height, width).astype(bool)
            if all((m & mask).sum() <= _MAX_HIDDEN * m.sum() for m in masks):
                break
        else:
            continue
        colour = rng.uniform(0, 255, 3)
        image[mask] = colour + rng.normal(0, 8, (int(mask.sum()), 3))
        masks.append(mask)
        classes.append(cls)
    annotations = []
    covered = np.zeros((height, width), bool)
    for mask, cls in reversed(list(zip(masks, classes))):  # the last drawn is on top
        visible = mask & ~covered
        covered |= mask
        polygons = _polygons(visible)
        if visible.sum() < _MIN_VISIBLE_PIXELS or not polygons:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0 = float(xs.min()), float(ys.min())
        annotations.append({
            "category_id": cls + 1,
            "segmentation": polygons,
            "bbox": [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
            "area": float(visible.sum()),
            "iscrowd": 0,
        })
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def generate_split(root: str, split: str, num_images: int, seed: int) -> str:
    """Write ``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json``; returns
    the JSON path. Deterministic for (num_images, seed)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, anns = _image(rng)
        file_name = f"{image_id:06d}.jpg"
        cv2.imwrite(os.path.join(image_dir, file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for ann in anns:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=image_id))
    coco = {
        "info": {"description": f"gn_det shapes ({split}), generated", "version": str(VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
    }
    json_path = os.path.join(root, "annotations", f"instances_{split}.json")
    tmp_path = json_path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(coco, f)
    os.replace(tmp_path, json_path)  # the JSON appears only once complete
    return json_path


def ensure_shapes_dataset(root: str, seed: int = 0) -> Dict[str, Tuple[str, str]]:
    """Generate under ``root`` each split of ``SPLITS`` that this version and seed has not
    generated there yet. Returns split -> (json path, image folder).

    ``root/VERSION`` says which splits are there (``"1 seed=0 train=300 val=60 val300=300"``); a
    split it lists at this version and seed, whose JSON is there, is kept as it is: a root stamped
    before a split was added (``"1 seed=0 train=300 val=60"``) gets only the new split, and the
    files of the others, which another process may be reading, are not rewritten. Another version
    or seed regenerates every split (each split's images depend only on its own seed)."""
    stamp = os.path.join(root, "VERSION")
    paths = {s: (os.path.join(root, "annotations", f"instances_{s}.json"), os.path.join(root, s)) for s in SPLITS}
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, ".lock")):  # several processes (launch) may ask at once
        have = _stamped_splits(open(stamp).read() if os.path.exists(stamp) else "", seed)
        missing = [s for s, (n, _) in SPLITS.items() if have.get(s) != n or not os.path.exists(paths[s][0])]
        for split in missing:
            num_images, offset = SPLITS[split]
            generate_split(root, split, num_images, seed * 1000 + offset)
        if missing:
            have.update({s: n for s, (n, _) in SPLITS.items()})
            with open(stamp, "w") as f:
                f.write(f"{VERSION} seed={seed} " + " ".join(f"{s}={n}" for s, n in have.items()) + "\n")
    return paths


def _stamped_splits(text: str, seed: int) -> Dict[str, int]:
    """split -> number of images, of the splits a VERSION stamp lists for this version and seed
    (none for another version or seed, or no stamp)."""
    words = text.split()
    if words[:2] != [str(VERSION), f"seed={seed}"]:
        return {}
    splits = {}
    for word in words[2:]:
        split, _, count = word.partition("=")
        if count.isdigit():
            splits[split] = int(count)
    return splits


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
