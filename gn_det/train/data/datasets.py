"""Dataset registration: the embedded shapes dataset, and a clear word when COCO is missing."""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable

from ...errors import DatasetError, MissingFileError, UnknownDatasetError, close_matches
from .checks import _ERROR_KINDS, annotation_problems, check_images, summarize_problems
from .shapes import CLASSES, ensure_shapes_dataset

logger = logging.getLogger(__name__)

__all__ = ["SHAPES_SPLITS", "SHAPES_TRAIN", "SHAPES_VAL", "SHAPES_VAL300", "datasets_root", "register_shapes_dataset",
           "check_datasets_exist", "shapes_root"]

SHAPES_TRAIN = "gn_det_shapes_train"
SHAPES_VAL = "gn_det_shapes_val"  # 60 images: the demo's and the tests' validation set
SHAPES_VAL300 = "gn_det_shapes_val300"  # 300 images: the detection study's (AP differences with a usable error)
SHAPES_SPLITS = {SHAPES_TRAIN: "train", SHAPES_VAL: "val", SHAPES_VAL300: "val300"}  # registered name -> split


def datasets_root() -> str:
    """detectron2's dataset root: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def shapes_root() -> str:
    """The embedded dataset's default root: ``<datasets root>/gn_det_shapes``."""
    return os.path.join(datasets_root(), "gn_det_shapes")


