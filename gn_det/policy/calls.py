"""The one point where a GN call consults the policy: ``call_for`` returns the call that runs an
input, decided once per input signature and then found by one dictionary lookup.

A signature (``call_key``) is everything a decision or a launch plan depends on: x's shape,
strides, dtype, device and 16-byte alignment; the same of weight, bias and the residual (or
their absence); groups, eps, activation; whether the output is recomputed; whether autograd
records the call; autocast. The first call of a signature checks the inputs
(``ops.functional.check_inputs``), asks ``paths.decide`` for the path (tuning, routes,
verification outcomes, switches) and builds the call: an ``ops.autograd.OpCall`` over the
PyTorch path, the Triton kernels (a ``TritonPlans``, whose launch plans are made at its first
call and kept in it), or ``verification.FirstUseVerification`` around both while a check of
the input's bucket is pending; or an ``ops.functional.AtenCall``. It is kept in
``switches.CALLS``, which everything that changes a decision empties (``switches``' docstring):
a repeat call computes its key, finds its call and runs it, nothing more.

Not kept: calls decided during a CUDA-graph capture (nothing is measured or verified there;
they are decided again outside), and the graph modes, checked before any key: inside
``torch.compile`` the graph holds the custom op ``gn_det::group_norm_forward`` (its
implementation, when the graph runs, is the op's own path as decided here), and under tracing
and export only standard operators run.

Every call allocates its outputs afresh, so a call captured in a CUDA graph shares no memory
with eager calls of the same signature.
"""
# No `from __future__ import annotations` here: torch.library.custom_op reads the ops' type
# hints, and torch < 2.7 cannot read them as strings.
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..ops.activation import ACT_NONE, RESIDUAL_OUTPUT, activation_code
from ..ops.autograd import OpCall, op_inputs, residual_mode_for
from ..ops.functional import AtenCall, EmptyCall, check_inputs, export_group_norm, plain_cpu_group_norm
from ..ops.layout import memory_format_of, to_dense
from ..ops.torch_path import TORCH_PATH, compute_dtype
from . import paths, tuning, verification
from .switches import CALLS, CALLS_MAX

__all__ = ["call_for", "call_key", "group_norm", "op_backend"]

Call = Callable[[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]], Tensor]


def call_key(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
             residual: Optional[Tensor], output_recomputed: bool, records_grad: bool) -> tuple:
    """The signature of a call: what its decision and launch plan depend on (module docstring).
    Alignments are of 16 bytes, what Triton specialises pointers on."""
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
            None if weight is None else (weight.shape, weight.stride(), weight.dtype, weight.device,
                                         weight.data_ptr() & 15),
            None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device, bias.data_ptr() & 15),
            None if residual is None else (residual.stride(), residual.dtype, residual.device,
                                           residual.data_ptr() & 15, residual.shape),
            num_groups, eps, code, output_recomputed, records_grad, torch.is_autocast_enabled())


def call_for(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
             residual: Optional[Tensor] = None, output_recomputed: bool = False) -> Call:
    """The call that runs ``group_norm(x, ...)``, as ``call(x, weight, bias, residual)``:
    decided at the first call of x's signature (inputs checked then), found by one lookup after.
    ``code`` is the activation's (``activation_code``)."""
    if paths.recording():  # (first: torch.export's tracing counts as compiling too)
        return _standard_ops_call(num_groups, eps, code)
    if torch.compiler.is_compiling():
        return _compiled_call(x, num_groups, eps, code, residual)
    try:
        records_grad = torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad))
        key = call_key(x, num_groups, weight, bias, eps, code, residual, output_recomputed, records_grad)
    except (AttributeError, TypeError):  # an argument that is not a tensor: the checks say which
        check_inputs(x, num_groups, weight, bias, eps, residual)
        raise
    call = CALLS.get(key)
    if call is None:
        call, keep = _decide(x, num_groups, weight, bias, eps, code, residual, output_recomputed, records_grad)
        if keep:
            _keep(key, call)
    return call


def _keep(key: tuple, value) -> None:
    """Keep a decision for its signature (all are forgotten when CALLS_MAX are held)."""
    if len(CALLS) >= CALLS_MAX:
        CALLS.clear()
    CALLS[key] = value


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
        activation: None, "relu" or "silu" (``ops.activation.ACTIVATION_TABLE``), applied
            after the affine (and the residual).
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
    return call_for(input, num_groups, weight, bias, eps, activation_code(activation), residual,
                    output_recomputed)(input, weight, bias, residual)


