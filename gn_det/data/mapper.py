"""A DatasetMapper that tolerates annotations without a usable mask."""
from __future__ import annotations

import logging

from detectron2.data import DatasetMapper

__all__ = ["MaskSafeDatasetMapper"]

logger = logging.getLogger(__name__)


class MaskSafeDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper, except that when masks are trained, annotations without a
    mask are dropped (and said so) instead of crashing the mask loss.

    detectron2's COCO loader drops instances whose polygons are all invalid, but keeps one
    whose ``segmentation`` is empty (``[]``) as a box without a mask; an image holding such an
    instance then has no ``gt_masks`` and Mask R-CNN's loss raises ``AttributeError``."""

    _warned = set()

    def __call__(self, dataset_dict):
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
