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

from ..ops.activation import RESIDUAL_OUTPUT, activation_code
from ..ops.autograd import OpCall, op_inputs, records_grad, residual_mode_for
from ..ops.functional import AtenCall, EmptyCall, check_inputs, export_group_norm, plain_cpu_group_norm
from ..ops.layout import memory_format_of, to_dense
from ..ops.torch_path import TORCH_PATH, compute_dtype
from . import paths, tuning, verification
from .switches import CALLS

__all__ = ["call_for", "call_key", "group_norm", "op_backend"]

Call = Callable[[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]], Tensor]


def call_key(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
             residual: Optional[Tensor], output_recomputed: bool, records_grad: bool,
             valid: Optional[Tensor] = None) -> tuple:
    """The signature of a call: what its decision and launch plan depend on (module docstring).
    Alignments are of 16 bytes, what Triton specialises pointers on. Of the images' regions
    (``valid``) only their presence, dtype and device: never their values (sizes change every
    step of multi-scale training; one plan serves them all)."""
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
            None if weight is None else (weight.shape, weight.stride(), weight.dtype, weight.device,
                                         weight.data_ptr() & 15),
            None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device, bias.data_ptr() & 15),
            None if residual is None else (residual.stride(), residual.dtype, residual.device,
                                           residual.data_ptr() & 15, residual.shape),
            num_groups, eps, code, output_recomputed, records_grad, torch.is_autocast_enabled(),
            None if valid is None else (valid.shape, valid.dtype, valid.device))


