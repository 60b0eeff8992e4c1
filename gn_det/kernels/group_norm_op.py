"""The GN operator: ``torch.library`` custom ops, their autograd, and the functional form.

``gn_det::group_norm_forward(x, weight, bias, G, eps, act, residual) -> (y, mean, rstd)`` and
``gn_det::group_norm_backward(dy, x, weight, bias, mean, rstd, G, eps, act, saved, mode) -> (dx, dw, db, dr)``
dispatch to the Triton kernels for CUDA tensors and to PyTorch operations for CPU tensors
(and for CUDA tensors too under ``GN_DET_BACKEND=torch``).
Each has a fake implementation, so ``torch.compile(fullgraph=True)`` traces through them,
and the forward op has registered autograd that saves only x and the (N, G) statistics.
``residual`` (optional, x's shape) is added after the affine, before the activation: a
residual block's end, ``relu(GN(x) + shortcut)``, in one pass; backward then also keeps
the residual or, with ReLU, the output, which the next layer keeps anyway
(``activation.RESIDUAL_*``).
In eager mode ``group_norm`` calls the same implementations through an
``autograd.Function``, which skips the custom op's per-call Python dispatch.
Under ``torch.jit.trace`` and ONNX export, ``group_norm`` emits standard operators
(``F.group_norm`` and the activation) instead of the custom op.
In eager mode, an input whose shape a route names (``routing.py``: where the kernels were
measured slower on this GPU model) runs PyTorch's own GroupNorm instead of the kernels.

Custom ops are on none of autocast's lists, so under autocast the op runs in its input's
dtype (float32 statistics) rather than being upcast to float32 as ``F.group_norm`` is.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .activation import (ACT_NONE, ACT_RELU, RESIDUAL_ADD, RESIDUAL_NONE, RESIDUAL_OUTPUT, activation_code,
                         apply_activation, export_activation)
from .group_norm_torch import torch_group_norm_backward, torch_group_norm_forward
from .layout import flat_spatial_stride, memory_format_of, to_dense
from .routing import aten_route

__all__ = ["aten_group_norm", "backend", "dispatch_path", "group_norm", "triton_enabled_for"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ATEN_EXACT_DTYPES = (torch.float32, torch.float64)  # where ATen's CPU GN computes in the input's dtype


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
def _triton_on_cpu() -> bool:
    """Whether CPU tensors go to the Triton interpreter (read once: TRITON_INTERPRET must be
    set before triton is imported anyway)."""
    return (
        os.environ.get("GN_DET_TRITON_ON_CPU") == "1"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and _triton_module() is not None
    )


def triton_enabled_for(x: Tensor) -> bool:
    """Whether x goes to the Triton kernels: CUDA tensors, and CPU tensors when the Triton
    interpreter is on (``TRITON_INTERPRET=1``) and ``GN_DET_TRITON_ON_CPU=1`` asks for it
    (how the kernels are tested on machines without a GPU). ``GN_DET_BACKEND=torch`` turns
    the kernels off."""
    if x.dtype == torch.float64 or backend() == "torch":
        return False  # (float64 is for reference checks: the exact PyTorch path)
    if x.is_cuda:
        return _triton_module() is not None
    return x.device.type == "cpu" and _triton_on_cpu()


def dispatch_path(x: Tensor, num_groups: int, activation: Optional[str] = None) -> str:
    """Which implementation ``group_norm`` runs for x (for benchmark tables and debugging)."""
    if x.numel() == 0:
        return "nothing (empty input)"
    x = to_dense(x)
    if triton_enabled_for(x):
        if aten_route(x, num_groups, activation_code(activation)) is not None:
            return "PyTorch: ATen GroupNorm, routed (Triton measured slower here)"
        return "Triton: " + _triton_module().kernel_path(x, num_groups)
    if memory_format_of(x) is not torch.contiguous_format:
        return "PyTorch: channels_last statistics + ATen backward"
    return "PyTorch: ATen GroupNorm" + ("" if activation_code(activation) == ACT_NONE else " + activation")


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward_impl(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: int,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); residual, if given, is dense in x's layout (see ``group_norm``)."""
    if x.numel() == 0:  # N = 0 (no ROIs) or an empty spatial size: launch nothing
        stats = x.new_zeros((x.shape[0], num_groups), dtype=_stats_dtype(x))
        return torch.empty_like(x), stats, stats.clone()
    if triton_enabled_for(x):
        return _triton_module().triton_group_norm_forward(x, weight, bias, num_groups, eps, activation, residual)
    return torch_group_norm_forward(x, weight, bias, num_groups, eps, activation, residual)


