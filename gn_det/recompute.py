"""Output recomputation: a GN layer's output is not kept for its consumers' backward.

A convolution after GN (+ fused ReLU) saves its input, the GN output, for its weight
gradient. GN's own backward already keeps what the output is made of: x, gamma, beta (and
the ``(N, G)`` statistics). While recomputation is on, each gn_det ``GroupNorm`` records
its output, and a saved-tensor pack hook, asked to save that output (or a view of it) with
its version unchanged, stores a small handle instead: what GN saved plus how to run GN's
forward again. The consumer's backward unpacks the handle, which reruns the same
deterministic forward, so the tensor it gets is bit-identical to the one it would have saved.

- ``set_recompute_output(model, True)``: a forward pre-hook and an always-called forward
  hook on ``model`` open and close a recording scope around each forward (so DDP, AMP and
  gradient accumulation work: each forward's handles hold that forward's tensors). What
  ``MODEL.GN.RECOMPUTE_OUTPUT`` turns on for built models.
- ``recompute_outputs()``: the same scope as a context manager, around any forward.
- ``observe_saved_tensors(observer)``: ``observer(tensor)`` for each tensor autograd saves as
  is (not the GN outputs stored as handles): what the benchmarks' counter
  (``gn_det.diagnostics.bench.memory.count_saved_tensors``) counts with.
- ``register_projection_finder(finder)``: how ``set_recompute_output`` finds, in a model, the
  convolutions whose output only a gn_det GN reads (gn_det.modeling registers detectron2's).

Saved normally instead: an output modified in place before it is saved (its version
changed: a residual ``+=``, an unfused ``relu_``), an output whose GN saved nothing (no
gradient needed through it: then holding x would cost as much as the output), outputs
of the routed ATen path that cast, and everything under ``torch.compile``, ``torch.jit.trace``
and ONNX export (the graph made there saves its own tensors). An output modified in place *after* being saved makes the
consumer's backward raise, as autograd does for saved tensors. Saved-tensor hooks
installed outside (``torch.autograd.graph.save_on_cpu``, a counter) still see every
tensor that is saved as is (torch 2.8+, which can hand them over; on older torch a recompute
scope opened inside them raises, naming that version, rather than bypass them).

Under autocast the GN op runs in its input's dtype (bf16 in, bf16 out), so the next
convolution receives the GN output itself, not a cast copy: the handle applies there too.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from .ops.autograd import GroupNormFunction
from .policy.paths import in_onnx_export

__all__ = ["observe_saved_tensors", "recompute_output_enabled", "recompute_outputs", "record_output", "recording",
           "register_projection_finder", "set_recompute_output"]

# The outer saved-tensor hooks, if any, when ours are pushed (so ours chain to them). torch
# 2.8 added this reader; before it, outer hooks can only be detected (_outer_hooks_active).
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_TOP_HOOKS_TORCH = "2.8"


def _outer_hooks_active() -> bool:
    """Whether saved-tensor default hooks are active here (for torch without ``_top_hooks``):
    a tensor saved by a probe op then already has hooks, and registering others raises."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False  # nothing is saved here, so no hook would be bypassed
    probe = torch.zeros((), requires_grad=True)
    square = probe * probe  # kept alive: its node holds the saved tensor
    try:
        square.grad_fn._raw_saved_self.register_hooks(lambda tensor: tensor, lambda tensor: tensor)
    except RuntimeError as exc:
        if "already been set" in str(exc):
            return True
        raise
    return False


class _State(threading.local):
    def __init__(self) -> None:
        self.hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self.users = 0
        self.records: Optional[Dict[int, "_Record"]] = None  # storage data_ptr -> record, while recording
        self.recording_depth = 0
        self.observers: List[Callable[[Tensor], None]] = []  # see observe_saved_tensors
        self.conv_input: Optional[Tuple[nn.Module, Tensor]] = None  # a projection conv's input, until its GN runs


_state = _State()


