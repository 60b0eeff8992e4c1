"""Builder names gn_det registered in detectron2's registries before detectron2's own builders
got the config's GN settings (``gn_det.modeling.hooks``), kept so that configs naming them
still build:

- backbones ``build_fastgn_resnet_backbone``, ``build_fastgn_resnet_fpn_backbone``
  (``MODEL.BACKBONE.NAME``),
- box head ``FastGNConvFCHead`` (``MODEL.ROI_BOX_HEAD.NAME``),
- mask head ``FastGNMaskRCNNConvUpsampleHead`` (``MODEL.ROI_MASK_HEAD.NAME``).

Each builds detectron2's module: the same module, state_dict keys and GN layers as
detectron2's name gives. The two backbones apply ``MODEL.RESNETS.CONV_BIAS``
(``gn_det.config.ResNetSettings``): with it, every convolution of the ResNet (the FPN backbone's
``bottom_up``) gets a zero bias, which detectron2's ResNet cannot have (``bias=False`` in its
code); its state_dict then has a ``.bias`` beside each convolution's ``.weight``. A config asking
for it with detectron2's builder names is refused when read (``ResNetSettings.from_cfg``).
"""
from __future__ import annotations

import torch
from detectron2.modeling import BACKBONE_REGISTRY, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from ..config import ResNetSettings

__all__ = ["add_conv_biases"]


def add_conv_biases(module: nn.Module) -> int:
    """Give every ``nn.Conv2d`` under ``module`` that has no bias a bias ``(out_channels,)`` of
    zeros (as detectron2's ``c2_msra_fill`` initialises one), on its weight's device and dtype,
    trainable iff the weight is (a frozen stage, ``MODEL.BACKBONE.FREEZE_AT``, stays frozen).
    Returns how many it added."""
    added = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.bias is None:
            weight = conv.weight
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=weight.dtype, device=weight.device),
                                     requires_grad=weight.requires_grad)
            added += 1
    return added


@BACKBONE_REGISTRY.register()
def build_fastgn_resnet_backbone(cfg, input_shape):
    """detectron2's ``build_resnet_backbone``; with ``MODEL.RESNETS.CONV_BIAS``, biases in its convolutions."""
    backbone = build_resnet_backbone(cfg, input_shape)
    if ResNetSettings.from_cfg(cfg).conv_bias:
        add_conv_biases(backbone)
    return backbone


@BACKBONE_REGISTRY.register()
def build_fastgn_resnet_fpn_backbone(cfg, input_shape):
    """detectron2's ``build_resnet_fpn_backbone``; with ``MODEL.RESNETS.CONV_BIAS``, biases in
    its ResNet's convolutions (``bottom_up``; the FPN's have theirs without a norm)."""
    backbone = build_resnet_fpn_backbone(cfg, input_shape)
    if ResNetSettings.from_cfg(cfg).conv_bias:
        add_conv_biases(backbone.bottom_up)
    return backbone


@ROI_BOX_HEAD_REGISTRY.register()
def FastGNConvFCHead(cfg, input_shape):  # (a registry name, like detectron2's heads)
    """detectron2's ``FastRCNNConvFCHead``."""
    return FastRCNNConvFCHead(cfg, input_shape)


@ROI_MASK_HEAD_REGISTRY.register()
def FastGNMaskRCNNConvUpsampleHead(cfg, input_shape):
    """detectron2's ``MaskRCNNConvUpsampleHead``."""
    return MaskRCNNConvUpsampleHead(cfg, input_shape)
