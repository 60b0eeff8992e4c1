"""``convert_to_group_norm``: turn an already built model's norms into gn_det's GN."""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from ..layers.group_norm import GroupNorm
from .fuse import fuse_norm_activation
from .weight_std import standardize_weights

__all__ = ["PREDICTION_LAYERS", "ConversionReport", "convert_to_group_norm"]

logger = logging.getLogger(__name__)

# Attribute names of the layers whose outputs are a head's predictions, in detectron2's heads
# (and the projects built on them), with what each predicts. A norm there would normalize the
# logits/regressions themselves (and its groups would have to divide e.g. 80 classes).
PREDICTION_LAYERS = {
    "predictor": "mask logits (mask head) / class logits per pixel (semantic-segmentation head)",
    "cls_score": "class logits (box predictor; RetinaNet/FCOS head)",
    "bbox_pred": "box deltas (box predictor; RetinaNet/FCOS head)",
    "objectness_logits": "RPN objectness logits",
    "anchor_deltas": "RPN box deltas",
    "ctrness": "FCOS centerness",
    "score_lowres": "keypoint heatmap logits",
}


@dataclasses.dataclass
class ConversionReport:
    """What ``convert_to_group_norm`` changed, by module name."""

    replaced: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, old type)
    added: List[str] = dataclasses.field(default_factory=list)  # convs that got a GN
    dropped_bias: List[str] = dataclasses.field(default_factory=list)  # convs whose bias GN made redundant
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, why it got no GN)
    fused_activations: int = 0
    standardized: List[str] = dataclasses.field(default_factory=list)  # convs whose weights are standardized

    def __str__(self) -> str:
        kinds = {}
        for _, old in self.replaced:
            kinds[old] = kinds.get(old, 0) + 1
        replaced = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing"
        return (
            f"replaced {replaced} with gn_det GroupNorm; added GN to {len(self.added)} convs "
            f"(dropped {len(self.dropped_bias)} conv biases); fused {self.fused_activations} ReLUs; "
            f"{len(self.standardized)} convs with standardized weights"
            + "".join(f"; skipped {name}: {why}" for name, why in self.skipped)
        )


def _norm_affine(norm: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    return weight, bias


def convert_to_group_norm(
    model: nn.Module,
    num_groups: int = 32,
    channels_per_group: int = 0,
    eps: float = 1e-5,
    init_from_norm: bool = True,
    add_to_norm_free_convs: bool = False,
    add_within: Sequence[str] = ("backbone.", "roi_heads."),
    fuse_activation: bool = True,
    weight_standardization: str = "",
) -> ConversionReport:
    """Replace, in place, ``FrozenBatchNorm2d``, ``BatchNorm2d`` and ``nn.GroupNorm`` modules
    with gn_det's ``GroupNorm``.

    Args:
        model: any module tree (e.g. a detectron2 ``GeneralizedRCNN``).
        num_groups, channels_per_group: the group count of the new GN layers (from BN), by
            number or (when > 0) by channels per group. An ``nn.GroupNorm`` keeps its own
            group count and eps: it becomes the same layer on gn_det's kernels.
        eps: eps of GN layers that replace BN or are added.
        init_from_norm: start GN's gamma/beta from the replaced norm's affine (BN's
            ``weight``/``bias``); else gamma = 1, beta = 0.
        add_to_norm_free_convs: also give a GN to each detectron2 ``Conv2d`` without a norm
            whose name starts with one of ``add_within`` (the FPN and the heads in stock
            configs; the RPN head is left alone), dropping the conv's bias, which GN's beta
            makes redundant. Prediction layers never get one: a conv named as in
            ``PREDICTION_LAYERS`` (mask/box/keypoint/sem-seg predictors, RPN objectness and
            deltas, RetinaNet/FCOS score, box and centerness convs) is left as it is and
            listed in ``report.skipped`` with what it predicts.
        fuse_activation: move the ReLUs that follow the new GN layers into their kernels.
        weight_standardization: "mmcv" or "timm": every detectron2 ``Conv2d`` whose norm is
            now a gn_det GN standardizes its weight (``gn_det.standardize_weights``); "" off.
    Returns:
        A ``ConversionReport``; it is also logged. New layers take the device and dtype of
        what they replace; where the conv before a norm is frozen (``requires_grad=False``,
        e.g. detectron2's ``FREEZE_AT`` stages) its GN's parameters are frozen too.
    """
    report = ConversionReport()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, GroupNorm) or not isinstance(child, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm)):
                continue
            if isinstance(child, nn.GroupNorm):  # the same layer, a scale without a shift included
                new = GroupNorm(child.num_groups, child.num_channels, eps=child.eps, affine=child.affine,
                                bias=child.affine and child.bias is not None)
            else:
                new = GroupNorm.from_channels(child.num_features, num_groups, channels_per_group, layer=name, eps=eps)
            weight, bias = _norm_affine(child)
            reference = weight if weight is not None else next(iter(child.buffers()), None)
            if reference is not None:
                new.to(device=reference.device, dtype=reference.dtype)
            if init_from_norm and new.affine:
                with torch.no_grad():
                    if weight is not None:
                        new.weight.copy_(weight)
                    if bias is not None and new.bias is not None:
                        new.bias.copy_(bias)
            conv_weight = getattr(parent, "weight", None)
            if isinstance(conv_weight, nn.Parameter):
                new.requires_grad_(conv_weight.requires_grad)
            setattr(parent, child_name, new)
            report.replaced.append((name, type(child).__name__))
    if add_to_norm_free_convs:
        for name, conv in model.named_modules():
            if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) or not name.startswith(tuple(add_within)):
                continue
            predicts = PREDICTION_LAYERS.get(name.rsplit(".", 1)[-1])
            if predicts is not None:
                report.skipped.append((name, f"prediction layer ({predicts})"))
                continue
            if type(conv) is not Conv2d or conv.norm is not None:  # torch's convs have no norm to give
                continue
            conv.norm = GroupNorm.from_channels(conv.out_channels, num_groups, channels_per_group, layer=name,
                                                eps=eps).to(conv.weight.device, conv.weight.dtype)
            conv.norm.requires_grad_(conv.weight.requires_grad)
            report.added.append(name)
            if conv.bias is not None:
                conv.bias = None
                report.dropped_bias.append(name)
    if fuse_activation:
        report.fused_activations = fuse_norm_activation(model)
    if weight_standardization:  # after fusing, which matches detectron2's Conv2d exactly
        report.standardized = standardize_weights(model, weight_standardization)
    logger.info("convert_to_group_norm: %s", report)
    return report
