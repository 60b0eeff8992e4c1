"""GN as functions of the operations alone, no policy: the input checks, PyTorch's own
operators for the two paths that use them, and ``group_norm_op``, the op on a backend the
caller names (a kernel engineer's entry: ``group_norm_op(x, 32, w, b, backend="triton")``).

- ``export_group_norm``: standard operators only (``F.group_norm``, the residual add, the
  activation): what ``torch.jit.trace`` and ONNX export record;
- ``aten_group_norm``: ATen's GroupNorm with its own autograd, in the wider of x's and the
  parameters' dtypes, the output in x's dtype and layout (where it was measured faster);
- ``plain_cpu_group_norm``: plain GN of a contiguous float32/float64 CPU tensor, ATen's, with
  its variance overflow caught.

``gn_det.group_norm`` (``gn_det.policy.calls``) is the entry that decides the path per input.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_setting
from .activation import ACT_NONE, RESIDUAL_NONE, activation_code, apply_activation, export_activation
from .autograd import OpCall, op_inputs, records_grad, residual_mode_for
from .layout import memory_format_of
from .torch_path import TORCH_PATH, Backend, compute_dtype, masked_moments, no_zero, region_mask

__all__ = ["AtenCall", "EmptyCall", "SUPPORTED_DTYPES", "aten_group_norm", "check_inputs", "check_valid",
           "export_group_norm", "group_norm_op", "plain_cpu_group_norm"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 residual: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> None:
    """Every rule a GN call's inputs must meet: an error naming what is wrong, else nothing.
    A spatial size of 0 (with N and C not 0) is refused as ``F.group_norm`` refuses it, for
    every activation and path alike."""
    if not isinstance(x, Tensor):
        raise TypeError(f"gn_det group_norm: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"gn_det group_norm: expected input of shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gn_det group_norm: input dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(
            f"gn_det group_norm: the input's {channels} channels (shape {tuple(x.shape)}) are not divisible "
            f"into num_groups={num_groups} groups"
        )
    if x.shape[0] * channels > 0 and x.dim() > 2 and math.prod(x.shape[2:]) == 0:
        raise ValueError(f"gn_det group_norm: input of shape {tuple(x.shape)} has an empty spatial size: there is "
                         "nothing to normalise a group over (as torch's GroupNorm, which also refuses it)")
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
        if residual.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"gn_det group_norm: residual dtype {residual.dtype} is not supported; "
                            "use float32, float16 or bfloat16")
    if valid is not None:
        check_valid(x, valid)


def check_valid(x: Tensor, valid: Tensor) -> None:
    """The rules of ``valid``, the images' regions of a padded batch (``gn_det.padding``)."""
    if not isinstance(valid, Tensor):
        raise TypeError(f"gn_det group_norm: valid must be a tensor of each image's valid (height, width), "
                        f"got {type(valid).__name__}")
    if x.dim() != 4:
        raise ValueError(f"gn_det group_norm: valid regions need an (N, C, H, W) input, got shape {tuple(x.shape)}")
    if valid.shape != (x.shape[0], 2) or valid.dtype != torch.int32 or valid.device != x.device:
        raise ValueError(f"gn_det group_norm: valid must be an int32 tensor of shape ({x.shape[0]}, 2) on {x.device} "
                         f"(each image's valid height and width), got {valid.dtype} {tuple(valid.shape)} on "
                         f"{valid.device}")


