"""Dataset registration: the embedded shapes dataset, and a clear word when COCO is missing."""
from __future__ import annotations

import json
import os
from typing import Iterable

from ..errors import DatasetError, MissingFileError, UnknownDatasetError, close_matches
from .shapes import CLASSES, ensure_shapes_dataset

__all__ = ["SHAPES_TRAIN", "SHAPES_VAL", "datasets_root", "register_shapes_dataset", "check_datasets_exist"]

SHAPES_TRAIN = "gn_det_shapes_train"
SHAPES_VAL = "gn_det_shapes_val"


def datasets_root() -> str:
    """detectron2's dataset root: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def register_shapes_dataset(root: str = "") -> None:
    """Generate (first use only) and register ``gn_det_shapes_train``/``gn_det_shapes_val``
    with detectron2's ``register_coco_instances``. Default root: ``<datasets root>/gn_det_shapes``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    root = root or os.path.join(datasets_root(), "gn_det_shapes")
    paths = ensure_shapes_dataset(root)
    for name, split in ((SHAPES_TRAIN, "train"), (SHAPES_VAL, "val")):
        json_file, image_root = paths[split]
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).json_file == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {"thing_classes": list(CLASSES)}, json_file, image_root)


def check_datasets_exist(names: Iterable[str]) -> None:
    """Check that each dataset is registered and its files are there and readable (before
    any training or worker process starts). Raises ``UnknownDatasetError`` (a
    ``KeyError``) for a name that is not registered, with the closest registered names;
    ``MissingFileError`` (a ``FileNotFoundError``) naming what is missing, where it was looked
    for, how to get COCO, and how to run on the embedded dataset instead; ``DatasetError`` (a
    ``ValueError``) for an annotation file that is not COCO JSON."""
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
                _check_coco_json(name, json_file, image_root)
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


def _check_coco_json(name: str, json_file: str, image_root: str) -> None:
    """The annotation file parses, has COCO's sections, and every image it lists exists."""
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
    missing = [img.get("file_name", "?") for img in coco["images"]
               if not os.path.exists(os.path.join(image_root or "", img.get("file_name", "")))]
    if missing:
        raise MissingFileError(
            f"dataset '{name}': {len(missing)} of {len(coco['images'])} images listed in {json_file} are missing "
            f"under {image_root}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
