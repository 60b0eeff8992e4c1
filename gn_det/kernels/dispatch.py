"""Which implementation runs a GN call: the backend choice ("auto": Triton kernels on CUDA;
"torch": PyTorch operations everywhere), the Triton interpreter on CPU for tests, and the
path names benchmarks and debugging print. ``forward_impl`` / ``backward_impl`` are the one
place that picks the Triton kernels (``group_norm_triton``) or the PyTorch path
(``group_norm_torch``); ``group_norm`` itself asks tuning (``tuning``, which starts from the
routes of ``routing``) whether ATen's GroupNorm runs instead.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .activation import ACT_NONE, RESIDUAL_ADD, activation_code
from .group_norm_torch import compute_dtype, torch_group_norm_backward, torch_group_norm_forward
from .layout import flat_spatial_stride, memory_format_of, to_dense
from .routing import aten_route
from .support import kernels_support, triton_support
from .tuning import decided_path, failed_verification
from .verification import verified_backward, verified_forward, verify_key_of

__all__ = ["BACKENDS", "backend", "backend_from_environment", "backward_impl", "dispatch_path", "forward_impl",
           "set_backend", "triton_enabled_for", "triton_on_cpu"]


@functools.lru_cache(maxsize=None)
def _triton_module():
    """The Triton kernels' module, or None where triton is not installed."""
    try:
        from . import group_norm_triton
    except ImportError:  # e.g. a CPU-only torch build without triton
        return None
    return group_norm_triton


BACKENDS = ("auto", "torch")
_backend = "auto"  # set by set_backend only: at import from GN_DET_BACKEND, later by an explicit call


def set_backend(name: str) -> str:
    """Choose the backend: "auto" (the default) runs the Triton kernels on CUDA; "torch" runs
    PyTorch operations everywhere, the escape hatch should the kernels ever fail on a machine.
    Returns the backend before, to restore it with. ``GN_DET_BACKEND`` is read once, at
    import, into the first call."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"{name!r} is not a gn_det backend: use 'auto' (Triton kernels on CUDA, the default) or "
                         "'torch' (PyTorch operations everywhere)")
    previous, _backend = _backend, name
    return previous


def backend() -> str:
    """The backend in use (see ``set_backend``)."""
    return _backend


def backend_from_environment() -> str:
    """``GN_DET_BACKEND`` (case-insensitive; "auto" when unset), checked."""
    value = os.environ.get("GN_DET_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"GN_DET_BACKEND={os.environ['GN_DET_BACKEND']!r} is not a gn_det backend: use 'auto' (Triton "
                         "kernels on CUDA, the default) or 'torch' (PyTorch operations everywhere)")
    return value


@functools.lru_cache(maxsize=None)
def triton_on_cpu() -> bool:
    """Whether CPU tensors go to the Triton interpreter (read once: TRITON_INTERPRET must be
    set before triton is imported anyway)."""
    asked = (
        os.environ.get("GN_DET_TRITON_ON_CPU") == "1"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and _triton_module() is not None
    )
    if asked and triton_support() is not None:  # (a triton whose interpreter cannot run the kernels: support.py)
        raise RuntimeError(f"GN_DET_TRITON_ON_CPU=1 asks for gn_det's Triton kernels under triton's interpreter, but "
                           f"{triton_support()}; or unset GN_DET_TRITON_ON_CPU")
    return asked


def triton_enabled_for(x: Tensor) -> bool:
    """Whether x goes to the Triton kernels: CUDA tensors, and CPU tensors when the Triton
    interpreter is on (``TRITON_INTERPRET=1``) and ``GN_DET_TRITON_ON_CPU=1`` asks for it
    (how the kernels are tested on machines without a GPU). ``GN_DET_BACKEND=torch`` turns
    the kernels off."""
    if x.dtype == torch.float64 or backend() == "torch":
        return False  # (float64 is for reference checks: the exact PyTorch path)
    if x.is_cuda:  # (support: the GPU's architecture, the dtype there, the triton installed)
        return kernels_support(x.device, x.dtype).ok and _triton_module() is not None
    return x.device.type == "cpu" and triton_on_cpu()


def dispatch_path(x: Tensor, num_groups: int, activation: Optional[str] = None, residual: bool = False,
                  train: bool = True) -> str:
    """Which implementation ``group_norm`` runs for x (for benchmark tables and debugging), as
    decided so far: a bucket that tuning has not measured, or verification not checked, yet
    shows the kernels' path."""
    if x.numel() == 0:
        return "nothing (empty input)"
    x = to_dense(x)
    code = activation_code(activation)
    decision = decided_path(x, num_groups, code, residual, train)
    if decision is not None and decision.path == "aten":
        times = ", ".join(f"{path} {ms:.3g} ms" for path, ms in decision.times_ms.items())
        return f"PyTorch: ATen GroupNorm, tuned ({decision.source}: {times})"
    if triton_enabled_for(x):
        failed = failed_verification(verify_key_of(_triton_module(), x, num_groups, code, residual))
        if failed is not None:
            return f"PyTorch: gn_det's PyTorch path (the kernels failed verification here: {failed.detail})"
        if decision is None and aten_route(x, num_groups, code) is not None:
            return "PyTorch: ATen GroupNorm, routed (Triton measured slower here)"
        return "Triton: " + _triton_module().kernel_path(x, num_groups)
    if memory_format_of(x) is not torch.contiguous_format:
        return "PyTorch: channels_last statistics + ATen backward"
    return "PyTorch: ATen GroupNorm" + ("" if code == ACT_NONE else " + activation")


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
