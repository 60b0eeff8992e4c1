"""The op's implementation: ``forward_impl`` / ``backward_impl`` run the Triton kernels
(``group_norm_triton``, verified at each bucket's first use: ``verification.py``) or the
PyTorch path (``group_norm_torch``) for the custom op and ``GroupNormFunction``
(``autograd.py``), as ``paths.triton_enabled_for`` says (``paths.decide``'s steps 6-8: the one
place where a call's path is chosen). The backend switch lives in ``switches.py``; its names
and ``dispatch_path`` are importable from here as before.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .activation import RESIDUAL_ADD
from .group_norm_torch import compute_dtype, torch_group_norm_backward, torch_group_norm_forward
from .layout import flat_spatial_stride, memory_format_of
from .paths import dispatch_path, triton_enabled_for, triton_module, triton_on_cpu
from .switches import BACKENDS, backend, backend_from_environment, set_backend
from .verification import verified_backward, verified_forward

__all__ = ["BACKENDS", "backend", "backend_from_environment", "backward_impl", "dispatch_path", "forward_impl",
           "set_backend", "triton_enabled_for", "triton_on_cpu"]

_triton_module = triton_module  # (the name gn_det/check.py reads)


def forward_impl(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: int,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); residual, if given, is dense in x's layout (see ``group_norm``)."""
    if x.numel() == 0:  # N = 0 (no ROIs) or an empty spatial size: launch nothing
        stats = x.new_zeros((x.shape[0], num_groups), dtype=compute_dtype(x))
        return torch.empty_like(x), stats, stats.clone()
    if triton_enabled_for(x):  # (verified at the bucket's first use: the PyTorch path where the kernels failed)
        return verified_forward(_triton_module(), x, weight, bias, num_groups, eps, activation, residual)
    return torch_group_norm_forward(x, weight, bias, num_groups, eps, activation, residual)


def backward_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
    num_groups: int, eps: float, activation: int, residual: Optional[Tensor] = None,
    residual_mode: int = RESIDUAL_ADD,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(dx, dweight, dbias, dresidual); dresidual is None without a residual. ``residual``
    is what the forward saved for it: the residual (RESIDUAL_ADD) or the output (RESIDUAL_OUTPUT)."""
    if x.numel() == 0:
        dres = None if residual is None else torch.zeros_like(residual)
        return torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(weight), dres
    if flat_spatial_stride(grad_y) is None:
        grad_y = grad_y.contiguous(memory_format=memory_format_of(x))
    if triton_enabled_for(x):
        return verified_backward(_triton_module(), grad_y, x, weight, bias, mean, rstd, num_groups, eps, activation,
                                 residual, residual_mode)
    return torch_group_norm_backward(grad_y, x, weight, bias, mean, rstd, num_groups, activation, eps, residual,
                                     residual_mode)
