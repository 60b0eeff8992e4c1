"""The GN operator's ``torch.library`` custom ops and autograd.

``gn_det::group_norm_forward(x, weight, bias, G, eps, act, residual) -> (y, mean, rstd)`` and
``gn_det::group_norm_backward(dy, x, weight, bias, mean, rstd, G, eps, act, saved, mode) -> (dx, dw, db, dr)``
run ``dispatch.forward_impl`` / ``backward_impl`` (the Triton kernels or PyTorch operations).
Each has a fake implementation, so ``torch.compile(fullgraph=True)`` traces through them,
and the forward op has registered autograd that saves only x and the (N, G) statistics.
``residual`` (optional, x's shape) is added after the affine, before the activation: a
residual block's end, ``relu(GN(x) + shortcut)``, in one pass; backward then also keeps
the residual or, with ReLU, the output, which the next layer keeps anyway
(``activation.RESIDUAL_*``). In eager mode ``group_norm`` calls the same implementations
through ``GroupNormFunction``, which skips the custom op's per-call Python dispatch.

The forward op also has a decomposition into standard ATen operators
(``group_norm_forward_decomposition``). On torch 2.6+ ``group_norm`` takes its standard-operator
path under export (``torch.compiler.is_exporting``), so exported graphs do not hold the op and
the decomposition is not registered: a decomposition in ``torch._decomp``'s table makes
inductor's fallback for the op raise wherever the environment sets ``CI`` (torch's own CI check
in ``make_fallback``), which would fail ``torch.compile`` on users' CI machines. torch 2.5
cannot tell export from ``torch.compile``, so its exported graphs hold the op: there it is
registered (the ONNX ``dynamo=True`` exporter applies that table before translating), and
``CI`` must be unset where torch 2.5 compiles a graph holding the op.

Custom ops are on none of autocast's lists, so under autocast the op runs in its input's
dtype (float32 statistics) rather than being upcast to float32 as ``F.group_norm`` is.
"""
# No `from __future__ import annotations` here: torch.library.custom_op reads the ops' type
# hints, and torch < 2.7 cannot read them as strings.
import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._decomp import register_decomposition
from torch.autograd.function import once_differentiable

from .activation import ACT_RELU, RESIDUAL_ADD, RESIDUAL_NONE, RESIDUAL_OUTPUT, export_activation
from .dispatch import backward_impl, forward_impl
from .group_norm_torch import compute_dtype

__all__ = ["GroupNormFunction", "group_norm_forward_decomposition", "residual_mode_for"]


@torch.library.custom_op("gn_det::group_norm_forward", mutates_args=())
def _group_norm_forward(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: int,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    return forward_impl(x, weight, bias, num_groups, eps, activation, residual)


@_group_norm_forward.register_fake
def _group_norm_forward_fake(x, weight, bias, num_groups, eps, activation, residual=None):
    stats = x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def group_norm_forward_decomposition(x, weight, bias, num_groups, eps, activation, residual=None):
    """The forward op in standard ATen operators, for exporters that decompose (ONNX dynamo=True):
    ATen's GroupNorm in the statistics' dtype (float32 for half inputs, as the kernels compute),
    the residual, the activation, the output in x's dtype; mean and rstd ``(N, G)`` as the op's."""
    n, channels = x.shape[:2]
    dtype = compute_dtype(x)
    y, mean, rstd = torch.ops.aten.native_group_norm(x.to(dtype), weight.to(dtype), bias.to(dtype), n, channels,
                                                     math.prod(x.shape[2:]), num_groups, eps)
    if residual is not None:
        y = y + residual.to(dtype)
    return export_activation(y, activation).to(x.dtype), mean, rstd


if not hasattr(torch.compiler, "is_exporting"):  # torch 2.5: its exported graphs hold the op
    register_decomposition(torch.ops.gn_det.group_norm_forward.default)(group_norm_forward_decomposition)


@torch.library.custom_op("gn_det::group_norm_backward", mutates_args=())
def _group_norm_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
    num_groups: int, eps: float, activation: int, residual: Optional[Tensor] = None,
    residual_mode: int = RESIDUAL_ADD,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dweight, dbias, dres = backward_impl(grad_y, x, weight, bias, mean, rstd, num_groups, eps, activation,
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


class GroupNormFunction(torch.autograd.Function):
    """The eager path: the same forward/backward as the custom op, without the custom op's
    Python dispatch (about 60 us a call on CPU, as much as the kernels at small shapes).
    ``torch.compile`` traces the custom op instead (see ``group_norm``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, activation, residual, residual_mode):
        y, mean, rstd = forward_impl(x, weight, bias, num_groups, eps, activation, residual)
        _setup_context(ctx, (x, weight, bias, num_groups, eps, activation, residual), (y, mean, rstd), residual_mode)
        return y

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: say so, loudly
    def backward(ctx, grad_y):
        x, weight, bias, mean, rstd, saved = ctx.saved_tensors
        dx, dweight, dbias, dres = backward_impl(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.eps,
                                                  ctx.activation, saved, ctx.residual_mode)
        return _input_grads(ctx, dx, dweight, dbias, None if dres is None else _residual_grad(ctx, dres)) + (None,)