def op_backend(x: Tensor, num_groups: int, code: int, residual: bool, records_grad: bool = False,
               residual_mode: Optional[int] = None):
    """The backend of the op's own path for a dense, non-empty x (``paths.decide``'s steps
    6-8): the Triton kernels (verified at first use), or the PyTorch path; bypassing tuning and
    routes. For the custom op's implementation (at every call of a compiled graph) and
    ``python -m gn_det.check``; kept per input signature beside the calls."""
    mode = residual_mode_for(code, residual) if residual_mode is None else residual_mode
    key = ("op backend", x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15, num_groups, code, residual,
           records_grad, mode)
    backend = CALLS.get(key)
    if backend is None:
        backend = _op_call(x, num_groups, 1e-5, code, residual, mode, records_grad, True)[0].backend
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            _keep(key, backend)
    return backend


# --------------------------------------------------------------------------- deciding

def _decide(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
            residual: Optional[Tensor], output_recomputed: bool, records_grad: bool) -> Tuple[Call, bool]:
    """(the call for this input, whether it is kept for its signature)."""
    check_inputs(x, num_groups, weight, bias, eps, residual)
    if x.numel() == 0:  # N = 0 (no ROIs): standard operators return it, with its gradients
        return EmptyCall(num_groups, eps, code), True
    xd = to_dense(x)
    dense = xd is x and weight is not None and bias is not None and weight.is_contiguous() and bias.is_contiguous() and (
        residual is None or residual.is_contiguous(memory_format=memory_format_of(x)))
    mode = residual_mode_for(code, residual is not None, output_recomputed)

    def op_call() -> Tuple[Call, bool]:
        return _op_call(xd, num_groups, eps, code, residual is not None, mode, records_grad, dense)

    def measure(train: bool) -> "tuning.Decision":  # first-use tuning: once per bucket
        inputs = op_inputs(x, weight, bias, residual)
        kernels = _op_call(xd, num_groups, eps, code, residual is not None, mode, train, True)[0]
        return tuning.measure_decision(*inputs[:3], inputs[3], num_groups, code, train,
                                       {"kernels": kernels, "aten": AtenCall(num_groups, eps, code, plain=False)})

    path = paths.decide(x, num_groups, code, residual, weight, bias, train=records_grad,
                        output_recomputed=output_recomputed, measure=measure).path
    keep = not (x.is_cuda and torch.cuda.is_current_stream_capturing())
    if path == paths.ATEN:
        return AtenCall(num_groups, eps, code, plain=True), keep
    if path == paths.ATEN_TUNED:
        return AtenCall(num_groups, eps, code, plain=False), keep
    call, decided = op_call()
    return call, keep and decided


def _op_call(xd: Tensor, num_groups: int, eps: float, code: int, residual: bool, mode: int, records_grad: bool,
             dense: bool) -> Tuple[OpCall, bool]:
    """(the op's call for dense x: kernels, kernels under verification, or the PyTorch path;
    whether that is settled for its signature)."""
    if not paths.triton_enabled_for(xd):
        return OpCall(TORCH_PATH, num_groups, eps, code, mode, records_grad, dense), True
    kernels, reference = verification.with_faults(paths.triton_module().TritonPlans(), TORCH_PATH)
    forward = verification.outcome(xd, num_groups, code, residual, tuning.CHECKS[0])
    backward = (verification.outcome(xd, num_groups, code, residual, verification.check_of(residual, mode))
                if records_grad else True)
    if forward is False or backward is False:  # the bucket failed (or a capture, where nothing is verified)
        backend = reference
    elif forward and backward:
        backend = kernels
    else:
        backend = verification.FirstUseVerification(kernels, reference)
    return OpCall(backend, num_groups, eps, code, mode, records_grad, dense), True


def _standard_ops_call(num_groups: int, eps: float, code: int) -> Call:
    """Tracing and export: standard operators only."""
    return lambda x, weight, bias, residual: export_group_norm(x, num_groups, weight, bias, eps, code, residual)


# --------------------------------------------------------------------------- torch.compile

def _compiled_call(x: Tensor, num_groups: int, eps: float, code: int, residual: Optional[Tensor]) -> Call:
    """Inside ``torch.compile``: plain GN of a contiguous float CPU tensor is ATen's (a standard
    operator); everything else is the custom op, whose implementation runs when the graph runs."""
    if (code == ACT_NONE and residual is None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous() and not paths.triton_on_cpu()):
        return lambda x, weight, bias, residual: plain_cpu_group_norm(x, num_groups, weight, bias, eps)

    def custom_op(x, weight, bias, residual):
        x, weight, bias, residual = op_inputs(x, weight, bias, residual)
        return torch.ops.gn_det.group_norm_forward(x, weight, bias, num_groups, float(eps), code, residual)[0]

    return custom_op


