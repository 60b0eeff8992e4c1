"""Builder names gn_det registered in detectron2's registries before detectron2's own builders
got the config's GN settings (``gn_det.modeling.hooks``), kept so that configs naming them
still build:

- backbones ``build_fastgn_resnet_backbone``, ``build_fastgn_resnet_fpn_backbone``
  (``MODEL.BACKBONE.NAME``),
- box head ``FastGNConvFCHead`` (``MODEL.ROI_BOX_HEAD.NAME``),
- mask head ``FastGNMaskRCNNConvUpsampleHead`` (``MODEL.ROI_MASK_HEAD.NAME``).

Each builds detectron2's module: the same module, state_dict keys and GN layers as
detectron2's name gives.
"""
from __future__ import annotations

from detectron2.modeling import BACKBONE_REGISTRY, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

__all__ = []


@BACKBONE_REGISTRY.register()
def build_fastgn_resnet_backbone(cfg, input_shape):
    """detectron2's ``build_resnet_backbone``."""
    return build_resnet_backbone(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_fastgn_resnet_fpn_backbone(cfg, input_shape):
    """detectron2's ``build_resnet_fpn_backbone``."""
    return build_resnet_fpn_backbone(cfg, input_shape)


@ROI_BOX_HEAD_REGISTRY.register()
def FastGNConvFCHead(cfg, input_shape):  # (a registry name, like detectron2's heads)
    """detectron2's ``FastRCNNConvFCHead``."""
    return FastRCNNConvFCHead(cfg, input_shape)


@ROI_MASK_HEAD_REGISTRY.register()
def FastGNMaskRCNNConvUpsampleHead(cfg, input_shape):
    """detectron2's ``MaskRCNNConvUpsampleHead``."""
    return MaskRCNNConvUpsampleHead(cfg, input_shape)