class _Record:
    """One GN output: a weak reference to it, its version, and how to recompute it."""

    __slots__ = ("output", "version", "dtype", "device", "offset", "recompute", "inputs", "input_versions", "cached")

    def __init__(self, output: Tensor, recompute: Callable[[], Tensor], inputs: Tuple[Tensor, ...]) -> None:
        self.output = weakref.ref(output)
        self.version = output._version
        self.dtype, self.device = output.dtype, output.device
        self.offset = output.storage_offset()
        self.recompute = recompute  # holds GN's node (or x, gamma, beta): what GN's backward keeps anyway
        self.inputs = inputs
        self.input_versions = tuple(t._version for t in inputs)
        self.cached: Optional[weakref.ref] = None  # the last recomputed output, while someone holds it

    def materialize(self, saved_version: int) -> Tensor:
        output = self.output()
        if output is not None and output._version != saved_version or any(
                t._version != v for t, v in zip(self.inputs, self.input_versions)):
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                "a GN output saved for backward (gn_det output recomputation), or the GN input it is recomputed "
                "from, was modified after it was saved")
        full = self.cached() if self.cached is not None else None
        if full is None:
            with torch.no_grad():
                full = self.recompute()
            self.cached = weakref.ref(full)
        return full


class _Handle:
    """What is stored in place of a GN output (or a view of it): the record and the view's geometry."""

    __slots__ = ("record", "version", "size", "stride", "offset")

    def __init__(self, record: _Record, tensor: Tensor) -> None:
        self.record = record
        self.version = tensor._version
        self.size, self.stride = tensor.size(), tensor.stride()
        self.offset = tensor.storage_offset() - record.offset

    def unpack(self) -> Tensor:
        full = self.record.materialize(self.version)
        if full.size() == self.size and full.stride() == self.stride and self.offset == 0:
            return full
        return full.as_strided(self.size, self.stride, full.storage_offset() + self.offset)


class _Outer:
    """A tensor packed by the saved-tensor hooks that were active outside ours."""

    __slots__ = ("packed", "unpack_hook")

    def __init__(self, packed, unpack_hook: Callable) -> None:
        self.packed, self.unpack_hook = packed, unpack_hook


def _handle_for(tensor: Tensor) -> Optional[_Handle]:
    records = _state.records
    if not records or tensor.layout is not torch.strided:
        return None
    # (the storage's address: a tensor's own where it starts its storage, ~0.6 us less than asking
    # for the storage, once per tensor autograd saves while recomputation is on)
    record = records.get(tensor.data_ptr() if tensor.storage_offset() == 0 else tensor.untyped_storage().data_ptr())
    if record is None or tensor.dtype != record.dtype or tensor.device != record.device:
        return None
    if tensor._version != record.version:
        return None  # modified in place since GN wrote it: the saved values are not GN's output
    if record.output() is None:
        return None  # that output is gone and the storage reused
    return _Handle(record, tensor)


class _Hooks:
    """The pack/unpack pair gn_det pushes, chained to the hooks active outside it."""

    def __init__(self) -> None:
        if _top_hooks is None and _outer_hooks_active():
            raise RuntimeError(
                "gn_det output recomputation (recompute_output) is on inside saved-tensor hooks set outside it (e.g. "
                f"torch.autograd.graph.save_on_cpu); torch {torch.__version__} cannot hand them to gn_det's, so they "
                f"would be bypassed. torch >= {_TOP_HOOKS_TORCH} chains them; else turn output recomputation off "
                "(gn_det.set_recompute_output(model, False), gn.recompute_output / MODEL.GN.RECOMPUTE_OUTPUT False)")
        outer = _top_hooks(False) if _top_hooks is not None else None
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)

    def pack(self, tensor: Tensor):
        handle = _handle_for(tensor)
        if handle is not None:
            return handle
        for observe in _state.observers:
            observe(tensor)
        if self.outer_pack is not None:
            return _Outer(self.outer_pack(tensor), self.outer_unpack)
        return tensor

    @staticmethod
    def unpack(packed):
        if isinstance(packed, _Handle):
            return packed.unpack()
        if isinstance(packed, _Outer):
            return packed.unpack_hook(packed.packed)
        return packed


@contextlib.contextmanager
def _hooks_pushed() -> Iterator[None]:
    if _state.users == 0:
        hooks = _Hooks()
        _state.hooks = torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)
        _state.hooks.__enter__()
    _state.users += 1
    try:
        yield
    finally:
        _state.users -= 1
        if _state.users == 0:
            hooks_context, _state.hooks = _state.hooks, None
            hooks_context.__exit__(None, None, None)


