"""An embedded image-classification dataset for the normalization studies, generated
deterministically in memory: 32x32 RGB images of 10 shape classes (each shape at a random
position, scale, rotation and colour) on noisy, cluttered backgrounds with a distractor blob.
Hard enough that a small ResNet does not saturate it in a few epochs, so differences between
normalizations show."""
from __future__ import annotations

import math
from typing import Tuple

import cv2
import numpy as np
import torch

CLASSES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star", "arc", "pentagon")
SIZE = 32


def _polygon(n: int, radius: float, angle: float, cx: float, cy: float, star: bool = False) -> np.ndarray:
    points = []
    for i in range(n * (2 if star else 1)):
        r = radius * (0.45 if star and i % 2 else 1.0)
        a = angle + i * 2 * math.pi / (n * (2 if star else 1))
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return np.round(np.array(points) * 8).astype(np.int32)  # 3 fractional bits for cv2's shift


def _draw(canvas: np.ndarray, cls: int, rng: np.random.Generator, colour) -> None:
    radius = rng.uniform(6, 12)
    cx, cy = rng.uniform(radius, SIZE - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    thick = int(rng.integers(2, 4))
    name = CLASSES[cls]
    centre = (int(cx * 8), int(cy * 8))
    if name == "circle":
        cv2.circle(canvas, centre, int(radius * 8), colour, -1, cv2.LINE_AA, shift=3)
    elif name == "ring":
        cv2.circle(canvas, centre, int(radius * 8), colour, thick, cv2.LINE_AA, shift=3)
    elif name == "arc":
        cv2.ellipse(canvas, centre, (int(radius * 8), int(radius * 8)), math.degrees(angle), 0, 180, colour, thick,
                    cv2.LINE_AA, shift=3)
    elif name in ("square", "triangle", "diamond", "pentagon", "star"):
        sides = {"square": 4, "triangle": 3, "diamond": 4, "pentagon": 5, "star": 5}[name]
        pts = _polygon(sides, radius, angle, cx, cy, star=name == "star")
        if name == "diamond":  # a square squashed along one axis
            pts = np.round((pts - [cx * 8, cy * 8]) * [1.0, 0.55] + [cx * 8, cy * 8]).astype(np.int32)
        cv2.fillPoly(canvas, [pts], colour, cv2.LINE_AA, shift=3)
    else:  # cross and bar: thick lines
        for k in range(2 if name == "cross" else 1):
            a = angle + k * math.pi / 2
            d = np.array([math.cos(a), math.sin(a)]) * radius
            p0, p1 = np.round((np.array([cx, cy]) - d) * 8), np.round((np.array([cx, cy]) + d) * 8)
            cv2.line(canvas, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, thick + 1, cv2.LINE_AA, shift=3)


def make_shapes_classification(num_images: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` images ``(N, 3, 32, 32)`` float32 in [0, 1] and labels ``(N,)``, balanced
    over the 10 classes; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, SIZE, SIZE, 3), np.float32)
    labels = np.arange(num_images) % len(CLASSES)
    rng.shuffle(labels)
    for i, cls in enumerate(labels):
        base = rng.uniform(0, 255, 3)
        canvas = np.clip(base + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        blob = tuple(int(v) for v in rng.integers(0, SIZE, 2)), int(rng.integers(3, 9))
        cv2.circle(canvas, blob[0], blob[1], tuple(float(v) for v in rng.uniform(0, 255, 3)), -1)  # a distractor
        colour = tuple(float(v) for v in (base + rng.choice([-1, 1], 3) * rng.uniform(70, 150, 3)) % 256)
        _draw(canvas, int(cls), rng, colour)
        images[i] = canvas + rng.normal(0, 10, canvas.shape)
    x = torch.from_numpy(np.clip(images, 0, 255) / 255.0).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))
