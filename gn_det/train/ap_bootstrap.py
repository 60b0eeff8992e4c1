"""COCO AP with a standard error over the validation images: a bootstrap of the images.

How much of an AP is the validation set's draw? Resample the validation images with
replacement (an image drawn twice counts twice: its detections and its ground truth), recompute
COCO's AP on each resample, and take the resamples' standard deviation as the AP's standard
error. The detection study (``tools/detection_norm_study.py``) states it beside each run's AP on
``gn_det_shapes_val300``.

Cheaply: pycocotools' ``COCOeval.evaluate()`` matches each image's detections to its ground
truth once (per category, at every IoU threshold); a resample only changes which images' matches
are pooled, so each resample re-runs only COCOeval's ``accumulate`` step, in numpy, over the
drawn images (``average_precision``). COCOeval's own ``accumulate`` cannot be given a list with
repeats (it keeps each image once). On the full image set in their order ``average_precision``
is COCOeval's AP (``stats[0]``: IoU 0.50:0.95, every area, 100 detections per image), bit for bit
(tests/test_val300_and_conv_bias.py checks it).

This is the training application's tool, not the plugin's: ``import gn_det`` does not load it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["RESAMPLES", "SEED", "PerImageMatches", "average_precision", "bootstrap_ap", "match_per_image",
           "results_with_se"]

RESAMPLES = 200  # resamples per AP: the SE's own relative error is about 1 / sqrt(2 * 200) = 5%
SEED = 0  # numpy's default_rng seed of the resampling: the same SE for the same predictions
IOU_TYPES = {"box_AP": "bbox", "mask_AP": "segm"}  # detectron2's names of the two APs -> COCO's IoU types


@dataclasses.dataclass
class PerImageMatches:
    """COCOeval's matches of one IoU type, per category and image, for area "all" and 100
    detections per image. ``I`` images (``image_ids``, COCOeval's order), ``K`` categories,
    ``T`` IoU thresholds, ``R`` recall thresholds; per category ``k``, its ``D_k`` detections
    of all images, image by image in that order, each image's by descending score:

    - ``scores[k]``: ``(D_k,)``; ``matched[k]``, ``ignored[k]``: ``(T, D_k)`` bool, detection
      matched to a ground truth / ignored at each threshold;
    - ``starts[k]``: ``(I,)``, where image ``i``'s detections start in those arrays;
      ``counts[k]``: ``(I,)``, how many it has;
    - ``gts[k]``: ``(I,)``, image ``i``'s ground truths of category ``k`` that count (not ignored).
    """

    image_ids: List[int]
    scores: List[np.ndarray]
    matched: List[np.ndarray]
    ignored: List[np.ndarray]
    starts: List[np.ndarray]
    counts: List[np.ndarray]
    gts: List[np.ndarray]
    iou_thresholds: np.ndarray  # (T,)
    recall_thresholds: np.ndarray  # (R,)


def match_per_image(gt: Union[str, dict], detections: Sequence[dict], iou_type: str) -> Optional[PerImageMatches]:
    """pycocotools' ``COCOeval(gt, detections, iou_type).evaluate()``, kept per image.
    ``gt``: a COCO annotation file (path) or its dict; ``detections``: COCO results (what
    detectron2's COCOEvaluator writes to ``coco_instances_results.json``), not modified.
    As detectron2 does, mask AP ignores the detections' boxes (areas then come from the masks).
    None when there are no detections (detectron2 then reports AP NaN)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return None
    detections = copy.deepcopy(list(detections))  # (loadRes writes into them)
    if iou_type == "segm":
        for d in detections:
            d.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        if isinstance(gt, str):
            with open(gt) as f:
                gt = json.load(f)
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iou_type)
        evaluator.evaluate()
    p = evaluator.params
    n_images, n_areas, last = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
    all_area = p.areaRngLbl.index("all")
    n_thresholds = len(p.iouThrs)
    matches = PerImageMatches(list(p.imgIds), [], [], [], [], [], [], np.asarray(p.iouThrs),
                              np.asarray(p.recThrs))
    for k in range(len(p.catIds)):
        scores, matched, ignored, counts, gts = [], [], [], [], []
        for i in range(n_images):
            e = evaluator.evalImgs[k * n_areas * n_images + all_area * n_images + i]
            if e is None:  # neither a ground truth nor a detection of this category
                counts.append(0)
                gts.append(0)
                continue
            scores.append(np.asarray(e["dtScores"][:last], dtype=np.float64))
            matched.append(np.asarray(e["dtMatches"][:, :last]) != 0)
            ignored.append(np.asarray(e["dtIgnore"][:, :last]) != 0)
            counts.append(len(scores[-1]))
            gts.append(int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)))
        counts_k = np.asarray(counts, dtype=np.int64)
        matches.scores.append(np.concatenate(scores) if scores else np.zeros(0))
        matches.matched.append(np.concatenate(matched, axis=1) if matched else np.zeros((n_thresholds, 0), bool))
        matches.ignored.append(np.concatenate(ignored, axis=1) if ignored else np.zeros((n_thresholds, 0), bool))
        matches.counts.append(counts_k)
        matches.starts.append(np.cumsum(counts_k) - counts_k)
        matches.gts.append(np.asarray(gts, dtype=np.int64))
    return matches