def recording() -> bool:
    """Whether GN outputs are being recorded now (inside a recompute scope, not compiling or tracing)."""
    return _state.records is not None and not _off()


def _recompute_output(node) -> Tensor:
    """Rerun a gn_det GN node's forward from what it saved. Read when needed, not when
    recorded: a residual it saved may itself be a recomputed output (a residual block's
    input is the previous block's output), which is then recomputed in turn; autograd's own
    version checks guard x and the residual."""
    x, weight, bias, _, _, residual = node.saved_tensors
    call = node.call  # (the forward's own backend: the same implementation, decided for x)
    return call.backend.forward(x, weight, bias, residual, call.num_groups, call.eps, call.activation,
                                node.valid)[0]


def output_recomputation(
    output: Tensor, bias: Optional[Tensor], eps: float
) -> Optional[Tuple[Callable[[], Tensor], Tuple[Tensor, ...]]]:
    """How to recompute a GN output ``(N, C, *)`` from what its GN saved for backward:
    ``(recompute, tensors)``, where ``recompute()`` reruns the same forward computation
    (deterministic, so bit-identical) from what GN saved, and ``tensors`` are those whose
    versions the record checks itself (none for gn_det's op, whose node is read again at
    recompute time); None where ``output`` did not come straight from a GN that saved its
    input (a routed path that cast or applied an activation, an output without a graph).
    ``bias`` and ``eps`` are the layer's (ATen's GN node keeps neither)."""
    node = output.grad_fn
    if isinstance(node, GroupNormFunction._backward_cls):  # gn_det's op: Triton kernels or the CPU path
        return functools.partial(_recompute_output, node), ()
    if type(node).__name__ == "NativeGroupNormBackward0":  # plain GN on NCHW CPU, or a route that did not cast
        x, weight, groups = node._saved_input, node._saved_weight, node._saved_group
        if weight is not None and weight.dtype != x.dtype or bias is not None and bias.dtype != x.dtype:
            return None  # a route that cast the parameters: the layer's are not what ran
        kept = tuple(t for t in (x, weight, bias) if t is not None)
        return functools.partial(F.group_norm, x, groups, weight, bias, eps), kept
    return None


def record_output(output: Tensor, bias: Optional[Tensor], eps: float) -> None:
    """Record a GN output ``(N, C, *)`` for recomputation, if its GN saved what it takes
    (``bias`` and ``eps``: the layer's, which ATen's GN node does not keep)."""
    if not recording() or output.grad_fn is None or output.numel() == 0:
        return
    found = output_recomputation(output, bias, eps)
    if found is not None:
        _state.records[output.untyped_storage().data_ptr()] = _Record(output, *found)


def _record_projection(x: Tensor, conv: nn.Module, conv_input: Tensor) -> None:
    """Record a projection convolution's output x, the input of its GN, for recomputation:
    GN's backward then gets it by running the convolution again, from the convolution's input
    (held as the convolution holds it: a handle where it is itself a recorded output) and
    weight, under the autocast state of the forward."""
    held = _handle_for(conv_input)
    kept = (conv.weight,) if held is not None else (conv.weight, conv_input)
    source = held if held is not None else conv_input
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def recompute() -> Tensor:
        inp = source.unpack() if isinstance(source, _Handle) else source
        with torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
            return conv._conv_forward(inp, conv.weight, conv.bias)  # as the forward ran it (a WSConv2d standardizes)

    _state.records[x.untyped_storage().data_ptr()] = _Record(x, recompute, kept)


def _note_projection_input(conv: nn.Module, args) -> None:
    _state.conv_input = (conv, args[0]) if recording() else None


def _record_projection_output(norm: nn.Module, args) -> None:
    pending, _state.conv_input = _state.conv_input, None
    x = args[0] if args else None
    if (pending is None or pending[0].norm is not norm or not recording() or not isinstance(x, Tensor)
            or x.numel() == 0 or type(x.grad_fn).__name__ != "ConvolutionBackward0"):
        return  # not straight from the convolution's forward (another call path): GN saves x as usual
    _record_projection(x, *pending)


