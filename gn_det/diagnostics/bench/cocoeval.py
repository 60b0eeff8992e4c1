"""The pieces of ``tools/benchmark_eval.py``: a COCO-sized synthetic ground truth and detection
set, and timing of the COCOeval implementations on it.

The set stands in for COCO val2017 and a Mask R-CNN's output on it: images of COCO's sizes,
about 7.3 ground-truth objects per image over 80 categories, as val2017 has (polygon masks;
small, medium and large in about COCO's proportions; 1% crowd), and exactly ``dets_per_image``
detections per image (compressed-RLE masks and boxes, as detectron2's ``instances_to_coco_json``
writes them): jittered copies of the objects (some with the wrong class, some duplicated) and
background false positives. It is generated in memory from a seed; nothing is read or
downloaded.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata as metadata
import io
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ...train.evaluation import detectron2_cocoeval, faster_cocoeval

__all__ = ["STAT_NAMES", "synthetic_coco", "coco_from_dataset", "prepare_results", "load_results", "time_cocoeval",
           "cocoeval_implementations", "benchmark"]

# COCOeval.stats for bbox/segm, in order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_SIZES = ((640, 480), (640, 427), (480, 640), (640, 426), (500, 375), (640, 360), (427, 640), (375, 500))
# COCO val2017's share of small (< 32^2), medium and large objects, and sqrt-area ranges for each.
_SIZE_CLASSES = ((0.41, 6.0, 32.0), (0.34, 32.0, 96.0), (0.25, 96.0, None))


def _polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, vertices: int,
             width: int, height: int) -> List[float]:
    """A star-shaped polygon around (cx, cy), clipped to the image, as COCO's flat [x1, y1, ...]."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    aspect = np.exp(rng.normal(0, 0.3))
    r = radius * rng.uniform(0.75, 1.25, vertices)
    xs = np.clip(cx + r * np.cos(angles) * aspect, 0, width)
    ys = np.clip(cy + r * np.sin(angles) / aspect, 0, height)
    return np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()


def _jittered(rng: np.random.Generator, poly: List[float], cx: float, cy: float, radius: float,
              width: int, height: int) -> List[float]:
    """A detection's outline of the object ``poly``: shifted and rescaled by some percent of
    its size, with noisy vertices, clipped to the image."""
    xy = np.asarray(poly).reshape(-1, 2)
    scale = np.exp(rng.normal(0, 0.1))
    xy = (xy - (cx, cy)) * scale + (cx, cy) + rng.normal(0, 0.08 * radius, 2) + rng.normal(0, 0.06 * radius, xy.shape)
    xy = np.clip(xy, 0, (width, height))
    return np.round(xy.ravel(), 2).tolist()


def _object_radius(rng: np.random.Generator, width: int, height: int) -> float:
    _, lo, hi = _SIZE_CLASSES[rng.choice(3, p=[s for s, _, _ in _SIZE_CLASSES])]
    hi = hi or 0.8 * min(width, height)
    return rng.uniform(lo, hi) / np.sqrt(np.pi)  # sqrt(area) -> radius of the same-area circle


