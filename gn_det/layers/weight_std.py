"""Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization", 2019): a convolution uses its weight standardized per output
channel, over that channel's inputs (``C_in / groups`` x kernel), ``(w - mean) / std``.

Two published definitions differ in the std and eps; gn_det names them by where they come from
(one table, ``WEIGHT_STANDARDIZATIONS``, one resolver):

- ``"mmcv"``: mmcv's ``ConvWS2d`` (mmdetection's GN+WS models): ``(w - mean) / (std + 1e-5)``,
  std with Bessel's correction (``torch.std``'s default). mmdetection's GN+WS ImageNet
  backbones were trained with it, so they give their outputs only with it.
- ``"timm"``: timm's ``StdConv2d`` with its default eps: ``(w - mean) / sqrt(var + 1e-6)``,
  the population variance (what ``F.batch_norm`` in training mode computes). (timm's BiT
  ResNet-V2 models build it with eps 1e-8 instead: their weights give slightly other outputs.)

This module is plain PyTorch; ``gn_det.modeling.weight_std`` puts it into detectron2's
``Conv2d``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["REQUEST_ATTR", "WEIGHT_STANDARDIZATIONS", "WSVariant", "awaits_standardization", "request_weight_standardization",
           "resolve_weight_standardization", "standardize_weight"]

# attribute of a norm module: the variant it asks the convolution before it to standardize with
REQUEST_ATTR = "conv_weight_standardization"


@dataclasses.dataclass(frozen=True)
class WSVariant:
    """One definition of weight standardization."""

    name: str
    eps: float
    unbiased: bool  # std with Bessel's correction (divide by n - 1), else the population std
    eps_inside_sqrt: bool  # sqrt(var + eps), else std + eps
    source: str  # where the definition comes from (for docs and errors)

    def formula(self) -> str:
        """The definition in one line, e.g. ``(w - mean) / (std_unbiased + 1e-05)``."""
        if self.eps_inside_sqrt:
            return f"(w - mean) / sqrt(var_{'unbiased' if self.unbiased else 'population'} + {self.eps:g})"
        return f"(w - mean) / (std_{'unbiased' if self.unbiased else 'population'} + {self.eps:g})"


WEIGHT_STANDARDIZATIONS: Dict[str, WSVariant] = {
    variant.name: variant for variant in (
        WSVariant("mmcv", eps=1e-5, unbiased=True, eps_inside_sqrt=False,
                  source="mmcv.cnn.bricks.conv_ws.ConvWS2d (mmdetection's GN+WS configs)"),
        WSVariant("timm", eps=1e-6, unbiased=False, eps_inside_sqrt=True,
                  source="timm.layers.std_conv.StdConv2d, its default eps (timm's BiT models use 1e-8)"),
    )
}
OFF = ""  # the config value that turns weight standardization off


def resolve_weight_standardization(value: Union[str, WSVariant, None]) -> Optional[WSVariant]:
    """The variant a setting names: ``""`` (or None) is off, ``"mmcv"``/``"timm"`` a variant
    of ``WEIGHT_STANDARDIZATIONS``; anything else is a ``ValueError`` listing them."""
    if isinstance(value, WSVariant):
        return value
    if value is None or value == OFF:
        return None
    if isinstance(value, str) and value in WEIGHT_STANDARDIZATIONS:
        return WEIGHT_STANDARDIZATIONS[value]
    choices = ", ".join(repr(name) for name in (OFF, *WEIGHT_STANDARDIZATIONS))
    raise ValueError(f"weight standardization {value!r} is not one of {choices} (\"\" is off)")


def in_graph_capture() -> bool:
    """Compiling, tracing or exporting: the standardization is recorded as standard operators
    (no cache, no custom autograd function)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _statistics(w: Tensor, spec: WSVariant) -> Tuple[Tensor, Tensor, Tensor]:
    """Per output channel ``(C_out, 1, ...)``: the mean, the root (std, or sqrt(var + eps))
    and the factor ``inv`` every path multiplies ``w - mean`` by (one expression everywhere,
    so every path gives the same bits)."""
    dims = tuple(range(1, w.dim()))  # reductions over dims keep any memory format (a view would not)
    var, mean = torch.var_mean(w, dim=dims, correction=1 if spec.unbiased else 0, keepdim=True)
    if spec.eps_inside_sqrt:
        root = torch.sqrt(var + spec.eps)
        return mean, root, 1.0 / root
    root = torch.sqrt(var)
    return mean, root, 1.0 / (root + spec.eps)


