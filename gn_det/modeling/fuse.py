"""Move the ReLU that detectron2 applies right after a norm into gn_det's GN kernels.

- detectron2 ``Conv2d(norm=GN, activation=ReLU)`` (box head, mask head, converted FPN/heads):
  the activation moves into the norm.
- ResNet ``BasicStem``, ``BasicBlock``, ``BottleneckBlock`` call ``F.relu_`` after a conv's
  norm in ``forward``: the block's class becomes a subclass whose forward skips the ReLUs
  that its GN layers now apply.
- The residual blocks' ends, ``relu_(norm(conv(x)) + shortcut)``: one GN pass with the add
  and the ReLU (``GroupNorm.forward_residual``), which keeps the conv's output and the block's
  output for backward (the shortcut instead under output recomputation), as the unfused block
  keeps its conv's output and the ReLU's output. The last conv is then run by the block
  (its weights, through ``nn.Conv2d._conv_forward``), not called as a module: forward hooks
  on that conv do not run. ``MODEL.GN.FUSE_ACTIVATION: False`` leaves blocks as they are.
Module names, parameters and buffers are untouched, so state_dicts keep their keys.
"""
from __future__ import annotations

import torch.nn.functional as F
from detectron2.layers import Conv2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import nn

from ..layers.group_norm import GroupNorm

__all__ = ["fuse_norm_activation"]


def _fusable(conv: nn.Module) -> bool:
    norm = getattr(conv, "norm", None)
    return isinstance(norm, GroupNorm) and norm.activation in (None, "relu")


def _relu(x, conv):
    """ReLU unless ``conv``'s GN already applied it."""
    norm = getattr(conv, "norm", None)
    if isinstance(norm, GroupNorm) and norm.activation == "relu":
        return x
    return F.relu_(x)


class FusedBasicStem(BasicStem):
    def forward(self, x):
        x = _relu(self.conv1(x), self.conv1)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def _block_end_fusable(conv: nn.Module) -> bool:
    """Whether ``relu_(conv(x) + shortcut)`` can run as one GN pass: a detectron2 Conv2d
    whose norm is gn_det's GN without an activation of its own, and no activation after."""
    return isinstance(conv, Conv2d) and _fusable(conv) and conv.norm.activation is None and conv.activation is None


def _block_end(conv: Conv2d, x, shortcut):
    """``relu_(conv(x) + shortcut)``, the add and ReLU fused into conv's GN where they can be."""
    if _block_end_fusable(conv):
        return conv.norm.forward_residual(conv._conv_forward(x, conv.weight, conv.bias), shortcut, "relu")
    out = conv(x)
    out += shortcut
    return F.relu_(out)


class FusedBasicBlock(BasicBlock):
    def forward(self, x):
        out = _relu(self.conv1(x), self.conv1)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return _block_end(self.conv2, out, shortcut)


class FusedBottleneckBlock(BottleneckBlock):
    def forward(self, x):
        out = _relu(self.conv1(x), self.conv1)
        out = _relu(self.conv2(out), self.conv2)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return _block_end(self.conv3, out, shortcut)


# block class -> (fused class, convs whose norm is followed by a ReLU in forward)
_FUSED_BLOCKS = {
    BasicStem: (FusedBasicStem, ("conv1",)),
    BasicBlock: (FusedBasicBlock, ("conv1",)),
    BottleneckBlock: (FusedBottleneckBlock, ("conv1", "conv2")),
}


def _is_relu(activation) -> bool:
    return isinstance(activation, nn.ReLU) or activation in (F.relu, F.relu_)


def fuse_norm_activation(model: nn.Module) -> int:
    """Fuse ReLUs into the gn_det GN layers that precede them, in place. Returns the number
    of ReLUs fused. Layers whose norm is not gn_det's GN are left as they are."""
    fused = 0
    for module in model.modules():
        spec = _FUSED_BLOCKS.get(type(module))
        if spec is not None:
            fused_class, conv_names = spec
            convs = [getattr(module, name) for name in conv_names]
            if all(_fusable(conv) for conv in convs):
                for conv in convs:
                    conv.norm.activation = "relu"
                module.__class__ = fused_class
                fused += len(convs)
        elif type(module) is Conv2d and _fusable(module) and _is_relu(module.activation):
            module.norm.activation = "relu"
            module.activation = None
            fused += 1
    return fused
