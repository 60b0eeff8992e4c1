"""Pretraining a detection config's ResNet on gn_det's embedded classification set, for the GN
paper's Table 4/5 setting at small scale: a backbone pretrained with BN whose statistics are
then kept frozen for detection (detectron2's FrozenBN), against one pretrained with GN.

``pretrain_backbone`` builds the config's own bottom-up ResNet (detectron2's backbone builder,
gn_det's hooks installed, so the config's norm and GN settings apply), puts a global average
pool and a linear classifier on its deepest feature, trains it with SGD on the 10-class shapes
images (``gn_det.diagnostics.bench.classification``: seeded, generated in memory), and writes
the ResNet's weights as a detectron2 checkpoint (``{"model": {"backbone.bottom_up.<name>":
tensor}}``) that ``MODEL.WEIGHTS`` loads into the detection model: a BN-pretrained file loads
into a ``FrozenBN`` ResNet with its running statistics (``num_batches_tracked`` left out: the
frozen norm has none), a GN-pretrained one into GN. The classifier is not saved.

Every stage trains (``MODEL.BACKBONE.FREEZE_AT`` is set to 0 for pretraining, whatever the config
says; detection then freezes what its config says), from scratch (``MODEL.WEIGHTS`` must be
empty), on ``MODEL.DEVICE``. The images reach the ResNet as detection images do: in the config's ``INPUT.FORMAT`` channel
order, 0-255, normalized by ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``; upsampled from the set's
32x32 to ``image_size`` (bilinear) so that the shapes span sizes the detector's anchors cover.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PretrainSettings", "BackboneClassifier", "pretrain_backbone", "pretraining_config", "checkpoint_state",
           "backbone_prefix"]

TRAIN_DATA_SEED_OFFSET, VAL_DATA_SEED_OFFSET = 1000, 2000  # the classification study's data seeds (seed + offset)


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """What a pretraining run depends on besides the config (all recorded with its weights)."""

    seed: int = 7  # initial weights, batch order and flips; data seed + TRAIN/VAL offsets
    epochs: int = 8
    batch_size: int = 32
    lr: float = 0.05  # at batch 32 (the classification study's), scaled linearly with the batch
    weight_decay: float = 1e-4
    train_images: int = 4000
    val_images: int = 1000
    image_size: int = 64  # the 32x32 images upsampled to this side

    def __post_init__(self):
        for name in ("epochs", "batch_size", "train_images", "val_images", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSettings.{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"PretrainSettings.lr must be > 0; got {self.lr}")
        if self.train_images < self.batch_size:
            raise ValueError(f"PretrainSettings: train_images ({self.train_images}) < batch_size ({self.batch_size}): "
                             "no full batch to train on")


def backbone_prefix(backbone: nn.Module) -> Tuple[nn.Module, str]:
    """(the bottom-up ResNet of ``backbone``, the prefix of its parameters' names in the
    detection model): ``backbone.bottom_up.`` under an FPN, ``backbone.`` for a plain ResNet."""
    bottom_up = getattr(backbone, "bottom_up", None)
    return (bottom_up, "backbone.bottom_up.") if isinstance(bottom_up, nn.Module) else (backbone, "backbone.")


class BackboneClassifier(nn.Module):
    """A bottom-up backbone and a classifier on its deepest feature: logits ``(N, classes)`` of
    normalized images ``(N, 3, H, W)``."""

    def __init__(self, resnet: nn.Module, num_classes: int):
        super().__init__()
        self.resnet = resnet
        shapes = resnet.output_shape()
        self.feature = max(shapes, key=lambda name: shapes[name].stride)  # e.g. "res5"
        self.fc = nn.Linear(shapes[self.feature].channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.resnet(images)[self.feature].mean(dim=(2, 3)))


def checkpoint_state(resnet: nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    """The ResNet's state under the detection model's names, without BN's
    ``num_batches_tracked`` (a frozen norm has no such buffer)."""
    return {prefix + name: tensor.detach().clone() for name, tensor in resnet.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def _detection_input(images: torch.Tensor, cfg, size: int) -> torch.Tensor:
    """RGB images in [0, 1] ``(N, 3, 32, 32)`` as the detector's backbone sees an image:
    ``(N, 3, size, size)`` in INPUT.FORMAT's channel order, 0-255, pixel-normalized."""
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False) * 255.0
    if cfg.INPUT.FORMAT == "BGR":
        x = x.flip(1)
    elif cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"pretrain_backbone: INPUT.FORMAT {cfg.INPUT.FORMAT!r}: only RGB and BGR images are made")
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, size: int) -> float:
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(_detection_input(x[i:i + 250], cfg, size)).argmax(1) != y[i:i + 250]).sum())
                    for i in range(0, len(x), 250))
    return 100.0 * wrong / len(x)