def call_for(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
             residual: Optional[Tensor] = None, output_recomputed: bool = False,
             valid: Optional[Tensor] = None) -> Call:
    """The call that runs ``group_norm(x, ...)``, as ``call(x, weight, bias, residual, valid)``:
    decided at the first call of x's signature (inputs checked then), found by one lookup after.
    ``code`` is the activation's (``activation_code``); ``valid`` the images' regions of a
    padded batch (``gn_det.padding``), or None."""
    if paths.recording():  # (first: torch.export's tracing counts as compiling too)
        return _standard_ops_call(num_groups, eps, code)
    if torch.compiler.is_compiling():
        return _compiled_call(x, num_groups, eps, code, residual, valid)
    try:
        grad = records_grad(x, weight, bias, residual)
        key = call_key(x, num_groups, weight, bias, eps, code, residual, output_recomputed, grad, valid)
    except (AttributeError, TypeError):  # an argument that is not a tensor: the checks say which
        check_inputs(x, num_groups, weight, bias, eps, residual, valid)
        raise
    call = CALLS.get(key)
    if call is None:
        generation = CALLS.generation
        call, keep = _decide(x, num_groups, weight, bias, eps, code, residual, output_recomputed, grad, valid)
        if keep:
            CALLS.keep(key, call, generation)
    return call


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
    valid: Optional[Tensor] = None,
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
        valid: None, or for a zero-padded batch ``(N, C, H, W)`` an ``(N, 2)`` integer tensor
            on input's device: each image's valid (height, width), its top-left region
            (values clamped to [0, H] and [0, W]). Each image's statistics are then over its
            region only and the output (and gradients) are 0 outside it (``gn_det.padding``).
    Returns:
        ``act(gamma * (x - mean_g) / sqrt(var_g + eps) + beta [+ residual])``: input's
        shape, dtype and memory format.

    First-order gradients only: a second-order gradient through it raises (plain GN on
    NCHW CPU tensors, which is ATen's own op, is the exception).
    """
    if isinstance(valid, Tensor) and valid.dim() == 2 and valid.shape[1] == 2 and isinstance(input, Tensor) and input.dim() == 4:
        valid = torch.stack([valid[:, 0].clamp(0, input.shape[2]), valid[:, 1].clamp(0, input.shape[3])], dim=1) \
            .to(torch.int32)
    return call_for(input, num_groups, weight, bias, eps, activation_code(activation), residual,
                    output_recomputed, valid)(input, weight, bias, residual, valid)


def op_backend(x: Tensor, num_groups: int, code: int, residual: bool, records_grad: bool = False,
               residual_mode: Optional[int] = None, masked: bool = False):
    """The backend of the op's own path for a dense, non-empty x (``paths.decide``'s steps
    6-8): the Triton kernels (verified at first use), or the PyTorch path; bypassing tuning and
    routes. For the custom op's implementation (at every call of a compiled graph) and
    ``python -m gn_det.check``; kept per input signature beside the calls."""
    mode = residual_mode_for(code, residual) if residual_mode is None else residual_mode
    key = ("op backend", x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15, num_groups, code, residual,
           records_grad, mode, masked)
    backend = CALLS.get(key)
    if backend is None:
        generation = CALLS.generation
        backend = _op_call(x, num_groups, 1e-5, code, residual, mode, records_grad, True, masked)[0].backend
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            CALLS.keep(key, backend, generation)
    return backend


# --------------------------------------------------------------------------- deciding

def _decide(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, code: int,
            residual: Optional[Tensor], output_recomputed: bool, records_grad: bool,
            valid: Optional[Tensor] = None) -> Tuple[Call, bool]:
    """(the call for this input, whether it is kept for its signature)."""
    check_inputs(x, num_groups, weight, bias, eps, residual, valid)
    masked = valid is not None
    if x.numel() == 0:  # N = 0 (no ROIs): standard operators return it, with its gradients
        return EmptyCall(num_groups, eps, code), True
    xd = to_dense(x)
    dense = xd is x and weight is not None and bias is not None and weight.is_contiguous() and bias.is_contiguous() and (
        residual is None or residual.is_contiguous(memory_format=memory_format_of(x)))
    mode = residual_mode_for(code, residual is not None, output_recomputed)

    def op_call() -> Tuple[Call, bool]:
        return _op_call(xd, num_groups, eps, code, residual is not None, mode, records_grad, dense, masked)

    def measure(train: bool) -> "tuning.Decision":  # first-use tuning: once per bucket
        inputs = op_inputs(x, weight, bias, residual)
        kernels = _op_call(xd, num_groups, eps, code, residual is not None, mode, train, True)[0]
        return tuning.measure_decision(*inputs[:3], inputs[3], num_groups, code, train,
                                       {"kernels": kernels, "aten": AtenCall(num_groups, eps, code, plain=False)})

    path = paths.decide(x, num_groups, code, residual, weight, bias, train=records_grad,
                        output_recomputed=output_recomputed, measure=measure, masked=masked).path
    keep = not (x.is_cuda and torch.cuda.is_current_stream_capturing())
    if path == paths.ATEN:
        return AtenCall(num_groups, eps, code, plain=True), keep
    if path == paths.ATEN_TUNED:
        return AtenCall(num_groups, eps, code, plain=False), keep
    call, decided = op_call()
    return call, keep and decided


def _op_call(xd: Tensor, num_groups: int, eps: float, code: int, residual: bool, mode: int, records_grad: bool,
             dense: bool, masked: bool = False) -> Tuple[OpCall, bool]:
    """(the op's call for dense x: kernels, kernels under verification, or the PyTorch path;
    whether that is settled for its signature). ``masked``: calls over image regions."""
    if not paths.triton_enabled_for(xd, num_groups, masked):
        return OpCall(TORCH_PATH, num_groups, eps, code, mode, records_grad, dense), True
    kernels, reference = verification.with_faults(paths.triton_module().TritonPlans(), TORCH_PATH)
    forward = verification.outcome(xd, num_groups, code, residual, tuning.CHECKS[0], masked)
    backward = (verification.outcome(xd, num_groups, code, residual, verification.check_of(residual, mode), masked)
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
    return lambda x, weight, bias, residual, valid=None: export_group_norm(x, num_groups, weight, bias, eps, code,
                                                                            residual, valid)


# --------------------------------------------------------------------------- torch.compile

def _compiled_call(x: Tensor, num_groups: int, eps: float, code: int, residual: Optional[Tensor],
                   valid: Optional[Tensor] = None) -> Call:
    """Inside ``torch.compile``: plain GN of a contiguous float CPU tensor is ATen's (a standard
    operator); everything else is the custom op, whose implementation runs when the graph runs
    (the images' regions are one of its tensor arguments: their values are no guard)."""
    if valid is None and paths.is_plain_cpu(x, code, residual is not None):
        return lambda x, weight, bias, residual, valid=None: plain_cpu_group_norm(x, num_groups, weight, bias, eps)

    def custom_op(x, weight, bias, residual, valid=None):
        x, weight, bias, residual = op_inputs(x, weight, bias, residual)
        return torch.ops.gn_det.group_norm_forward(x, weight, bias, num_groups, float(eps), code, residual, valid)[0]

    return custom_op


@torch.library.custom_op("gn_det::group_norm_forward", mutates_args=())
def _group_norm_forward(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: int,
    residual: Optional[Tensor] = None, valid: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        stats = x.new_zeros((x.shape[0], num_groups), dtype=compute_dtype(x))
        return torch.empty_like(x), stats, stats.clone()
    backend = op_backend(x, num_groups, activation, residual is not None, masked=valid is not None)
    return backend.forward(x, weight, bias, residual, num_groups, eps, activation, valid)


@_group_norm_forward.register_fake
def _group_norm_forward_fake(x, weight, bias, num_groups, eps, activation, residual=None, valid=None):
    stats = x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def group_norm_forward_decomposition(x, weight, bias, num_groups, eps, activation, residual=None, valid=None):
    """The forward op in standard ATen operators, for exporters that decompose (ONNX dynamo=True):
    ATen's GroupNorm in the statistics' dtype (float32 for half inputs, as the kernels compute),
    the residual, the activation, the output in x's dtype; mean and rstd ``(N, G)`` as the op's."""
    from ..ops.activation import export_activation

    if valid is not None:
        raise NotImplementedError("gn_det: exporting GN over image regions (valid) through torch 2.5's decomposing "
                                  "ONNX exporter is not supported; torch >= 2.6 exports it in standard operators")

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
    valid: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        dres = x.new_empty(0) if residual is None else torch.zeros_like(residual)
        return torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(weight), dres
    backend = op_backend(x, num_groups, activation, residual is not None, records_grad=True, residual_mode=residual_mode,
                         masked=valid is not None)
    dx, dweight, dbias, dres = backend.backward(grad_y, x, weight, bias, mean, rstd, residual, num_groups, eps,
                                                activation, residual_mode, valid)
    # (a custom op returns tensors only: an empty one stands for "no residual")
    return dx, dweight, dbias, x.new_empty(0) if dres is None else dres


@_group_norm_backward.register_fake
def _group_norm_backward_fake(grad_y, x, weight, bias, mean, rstd, num_groups, eps, activation, residual=None,
                              residual_mode=1, valid=None):
    dres = x.new_empty(0) if residual is None else torch.empty_like(residual)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight), dres


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation, residual, valid = inputs + (None,) * (8 - len(inputs))
    y, mean, rstd = output
    mode = residual_mode_for(activation, residual is not None)
    ctx.save_for_backward(x, weight, bias, mean, rstd, y if mode == RESIDUAL_OUTPUT else residual, valid)
    ctx.num_groups, ctx.eps, ctx.activation, ctx.residual_mode = num_groups, eps, activation, mode
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd, saved, valid = ctx.saved_tensors
    dx, dweight, dbias, dres = torch.ops.gn_det.group_norm_backward(
        grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.eps, ctx.activation, saved, ctx.residual_mode, valid)
    if ctx.residual_dtype is not None and dres.dtype != ctx.residual_dtype:
        dres = dres.to(ctx.residual_dtype)
    needs = ctx.needs_input_grad  # (the custom op's omits arguments left at their defaults)
    grads = (dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None, None, None)
    if len(needs) > 6:
        grads += (dres if needs[6] else None,)
    return grads + (None,) * (len(needs) - len(grads))


_group_norm_forward.register_autograd(_backward, setup_context=_setup_context)