def aten_group_norm(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """PyTorch's own GroupNorm, residual add and activation: ATen's kernels and autograd, in the
    wider of x's and the parameters' dtypes (float32 under autocast, which upcasts
    ``F.group_norm``), the output in x's dtype and memory format as the kernels give it.
    weight, bias and residual may be None."""
    compute = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    weight, bias = (None if p is None else p.to(compute) for p in (weight, bias))
    y = F.group_norm(x.to(compute), num_groups, weight, bias, eps)
    # In place on GN's fresh output (GN's backward needs its input, not its output).
    if residual is not None:
        y += residual
    return apply_activation(y, code).to(dtype=x.dtype, memory_format=memory_format_of(x))


def plain_cpu_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float) -> Tensor:
    """Plain GN of a contiguous float32/float64 CPU x ``(N, C, *)``: ATen's native GroupNorm, its
    kernels and autograd (second order included), unless its variance overflowed. ATen squares
    the deviations in x's dtype: beyond ~1.8e19 in float32 the variance is inf, rstd =
    rsqrt(inf) = 0 and the output would be beta, finite and wrong. rstd is 0 for nothing else
    (a NaN rstd is not 0), so the check reads the ``(N, G)`` rstd, never x; such a call is
    computed again by the PyTorch path, which remeasures those groups scaled (accurate;
    first-order gradients only, as everywhere on that path)."""
    n, c = x.shape[:2]
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), num_groups, eps)
    if torch.compiler.is_compiling():  # no host check in a graph: an overflowed group's output is NaN instead
        overflowed = (rstd == 0) & torch.isfinite(mean)
        nan = torch.where(overflowed, float("nan"), 0.0).repeat_interleave(c // num_groups, dim=1)
        return y + nan.view((n, c) + (1,) * (x.dim() - 2))
    if x.numel() == 0 or no_zero(rstd):
        return y
    grad = records_grad(x, weight, bias, None)
    return OpCall(TORCH_PATH, num_groups, eps, ACT_NONE, RESIDUAL_NONE, grad, False)(x, weight, bias)


def export_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      code: int, residual: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Tensor:
    """Standard operators only: what tracing and ONNX export record (with ``valid``, the
    regions' statistics and the zeros outside them in elementwise operators and sums)."""
    if valid is not None:
        return _export_masked(x, num_groups, weight, bias, eps, code, residual, valid)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return export_activation(y if residual is None else y + residual, code)


def _export_masked(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   code: int, residual: Optional[Tensor], valid: Tensor) -> Tensor:
    c = x.shape[1]
    xc = x.to(compute_dtype(x))
    inside = region_mask(x, valid)
    centred, _, var = masked_moments(xc, inside, valid, num_groups)
    y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight.to(xc.dtype).view(1, c, 1, 1)
    if bias is not None:
        y = y + bias.to(xc.dtype).view(1, c, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.where(inside, export_activation(y, code), 0.0).to(x.dtype)


class AtenCall:
    """ATen's GroupNorm for one decided input, as ``call(x, weight, bias, residual)``:
    ``plain_cpu_group_norm`` (``plain``: no activation, no residual, a contiguous float CPU x)
    or ``aten_group_norm``, on the op's inputs (``autograd.op_inputs``)."""

    __slots__ = ("num_groups", "eps", "activation", "plain")

    def __init__(self, num_groups: int, eps: float, activation: int, plain: bool) -> None:
        self.num_groups, self.eps, self.activation, self.plain = num_groups, eps, activation, plain

    def __call__(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 residual: Optional[Tensor] = None, valid: None = None) -> Tensor:
        # (valid: never given; ATen's GroupNorm cannot mask, so masked calls are never decided here)
        if self.plain:
            return plain_cpu_group_norm(x, self.num_groups, weight, bias, self.eps)
        # (the op's inputs, as tuning measured it: weight None computes in float32 for half x)
        x, weight, bias, residual = op_inputs(x, weight, bias, residual)
        return aten_group_norm(x, self.num_groups, weight, bias, self.eps, self.activation, residual)


class EmptyCall:
    """An input with N = 0 (no ROIs): standard operators return its empty output (with
    gradients), as ``torch.nn.GroupNorm`` does."""

    __slots__ = ("num_groups", "eps", "activation")

    def __init__(self, num_groups: int, eps: float, activation: int) -> None:
        self.num_groups, self.eps, self.activation = num_groups, eps, activation

    def __call__(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 residual: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Tensor:
        y = export_group_norm(x, self.num_groups, weight, bias, self.eps, self.activation, residual)
        return torch.empty_like(x).copy_(y)  # (x's dtype and strides, as every path returns; differentiable)


def group_norm_op(
    input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    eps: float = 1e-5, activation: Optional[str] = None, residual: Optional[Tensor] = None,
    *, backend: Union[str, Backend] = "torch", valid: Optional[Tensor] = None,
) -> Tensor:
    """GN by one backend, with autograd, and nothing else: no verification, tuning or routes
    (``gn_det.group_norm`` adds them). ``backend``: "torch" (the PyTorch path), "triton" (the
    kernels, planned at this call: CUDA, or CPU under ``TRITON_INTERPRET=1``), or a backend
    object (``torch_path.Backend``). Arguments and result as ``gn_det.group_norm``'s."""
    code = activation_code(activation)
    check_inputs(input, num_groups, weight, bias, eps, residual, valid)
    if backend == "torch":
        backend = TORCH_PATH
    elif backend == "triton":
        from .triton_launch import TritonPlans  # (imports triton)

        backend = TritonPlans()
    elif isinstance(backend, str):
        raise ValueError(f"backend={backend!r}: use 'torch', 'triton' or a backend object")
    elif type(backend).__name__ == "TritonPlans":  # (one input signature's plans: reused, they would misread another)
        raise ValueError("backend=TritonPlans(...): a TritonPlans holds the launch plans of one input signature; "
                         "pass backend='triton' (planned for this call)")
    grad = records_grad(input, weight, bias, residual)
    call = OpCall(backend, num_groups, eps, code, residual_mode_for(code, residual is not None), grad, False)
    if input.numel() == 0:
        return export_group_norm(input, num_groups, weight, bias, eps, code, residual)
    return call(*op_inputs(input, weight, bias, residual), valid)

