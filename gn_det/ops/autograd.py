"""The GN operator's autograd, and ``OpCall``: one decided way to run it.

``GroupNormFunction`` runs a backend's forward (``torch_path.Backend``: the PyTorch path, or
``triton_launch.TritonPlans``) and saves only x and the ``(N, G)`` statistics: the
activation's input is recomputed from them in backward (plus, with a residual, the residual,
or with ReLU the output, which the next layer keeps anyway: ``activation.RESIDUAL_*``).

``OpCall`` binds a backend to the op's constants for one input signature (which the policy
decided once: ``gn_det.policy.calls``) and runs it: through ``GroupNormFunction`` when autograd
records the call, straight to the backend's forward otherwise (no autograd machinery under
``torch.no_grad()``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .activation import ACT_RELU, RESIDUAL_ADD, RESIDUAL_NONE, RESIDUAL_OUTPUT
from .layout import memory_format_of, to_dense
from .torch_path import compute_dtype

__all__ = ["GroupNormFunction", "OpCall", "op_inputs", "records_grad", "residual_mode_for"]


def records_grad(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]) -> bool:
    """Whether autograd records a call on these inputs (grad mode on, one of them requires grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad))


def residual_mode_for(activation: int, residual: bool, output_recomputed: bool = False) -> int:
    """What backward keeps to get the activation's input: nothing more without a residual;
    with ReLU, the output (its sign is the input's, and the next layer keeps the output
    anyway), unless the output is to be recomputed, which needs the residual itself."""
    if not residual:
        return RESIDUAL_NONE
    return RESIDUAL_OUTPUT if activation == ACT_RELU and not output_recomputed else RESIDUAL_ADD


def op_inputs(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]):
    """(x, weight, bias, residual) as the backends take them: x dense (contiguous or
    channels_last), the residual dense in x's layout, weight and bias dense ``(C,)`` tensors
    (ones and zeros where None: a scale without a shift, ``GroupNorm(..., bias=False)``, takes
    beta = 0 and returns no gradient for it)."""
    x = to_dense(input)
    if residual is not None:  # read with x's offsets by the kernels: dense in x's layout (a copy if not)
        residual = residual.contiguous(memory_format=memory_format_of(x))
    channels = x.shape[1]
    if weight is None:
        weight = torch.ones(channels, dtype=compute_dtype(x), device=x.device)
    if bias is None:
        bias = torch.zeros(channels, dtype=weight.dtype, device=x.device)
    return x, weight.contiguous(), bias.contiguous(), residual


class GroupNormFunction(torch.autograd.Function):
    """``act(GN(x) [+ residual])`` by ``call.backend`` (an ``OpCall``), with its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, valid, call):
        y, mean, rstd = call.backend.forward(x, weight, bias, residual, call.num_groups, call.eps, call.activation,
                                             valid)
        # The activation's input is recomputed from x (+ residual) and the statistics in
        # backward: no output is saved for it (the layer's activation-memory saving over
        # GroupNorm + ReLU/SiLU, and with a residual over GN, += shortcut, ReLU).
        ctx.save_for_backward(x, weight, bias, mean, rstd, y if call.residual_mode == RESIDUAL_OUTPUT else residual)
        ctx.call, ctx.valid = call, valid
        ctx.residual_dtype = None if residual is None else residual.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True: the backends' backward is not itself
            return _backward_once(ctx, grad_y)  # differentiable; once_differentiable says so, loudly
        # (the usual backward: autograd has turned grad mode off, so once_differentiable's
        # no_grad context and checks, ~3 us a call, would do nothing)
        return _backward(ctx, grad_y)


def _backward(ctx, grad_y):
    """``GroupNormFunction.backward``'s gradients (grad mode off)."""
    x, weight, bias, mean, rstd, saved = ctx.saved_tensors
    call = ctx.call
    dx, dweight, dbias, dres = call.backend.backward(grad_y, x, weight, bias, mean, rstd, saved, call.num_groups,
                                                      call.eps, call.activation, call.residual_mode, ctx.valid)
    if dres is not None and dres.dtype != ctx.residual_dtype:  # (RESIDUAL_OUTPUT: written in x's dtype)
        dres = dres.to(ctx.residual_dtype)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None,
            dres if needs[3] else None, None, None)


_backward_once = once_differentiable(_backward)


class OpCall:
    """The op for one input signature: ``call(x, weight, bias, residual, valid=None) -> y``
    (``valid``: the images' regions in a padded batch, ``torch_path.Backend``).

    Args:
        backend: the implementation (``torch_path.TORCH_PATH``, a ``TritonPlans``, or a
            policy's wrapper with the same two methods, e.g. first-use verification).
        num_groups, eps, activation: the op's constants (activation as its code).
        residual_mode: what backward keeps for a residual (``residual_mode_for``).
        records_grad: autograd records the calls of this signature (GroupNormFunction runs).
        dense: the inputs of this signature are already as the backends take them (x dense,
            weight and bias given and dense, the residual dense in x's layout); else
            ``op_inputs`` makes them so at each call.
    """

    __slots__ = ("backend", "num_groups", "eps", "activation", "residual_mode", "records_grad", "dense")

    def __init__(self, backend, num_groups: int, eps: float, activation: int, residual_mode: int,
                 records_grad: bool, dense: bool) -> None:
        self.backend = backend
        self.num_groups, self.eps, self.activation = num_groups, float(eps), activation
        self.residual_mode, self.records_grad, self.dense = residual_mode, records_grad, dense

    def __call__(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 residual: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Tensor:
        if not self.dense:
            x, weight, bias, residual = op_inputs(x, weight, bias, residual)
        if self.records_grad:
            return GroupNormFunction.apply(x, weight, bias, residual, valid, self)
        return self.backend.forward(x, weight, bias, residual, self.num_groups, self.eps, self.activation, valid)[0]

    def __repr__(self) -> str:
        return (f"OpCall({type(self.backend).__name__}, groups={self.num_groups}, eps={self.eps}, "
                f"activation={self.activation}, residual_mode={self.residual_mode}, grad={self.records_grad})")