class _Standardize(torch.autograd.Function):
    """The standardization with a hand-written backward: 3 passes over the weight instead of
    autograd's chain through var_mean, sub, sqrt and div (2.6x less time forward+backward on
    a 512x512x3x3 weight on CPU). With y the output, g its gradient, n the fan-in and d = n - 1
    (unbiased) or n: dL/dw = inv * (g - mean(g) - y * c), c = sum(g * y) / d for sqrt(var + eps),
    c = sum(g * y) * (std + eps) / (std * d) for std + eps (0 where std = 0, where the std has
    no derivative: autograd would give NaN)."""

    @staticmethod
    def forward(ctx, w: Tensor, spec: WSVariant) -> Tensor:
        mean, root, inv = _statistics(w, spec)
        out = (w - mean).mul_(inv)
        ctx.save_for_backward(out, root, inv)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, root, inv = ctx.saved_tensors
        spec = ctx.spec
        dims = tuple(range(1, out.dim()))
        d = out[0].numel() - (1 if spec.unbiased else 0)
        gy = (grad * out).sum(dim=dims, keepdim=True)
        if spec.eps_inside_sqrt:
            c = gy / d
        else:
            c = torch.where(root > 0, gy / (inv * root * d), torch.zeros_like(gy))
        return (grad - grad.mean(dim=dims, keepdim=True) - out * c).mul_(inv), None


def standardize_weight(weight: Tensor, variant: Union[str, WSVariant] = "mmcv") -> Tensor:
    """A convolution weight ``(C_out, C_in / groups, *kernel)`` standardized per output
    channel with ``variant``'s definition; same shape, dtype and memory format.

    Statistics are taken in float32 for half-precision weights (and in the weight's dtype
    otherwise), with autocast off: the result does not depend on the autocast state, and the
    convolution after it is cast by autocast as it would cast the weight itself. Where a
    gradient reaches the weight, a custom autograd function computes it (outside graph
    capture, which records standard operators)."""
    spec = resolve_weight_standardization(variant)
    if spec is None:
        return weight
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        if in_graph_capture():
            mean, _, inv = _statistics(w, spec)
            out = (w - mean) * inv
        elif w.requires_grad and torch.is_grad_enabled():
            out = _Standardize.apply(w, spec)
        else:
            mean, _, inv = _statistics(w, spec)
            out = (w - mean).mul_(inv)
    return out.to(weight.dtype)


def _unstandardized(norm: nn.Module, args) -> None:
    """Forward pre-hook of a norm that asks for weight standardization until its conv has it."""
    raise ConfigError(
        f"{type(norm).__name__} asks for weight standardization ({getattr(norm, REQUEST_ATTR)!r}) of the "
        "convolution before it, which was never standardized: gn_det's build paths do it (detectron2's build_model "
        "and build functions, gn_det.lazy.build_lazy_model, convert_to_group_norm); for a module built otherwise "
        "call gn_det.standardize_weights(module) once after building it (it finds a detectron2 Conv2d's norm= and a "
        "torch nn.Conv2d followed by its norm in an nn.Sequential)")


def awaits_standardization(module: nn.Module) -> bool:
    """``module`` is a norm that asks for weight standardization of a convolution that does not
    have it yet (its check runs at its next forward)."""
    return any(hook is _unstandardized for hook in module._forward_pre_hooks.values())


def remove_unstandardized_guard(norm: nn.Module) -> None:
    """Drop ``norm``'s check that its convolution standardizes (it does now)."""
    for key, hook in list(norm._forward_pre_hooks.items()):
        if hook is _unstandardized:
            del norm._forward_pre_hooks[key]


def request_weight_standardization(norm: nn.Module, variant: Union[str, WSVariant] = "mmcv") -> nn.Module:
    """Mark ``norm`` (a module given to a detectron2 ``Conv2d`` as ``norm=``) as asking that
    conv to standardize its weight with ``variant``; ``standardize_weights`` applies it.
    Returns ``norm``."""
    spec = resolve_weight_standardization(variant)
    if spec is None:
        return norm
    setattr(norm, REQUEST_ATTR, spec.name)
    remove_unstandardized_guard(norm)
    norm.register_forward_pre_hook(_unstandardized)
    return norm