def average_precision(matches: PerImageMatches, images: Optional[np.ndarray] = None) -> float:
    """COCO AP (IoU 0.50:0.95, area "all", 100 detections per image), in percent as detectron2
    reports it, over ``images``: indices into ``matches.image_ids``, ``(N,)``, repeats counted
    (default: every image once). COCOeval's ``accumulate`` and ``summarize`` in numpy: per
    category and IoU threshold, the detections of those images by descending score (ties in
    image order, as COCOeval's stable sort), interpolated precision at the 101 recall
    thresholds; categories without a ground truth among them are left out. NaN if none is left."""
    n_images = len(matches.image_ids)
    images = np.arange(n_images) if images is None else np.sort(np.asarray(images, dtype=np.int64))
    n_thresholds, n_recalls = len(matches.iou_thresholds), len(matches.recall_thresholds)
    precision = -np.ones((n_thresholds, n_recalls, len(matches.scores)))  # COCOeval's (T, R, K) at area all, 100
    for k in range(len(matches.scores)):
        positives = int(matches.gts[k][images].sum())
        if positives == 0:
            continue
        lengths = matches.counts[k][images]
        offsets = np.cumsum(lengths) - lengths
        picked = np.repeat(matches.starts[k][images] - offsets, lengths) + np.arange(int(lengths.sum()))
        order = np.argsort(-matches.scores[k][picked], kind="mergesort")
        matched = matches.matched[k][:, picked[order]]
        ignored = matches.ignored[k][:, picked[order]]
        tp = np.cumsum(matched & ~ignored, axis=1).astype(float)  # (T, D)
        fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)
        n_dets = tp.shape[1]
        if n_dets == 0:
            precision[:, :, k] = 0
            continue
        recall = tp / positives
        prec = tp / (fp + tp + np.spacing(1))
        prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # precision envelope, right to left
        for t in range(n_thresholds):
            at = np.searchsorted(recall[t], matches.recall_thresholds, side="left")
            precision[t, :, k] = np.where(at < n_dets, prec[t, np.minimum(at, n_dets - 1)], 0.0)
    counted = precision[precision > -1]
    return float(np.mean(counted)) * 100 if counted.size else math.nan


def bootstrap_ap(matches: Optional[PerImageMatches], resamples: int = RESAMPLES, seed: int = SEED) -> Dict[str, float]:
    """``{"AP": AP on every image, "se": the standard deviation (ddof 1) of the AP over
    ``resamples`` resamples of the images with replacement (numpy ``default_rng(seed)``)}``,
    in percent. NaN for both without detections."""
    if matches is None:
        return {"AP": math.nan, "se": math.nan}
    rng = np.random.default_rng(seed)
    n_images = len(matches.image_ids)
    values = [average_precision(matches, rng.integers(0, n_images, n_images)) for _ in range(resamples)]
    values = [v for v in values if not math.isnan(v)]
    return {"AP": average_precision(matches),
            "se": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan}


def results_with_se(gt_json: str, results_json: str, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """A run's box and mask AP on a validation set, each with its bootstrap standard error:
    ``{"images", "box_AP", "mask_AP", "box_AP_se", "mask_AP_se", "bootstrap": {"resamples",
    "seed"}}``. ``gt_json``: the set's COCO annotations; ``results_json``: the detections
    COCOEvaluator wrote for it (``<OUTPUT_DIR>/inference/<dataset>/coco_instances_results.json``)."""
    with open(gt_json) as f:
        gt = json.load(f)
    with open(results_json) as f:
        detections = json.load(f)
    out: dict = {"images": len(gt["images"])}
    for name, iou_type in IOU_TYPES.items():
        found = bootstrap_ap(match_per_image(gt, detections, iou_type), resamples, seed)
        out[name], out[f"{name}_se"] = found["AP"], found["se"]
    out["bootstrap"] = {"resamples": resamples, "seed": seed}
    return out