# Functions ``finder(model) -> convolutions`` whose results set_recompute_output also covers:
# detectron2 Conv2d-like modules (``weight``, ``bias``, ``stride``..., ``norm`` a gn_det GroupNorm
# without activation) whose output only that GN reads. Added by register_projection_finder only.
_projection_finders: List[Callable[[nn.Module], List[nn.Module]]] = []


def register_projection_finder(
    finder: Callable[[nn.Module], List[nn.Module]]
) -> Callable[[nn.Module], List[nn.Module]]:
    """Add ``finder``: ``finder(model)`` returns the convolutions of ``model`` whose output only
    their ``norm`` (a gn_det ``GroupNorm`` without activation) reads, cheap to run again; under
    ``set_recompute_output`` such a GN's input is recomputed (the convolution runs again) instead
    of saved. ``gn_det.modeling`` registers detectron2's (``projection_convs``) when imported.
    Returns ``finder`` (usable as a decorator)."""
    if finder not in _projection_finders:
        _projection_finders.append(finder)
    return finder


def _open_scope() -> None:
    if _state.recording_depth == 0:
        _state.records = {}
    _state.recording_depth += 1


def _close_scope() -> None:
    _state.recording_depth -= 1
    if _state.recording_depth == 0:
        _state.records = None  # handles hold their records; the rest is dropped with the forward


@contextlib.contextmanager
def recompute_outputs(enabled: bool = True) -> Iterator[None]:
    """A scope in which gn_det GN outputs are recomputed in backward instead of saved.
    Enter it around a forward (what backward needs is fixed when the forward saves it; the
    backward may run after the scope is closed). Does nothing under ``torch.compile``."""
    if not enabled or _off():
        yield
        return
    with _hooks_pushed():
        _open_scope()
        try:
            yield
        finally:
            _close_scope()


def _off() -> bool:
    """Compiling, tracing or exporting: the graph being made saves its own tensors."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or in_onnx_export()


def _enter_scope(module: nn.Module, args) -> None:
    if _off():
        return
    scope = recompute_outputs()
    scope.__enter__()
    module.__dict__.setdefault("_gn_det_scopes", []).append(scope)


def _exit_scope(module: nn.Module, args, output) -> None:
    scopes = module.__dict__.get("_gn_det_scopes")
    if scopes:
        scopes.pop().__exit__(None, None, None)


def set_recompute_output(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn output recomputation on (or off) for every forward of ``model``, in place: GN
    outputs consumed inside ``model``'s forward are recomputed in backward instead of saved,
    and so are the inputs of the GNs after the convolutions the registered finders return
    (``register_projection_finder``; with detectron2, its blocks' projection shortcuts and
    FPN laterals: the convolution runs again). Gradients are bit-identical (fp32);
    memory drops by about one activation per GN whose output feeds a layer that saves its
    input, and one per projection. Idempotent. Returns ``model``."""
    handles = model.__dict__.pop("_gn_det_recompute_handles", None)
    for handle in handles or ():
        handle.remove()
    if enabled:
        handles = [model.register_forward_pre_hook(_enter_scope),
                   model.register_forward_hook(_exit_scope, always_call=True)]
        for conv in (conv for find in _projection_finders for conv in find(model)):
            handles += [conv.register_forward_pre_hook(_note_projection_input),
                        conv.norm.register_forward_pre_hook(_record_projection_output)]
        model.__dict__["_gn_det_recompute_handles"] = tuple(handles)
    return model


def recompute_output_enabled(model: nn.Module) -> bool:
    """Whether ``set_recompute_output(model, True)`` is in effect."""
    return bool(model.__dict__.get("_gn_det_recompute_handles"))


@contextlib.contextmanager
def observe_saved_tensors(observer: Callable[[Tensor], None]) -> Iterator[None]:
    """Call ``observer(tensor)`` for each tensor autograd saves for backward inside the block
    (forwards run inside it), before the hooks active outside see it; not for recomputed GN
    outputs (stored as handles, not saved)."""
    with _hooks_pushed():
        _state.observers.append(observer)
        try:
            yield
        finally:
            _state.observers.remove(observer)