def pretraining_config(cfg):
    """``cfg`` as pretraining builds its ResNet: a copy with ``MODEL.BACKBONE.FREEZE_AT`` 0
    (every stage trains; with detectron2's default 2 the stem and res2 would stay at their
    initialisation and their BN would be frozen at identity statistics). ``MODEL.WEIGHTS``
    must be empty: pretraining starts from scratch (``ValueError`` naming the key otherwise)."""
    if cfg.MODEL.WEIGHTS:
        raise ValueError(f"pretrain_backbone: MODEL.WEIGHTS is {cfg.MODEL.WEIGHTS!r}, but pretraining starts from "
                         "scratch; set MODEL.WEIGHTS '' (the detection run loads the pretrained file instead)")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


def pretrain_backbone(cfg, settings: PretrainSettings, path: str, log=print) -> dict:
    """Pretrain ``cfg``'s bottom-up ResNet (``cfg.MODEL.RESNETS.NORM`` its norm, on
    ``cfg.MODEL.DEVICE``; ``pretraining_config``) with ``settings`` and write its weights to
    ``path`` (a detectron2 checkpoint, written whole or not at all). Returns the run's record:
    settings, validation error (%) after training, seconds, the norm and the number of tensors
    saved."""
    from detectron2.modeling import build_backbone

    from ..diagnostics.bench.classification import CLASSES, make_shapes_classification
    from .checkpoint import atomic_write

    cfg = pretraining_config(cfg)
    device = torch.device(cfg.MODEL.DEVICE)
    start = time.time()
    x_train, y_train = make_shapes_classification(settings.train_images, seed=TRAIN_DATA_SEED_OFFSET + settings.seed)
    x_val, y_val = make_shapes_classification(settings.val_images, seed=VAL_DATA_SEED_OFFSET + settings.seed)
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    torch.manual_seed(settings.seed)
    resnet, prefix = backbone_prefix(build_backbone(cfg))
    model = BackboneClassifier(resnet, len(CLASSES)).to(device)
    lr = settings.lr * settings.batch_size / 32
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=settings.weight_decay)
    steps_per_epoch = settings.train_images // settings.batch_size
    total = settings.epochs * steps_per_epoch
    warmup = max(1, min(total // 10, steps_per_epoch // 2))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 0
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total)))
    order_gen = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(settings.train_images, generator=order_gen).to(device)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            images = x_train[idx]
            if torch.rand(1, generator=order_gen).item() < 0.5:  # flip augmentation, as the study's
                images = images.flip(3)
            loss = F.cross_entropy(model(_detection_input(images, cfg, settings.image_size)), y_train[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretrain_backbone: loss {loss.item()} at epoch {epoch}, step {step} "
                                         f"(norm {cfg.MODEL.RESNETS.NORM!r}, lr {lr}): the run diverged")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        log(f"pretrain_backbone: epoch {epoch + 1}/{settings.epochs}: mean loss {sum(losses) / len(losses):.3f}")
    error = _error(model, x_val, y_val, cfg, settings.image_size)
    state = checkpoint_state(resnet, prefix)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checkpoint = {"model": {k: v.cpu() for k, v in state.items()}, "__author__": "gn_det.train.pretrain"}
    atomic_write(path, lambda f: torch.save(checkpoint, f))  # whole or not at all, under a unique temporary
    return {"norm": cfg.MODEL.RESNETS.NORM, "settings": dataclasses.asdict(settings), "lr": lr,
            "steps": total, "val_error": error, "seconds": time.time() - start, "tensors": len(state),
            "weights": os.path.abspath(path)}
