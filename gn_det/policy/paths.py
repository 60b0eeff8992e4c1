"""Which path a GN call takes, and why: the one place that decides (``decide``).

``group_norm`` runs what ``decide`` returns; ``dispatch_path`` (benchmark tables, debugging)
prints it; ``dispatch.forward_impl`` / ``backward_impl`` ask ``triton_enabled_for``, the same
test as steps 6-8 below, for the op's own implementation. The order, first match wins:

====  ===============  ===================================================================
step  path             when
====  ===============  ===================================================================
1     ``ATEN``         plain GN (no activation, no residual) on a contiguous float32/float64
                       CPU tensor, the Triton interpreter off for CPU: ``F.group_norm``,
                       ATen's kernels and autograd (``nn.GroupNorm``'s speed; a standard
                       operator, so also right under tracing, export and torch.compile).
                       First, because at small shapes every Python check shows in the time.
2     ``EXPORT``       ``torch.jit.trace``, ONNX export or ``torch.export``: standard
                       operators only (``group_norm_op.export_group_norm``).
3     ``CUSTOM_OP``    inside ``torch.compile``: the graph holds the custom op
                       ``gn_det::group_norm_forward``; when the graph runs, its implementation
                       is chosen by steps 6-8 (nothing is tuned inside graphs).
4     op's path        an empty input (N = 0, no ROIs; or an empty spatial size): nothing
                       to compute or tune; steps 6-8 say which implementation returns it.
5     ``ATEN_TUNED``   ATen's GroupNorm (``group_norm_op.aten_group_norm``) where it is
                       faster for x's bucket, unless the output is to be recomputed (ATen's
                       GroupNorm would keep it) and only where the op's own path is the
                       Triton kernels, or tuning is on for CPU: with tuning on
                       (``switches.set_autotune``), the decision held (measured, disk cache,
                       another rank: ``tuning.held_decision``), else a route of
                       ``routing.py`` (a seed decision), else, outside CUDA-graph capture, a
                       measurement now (``tuning.measure_decision``); with tuning off, a route.
6     ``TORCH``        the op (``autograd.GroupNormFunction``) on gn_det's PyTorch path: the
                       backend is "torch" (``switches.set_backend``), float64 (the exact path),
                       a GPU or triton the kernels do not support (``support.kernels_support``),
                       no triton, or a CPU tensor without the Triton interpreter.
7     ``FALLBACK``     the op on gn_det's PyTorch path: the kernels failed verification for
                       x's bucket (``verification.py``; applied by ``verified_forward`` /
                       ``verified_backward``, reported here when ``explain=True``).
8     ``KERNELS``      the op on the Triton kernels (verified at the bucket's first use).
====  ===============  ===================================================================

A call over image regions (``valid``, ``gn_det.padding``) skips steps 1, 4 and 5 (ATen's
GroupNorm cannot mask): steps 2-3, then 6-8, where step 6 also sends it to the PyTorch path
when the kernels do not mask x's kernel set (``masked_kernels_support``) or x is not 4-D.

``decide`` returns a ``Choice``: the path and the reason. Reasons are short constants unless
``explain=True`` (``dispatch_path``), which adds the measured times, the failed verification
and the kernel set, at a cost no call should pay.
"""
from __future__ import annotations

import functools
import inspect
import os
from types import ModuleType
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import routing, tuning
from ..ops.activation import ACT_NONE, activation_code
from ..ops.autograd import records_grad
from ..ops.layout import memory_format_of, to_dense
from .support import kernels_support, triton_support
from .switches import SWITCHES
from .verification import verify_key_of

__all__ = ["ATEN", "ATEN_TUNED", "CUSTOM_OP", "Choice", "EXPORT", "FALLBACK", "KERNELS", "PATHS", "TORCH", "decide",
           "dispatch_path", "is_plain_cpu", "triton_enabled_for", "triton_module", "triton_on_cpu"]

