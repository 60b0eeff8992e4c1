"""Activation names accepted by gn_det's GN, and their integer codes in the kernels."""
from __future__ import annotations

from typing import Optional

import torch

ACT_NONE, ACT_RELU, ACT_SILU = 0, 1, 2
ACTIVATIONS = {None: ACT_NONE, "none": ACT_NONE, "relu": ACT_RELU, "silu": ACT_SILU}
ACTIVATION_NAMES = {ACT_NONE: None, ACT_RELU: "relu", ACT_SILU: "silu"}


def activation_code(activation: Optional[str]) -> int:
    """Resolve an activation name (None, "relu", "silu"; case-insensitive) to its code."""
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in ACTIVATIONS:
        raise ValueError(f"Unknown GN activation {activation!r}; expected one of None, 'relu', 'silu'")
    return ACTIVATIONS[key]


def apply_activation(z: torch.Tensor, code: int) -> torch.Tensor:
    """act(z) with PyTorch operations (in place where z is a fresh temporary)."""
    if code == ACT_RELU:
        return torch.relu_(z)
    if code == ACT_SILU:
        return torch.nn.functional.silu(z, inplace=True)
    return z


def activation_grad_(z: torch.Tensor, grad: torch.Tensor, code: int) -> torch.Tensor:
    """d act(z)/dz * grad, written over z (a temporary the caller no longer needs: one fewer
    activation-sized allocation). ATen's own activation backward kernels, one pass each
    (``grad * (z > 0)`` would take a slow float-times-bool promotion path, ~50x slower on CPU)."""
    if code == ACT_RELU:
        return torch.ops.aten.threshold_backward.grad_input(grad, z, 0, grad_input=z)
    if code == ACT_SILU:
        return torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=z)
    return grad
