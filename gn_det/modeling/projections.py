"""The convolutions of a detectron2 model whose output only a gn_det GN reads, cheap to run
again: under output recomputation (``MODEL.GN.RECOMPUTE_OUTPUT``, ``gn_det.set_recompute_output``)
their GN's input is recomputed by running the convolution again instead of being saved.
Registered with ``gn_det.recompute.register_projection_finder`` when gn_det.modeling is imported
(``import gn_det`` with detectron2 installed)."""
from __future__ import annotations

from typing import List

from detectron2.layers import CNNBlockBase, Conv2d
from detectron2.modeling.backbone import FPN
from torch import nn

from ..layers.group_norm import GroupNorm
from ..recompute import register_projection_finder

__all__ = ["projection_convs"]


@register_projection_finder
def projection_convs(model: nn.Module) -> List[nn.Module]:
    """The convolutions of ``model`` whose output only a gn_det GN (without activation) reads,
    cheap to run again: the 1x1 projection shortcuts of detectron2's residual blocks and the
    1x1 lateral convolutions of its FPN (each feeds a sum). Those with frozen weights are left
    out (they keep no input to recompute from)."""
    found = []
    for module in model.modules():
        if isinstance(module, CNNBlockBase):
            found.append(getattr(module, "shortcut", None))
        elif isinstance(module, FPN):
            found.extend(module.lateral_convs)
    return [conv for conv in found
            if isinstance(conv, Conv2d) and isinstance(conv.norm, GroupNorm) and conv.norm.activation is None
            and conv.activation is None and tuple(conv.kernel_size) == (1, 1) and conv.weight.requires_grad]