ATEN = "aten"  # F.group_norm itself (step 1)
EXPORT = "export"  # standard operators, for tracing and export (step 2)
CUSTOM_OP = "custom op"  # torch.ops.gn_det.group_norm_forward in a compiled graph (step 3)
ATEN_TUNED = "aten, tuned"  # group_norm_op.aten_group_norm: measured faster, or routed (step 5)
TORCH = "torch"  # GroupNormFunction on gn_det's PyTorch path (step 6)
FALLBACK = "torch, verification failed"  # GroupNormFunction on gn_det's PyTorch path (step 7)
KERNELS = "kernels"  # GroupNormFunction on the Triton kernels (step 8)
PATHS = (ATEN, EXPORT, CUSTOM_OP, ATEN_TUNED, TORCH, FALLBACK, KERNELS)

_ATEN_EXACT_DTYPES = (torch.float32, torch.float64)  # where ATen's CPU GN computes in the input's dtype
# torch.export, which ONNX's dynamo=True exporter runs, sets this (torch 2.6+; the TorchScript
# exporter sets is_in_onnx_export() instead). Without it (torch 2.5) the exported graph holds the
# custom op, which ONNX export replaces by its decomposition (autograd.py).
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def exporting_outside_dynamo() -> bool:
    """torch.export's non-strict tracing (the ONNX exporter's first try). Under dynamo only the
    op: torch 2.7's dynamo (2.7.1 measured; 2.14.1 reads the flag) folds is_exporting() to True
    in every torch.compile trace (the graph then lost the op, so the kernels); strict export
    keeps the op."""
    return _is_exporting() and not torch.compiler.is_dynamo_compiling()


def _onnx_export_test() -> Callable[[], bool]:
    """``torch.onnx.is_in_onnx_export`` at an attribute read's cost: torch 2.14's imports its two
    flags at every call (~1.3 us, once per GN call); where its source is that, the flags are
    read directly, else the function itself is used."""
    public = torch.onnx.is_in_onnx_export
    try:
        source = inspect.getsource(public)
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except (ImportError, OSError, TypeError):
        return public
    if "return GLOBALS.in_onnx_export or _flags._is_onnx_exporting" not in source:
        return public
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


