"""Fixed synthetic detectron2 batches: images with boxes, classes and polygon masks, in the
format a detectron2 model's ``forward(batched_inputs)`` takes in training."""
from __future__ import annotations

from typing import Dict, List

import torch


def synthetic_batch(
    num_images: int = 2,
    height: int = 800,
    width: int = 1333,
    boxes_per_image: int = 8,
    num_classes: int = 80,
    seed: int = 0,
) -> List[Dict]:
    """``num_images`` dicts with ``image`` (uint8, (3, H, W)) and ``instances`` holding
    ``gt_boxes`` (XYXY), ``gt_classes`` and ``gt_masks`` (one quadrilateral polygon per box).
    Deterministic for a given seed."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    gen = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
        size = torch.rand(boxes_per_image, 2, generator=gen) * 0.4 + 0.1  # 10%..50% of the image
        corner = torch.rand(boxes_per_image, 2, generator=gen) * (1 - size)
        scale = torch.tensor([width, height], dtype=torch.float32)
        xy0, xy1 = corner * scale, (corner + size) * scale
        boxes = torch.cat([xy0, xy1], dim=1)
        polygons = []
        for (x0, y0), (x1, y1) in zip(xy0.tolist(), xy1.tolist()):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2  # a diamond inside the box
            polygons.append([[cx, y0, x1, cy, cx, y1, x0, cy]])
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (boxes_per_image,), generator=gen)
        instances.gt_masks = PolygonMasks(polygons)
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch
