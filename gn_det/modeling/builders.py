"""Builders registered in detectron2's registries, so configs pick gn_det up by name:

- backbones ``build_fastgn_resnet_backbone``, ``build_fastgn_resnet_fpn_backbone``
  (``MODEL.BACKBONE.NAME``),
- box head ``FastGNConvFCHead`` (``MODEL.ROI_BOX_HEAD.NAME``),
- mask head ``FastGNMaskRCNNConvUpsampleHead`` (``MODEL.ROI_MASK_HEAD.NAME``).

Each builds detectron2's own module under the config's GN settings (``MODEL.GN.*``), then,
with ``MODEL.GN.FUSE_ACTIVATION``, fuses the ReLUs that follow its GN layers. The modules
are detectron2's, so their state_dict keys and shapes are detectron2's: model-zoo GN
checkpoints and Detectron's ``R-50-GN.pkl`` load as they do into detectron2's GN models.
``build_model(cfg)`` does the same for a whole model, whatever builders its config names.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling import build_model as _detectron2_build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
import torch
from torch import nn

from ..config import gn_settings_from_cfg, validate_gn_config
from .fuse import fuse_norm_activation
from .norm import GNSettings, gn_settings, install

__all__ = ["build_model", "building_from"]


@contextlib.contextmanager
def building_from(cfg: CfgNode) -> Iterator[GNSettings]:
    """Scope in which detectron2 modules build with ``cfg``'s GN settings (checked first)."""
    validate_gn_config(cfg)
    install()  # re-bind get_norm in detectron2 modules loaded since the last call
    with gn_settings(gn_settings_from_cfg(cfg)) as settings:
        yield settings


def _build(cfg: CfgNode, builder, *args) -> nn.Module:
    with building_from(cfg) as settings:
        module = builder(*args)
    if settings.fuse_activation:
        fuse_norm_activation(module)
    return module


def build_model(cfg: CfgNode) -> nn.Module:
    """detectron2's ``build_model`` under ``cfg``'s GN settings, with ReLUs fused into GN, and
    in channels_last memory format when ``MODEL.CHANNELS_LAST``: with NHWC conv weights the
    convolutions produce NHWC activations, which gn_det's GN keeps."""
    model = _build(cfg, _detectron2_build_model, cfg)
    if cfg.MODEL.get("CHANNELS_LAST", False):
        model.to(memory_format=torch.channels_last)
    return model


@BACKBONE_REGISTRY.register()
def build_fastgn_resnet_backbone(cfg, input_shape):
    """detectron2's ResNet with the config's GN settings and ReLUs fused into GN."""
    return _build(cfg, build_resnet_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_fastgn_resnet_fpn_backbone(cfg, input_shape):
    """detectron2's ResNet-FPN with the config's GN settings and ReLUs fused into GN."""
    return _build(cfg, build_resnet_fpn_backbone, cfg, input_shape)


@ROI_BOX_HEAD_REGISTRY.register()
def FastGNConvFCHead(cfg, input_shape):  # noqa: N802  (a registry name, like detectron2's heads)
    """detectron2's ``FastRCNNConvFCHead`` with the config's GN settings and fused ReLUs."""
    return _build(cfg, FastRCNNConvFCHead, cfg, input_shape)


@ROI_MASK_HEAD_REGISTRY.register()
def FastGNMaskRCNNConvUpsampleHead(cfg, input_shape):  # noqa: N802
    """detectron2's ``MaskRCNNConvUpsampleHead`` with the config's GN settings and fused ReLUs."""
    return _build(cfg, MaskRCNNConvUpsampleHead, cfg, input_shape)