_in_onnx_export: Optional[Callable[[], bool]] = None  # (resolved at the first call: torch.onnx imports slowly)


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, at an attribute read's cost outside ``torch.compile``
    (where dynamo reads the public function; it refuses to trace the flags' object)."""
    global _in_onnx_export
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    if _in_onnx_export is None:
        _in_onnx_export = _onnx_export_test()
    return _in_onnx_export()


def recording() -> bool:
    """Step 2's test: ``torch.jit.trace``, ONNX export or torch.export (outside dynamo) is
    recording the call, so only standard operators may run."""
    return torch.jit.is_tracing() or in_onnx_export() or exporting_outside_dynamo()


class Choice(NamedTuple):
    """The path of a call (one of ``PATHS``) and why."""

    path: str
    reason: str


@functools.lru_cache(maxsize=None)
def triton_module() -> Optional[ModuleType]:
    """The Triton kernels' module, or None where triton is not installed."""
    try:
        from ..ops import triton_launch as group_norm_triton
    except ImportError:  # e.g. a CPU-only torch build without triton
        return None
    return group_norm_triton


@functools.lru_cache(maxsize=None)
def triton_on_cpu() -> bool:
    """Whether CPU tensors go to the Triton interpreter (read once: TRITON_INTERPRET must be
    set before triton is imported anyway)."""
    asked = (
        os.environ.get("GN_DET_TRITON_ON_CPU") == "1"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and triton_module() is not None
    )
    if asked and triton_support() is not None:  # (a triton whose interpreter cannot run the kernels: support.py)
        raise RuntimeError(f"GN_DET_TRITON_ON_CPU=1 asks for gn_det's Triton kernels under triton's interpreter, but "
                           f"{triton_support()}; or unset GN_DET_TRITON_ON_CPU")
    return asked


def _kernels_off(x: Tensor) -> Optional[str]:
    """Why x does not go to the Triton kernels (step 6), or None when it does."""
    if SWITCHES.backend == "torch":
        return "the backend is 'torch' (set_backend / GN_DET_BACKEND)"
    if x.dtype == torch.float64:
        return "float64: the exact PyTorch path, for reference checks"
    if x.is_cuda:  # (support: the GPU's architecture, the dtype there, the triton installed)
        support = kernels_support(x.device, x.dtype)
        if not support.ok:
            return support.reason
        return None if triton_module() is not None else "triton is not importable"
    if x.device.type == "cpu" and triton_on_cpu():
        return None
    return _NOT_CUDA if x.device.type == "cpu" else f"{x.device.type} tensor{_NOT_CUDA[len('cpu tensor'):]}"


_NOT_CUDA = "cpu tensor (the Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 GN_DET_TRITON_ON_CPU=1)"


def triton_enabled_for(x: Tensor, num_groups: int = 1, masked: bool = False) -> bool:
    """Whether x goes to the Triton kernels: CUDA tensors the kernels support, and CPU tensors
    when the Triton interpreter is on (``TRITON_INTERPRET=1``) and ``GN_DET_TRITON_ON_CPU=1``
    asks for it (how the kernels are tested on machines without a GPU); not float64, not
    under the "torch" backend; over image regions (``masked``), where they mask x's kernel set.
    ``decide``'s step 6."""
    if _kernels_off(x) is not None:
        return False
    return not masked or x.numel() == 0 or _masked_kernels_off(x, num_groups) is None


def _masked_kernels_off(x: Tensor, num_groups: int) -> Optional[str]:
    """Why x's regions (``valid``) are not masked by the Triton kernels, or None (step 6)."""
    if x.dim() != 4:
        return f"regions of a {x.dim()}-D input: only (N, C, H, W) maps have them (the PyTorch path refuses)"
    if not triton_module().masked_kernels_support(x, num_groups):
        return "the Triton kernels do not mask this kernel set (" + triton_module().kernel_path(x, num_groups) + ")"
    return None


def _op_path(x: Tensor, num_groups: int, activation: int, residual: bool, explain: bool, off: Optional[str],
             why: str = "", masked: bool = False) -> Choice:
    """Steps 6-8: the op's own implementation for x (dense); ``off`` is ``_kernels_off(x)``."""
    if off is None and masked and x.numel():
        off = _masked_kernels_off(x, num_groups)
    if off is not None:
        return Choice(TORCH, why + off)
    if not explain or x.numel() == 0:
        return Choice(KERNELS, why + "the Triton kernels (verified at the bucket's first use)")
    failed = tuning.failed_verification(verify_key_of(x, num_groups, activation, residual, masked))
    if failed is not None:
        return Choice(FALLBACK, why + f"the kernels failed verification here: {failed.detail}")
    return Choice(KERNELS, why + triton_module().kernel_path(x, num_groups))


# The choices whose reason is a constant, made once (decide runs at every call).
_PLAIN_CPU = Choice(ATEN, "plain GN on a contiguous CPU tensor: ATen's GroupNorm and autograd")
_EXPORTING = Choice(EXPORT, "tracing or export: standard operators only")
_COMPILING = Choice(CUSTOM_OP, "inside torch.compile: the graph holds the custom op")
_TUNED = Choice(ATEN_TUNED, "tuned: ATen's GroupNorm measured faster for this bucket")
_ROUTED = Choice(ATEN_TUNED, "routed (Triton measured slower here)")


def is_plain_cpu(x: Tensor, activation: int, residual: bool) -> bool:
    """Step 1's test: plain GN of a contiguous float32/float64 CPU tensor, the interpreter off."""
    return (activation == ACT_NONE and not residual and x.dtype in _ATEN_EXACT_DTYPES and x.device.type == "cpu"
            and x.is_contiguous() and not triton_on_cpu())


def _is_capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def decide(
    x: Tensor, num_groups: int, activation: int, residual: Union[Tensor, bool, None] = None,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *, train: Optional[bool] = None,
    output_recomputed: bool = False, measure: Optional[Callable[[bool], "tuning.Decision"]] = None,
    explain: bool = False, masked: bool = False,
) -> Choice:
    """The path of ``group_norm(x, num_groups, weight, bias, activation=..., residual=...)``
    and why (the module docstring's steps, in order).

    Args:
        x: the call's input ``(N, C, *)``, as given (checked by ``group_norm``).
        activation: the activation's code (``activation.activation_code``).
        residual: the residual tensor, None, or (``dispatch_path``) whether there is one.
        weight, bias: the call's, or None; with x and residual they say whether the call is
            recorded for backward when ``train`` is None.
        train: whether the call is recorded for backward (forward + backward are tuned).
        output_recomputed: the caller recomputes the output in backward (no ATen GroupNorm).
        measure: ``measure(train) -> tuning.Decision`` times the paths at this call's input
            when its bucket has no decision yet (``group_norm`` gives it); None: nothing is
            measured (``dispatch_path``), the bucket runs the op's path until decided.
        explain: a reason with the details (times, failed verification, kernel set).
        masked: the call normalizes each image over its region of a padded batch
            (``valid``): the op's own path, never ATen's GroupNorm (steps 1 and 5).
    """
    has_residual = residual is not None and residual is not False
    if masked:
        if recording():
            return _EXPORTING
        if torch.compiler.is_compiling():
            return _COMPILING
        x = to_dense(x)
        return _op_path(x, num_groups, activation, has_residual, explain, _kernels_off(x), masked=True)
    if is_plain_cpu(x, activation, has_residual):
        return _PLAIN_CPU
    if recording():
        return _EXPORTING
    if torch.compiler.is_compiling():
        return _COMPILING
    x = to_dense(x)
    off = _kernels_off(x)
    if x.numel() == 0:
        return _op_path(x, num_groups, activation, has_residual, explain, off, "empty input, nothing to compute: ")
    tuned = tuning.autotune_enabled(x)
    if output_recomputed or not (off is None or (tuned and x.device.type == "cpu")):
        return _op_path(x, num_groups, activation, has_residual, explain, off)
    if tuned:
        if train is None:
            train = records_grad(x, weight, bias, residual if isinstance(residual, Tensor) else None)
        decision = tuning.held_decision(x, num_groups, activation, has_residual, train)
        if decision is None:
            if routing.aten_route(x, num_groups, activation) is not None:
                return _ROUTED
            if measure is None or _is_capturing(x):  # (no measuring inside a CUDA graph: decided later, outside)
                return _op_path(x, num_groups, activation, has_residual, explain, off, "not tuned yet: ")
            decision = measure(train)
        if decision.path == "aten":
            if not explain:
                return _TUNED
            times = ", ".join(f"{path} {ms:.3g} ms" for path, ms in decision.times_ms.items())
            return Choice(ATEN_TUNED, f"tuned ({decision.source}: {times})")
        return _op_path(x, num_groups, activation, has_residual, explain, off)
    if routing.aten_route(x, num_groups, activation) is not None:
        return _ROUTED
    return _op_path(x, num_groups, activation, has_residual, explain, off)


def dispatch_path(x: Tensor, num_groups: int, activation: Optional[str] = None, residual: bool = False,
                  train: bool = True) -> str:
    """What ``decide`` chooses for ``group_norm(x, num_groups, activation=..., residual=...)``
    in eager mode, as decided so far (for benchmark tables and debugging): a bucket that
    tuning has not measured shows the op's own path; nothing is measured here."""
    if x.numel() == 0:
        return "nothing (empty input)"
    code = activation_code(activation)
    choice = decide(x, num_groups, code, residual, train=train, explain=True)
    if choice.path == ATEN_TUNED:
        return f"PyTorch: ATen GroupNorm, {choice.reason}"
    if choice.path == KERNELS:
        return "Triton: " + choice.reason
    if choice.path == FALLBACK:
        return f"PyTorch: gn_det's PyTorch path ({choice.reason})"
    # ATEN (step 1), or gn_det's PyTorch path, which runs ATen's GroupNorm kernels on NCHW
    if memory_format_of(to_dense(x)) is not torch.contiguous_format:
        return "PyTorch: channels_last statistics + ATen backward"
    return "PyTorch: ATen GroupNorm" + ("" if code == ACT_NONE else " + activation")
