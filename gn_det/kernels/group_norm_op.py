"""``group_norm``, the functional form of gn_det's GN: its input checks, and the path that
``paths.decide`` chooses for the call (the order is documented there, once). Two of those
paths are PyTorch's own operators, each named by what it is for:

- ``export_group_norm``: standard operators only (``F.group_norm``, the residual add, the
  activation), what ``torch.jit.trace`` and ONNX export record;
- ``aten_group_norm``: ATen's GroupNorm with its own autograd, for the inputs where it was
  measured faster on this GPU model (first-use tuning, ``tuning.py``, or a route in
  ``routing.py``).

The others run the op (``autograd.py``: the custom op inside ``torch.compile``,
``GroupNormFunction`` in eager mode), whose implementation, the Triton kernels or the PyTorch
path (``group_norm_torch``), ``dispatch.py`` runs as ``paths.py`` decides.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_setting
from .activation import ACT_NONE, RESIDUAL_NONE, activation_code, apply_activation, export_activation
from .autograd import GroupNormFunction, residual_mode_for
from . import paths, tuning
from .group_norm_torch import compute_dtype
from .layout import memory_format_of, to_dense


__all__ = ["aten_group_norm", "export_group_norm", "group_norm"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    check_setting("eps", eps, where="in gn_det group_norm")  # the one eps rule (gn_det.config), as a layer's
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


def _plain_cpu_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float) -> Tensor:
    """Plain GN of a contiguous float32/float64 CPU x ``(N, C, *)``: ATen's native GroupNorm, its
    kernels and autograd (second order included), unless its variance overflowed. ATen squares
    the deviations in x's dtype: beyond ~1.8e19 in float32 the variance is inf, rstd =
    rsqrt(inf) = 0 and the output would be beta, finite and wrong. rstd is 0 for nothing else
    (a NaN rstd is not 0), so the check reads the ``(N, G)`` rstd, never x; such a call is
    computed again by the op's own PyTorch path, which remeasures those groups scaled
    (accurate; first-order gradients only, as everywhere on that path)."""
    if paths.recording():
        return F.group_norm(x, num_groups, weight, bias, eps)  # the standard operator is what is recorded
    n, c = x.shape[:2]
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), num_groups, eps)
    if torch.compiler.is_compiling():  # no host check in a graph: an overflowed group's output is NaN instead
        overflowed = (rstd == 0) & torch.isfinite(mean)
        nan = torch.where(overflowed, float("nan"), 0.0).repeat_interleave(c // num_groups, dim=1)
        return y + nan.view((n, c) + (1,) * (x.dim() - 2))
    if bool(rstd.all()):
        return y
    x, weight, bias, _ = _op_inputs(x, weight, bias, None)
    return GroupNormFunction.apply(x, weight, bias, num_groups, float(eps), ACT_NONE, None, RESIDUAL_NONE)


def export_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      code: int, residual: Optional[Tensor] = None) -> Tensor:
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
            (``gn_det.recompute``): the op's own path runs (neither tuning nor routes send
            it to ATen's GroupNorm, which would keep its output), and with a residual,
            backward keeps the residual, not the output.
    Returns:
        ``act(gamma * (x - mean_g) / sqrt(var_g + eps) + beta [+ residual])``: input's
        shape, dtype and memory format.

    First-order gradients only: a second-order gradient through it raises (plain GN on
    NCHW CPU tensors, which is ATen's own op, is the exception).
    """
    code = activation_code(activation)
    _check_inputs(input, num_groups, weight, bias, eps, residual)

    def measure(train: bool) -> "tuning.Decision":  # (first-use tuning: once per bucket)
        x, w, b, r = _op_inputs(input, weight, bias, residual)
        return tuning.measure_decision(x, w, b, r, num_groups, code, train, {"kernels": run_op, "aten": run_aten})

    def run_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor]) -> Tensor:
        mode = residual_mode_for(code, residual, output_recomputed)
        return GroupNormFunction.apply(x, weight, bias, num_groups, float(eps), code, residual, mode)

    def run_aten(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor]) -> Tensor:
        return aten_group_norm(x, num_groups, weight, bias, eps, code, residual)

    path = paths.decide(input, num_groups, code, residual, weight, bias, output_recomputed=output_recomputed,
                        measure=measure).path
    if path == paths.ATEN:  # (an overflowed variance recomputed: _plain_cpu_group_norm)
        return _plain_cpu_group_norm(input, num_groups, weight, bias, eps)
    if path == paths.EXPORT:
        return export_group_norm(input, num_groups, weight, bias, eps, code, residual)
    x, weight, bias, residual = _op_inputs(input, weight, bias, residual)
    if path == paths.CUSTOM_OP:
        return torch.ops.gn_det.group_norm_forward(x, weight, bias, num_groups, float(eps), code, residual)[0]
    if path == paths.ATEN_TUNED:
        return run_aten(x, weight, bias, residual)  # measured faster here
    return run_op(x, weight, bias, residual)  # (the kernels or the PyTorch path: dispatch.forward_impl)


def _op_inputs(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]):
    """(x, weight, bias, residual) as the op takes them: x dense (contiguous or channels_last),
    the residual dense in x's layout, weight and bias dense ``(C,)`` tensors."""
    x = to_dense(input)
    if residual is not None:  # read with x's offsets by the kernels: dense in x's layout (a copy if not)
        residual = residual.contiguous(memory_format=memory_format_of(x))
    channels = x.shape[1]
    if weight is None:
        weight = torch.ones(channels, dtype=compute_dtype(x), device=x.device)
    if bias is None:
        # A scale without a shift (GroupNorm(..., bias=False)): the kernels take beta = 0. It
        # needs no gradient, so none is returned for it; dgamma is computed as usual.
        bias = torch.zeros(channels, dtype=weight.dtype, device=x.device)
    # The kernels read gamma and beta as dense (C,) vectors; a strided view (every other
    # element of a larger tensor, say) is copied first. Parameters already are dense.
    return x, weight.contiguous(), bias.contiguous(), residual