@torch.library.custom_op("gn_det::group_norm_forward", mutates_args=())
def _group_norm_forward(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: int,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        stats = x.new_zeros((x.shape[0], num_groups), dtype=compute_dtype(x))
        return torch.empty_like(x), stats, stats.clone()
    backend = op_backend(x, num_groups, activation, residual is not None)
    return backend.forward(x, weight, bias, residual, num_groups, eps, activation)


@_group_norm_forward.register_fake
def _group_norm_forward_fake(x, weight, bias, num_groups, eps, activation, residual=None):
    stats = x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def group_norm_forward_decomposition(x, weight, bias, num_groups, eps, activation, residual=None):
    """The forward op in standard ATen operators, for exporters that decompose (ONNX dynamo=True):
    ATen's GroupNorm in the statistics' dtype (float32 for half inputs, as the kernels compute),
    the residual, the activation, the output in x's dtype; mean and rstd ``(N, G)`` as the op's."""
    from ..ops.activation import export_activation

    n, channels = x.shape[:2]
    dtype = compute_dtype(x)
    y, mean, rstd = torch.ops.aten.native_group_norm(x.to(dtype), weight.to(dtype), bias.to(dtype), n, channels,
                                                     math.prod(x.shape[2:]), num_groups, eps)
    if residual is not None:
        y = y + residual.to(dtype)
    return export_activation(y, activation).to(x.dtype), mean, rstd


# On torch 2.6+ ``group_norm`` takes its standard-operator path under export
# (``torch.compiler.is_exporting``), so exported graphs do not hold the op and the
# decomposition is not registered: a decomposition in ``torch._decomp``'s table makes
# inductor's fallback for the op raise wherever the environment sets ``CI`` (torch's own CI
# check in ``make_fallback``). torch 2.5 cannot tell export from ``torch.compile``, so its
# exported graphs hold the op: there it is registered (the ONNX ``dynamo=True`` exporter
# applies that table before translating).
if not hasattr(torch.compiler, "is_exporting"):
    from torch._decomp import register_decomposition

    register_decomposition(torch.ops.gn_det.group_norm_forward.default)(group_norm_forward_decomposition)


@torch.library.custom_op("gn_det::group_norm_backward", mutates_args=())
def _group_norm_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
    num_groups: int, eps: float, activation: int, residual: Optional[Tensor] = None,
    residual_mode: int = 1,  # activation.RESIDUAL_ADD
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        dres = x.new_empty(0) if residual is None else torch.zeros_like(residual)
        return torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(weight), dres
    backend = op_backend(x, num_groups, activation, residual is not None, records_grad=True, residual_mode=residual_mode)
    dx, dweight, dbias, dres = backend.backward(grad_y, x, weight, bias, mean, rstd, residual, num_groups, eps,
                                                activation, residual_mode)
    # (a custom op returns tensors only: an empty one stands for "no residual")
    return dx, dweight, dbias, x.new_empty(0) if dres is None else dres


@_group_norm_backward.register_fake
def _group_norm_backward_fake(grad_y, x, weight, bias, mean, rstd, num_groups, eps, activation, residual=None,
                              residual_mode=1):
    dres = x.new_empty(0) if residual is None else torch.empty_like(residual)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight), dres


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation, residual = inputs
    y, mean, rstd = output
    mode = residual_mode_for(activation, residual is not None)
    ctx.save_for_backward(x, weight, bias, mean, rstd, y if mode == RESIDUAL_OUTPUT else residual)
    ctx.num_groups, ctx.eps, ctx.activation, ctx.residual_mode = num_groups, eps, activation, mode
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd, saved = ctx.saved_tensors
    dx, dweight, dbias, dres = torch.ops.gn_det.group_norm_backward(
        grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.eps, ctx.activation, saved, ctx.residual_mode)
    if ctx.residual_dtype is not None and dres.dtype != ctx.residual_dtype:
        dres = dres.to(ctx.residual_dtype)
    needs = ctx.needs_input_grad  # (the custom op's omits a residual left at its default)
    grads = (dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None, None, None)
    return grads + (dres if needs[6] else None,) if len(needs) > 6 else grads


_group_norm_forward.register_autograd(_backward, setup_context=_setup_context)