def _backward_impl(
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
        return _triton_module().triton_group_norm_backward(
            grad_y, x, weight, bias, mean, rstd, num_groups, activation, residual, residual_mode)
    return torch_group_norm_backward(grad_y, x, weight, bias, mean, rstd, num_groups, activation, eps, residual,
                                     residual_mode)


@torch.library.custom_op("gn_det::group_norm_forward", mutates_args=())
def _group_norm_forward(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: int,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(x, weight, bias, num_groups, eps, activation, residual)


@_group_norm_forward.register_fake
def _group_norm_forward_fake(x, weight, bias, num_groups, eps, activation, residual=None):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("gn_det::group_norm_backward", mutates_args=())
def _group_norm_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
    num_groups: int, eps: float, activation: int, residual: Optional[Tensor] = None,
    residual_mode: int = RESIDUAL_ADD,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dweight, dbias, dres = _backward_impl(grad_y, x, weight, bias, mean, rstd, num_groups, eps, activation,
                                              residual, residual_mode)
    # (a custom op returns tensors only: an empty one stands for "no residual")
    return dx, dweight, dbias, x.new_empty(0) if dres is None else dres


@_group_norm_backward.register_fake
def _group_norm_backward_fake(grad_y, x, weight, bias, mean, rstd, num_groups, eps, activation, residual=None,
                              residual_mode=RESIDUAL_ADD):
    dres = x.new_empty(0) if residual is None else torch.empty_like(residual)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight), dres


def _input_grads(ctx, dx, dweight, dbias, dres):
    """Gradients for (x, weight, bias, num_groups, eps, activation, residual), None where not needed."""
    needs = ctx.needs_input_grad  # (the custom op's omits a residual left at its default)
    grads = (dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None, None, None)
    return grads + (dres if needs[6] else None,) if len(needs) > 6 else grads


def residual_mode_for(activation: int, residual: Optional[Tensor], output_recomputed: bool = False) -> int:
    """What backward keeps to get the activation's input: nothing more without a residual;
    with ReLU, the output (its sign is the input's, and the next layer keeps the output
    anyway), unless the output is to be recomputed, which needs the residual itself."""
    if residual is None:
        return RESIDUAL_NONE
    return RESIDUAL_OUTPUT if activation == ACT_RELU and not output_recomputed else RESIDUAL_ADD


def _setup_context(ctx, inputs, output, residual_mode=None):
    x, weight, bias, num_groups, eps, activation, residual = inputs
    y, mean, rstd = output
    if residual_mode is None:  # the custom op (torch.compile): never recomputed
        residual_mode = residual_mode_for(activation, residual)
    # The activation's input is recomputed from x (+ residual) and the statistics in
    # backward: no output is saved for it, which is the layer's activation-memory saving over
    # GroupNorm + ReLU/SiLU (and, with a residual, over GN, += shortcut, ReLU).
    ctx.save_for_backward(x, weight, bias, mean, rstd, y if residual_mode == RESIDUAL_OUTPUT else residual)
    ctx.num_groups = num_groups
    ctx.eps = eps
    ctx.activation = activation
    ctx.residual_mode = residual_mode
    ctx.residual_dtype = None if residual is None else residual.dtype


def _residual_grad(ctx, dres: Tensor) -> Tensor:
    # (with RESIDUAL_OUTPUT the kernels write it in the output's dtype, x's)
    return dres if ctx.residual_dtype in (None, dres.dtype) else dres.to(ctx.residual_dtype)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd, saved = ctx.saved_tensors
    dx, dweight, dbias, dres = torch.ops.gn_det.group_norm_backward(
        grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.eps, ctx.activation, saved, ctx.residual_mode
    )
    return _input_grads(ctx, dx, dweight, dbias, _residual_grad(ctx, dres))


_group_norm_forward.register_autograd(_backward, setup_context=_setup_context)


class _GroupNormFunction(torch.autograd.Function):
    """The eager path: the same forward/backward as the custom op, without the custom op's
    Python dispatch (about 60 us a call on CPU, as much as the kernels at small shapes).
    ``torch.compile`` traces the custom op instead (see ``group_norm``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, activation, residual, residual_mode):
        y, mean, rstd = _forward_impl(x, weight, bias, num_groups, eps, activation, residual)
        _setup_context(ctx, (x, weight, bias, num_groups, eps, activation, residual), (y, mean, rstd), residual_mode)
        return y

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: say so, loudly
    def backward(ctx, grad_y):
        x, weight, bias, mean, rstd, saved = ctx.saved_tensors
        dx, dweight, dbias, dres = _backward_impl(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.eps,
                                                  ctx.activation, saved, ctx.residual_mode)
        return _input_grads(ctx, dx, dweight, dbias, None if dres is None else _residual_grad(ctx, dres)) + (None,)


def _check_inputs(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  residual: Optional[Tensor] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"gn_det group_norm: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"gn_det group_norm: expected input of shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"gn_det group_norm: input dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(
            f"gn_det group_norm: the input's {channels} channels (shape {tuple(x.shape)}) are not divisible "
            f"into num_groups={num_groups} groups"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.shape != (channels,):
            raise ValueError(
                f"gn_det group_norm: {name} has shape {tuple(param.shape)}, expected ({channels},) for input "
                f"of shape {tuple(x.shape)} (does the layer's num_channels match the input's channels?)"
            )
        if param.device != x.device:
            raise ValueError(f"gn_det group_norm: {name} is on {param.device} but the input is on {x.device}")
    if not eps >= 0:
        raise ValueError(f"gn_det group_norm: eps must be >= 0, got {eps}")
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != x.shape:
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"gn_det group_norm: residual must be a tensor of the input's shape {tuple(x.shape)} "
                             f"(it is added to the normalised input), got {got}")
        if residual.device != x.device:
            raise ValueError(f"gn_det group_norm: residual is on {residual.device} but the input is on {x.device}")
        if residual.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"gn_det group_norm: residual dtype {residual.dtype} is not supported; "
                            "use float32, float16 or bfloat16")


def aten_group_norm(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """PyTorch's own GroupNorm, residual add and activation, for the shapes a route sends
    there (where the kernels were measured slower): ATen's kernels and autograd, in the wider
    of x's and the parameters' dtypes (float32 under autocast, which upcasts ``F.group_norm``),
    the output in x's dtype and memory format as the kernels give it. weight, bias and
    residual may be None."""
    compute = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    weight, bias = (None if p is None else p.to(compute) for p in (weight, bias))
    y = F.group_norm(x.to(compute), num_groups, weight, bias, eps)
    # In place on GN's fresh output (GN's backward needs its input, not its output).
    if residual is not None:
        y += residual
    return apply_activation(y, code).to(dtype=x.dtype, memory_format=memory_format_of(x))


def _reference(x: Tensor, num_groups: int, weight, bias, eps: float, code: int, residual: Optional[Tensor]) -> Tensor:
    """Standard operators only: what tracing and ONNX export record."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return export_activation(y if residual is None else y + residual, code)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    *,
    output_recomputed: bool = False,
) -> Tensor:
    """Group Normalization with an optional fused residual add and activation.

    Args:
        input: ``(N, C, *)``, any rank >= 2, contiguous or channels_last, float32/16 or bfloat16.
        num_groups: G, which divides C.
        weight, bias: ``(C,)`` per-channel affine (gamma, beta), or None.
        eps: added to the variance.
        activation: None, "relu" or "silu", applied after the affine (and the residual).
        residual: None, or a tensor of input's shape (any float dtype and layout) added after
            the affine, before the activation: a residual block's ``relu(GN(x) + shortcut)``
            in one pass. Backward keeps x and, with ReLU, the output (which the next layer
            keeps anyway), else the residual; not the sum.
        output_recomputed: the caller will have the output recomputed in backward
            (``gn_det.recompute``): with a residual, backward then keeps the residual, not
            the output.
    Returns:
        ``act(gamma * (x - mean_g) / sqrt(var_g + eps) + beta [+ residual])``: input's
        shape, dtype and memory format.

    First-order gradients only: a second-order gradient through it raises (plain GN on
    NCHW CPU tensors, which is ATen's own op, is the exception).
    """
    code = activation_code(activation)
    _check_inputs(input, num_groups, weight, bias, eps, residual)
    if (code == ACT_NONE and residual is None and input.dtype in _ATEN_EXACT_DTYPES and input.device.type == "cpu"
            and input.is_contiguous() and not _triton_on_cpu()):
        # Plain GN on NCHW CPU tensors: ATen's own kernels and autograd, nn.GroupNorm's speed
        # (accurate in NCHW; channels_last goes through our path below). A standard operator,
        # so also right under tracing, ONNX export and torch.compile. First, because at small
        # shapes every Python check shows in the time.
        return F.group_norm(input, num_groups, weight, bias, eps)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return _reference(input, num_groups, weight, bias, eps, code, residual)
    x = to_dense(input)
    if residual is not None:  # read with x's offsets by the kernels: dense in x's layout (a copy if not)
        residual = residual.contiguous(memory_format=memory_format_of(x))
    channels = x.shape[1]
    if weight is None:
        weight = torch.ones(channels, dtype=_stats_dtype(x), device=x.device)
    if bias is None:
        # A scale without a shift (GroupNorm(..., bias=False)): the kernels take beta = 0. It
        # needs no gradient, so none is returned for it; dgamma is computed as usual.
        bias = torch.zeros(channels, dtype=weight.dtype, device=x.device)
    # The kernels read gamma and beta as dense (C,) vectors; a strided view (every other
    # element of a larger tensor, say) is copied first. Parameters already are dense.
    weight, bias = weight.contiguous(), bias.contiguous()
    if torch.compiler.is_compiling():
        # Routes are not consulted here: the compiled graph holds the custom op.
        return torch.ops.gn_det.group_norm_forward(x, weight, bias, num_groups, float(eps), code, residual)[0]
    # aten_route first: with no route for x's device it returns at once (the common case).
    if aten_route(x, num_groups, code) is not None and triton_enabled_for(x):
        return aten_group_norm(x, num_groups, weight, bias, eps, code, residual)  # measured faster here
    return _GroupNormFunction.apply(x, weight, bias, num_groups, float(eps), code, residual,
                                    residual_mode_for(code, residual, output_recomputed))
