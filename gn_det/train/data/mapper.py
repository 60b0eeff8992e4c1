"""The training DatasetMapper: tolerates annotations without a usable mask, and names an
image that cannot be read (or skips it, as ``DATALOADER.BAD_IMAGES`` says)."""
from __future__ import annotations

import logging
import os

from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data.detection_utils import SizeMismatchError

from ...errors import DatasetError
from .checks import DataSettings

__all__ = ["MaskSafeDatasetMapper"]

logger = logging.getLogger(__name__)


class MaskSafeDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper, except that when masks are trained, annotations without a
    mask are dropped (and said so) instead of crashing the mask loss.

    detectron2's COCO loader drops instances whose polygons are all invalid, but keeps one
    whose ``segmentation`` is empty (``[]``) as a box without a mask; an image holding such an
    instance then has no ``gt_masks`` and Mask R-CNN's loss raises ``AttributeError``.

    An image that cannot be read or has another size than its annotations say (a file
    corrupted after the check before training) raises ``DatasetError`` naming the file and the
    dataset, or with ``DATALOADER.BAD_IMAGES skip`` is logged and left out (``None``)."""

    _warned = set()

    def __init__(self, cfg, is_train: bool = True, **kwargs) -> None:
        super().__init__(cfg, is_train=is_train, **kwargs)
        self.skip_bad_images = DataSettings.from_cfg(cfg).bad_images == "skip"
        self.dataset_names = tuple(cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST)

    def _dataset_of(self, file_name: str) -> str:
        for name in self.dataset_names:
            root = getattr(MetadataCatalog.get(name), "image_root", None)
            if root and os.path.abspath(file_name).startswith(os.path.abspath(root) + os.sep):
                return name
        return " or ".join(self.dataset_names) or "?"

    def __call__(self, dataset_dict):
        try:
            return self._map(dataset_dict)
        except (OSError, SizeMismatchError) as exc:  # PIL: truncated, not an image; detectron2: wrong size
            file_name = dataset_dict.get("file_name", "?")
            problem = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            if self.skip_bad_images:
                logger.warning("dataset '%s': skipped image %s, which cannot be used (%s)",
                               self._dataset_of(file_name), file_name, problem)
                return None
            raise DatasetError(f"dataset '{self._dataset_of(file_name)}': image {file_name} cannot be used ({problem}); "
                               "replace or remove it, or set DATALOADER.BAD_IMAGES skip to leave such images out "
                               "with a warning") from None

    def _map(self, dataset_dict):
        annotations = dataset_dict.get("annotations")
        if self.use_instance_mask and annotations:
            kept = [a for a in annotations if a.get("segmentation")]
            if len(kept) != len(annotations):
                name = dataset_dict.get("file_name", "?")
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning("%s: dropped %d annotation(s) with no mask (empty 'segmentation')",
                                   name, len(annotations) - len(kept))
                dataset_dict = dict(dataset_dict, annotations=kept)
        return super().__call__(dataset_dict)