def register_shapes_dataset(root: str = "") -> None:
    """Generate (first use only; each split once per root) and register ``gn_det_shapes_train``,
    ``gn_det_shapes_val`` and ``gn_det_shapes_val300`` (``SHAPES_SPLITS``) with detectron2's
    ``register_coco_instances``. Default root: ``shapes_root()``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    root = root or shapes_root()
    paths = ensure_shapes_dataset(root)
    for name, split in SHAPES_SPLITS.items():
        json_file, image_root = paths[split]
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).json_file == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {"thing_classes": list(CLASSES)}, json_file, image_root)


def check_datasets_exist(names: Iterable[str], images: str = "headers", skip_bad: Iterable[str] = (),
                         annotations: str = "error") -> None:
    """Check that each dataset is registered and its files are there and readable (before
    any training or worker process starts): its annotations (COCO sections, every
    ``category_id`` among the categories; what ``checks.annotation_problems`` finds, an error or
    with ``annotations`` ``warn`` a warning, as ``DATALOADER.CHECK_ANNOTATIONS``) and its images
    (``images``: ``headers``, ``decode`` or ``none``, as ``DATALOADER.CHECK_IMAGES``; see
    ``gn_det.train.data.checks``). Bad images of a
    dataset named in ``skip_bad`` are logged, not raised (training leaves them out). Raises ``UnknownDatasetError`` (a
    ``KeyError``) for a name that is not registered, with the closest registered names;
    ``MissingFileError`` (a ``FileNotFoundError``) naming what is missing, where it was looked
    for, how to get COCO, and how to run on the embedded dataset instead; ``DatasetError`` (a
    ``ValueError``) for an annotation file that is not COCO JSON, an unknown category id, or
    images that cannot be used."""
    skip_bad = set(skip_bad)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in names:
        registered = DatasetCatalog.list()
        if name not in registered:
            # (detectron2 registers ~100 names: the closest few say more than all of them)
            raise UnknownDatasetError(
                f"dataset '{name}' (DATASETS.TRAIN/DATASETS.TEST) is not registered{close_matches(name, registered)} "
                f"({len(registered)} are, e.g. coco_2017_train and {SHAPES_TRAIN}; register your own with "
                "detectron2.data.datasets.register_coco_instances before training)"
            )
        meta = MetadataCatalog.get(name)
        json_file = getattr(meta, "json_file", None)
        image_root = getattr(meta, "image_root", None)
        missing = [p for p in (json_file, image_root) if p and not os.path.exists(p)]
        if not missing:
            if json_file:
                _check_coco_json(name, json_file, image_root, images, name in skip_bad, annotations)
            continue
        hint = ""
        if name.startswith("coco_"):
            hint = (
                f"\nCOCO is looked for under $DETECTRON2_DATASETS/coco (now {os.path.abspath(datasets_root())}/coco): "
                "download train2017/, val2017/ and annotations/ from https://cocodataset.org/#download "
                "and set DETECTRON2_DATASETS to the folder holding coco/."
            )
        raise MissingFileError(
            f"dataset '{name}': missing {', '.join(os.path.abspath(p) for p in missing)}.{hint}\n"
            "To run on gn_det's embedded dataset instead: python tools/train_net.py "
            "--config configs/demo/mask_rcnn_gn_shapes.yaml, or add "
            f"DATASETS.TRAIN '(\"{SHAPES_TRAIN}\",)' DATASETS.TEST '(\"{SHAPES_VAL}\",)' "
            "MODEL.ROI_HEADS.NUM_CLASSES 3 to your command."
        )


def _check_coco_json(name: str, json_file: str, image_root: str, images: str = "headers", skip_bad: bool = False,
                     annotations: str = "error") -> None:
    """The annotation file parses, has COCO's sections, known category ids and annotations that
    can be right (``annotations``: ``error``, ``warn``, ``none``), and every image it lists is
    there and usable (``images``: how closely to look)."""
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # (UnicodeDecodeError: a binary file)
        raise DatasetError(f"dataset '{name}': annotation file {json_file} is not valid JSON ({exc}); "
                           "is it truncated or corrupt?") from None
    if not isinstance(coco, dict):
        raise DatasetError(f"dataset '{name}': {json_file} holds a {type(coco).__name__}, not a COCO dict")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"dataset '{name}': {json_file} has no '{key}' list, which COCO format requires")
    known = {c.get("id") for c in coco["categories"] if isinstance(c, dict)}
    unknown = [a for a in coco["annotations"] if isinstance(a, dict) and a.get("category_id") not in known]
    if unknown:
        first = unknown[0]
        raise DatasetError(
            f"dataset '{name}': {len(unknown)} annotation(s) in {json_file} have a category_id that is not among its "
            f"'categories' (ids {sorted(known, key=str)[:20]}): annotation id {first.get('id')} of image "
            f"{first.get('image_id')} has category_id {first.get('category_id')!r}; fix the ids, or add the category")
    if annotations != "none":
        _check_annotations(name, json_file, coco, annotations)
    bad = check_images(coco["images"], image_root, images)
    missing = [file for file, problem in bad if problem == "missing"]
    if missing:
        raise MissingFileError(
            f"dataset '{name}': {len(missing)} of {len(coco['images'])} images listed in {json_file} are missing "
            f"under {image_root}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if bad:
        listed = "; ".join(f"{file}: {problem}" for file, problem in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if skip_bad:
            logger.warning("dataset '%s': %d of %d images under %s cannot be used and will be skipped "
                           "(DATALOADER.BAD_IMAGES skip): %s", name, len(bad), len(coco["images"]), image_root, listed)
            return
        raise DatasetError(
            f"dataset '{name}': {len(bad)} of {len(coco['images'])} images listed in {json_file} cannot be used: "
            f"{listed}; replace or remove them (or, for training data, set DATALOADER.BAD_IMAGES skip to leave "
            "them out with a warning)")


def _check_annotations(name: str, json_file: str, coco: dict, mode: str) -> None:
    errors, filtered = annotation_problems(coco)
    if filtered:
        logger.warning("dataset '%s': detectron2 leaves out %d annotation(s) of %s without a word: %s", name,
                       len(filtered), json_file, summarize_problems(filtered, {"no image": "whose image_id is not among "
                                                                                          "the file's images"}))
    if not errors:
        return
    found = summarize_problems(errors, _ERROR_KINDS)
    if mode == "warn":
        logger.warning("dataset '%s': %d annotation problem(s) in %s, trained with as detectron2 takes them (boxes "
                       "clipped or dropped, bad polygons dropped, a duplicate image id's annotations on one image; "
                       "DATALOADER.CHECK_ANNOTATIONS warn): %s", name, len(errors), json_file, found)
        return
    raise DatasetError(
        f"dataset '{name}': {len(errors)} annotation problem(s) in {json_file} that cannot be right: {found}; fix "
        "them, or set DATALOADER.CHECK_ANNOTATIONS warn to train with them as detectron2 takes them (boxes clipped or "
        "dropped, bad polygons dropped, a duplicate image id's annotations on one image)")
