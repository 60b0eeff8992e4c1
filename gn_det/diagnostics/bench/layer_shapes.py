"""The GN layer shapes gn_det is measured at: one table for every tool that benchmarks,
compiles or profiles the kernels (tools/benchmark_norm.py, tools/compile_kernels.py,
tools/profile_kernels.py), and the shapes of detectron2 multi-scale training for the
compilation-count replay.

Shapes are ``(N, C, *spatial)``; the GN layers have 32 groups.
"""
from __future__ import annotations

import random
from typing import Dict, Iterator, List, Tuple

Shape = Tuple[int, ...]

# name -> (N, C, H, W): the GN layers of a Mask R-CNN R50-FPN step on 1333x800 images, 1 and
# 2 images per GPU (stem, res2-res5, FPN P2-P5, box head, mask head).
MASK_RCNN_SHAPES: Dict[str, Shape] = {
    "stem N=1": (1, 64, 400, 672), "stem N=2": (2, 64, 400, 672),
    "res2 N=1": (1, 256, 200, 336), "res2 N=2": (2, 256, 200, 336),
    "res3": (2, 512, 100, 168), "res4": (2, 1024, 50, 84), "res5": (2, 2048, 25, 42),
    "FPN P2 N=1": (1, 256, 200, 336), "FPN P2": (2, 256, 200, 336), "FPN P3 N=1": (1, 256, 100, 168),
    "FPN P3": (2, 256, 100, 168), "FPN P4": (2, 256, 50, 84), "FPN P5": (2, 256, 25, 42),
    "box head": (512, 256, 7, 7), "mask head": (128, 256, 14, 14),
}

# Smaller stand-ins of the same layers for the CPU benchmark (the table above takes minutes
# per row on two CPU cores).
CPU_SHAPES: Dict[str, Shape] = {
    "stem": (2, 64, 100, 168), "res3": (2, 512, 25, 42), "FPN P4": (2, 256, 25, 42),
    "box head": (64, 256, 7, 7), "mask head": (16, 256, 14, 14),
}

# Shapes outside detection that the compile check covers as well: other ranks, and the
# corner where Triton folds integer arguments equal to 1 into constants.
COMPILE_EXTRA_SHAPES: Dict[str, Shape] = {
    "sequence": (3, 96, 1001), "volume": (2, 64, 9, 17, 23),
    "features, G = C": (8, 32),  # one channel per group and S = 1
    # RegNet widths at 32 groups: 7 channels per group, across channels_last blocks of 128,
    # over many splits: the forward's statistics take a finalize launch there (_stats_merge).
    "7 channels per group": (2, 224, 100, 168),
}


def mask_rcnn_gn_layers(n: int, height: int, width: int, rois: int, mask_rois: int) -> List[Tuple[Shape, bool]]:
    """(shape, followed by a ReLU) of every distinct GN layer of a GN Mask R-CNN R50-FPN
    training step on a padded batch of n images of height x width (divisible by 32): ResNet
    bottlenecks with the stride in the 3x3 conv and GN shortcuts, FPN lateral and output convs,
    the 4conv1fc box head on ``rois`` ROIs and the mask head on ``mask_rois``."""
    def at(stride: int, c: int, relu: bool, batch: int = n) -> Tuple[Shape, bool]:
        return (batch, c, height // stride, width // stride), relu

    layers = [at(2, 64, True)]  # stem
    for stride, mid, out in ((4, 64, 256), (8, 128, 512), (16, 256, 1024), (32, 512, 2048)):
        # conv1 (1x1) of a stage's first block runs at the previous stage's resolution.
        layers += [at(max(stride // 2, 4), mid, True), at(stride, mid, True), at(stride, out, False)]
    layers += [at(stride, 256, False) for stride in (4, 8, 16, 32)]  # FPN lateral and output convs
    layers += [((rois, 256, 7, 7), True), ((mask_rois, 256, 14, 14), True)]
    return sorted(set(layers))


def multiscale_training_batches(iterations: int = 300, seed: int = 0, images: int = 2,
                                short_sides: Tuple[int, ...] = tuple(range(640, 801, 32)),
                                aspect: Tuple[float, float] = (1.2, 1.8), max_size: int = 1333,
                                divisibility: int = 32, rois_per_image: int = 512,
                                max_mask_rois: int = 200) -> Iterator[Tuple[int, int, int, int, int]]:
    """(n, height, width, box ROIs, mask ROIs) of each iteration of detectron2 multi-scale
    training: each image of aspect ratio drawn from ``aspect`` (either orientation) resized by
    ResizeShortestEdge (short side drawn from ``short_sides``, long side at most max_size),
    the batch padded to the largest image and to ``divisibility``; ``rois_per_image`` box-head
    ROIs per image and 1 to ``max_mask_rois`` mask-head ROIs (the foreground ones)."""
    rng = random.Random(seed)
    for _ in range(iterations):
        heights, widths = [], []
        for _ in range(images):
            short, ratio = rng.choice(short_sides), rng.uniform(*aspect)
            long = short * ratio
            if long > max_size:  # detectron2's ResizeShortestEdge.get_output_shape
                short, long = short * max_size / long, max_size
            short, long = int(short + 0.5), int(long + 0.5)
            h, w = (short, long) if rng.random() < 0.5 else (long, short)
            heights.append(h)
            widths.append(w)
        pad = lambda v: -(-max(v) // divisibility) * divisibility  # noqa: E731
        yield images, pad(heights), pad(widths), rois_per_image * images, rng.randint(1, max_mask_rois)