def synthetic_coco(num_images: int = 5000, dets_per_image: int = 100, gt_per_image: float = 7.3,
                   num_classes: int = 80, seed: int = 0) -> Tuple[dict, List[dict]]:
    """A COCO-format ground truth and detections for it (see the module's docstring).

    Returns ``(dataset, detections)``: ``dataset`` is a COCO instances dict (``images``,
    ``annotations`` with polygon ``segmentation``, mask ``area`` and ``bbox``, ``categories``);
    ``detections`` is a list of ``num_images * dets_per_image`` result dicts (``image_id``,
    ``category_id``, ``score``, ``bbox`` [x, y, w, h], ``segmentation`` as compressed RLE with
    str counts). The same arguments give the same set.
    """
    if num_images < 1 or dets_per_image < 1 or num_classes < 1:
        raise ValueError(f"num_images, dets_per_image and num_classes must be >= 1 (got {num_images}, "
                         f"{dets_per_image}, {num_classes})")
    rng = np.random.default_rng(seed)
    categories = [{"id": k, "name": f"class_{k}", "supercategory": "thing"} for k in range(1, num_classes + 1)]
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = _SIZES[rng.integers(len(_SIZES))]
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        objects = []  # (category, cx, cy, radius)
        gt_polys = []
        for _ in range(max(1, rng.poisson(gt_per_image))):
            obj = (int(rng.integers(1, num_classes + 1)), rng.uniform(0, width), rng.uniform(0, height),
                   _object_radius(rng, width, height))
            objects.append(obj)
            gt_polys.append(_polygon(rng, obj[1], obj[2], obj[3], int(rng.integers(8, 25)), width, height))
        gt_rles = mask_util.frPyObjects(gt_polys, height, width)
        for (category, *_), poly, area, box in zip(objects, gt_polys, mask_util.area(gt_rles), mask_util.toBbox(gt_rles)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": [poly], "area": float(area), "bbox": [float(v) for v in box],
                                "iscrowd": int(rng.random() < 0.01)})
        # Detections: 0-3 jittered copies of each object (the first scored high), the rest background.
        det_polys, det_meta = [], []
        for (category, cx, cy, radius), poly in zip(objects, gt_polys):
            for copy_index in range(rng.choice(4, p=[0.1, 0.6, 0.2, 0.1])):
                if len(det_polys) == dets_per_image:
                    break
                cat = category if rng.random() < 0.85 else int(rng.integers(1, num_classes + 1))
                score = rng.uniform(0.4, 1.0) if copy_index == 0 else rng.uniform(0.05, 0.7)
                det_polys.append(_jittered(rng, poly, cx, cy, radius, width, height))
                det_meta.append((cat, score))
        while len(det_polys) < dets_per_image:
            det_polys.append(_polygon(rng, rng.uniform(0, width), rng.uniform(0, height),
                                      _object_radius(rng, width, height), 12, width, height))
            det_meta.append((int(rng.integers(1, num_classes + 1)), rng.beta(1, 4)))
        det_rles = mask_util.frPyObjects(det_polys, height, width)
        for (category, score), rle, box in zip(det_meta, det_rles, mask_util.toBbox(det_rles)):
            rle["counts"] = rle["counts"].decode("ascii")  # as detectron2 writes them (JSON-able)
            detections.append({"image_id": image_id, "category_id": category, "score": round(float(score), 5),
                               "bbox": [float(v) for v in box], "segmentation": rle})
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def coco_from_dataset(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` over a deep copy of ``dataset`` (COCOeval writes into its
    annotations, so every timed run gets its own)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def prepare_results(detections: Sequence[dict], iou_type: str) -> List[dict]:
    """A copy of ``detections`` prepared as detectron2's ``_evaluate_predictions_on_coco``
    prepares them for ``iou_type`` (for "segm" the boxes are dropped, so that the mask's area
    decides small/medium/large; for "bbox" the masks, so that no RLE is decoded), ready for
    ``COCO.loadRes`` (which writes into them)."""
    drop = {"segm": "bbox", "bbox": "segmentation"}.get(iou_type)
    if drop is None:
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    return [{k: copy.deepcopy(v) for k, v in det.items() if k != drop} for det in detections]


def load_results(coco_gt: COCO, results: List[dict]) -> COCO:
    """``coco_gt.loadRes(results)``, its progress lines discarded."""
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(results)


def time_cocoeval(cls: type, dataset: dict, detections: Sequence[dict], iou_type: str) -> Tuple[float, float, List[float]]:
    """One timed COCOeval run of ``cls`` on fresh pycocotools COCO objects (the objects
    detectron2's COCOEvaluator hands any COCOeval class).

    Returns ``(eval_seconds, load_seconds, stats)``: the wall time of constructing ``cls`` and
    its evaluate + accumulate + summarize (its printed summary discarded); the time of
    pycocotools' ``loadRes`` of the detections (not in eval_seconds: detectron2 runs the same
    pycocotools code before any implementation); and its 12 ``stats`` in points (0-100; -100
    where undefined).
    """
    coco_gt = coco_from_dataset(dataset)
    results = prepare_results(detections, iou_type)
    start = time.perf_counter()
    coco_dt = load_results(coco_gt, results)
    load_seconds = time.perf_counter() - start
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        evaluator = cls(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        seconds = time.perf_counter() - start
    return seconds, load_seconds, [float(s) * 100 for s in evaluator.stats[:len(STAT_NAMES)]]


def cocoeval_implementations() -> Dict[str, Tuple[Optional[type], str]]:
    """The COCOeval implementations to compare: name -> ``(cls, note)``; ``cls`` is ``None``
    where that implementation is not importable here, and ``note`` then says why (otherwise it
    names the implementation and its version). pycocotools' comes first: it is the reference."""
    d2_cls, d2_note = detectron2_cocoeval()
    fast_cls, fast_note = faster_cocoeval()
    return {
        "pycocotools": (COCOeval, f"pycocotools {metadata.version('pycocotools')} (Python)"),
        "faster-coco-eval": (fast_cls, fast_note),
        "detectron2 COCOeval_opt": (d2_cls, d2_note),
    }


def benchmark(dataset: dict, detections: Sequence[dict], iou_types: Sequence[str] = ("bbox", "segm"),
              repeats: int = 1, log=print) -> List[dict]:
    """Times every importable implementation of ``cocoeval_implementations()`` side by side on
    one set, ``repeats`` times each (the implementations take turns in every repetition).

    Returns one row per (IoU type, implementation): ``iou_type``, ``implementation``,
    ``note``, and, where it ran, ``seconds`` (median over the repeats), ``all_seconds``,
    ``load_seconds`` (median loadRes time), ``stats`` (the 12 COCO stats in points),
    ``speedup`` (pycocotools' median / this one's) and ``max_abs_diff`` (the largest difference
    from pycocotools' stats, in points). ``log`` gets a line per timed run.
    """
    impls = cocoeval_implementations()
    rows = []
    for iou_type in iou_types:
        runs: Dict[str, List[Tuple[float, float, List[float]]]] = {name: [] for name, (cls, _) in impls.items() if cls}
        for rep in range(repeats):
            for name in runs:
                runs[name].append(time_cocoeval(impls[name][0], dataset, detections, iou_type))
                log(f"{iou_type} {name} run {rep + 1}/{repeats}: {runs[name][-1][0]:.2f} s "
                    f"(AP {runs[name][-1][2][0]:.2f})")
        reference = statistics.median(t for t, _, _ in runs["pycocotools"])
        ref_stats = runs["pycocotools"][0][2]
        for name, (_, note) in impls.items():
            row = {"iou_type": iou_type, "implementation": name, "note": note}
            if name in runs:
                seconds = statistics.median(t for t, _, _ in runs[name])
                stats = runs[name][0][2]
                row.update(seconds=seconds, all_seconds=[t for t, _, _ in runs[name]],
                           load_seconds=statistics.median(t for _, t, _ in runs[name]), stats=stats,
                           speedup=reference / seconds,
                           max_abs_diff=max(abs(a - b) for a, b in zip(stats, ref_stats)))
            rows.append(row)
    return rows
