"""Group Normalization with a fused activation in PyTorch operations: the CPU path.

It mirrors the Triton kernels' contract (same arguments, same saved tensors: x and the
per-group statistics, the activation's input recomputed in backward) and uses ATen's
native GroupNorm kernels for the normalisation itself, so CPU speed matches nn.GroupNorm.

ATen's CPU GroupNorm on channels_last float32 input loses accuracy badly when the mean is
large against the standard deviation (20% to 165% relative error at mean/std >= 1e3 in
torch 2.14; NCHW is fine), so channels_last input is normalised in NCHW and converted back.
Half-precision input is computed in float32 (statistics and arithmetic) and cast back.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .activation import ACT_NONE, activation_grad, apply_activation
from .layout import memory_format_of


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x)).contiguous()


def torch_group_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, activation: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``triton_group_norm_forward``; stats are float32 (float64 for float64 x)."""
    n, c = x.shape[:2]
    hxw = x.numel() // (n * c)
    dtype = _compute_dtype(x)
    # (The native GroupNorm ops are on none of autocast's lists: no need to leave autocast.)
    y, mean, rstd = torch.native_group_norm(_nchw(x), weight.to(dtype), bias.to(dtype), n, c, hxw, num_groups, eps)
    y = apply_activation(y, activation)
    return y.to(dtype=x.dtype, memory_format=memory_format_of(x)), mean, rstd


def torch_group_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, activation: int, eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``triton_group_norm_backward`` (plus eps, to recompute z)."""
    n, c = x.shape[:2]
    hxw = x.numel() // (n * c)
    dtype = _compute_dtype(x)
    xc = _nchw(x)
    w = weight.to(dtype)
    grad = _nchw(grad_y)
    if activation != ACT_NONE:
        # Recompute the activation's input z with the forward's own kernel: one pass, and
        # bit-identical to the forward, so ReLU's mask agrees with it.
        z = torch.native_group_norm(xc, w, bias.to(dtype), n, c, hxw, num_groups, eps)[0]
        grad = activation_grad(z, grad, activation)
    dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
        grad, xc, mean, rstd, w, n, c, hxw, num_groups, [True, True, True]
    )
    return dx.to(dtype=x.dtype, memory_format=memory_format_of(x)), dweight.to(weight.dtype), dbias.to(weight.dtype)

