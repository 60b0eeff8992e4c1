"""``python -m gn_det.check``: a self-check of gn_det on this machine, for users and bug reports.

On a CUDA GPU it runs gn_det's Triton kernels at every GN shape of a Mask R-CNN R50-FPN step
(``gn_det.diagnostics.bench.layer_shapes.MASK_RCNN_SHAPES``, the benchmark's table) and a few others (odd sizes,
G = 1, G = C, a sequence, a 3-D volume, (N, C) features), in float32, float16 and bfloat16,
NCHW and channels_last, as plain GN, GN + ReLU, and a residual block's end (GN + shortcut + ReLU, with
the output kept, and with it recomputed in backward as ``MODEL.GN.RECOMPUTE_OUTPUT`` does).
For each case (a row) it reports:

- the largest error against a float64 reference computed from the same rounded inputs, forward
  and backward (dx, dgamma, dbeta, d residual), of the kernels and of PyTorch (``F.group_norm``
  under autocast, as mixed-precision training runs ``nn.GroupNorm``; then the shortcut add and
  ReLU). The error is ``gn_det.tolerances.scaled_error``; a case is correct when gn_det's
  errors are within the dtype's tolerances (``gn_det.tolerances``, the tests' table, with the
  reasons), its output and gradients keep the input's dtype and memory format, and
  ``gn_det.group_norm`` as a user calls it (tuning, routes and all) is correct too;
- forward + backward time of the kernels and of PyTorch's ops (``nn.GroupNorm`` [+ ReLU], or
  the residual block's three: GN, ``+= shortcut``, ReLU), measured side by side in one loop
  (CUDA events, median of several repetitions after warm-up; the GPU is given a head start so
  host launch time is hidden, as in a training step), and their ratio;
- what first-use tuning decides for the case's bucket (``gn_det.autotune_decisions()``: every
  field of the entry is shown, whatever fields it has), measured in this process (the check
  keeps decisions in memory only: it neither reads nor writes the user's tuning cache).

The kernel rows call the op's own path (``gn_det.policy.calls.op_backend``) directly, bypassing
tuning and routes, so that they check the kernels themselves whatever tuning would pick.

Without CUDA it says so and checks what runs here: gn_det's PyTorch (CPU) path at small
stand-ins of the shapes (timed against PyTorch on CPU), and the Triton kernels under Triton's
interpreter at a few small shapes (not timed), in a subprocess of its own started with
``TRITON_INTERPRET=1 GN_DET_TRITON_ON_CPU=1`` (the interpreter must be chosen before triton
is imported; set both yourself and the check runs the interpreter in its own process).

It prints one row per case, the failures again, and a last line (all correct, or how many
failed; the median speed-up), writes a JSON file (rows, tolerances, the machine:
``gn_det.diagnostics.env``'s report plus the GPU's name and compute capability) to attach to a bug
report, and exits 1 if any case is incorrect or raised (a case that raises is a failed row
with its error; the run goes on), 2 on a bad command line, else 0.

    python -m gn_det.check                      # everything (GPU: every shape; CPU: as above)
    python -m gn_det.check --quick              # a few shapes
    python -m gn_det.check --dtypes bf16 --layouts channels_last --ops relu,block
    python -m gn_det.check --json report.json   # (default: ./gn_det_check_<machine>.json)

``--inject-fault KIND[:TEXT]`` is for testing the check itself: it corrupts the implementation
under test (the kernels, or the CPU path) in the cases whose label contains TEXT, as a faulty
kernel would: ``wrong-output`` adds a large error to one output element, ``wrong-dx`` to one
element of dx, ``raise`` makes the call raise. The report records the fault, and the run
exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import gn_det
from gn_det.diagnostics.bench.layer_shapes import CPU_SHAPES, MASK_RCNN_SHAPES, Shape
from gn_det.policy.timing import DeviceTimer
from gn_det.policy import routing, tuning
from gn_det import policy
from gn_det.ops.activation import activation_code
from gn_det.ops.autograd import OpCall, records_grad, residual_mode_for
from gn_det.policy.calls import op_backend
from gn_det.ops.layout import memory_format_of
from gn_det.tolerances import GRAD_TOLERANCE, TOLERANCE, relu_unambiguous_grad, scaled_error

FORMAT_VERSION = 1
EPS = 1e-5
GROUPS = 32  # detectron2's GN

# ----------------------------------------------------------------------------- what is checked

# name -> (shape, groups): the cases beside the benchmark's table.
GPU_EXTRA_SHAPES: Dict[str, Tuple[Shape, int]] = {
    "odd 37x53 (3 ch/group)": ((3, 96, 37, 53), 32),
    "7 ch/group (RegNet)": ((2, 224, 100, 168), 32),
    "G = 1 (layer norm)": ((2, 256, 50, 84), 1),
    "G = C (instance norm)": ((4, 64, 28, 28), 64),
    "sequence": ((3, 96, 1001), 32),
    "volume": ((2, 64, 9, 17, 23), 32),
    "features (N, C)": ((64, 512), 32),
}
GPU_QUICK = ("stem N=1", "res5", "FPN P3", "box head", "odd 37x53 (3 ch/group)", "G = 1 (layer norm)",
             "G = C (instance norm)", "volume")

# The CPU path at smaller stand-ins of the same layers (layer_shapes.CPU_SHAPES) and others.
CPU_EXTRA_SHAPES: Dict[str, Tuple[Shape, int]] = {
    "odd 13x11 (3 ch/group)": ((2, 96, 13, 11), 32),
    "G = 1 (layer norm)": ((2, 64, 25, 42), 1),
    "G = C (instance norm)": ((2, 32, 14, 14), 32),
    "sequence": ((3, 96, 201), 32),
    "volume": ((2, 64, 5, 9, 11), 32),
}
CPU_QUICK: Dict[str, Tuple[Shape, int]] = {
    "box head (small)": ((8, 64, 7, 7), 32), "volume (small)": ((2, 12, 3, 5, 4), 3),
}

# The Triton kernels under the interpreter (seconds per case: small shapes only).
INTERPRETER_SHAPES: Dict[str, Tuple[Shape, int]] = {
    "box head 7x9 (64 ch)": ((2, 64, 7, 9), 32),
    "odd 5x7": ((1, 12, 5, 7), 4),
    "G = 1": ((2, 8, 6, 10), 1),
    "G = C": ((2, 8, 5, 5), 8),
    "volume": ((2, 6, 3, 5, 4), 3),
}
INTERPRETER_QUICK = ("odd 5x7", "volume")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
LAYOUTS = ("nchw", "channels_last")


@dataclasses.dataclass(frozen=True)
class Op:
    """What a case computes: GN [+ shortcut] [+ activation]."""
    name: str  # as the table and --ops show it
    activation: Optional[str]
    residual: bool
    output_recomputed: bool  # backward keeps the shortcut, not the output (MODEL.GN.RECOMPUTE_OUTPUT)
    pytorch: str  # what it is timed against


OPS: Dict[str, Op] = {op.name: op for op in (
    Op("gn", None, False, False, "nn.GroupNorm"),
    Op("relu", "relu", False, False, "nn.GroupNorm + ReLU"),
    Op("block", "relu", True, False, "GN, += shortcut, ReLU"),
    Op("block-recomputed", "relu", True, True, "GN, += shortcut, ReLU"),
)}
OP_HELP = ("gn: GN alone; relu: GN + fused ReLU; block: a residual block's end, relu(GN(x) + shortcut), "
           "fused; block-recomputed: the same with the output recomputed in backward")


@dataclasses.dataclass(frozen=True)
class Case:
    part: str  # "cuda", "cpu path", "interpreter"
    name: str
    shape: Shape
    groups: int
    dtype: str
    layout: str
    op: str

    @property
    def label(self) -> str:
        """How the failures list names the case (and what --inject-fault's TEXT is matched against)."""
        return label(self.part, self.name, self.shape, self.groups, self.dtype, self.layout, self.op)


def label(part: str, name: str, shape: Sequence[int], groups: int, dtype: str, layout: str, op: str) -> str:
    return f"{part} | {name} {'x'.join(map(str, shape))} G={groups} | {dtype} | {layout} | {op}"


def memory_format(layout: str, rank: int) -> torch.memory_format:
    if layout == "nchw":
        return torch.contiguous_format
    return torch.channels_last if rank == 4 else torch.channels_last_3d


def shape_table(part: str, quick: bool) -> Dict[str, Tuple[Shape, int]]:
    """name -> (shape, groups) of a part's cases."""
    if part == "cuda":
        table = {name: (shape, GROUPS) for name, shape in MASK_RCNN_SHAPES.items()}
        table.update(GPU_EXTRA_SHAPES)
        return {k: v for k, v in table.items() if k in GPU_QUICK} if quick else table
    if part == "cpu path":
        if quick:
            return dict(CPU_QUICK)
        table = {f"{name} (small)": (shape, GROUPS) for name, shape in CPU_SHAPES.items()}
        table.update(CPU_EXTRA_SHAPES)
        return table
    return {k: v for k, v in INTERPRETER_SHAPES.items() if not quick or k in INTERPRETER_QUICK}


def split_names(value: str) -> List[str]:
    """A comma-separated list of case names or parts of them; commas inside parentheses belong
    to a name ('features (N, C)')."""
    parts, depth, current = [], 0, ""
    for char in value:
        depth += (char == "(") - (char == ")")
        if char == "," and depth <= 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def name_matches(text: str, name: str) -> bool:
    """Whether a --shapes entry selects a case name: '=NAME' the name itself, else any name
    containing the text (case-insensitive both)."""
    if text.startswith("="):
        return text[1:].strip().lower() == name.lower()
    return text.lower() in name.lower()


def cases(part: str, quick: bool, dtypes: Sequence[str], layouts: Sequence[str], ops: Sequence[str],
          shape_filter: Sequence[str]) -> List[Case]:
    out = []
    for name, (shape, groups) in shape_table(part, quick).items():
        if shape_filter and not any(name_matches(text, name) for text in shape_filter):
            continue
        for dtype in dtypes:
            for layout in layouts:
                if layout != "nchw" and len(shape) not in (4, 5):
                    continue  # channels_last is defined for images and volumes only
                out += [Case(part, name, tuple(shape), groups, dtype, layout, op) for op in ops]
    return out


# ----------------------------------------------------------------------------- fault injection

class _WrongGradient(torch.autograd.Function):
    """Identity forward; backward adds ``delta`` to one element of the gradient."""

    @staticmethod
    def forward(ctx, x, delta):
        ctx.delta = delta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()  # (dense, in the gradient's layout: element 0 of its storage is one of its own)
        grad.as_strided((1,), (1,)).add_(ctx.delta * (1 + grad.abs().max()))
        return grad, None


FAULTS = ("wrong-output", "wrong-dx", "raise")


def _inject(faults: Sequence[str], case: Case, run: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """run, corrupted by each --inject-fault that applies to case (see the module docstring)."""
    for fault in faults:
        kind, _, text = fault.partition(":")
        if not text or text.lower() in case.label.lower():
            run = _corrupted(run, kind, fault)
    return run


def _corrupted(run: Callable[..., Tensor], kind: str, fault: str) -> Callable[..., Tensor]:
    def corrupted(x: Tensor, *args, **kwargs) -> Tensor:
        if kind == "raise":
            raise RuntimeError(f"fault injected by --inject-fault {fault}")
        if kind == "wrong-dx":
            x = _WrongGradient.apply(x, 0.5)
        y = run(x, *args, **kwargs)
        if kind == "wrong-output":
            delta = torch.zeros_like(y)  # (y's layout: element 0 of its storage is one of y's)
            delta.as_strided((1,), (1,)).fill_(0.5 * (1 + y.detach().abs().max().item()))
            y = y + delta
        return y
    return corrupted


# ----------------------------------------------------------------------------- the implementations

def gn_det_op(x: Tensor, groups: int, weight: Tensor, bias: Tensor, op: Op, residual: Optional[Tensor]) -> Tensor:
    """gn_det's own path, bypassing tuning and routes: the Triton kernels on CUDA (and on CPU
    under the interpreter), else the PyTorch path. x, residual dense; weight, bias dense (C,)."""
    code = activation_code(op.activation)
    mode = residual_mode_for(code, residual is not None, op.output_recomputed)
    grad = records_grad(x, weight, bias, residual)
    backend = op_backend(x, groups, code, residual is not None, grad, mode)
    return OpCall(backend, groups, EPS, code, mode, grad, True)(x, weight, bias, residual)


def gn_det_as_called(x: Tensor, groups: int, weight: Tensor, bias: Tensor, op: Op,
                     residual: Optional[Tensor]) -> Tensor:
    """``gn_det.group_norm`` as a user calls it: routes, tuning and everything else included."""
    return gn_det.group_norm(x, groups, weight, bias, EPS, op.activation, residual=residual,
                             output_recomputed=op.output_recomputed)


def pytorch_op(x: Tensor, groups: int, weight: Tensor, bias: Tensor, op: Op, residual: Optional[Tensor]) -> Tensor:
    """PyTorch's ops as a detectron2 model runs them, in mixed precision for half x (autocast
    upcasts GroupNorm: its output is float32): ``nn.GroupNorm`` [+ ReLU], or a residual
    block's end as detectron2's BottleneckBlock writes it (``out += shortcut; relu_``)."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(x.device.type, dtype=x.dtype) if half else contextlib.nullcontext():
        y = F.group_norm(x, groups, weight, bias, EPS)
        if residual is not None:
            y += residual
            return F.relu_(y)
        return F.relu(y) if op.activation == "relu" else y


def reference(x: Tensor, groups: int, weight: Tensor, bias: Tensor, op: Op, residual: Optional[Tensor],
              dy: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(the upstream gradient the case checks with, float64 output and gradients (keys: forward,
    dx, dweight, dbias[, dresidual])) from the same rounded inputs, on their device. The upstream
    gradient is dy, and with ReLU 0 where the exact pre-activation is within rounding of 0
    (``gn_det.tolerances.relu_unambiguous_grad``)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    if residual is not None:
        leaves.append(residual.detach().double().requires_grad_())
    y = F.group_norm(leaves[0], groups, leaves[1], leaves[2], EPS)
    if residual is not None:
        y = y + leaves[3]
    if op.activation == "relu":
        dy = relu_unambiguous_grad(y.detach(), dy)
        y = F.relu(y)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return dy, dict(zip(_OUTPUTS, (y.detach(),) + tuple(grads)))


_OUTPUTS = ("forward", "dx", "dweight", "dbias", "dresidual")


def run_and_grad(impl: Callable[..., Tensor], x: Tensor, groups: int, weight: Tensor, bias: Tensor, op: Op,
                 residual: Optional[Tensor], dy: Tensor) -> Dict[str, Tensor]:
    """impl's output and gradients (the keys of ``reference``)."""
    leaves = [x, weight, bias] + ([residual] if residual is not None else [])
    y = impl(x, groups, weight, bias, op, residual)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return dict(zip(_OUTPUTS, (y.detach(),) + tuple(grads)))


def errors(results: Dict[str, Tensor], ref: Dict[str, Tensor]) -> Dict[str, float]:
    return {k: scaled_error(results[k], ref[k]) for k in ref}


# ----------------------------------------------------------------------------- timing

def describe_timing(timer: DeviceTimer, warmup: int, reps: int) -> str:
    """How the check's times were taken, for its JSON."""
    if not timer.cuda:
        return f"forward + backward, wall time (perf_counter), median of {reps} after {warmup} warm-up"
    return (f"forward + backward, device time (CUDA events), median of {reps} after {warmup} warm-up, both "
            f"paths taking turns in each repetition; the GPU given a {timer.HEAD_START_S * 1e3:.0f} ms head start "
            "before each timed call so that host launch time is hidden")


def time_side_by_side(timer: DeviceTimer, runs: Dict[str, Callable[[], object]], warmup: int,
                      reps: int) -> Dict[str, float]:
    """name -> median ms; the runs take turns in every repetition, in an order that alternates."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(warmup + reps):
        for name in (names if i % 2 == 0 else names[::-1]):
            ms = timer(runs[name]) * 1e3
            if i >= warmup:
                times[name].append(ms)
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------- tuning

_ENTRY_SHOWN = ("path", "source", "times_ms")  # shown first; every other non-key field follows as key=value


def tuning_entries(x: Tensor, groups: int, op: Op, train: bool = True) -> List[dict]:
    """The entries of ``gn_det.autotune_decisions()`` for x's bucket (every field kept)."""
    key = dict(zip(tuning.TUNE_FIELDS, tuning.tune_key_of(x, groups, activation_code(op.activation), op.residual,
                                                          train)))
    return [entry for entry in gn_det.autotune_decisions() if all(entry.get(k) == v for k, v in key.items())]


def describe_tuning(entries: List[dict]) -> str:
    """A decision entry in a few words, with every field beyond the bucket's own."""
    texts = []
    for entry in entries:
        parts = [str(entry.get("path", "?"))]
        if "source" in entry:
            parts.append(str(entry["source"]))
        times = entry.get("times_ms")
        if isinstance(times, dict) and times:
            parts.append(" ".join(f"{p} {_ms(v)}" for p, v in times.items()))
        for field, value in entry.items():
            if field in tuning.TUNE_FIELDS or field in _ENTRY_SHOWN or field == "shape":
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            parts.append(f"{field}={text if len(text) <= 60 else text[:57] + '...'}")
        texts.append(", ".join(parts))
    return "; ".join(texts)


def _ms(value) -> str:
    return f"{value:.3g} ms" if isinstance(value, (int, float)) else str(value)


# ----------------------------------------------------------------------------- one case

@dataclasses.dataclass
class Settings:
    device: torch.device
    warmup: int
    reps: int
    timed: bool  # measure speed (False under the interpreter)
    tune: bool  # run gn_det.group_norm as called (tuning included) and show its decision
    faults: List[str]
    timer: "DeviceTimer"


def _tensors(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x, dy, shortcut (in dtype, contiguous), weight, bias (float32, as in mixed-precision
    training): x = 0.5 + N(0, 1) (a mean away from 0, as after a convolution)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    x = randn().add_(0.5)
    dy, shortcut = randn(), randn()
    c = shape[1]
    weight = torch.rand(c, generator=gen, device=device).add_(0.5)
    bias = torch.rand(c, generator=gen, device=device).sub_(0.5)
    return x, dy, shortcut, weight, bias


def _contract_problems(what: str, got: Dict[str, Tensor], x: Tensor, residual: Optional[Tensor],
                       check_dx_format: bool = True) -> List[str]:
    """The output and dx keep x's dtype and memory format (dx's format: where check_dx_format);
    d residual the residual's dtype."""
    fmt = memory_format_of(x)
    problems = []
    for key in ("forward", "dx"):
        t = got[key]
        if t.dtype != x.dtype:
            problems.append(f"{what} {key} is {str(t.dtype)[6:]}, not the input's {str(x.dtype)[6:]}")
        if (key == "forward" or check_dx_format) and not t.is_contiguous(memory_format=fmt):
            problems.append(f"{what} {key} lost the input's memory format")
    if residual is not None and got["dresidual"].dtype != residual.dtype:
        problems.append(f"{what} dresidual is {str(got['dresidual'].dtype)[6:]}, not the residual's")
    return problems


def implementation_name(x: Tensor, groups: int) -> str:
    """Which implementation gn_det's own path runs for x."""
    if policy.triton_enabled_for(x):
        module = policy.paths.triton_module()
        where = "Triton kernels" + (" (interpreter)" if x.device.type == "cpu" else "")
        try:
            return f"{where}: {module.kernel_path(x, groups)}"
        except Exception:  # a name is not worth failing for
            return where
    return "PyTorch path"


def check_group(cases_here: List[Case], settings: Settings, deadline: Optional[float] = None
                ) -> Iterator[Tuple[Case, Optional[dict]]]:
    """(case, row) for the cases of one shape and dtype (inputs and references made once for
    them); row None for a case not started because the deadline (time.monotonic) had passed."""
    first = cases_here[0]
    device = settings.device
    dtype = DTYPES[first.dtype]
    try:
        x0, dy0, r0, weight0, bias0 = _tensors(first.shape, dtype, device)
    except Exception as exc:  # (e.g. out of memory): every case of the group fails with it
        for case in cases_here:
            yield case, _error_row(case, exc)
        return
    refs: Dict[Tuple, Dict[str, Tensor]] = {}
    for case in cases_here:
        if deadline is not None and time.monotonic() > deadline:
            yield case, None
            continue
        started = time.perf_counter()
        try:
            op = OPS[case.op]
            math_of = (op.activation, op.residual)  # (recomputing the output changes no value)
            if math_of not in refs:
                refs[math_of] = reference(x0, case.groups, weight0, bias0, op, r0 if op.residual else None, dy0)
            dy, ref = refs[math_of]
            row = check_case(case, op, settings, x0, dy, r0, weight0, bias0, ref)
        except Exception as exc:
            row = _error_row(case, exc)
        row["seconds"] = round(time.perf_counter() - started, 3)
        yield case, row
    del refs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_case(case: Case, op: Op, settings: Settings, x0: Tensor, dy0: Tensor, r0: Tensor, weight0: Tensor,
               bias0: Tensor, ref: Dict[str, Tensor]) -> dict:
    fmt = memory_format(case.layout, len(case.shape))
    x = x0.contiguous(memory_format=fmt).requires_grad_()
    dy = dy0.contiguous(memory_format=fmt)
    residual = r0.contiguous(memory_format=fmt).requires_grad_() if op.residual else None
    weight, bias = weight0.clone().requires_grad_(), bias0.clone().requires_grad_()
    dtype = DTYPES[case.dtype]
    tol = {"forward": TOLERANCE[dtype], "backward": GRAD_TOLERANCE[dtype]}
    row = _base_row(case)
    row.update(implementation=implementation_name(x, case.groups), pytorch=op.pytorch, tolerance=tol)
    under_test = _inject(settings.faults, case, lambda *a: gn_det_op(*a))
    args = (x, case.groups, weight, bias, op, residual, dy)

    ours = run_and_grad(under_test, *args)
    _sync(settings.device)
    problems = _contract_problems("gn_det", ours, x, residual)
    row["errors"] = {"gn_det": errors(ours, ref)}
    del ours
    try:
        row["errors"]["pytorch"] = errors(run_and_grad(pytorch_op, *args), ref)
    except Exception as exc:  # PyTorch's own failure is reported, not held against gn_det
        row["pytorch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    raised = []  # stages after the kernels' own run that raised: the case fails, the others still run
    if settings.tune:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                called = run_and_grad(gn_det_as_called, *args)
                _sync(settings.device)
            row["errors"]["gn_det as called"] = errors(called, ref)
            # (PyTorch's GroupNorm, where tuning picks it, gives dx in its own layout)
            problems += _contract_problems("gn_det.group_norm", called, x, residual, check_dx_format=False)
            del called
            package = os.path.dirname(os.path.abspath(gn_det.__file__))
            row["warnings"] = [str(w.message) for w in caught  # gn_det's own (a fallback, say), not torch's
                               if os.path.abspath(w.filename).startswith(package) or "gn_det" in str(w.message)]
        except Exception as exc:
            raised.append(f"gn_det.group_norm raised {type(exc).__name__}: {exc}"[:500])
        if settings.device.type == "cuda":
            try:
                row["tuning"] = tuning_entries(x, case.groups, op)
                if not row["tuning"]:
                    row["tuning_note"] = _why_no_decision(x, case.groups, op)
            except Exception as exc:  # showing the decision is not worth failing the case for
                row["tuning_note"] = f"decision not found ({type(exc).__name__}: {exc})"[:200]
    for who in ("gn_det", "gn_det as called"):
        for key, err in row["errors"].get(who, {}).items():
            limit = tol["forward"] if key == "forward" else tol["backward"]
            if not err <= limit:  # (NaN fails too)
                problems.append(f"{who}: {key} error {err:.3g} > {limit:g}")
    if settings.timed and "pytorch" in row["errors"]:
        try:
            row["time_ms"] = time_side_by_side(settings.timer, {
                "gn_det": lambda: run_and_grad(under_test, *args),
                "pytorch": lambda: run_and_grad(pytorch_op, *args),
            }, settings.warmup, settings.reps)
            row["speedup"] = row["time_ms"]["pytorch"] / row["time_ms"]["gn_det"]
        except Exception as exc:
            raised.append(f"timing raised {type(exc).__name__}: {exc}"[:500])
    row["status"] = "error" if raised else "incorrect" if problems else "ok"
    row["problems"] = raised + problems
    return row


def _why_no_decision(x: Tensor, groups: int, op: Op) -> str:
    if not tuning.autotune_enabled(x):
        return "tuning off (GN_DET_AUTOTUNE=0): the kernels, but where routes.json routes"
    if op.output_recomputed:
        return "not tuned: output recomputed, the kernels run"
    if routing.aten_route(x, groups, activation_code(op.activation)) is not None:
        return "routed to PyTorch's GroupNorm by routes.json (a seed decision)"
    return "no decision recorded"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a launch error belongs to this case, not the next


def _base_row(case: Case) -> dict:
    return {"part": case.part, "case": case.name, "dims": list(case.shape), "groups": case.groups,
            "dtype": case.dtype, "layout": case.layout, "op": case.op, "label": case.label}


def _error_row(case: Case, exc: BaseException) -> dict:
    row = _base_row(case)
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    row.update(status="error", problems=[f"raised {type(exc).__name__}: {exc}"[:500]], traceback=tail[-2000:])
    return row


# ----------------------------------------------------------------------------- the table

COLUMNS = (("case", 22), ("shape", 16), ("G", 3), ("dtype", 8), ("layout", 13), ("op", 16),
           ("fwd err gn_det/torch", 19), ("bwd err gn_det/torch", 19), ("tol fwd/bwd", 12),
           ("gn_det ms", 9), ("torch ms", 9), ("speed-up", 8), ("result", 7), ("tuning", 0))


def header() -> str:
    line = " ".join(f"{name:<{width}}" if width else name for name, width in COLUMNS)
    return line + "\n" + "-" * len(line)


def _err(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


def _worst_gradient(errs: Dict[str, float]) -> Optional[float]:
    """The largest of the gradients' errors (NaN first: it is the worst)."""
    values = [v for k, v in errs.items() if k != "forward"]
    return max(values, key=lambda v: (v != v, v if v == v else 0.0), default=None)


def format_row(row: dict) -> str:
    errs = row.get("errors", {})
    ours, theirs = errs.get("gn_det", {}), errs.get("pytorch", {})
    times = row.get("time_ms") or {}
    tol = row.get("tolerance")
    cells = {
        "case": row["case"], "shape": "x".join(map(str, row["dims"])), "G": str(row["groups"]),
        "dtype": row["dtype"], "layout": row["layout"], "op": row["op"],
        "fwd err gn_det/torch": f"{_err(ours.get('forward'))}/{_err(theirs.get('forward'))}" if errs else "-",
        "bwd err gn_det/torch": f"{_err(_worst_gradient(ours))}/{_err(_worst_gradient(theirs))}" if errs else "-",
        "tol fwd/bwd": f"{tol['forward']:g}/{tol['backward']:g}" if tol else "-",
        "gn_det ms": f"{times['gn_det']:.3f}" if times else "-",
        "torch ms": f"{times['pytorch']:.3f}" if times else "-",
        "speed-up": f"{row['speedup']:.2f}x" if "speedup" in row else "-",
        "result": {"ok": "ok", "incorrect": "FAIL", "error": "ERROR"}[row["status"]],
        "tuning": describe_tuning(row["tuning"]) if row.get("tuning") else row.get("tuning_note", ""),
    }
    if row.get("warnings"):  # gn_det's own warnings during the call as a user makes it (e.g. a fallback)
        first = row["warnings"][0].replace("\n", " ")
        cells["tuning"] += f" [{len(row['warnings'])} warning(s): {first[:80]}{'...' if len(first) > 80 else ''}]"
    line = " ".join(f"{cells[name]:<{width}}" if width else cells[name] for name, width in COLUMNS).rstrip()
    if row["status"] != "ok":
        line += "\n    " + "; ".join(row["problems"])
    return line


# ----------------------------------------------------------------------------- the machine

def machine_info(device: torch.device) -> dict:
    """The machine, for the report: gn_det.diagnostics.env's rows, plus the GPU's name and compute capability."""
    from gn_det.diagnostics.env import collect_env

    info = {"gn_det": gn_det.__version__, "torch": torch.__version__, "triton": _triton_version(),
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    cuda=torch.version.cuda)
    else:
        info.update(gpu=None, compute_capability=None, cpu=platform.processor() or platform.machine(),
                    cpus=os.cpu_count())
    try:
        info["env"] = {key: value for key, value in collect_env()}
    except Exception as exc:  # the report still goes out
        info["env"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def machine_name(info: dict) -> str:
    return info["gpu"] or f"cpu {info['cpu']} x{info['cpus']}"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


# ----------------------------------------------------------------------------- running

def _json_safe(value):
    """NaN and inf as strings (JSON has no literal for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


WHAT_RUNS_ON_CPU = {
    "cpu path": "gn_det's PyTorch path on CPU (timed against PyTorch on CPU)",
    "interpreter": "the Triton kernels under Triton's interpreter at small shapes (not timed)",
}
PART_TITLES = {
    "cuda": "gn_det's Triton kernels on the GPU (errors against float64; time against PyTorch's ops)",
    "cpu path": "gn_det's PyTorch path on CPU (errors against float64; time against PyTorch's ops on CPU)",
    "interpreter": "gn_det's Triton kernels under Triton's interpreter, on CPU (errors against float64; not timed)",
}


def run_part(part: str, args: argparse.Namespace, device: torch.device, timer: DeviceTimer,
             deadline: Optional[float], rows: List[dict], not_run: List[str]) -> None:
    """Checks one part's cases, printing each row as it is done."""
    todo = cases(part, args.quick, args.dtypes, args.layouts, args.ops, args.shapes)
    settings = Settings(device=device, warmup=args.warmup, reps=args.reps, timed=part != "interpreter",
                        tune=part != "interpreter", faults=args.inject_fault, timer=timer)
    print(f"-- {PART_TITLES[part]}", flush=True)
    groups: Dict[Tuple, List[Case]] = {}
    for case in todo:
        groups.setdefault((case.name, case.dtype), []).append(case)
    for group in groups.values():
        if deadline is not None and time.monotonic() > deadline:
            not_run.extend(case.label for case in group)
            continue
        for case, row in check_group(group, settings, deadline):
            if row is None:
                not_run.append(case.label)
                continue
            rows.append(row)
            print(format_row(row), flush=True)


def run_interpreter_subprocess(args: argparse.Namespace, deadline: Optional[float], rows: List[dict],
                               not_run: List[str]) -> Optional[str]:
    """Runs the interpreter part in a process started with TRITON_INTERPRET=1 and
    GN_DET_TRITON_ON_CPU=1; its rows join ``rows``. Returns why it did not run, if it did not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if deadline is not None and time.monotonic() > deadline:
        not_run.extend(case.label for case in cases("interpreter", args.quick, args.dtypes, args.layouts, args.ops,
                                                    args.shapes))
        return None
    fd, rows_file = tempfile.mkstemp(prefix="gn_det_check_", suffix=".json")
    os.close(fd)
    command = [sys.executable, "-m", "gn_det.diagnostics.check", "--device", "cpu", "--part", "interpreter",
               "--rows-out", rows_file, "--dtypes", ",".join(args.dtypes), "--layouts", ",".join(args.layouts),
               "--ops", ",".join(args.ops)]
    command += ["--quick"] if args.quick else []
    command += ["--shapes", ",".join(args.shapes)] if args.shapes else []
    for fault in args.inject_fault:
        command += ["--inject-fault", fault]
    if deadline is not None:
        command += ["--time-limit", str(deadline - time.monotonic())]  # (the child's clock starts later)
    env = dict(os.environ, TRITON_INTERPRET="1", GN_DET_TRITON_ON_CPU="1")
    proc = None
    try:
        proc = subprocess.run(command, env=env, stdout=None, stderr=subprocess.PIPE, text=True)
        with open(rows_file) as f:
            child = json.load(f)
        rows.extend(child["rows"])
        not_run.extend(child["not_run"])
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}")
    except Exception as exc:  # the interpreter process died: one failed row says how
        case = Case("interpreter", "interpreter process", (0,), 0, "-", "-", "-")
        row = _error_row(case, exc)
        row["stderr"] = (proc.stderr or "")[-3000:] if proc is not None else ""
        row["problems"].append("stderr: " + row["stderr"][-500:])
        rows.append(row)
        print(format_row(row), flush=True)
    finally:
        os.unlink(rows_file)
    return None


def summary(rows: List[dict], not_run: List[str], cuda: bool) -> Tuple[str, dict]:
    failed = [r for r in rows if r["status"] != "ok"]
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    median = statistics.median(speedups) if speedups else None
    if not rows:
        verdict = "no case checked"
    elif not failed:
        verdict = f"all {len(rows)} cases correct"
    else:
        incorrect = sum(r["status"] == "incorrect" for r in rows)
        verdict = (f"{len(failed)} failure{'s' if len(failed) > 1 else ''} in {len(rows)} cases ({incorrect} "
                   f"incorrect, {len(failed) - incorrect} raised)")
    if median is None:
        speed = "speed not measured"
    else:
        who = "gn_det's kernels vs PyTorch's ops" if cuda else "gn_det's CPU path vs PyTorch's ops on CPU"
        speed = f"median speed-up {median:.2f}x ({who}, forward + backward, {len(speedups)} cases timed)"
    if cuda:
        decisions = gn_det.autotune_decisions()
        to_aten = sum(entry.get("path") == "aten" for entry in decisions)
        speed += f"; tuning runs PyTorch's GroupNorm in {to_aten} of {len(decisions)} buckets"
    line = f"gn_det check: {verdict}; {speed}" + (f"; {len(not_run)} cases not run (time limit)" if not_run else "")
    return line, {"cases": len(rows), "failed": len(failed), "incorrect": sum(r["status"] == "incorrect" for r in rows),
                  "raised": sum(r["status"] == "error" for r in rows), "not_run": not_run,
                  "median_speedup": median, "timed_cases": len(speedups), "line": line}


def _list(value: str, allowed: Sequence[str], what: str, aliases: Optional[Dict[str, str]] = None) -> List[str]:
    items = [aliases.get(v, v) if aliases else v for v in (s.strip().lower() for s in value.split(",")) if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} {','.join(bad) or repr(value)}: choose from {','.join(allowed)}")
    return items


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gn_det.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16",
                        type=lambda v: _list(v, tuple(DTYPES), "dtype", DTYPE_ALIASES),
                        help="comma-separated: float32, float16, bfloat16 (or fp32, fp16, bf16)")
    parser.add_argument("--layouts", default="nchw,channels_last", type=lambda v: _list(v, LAYOUTS, "layout"),
                        help="comma-separated: nchw, channels_last")
    parser.add_argument("--ops", default=",".join(OPS), type=lambda v: _list(v, tuple(OPS), "op"),
                        help=f"comma-separated: {OP_HELP}")
    parser.add_argument("--shapes", default="", type=split_names,
                        help="comma-separated parts of case names (e.g. 'stem,box'), or '=NAME' for one name "
                             "exactly (e.g. '=FPN P2', not 'FPN P2 N=1'): only those cases")
    parser.add_argument("--part", choices=("all", "cpu-path", "interpreter"), default="all",
                        help="without CUDA: the CPU path, the kernels under the interpreter, or both (default)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions (default 2 on GPU, 1 on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7 on GPU, 5 with --quick; "
                                                              "3 on CPU)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds: cases not started by then are listed as not run (default: no limit)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="the report's path, or a folder for check_<machine>.json "
                             "(default: ./gn_det_check_<machine>.json)")
    parser.add_argument("--inject-fault", action="append", default=[], metavar="KIND[:TEXT]",
                        help=f"for testing the check itself: corrupt gn_det's implementation ({', '.join(FAULTS)}) in "
                             "the cases whose label (as in the failures list) contains TEXT (all without it); "
                             "may be repeated")
    parser.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)  # the interpreter subprocess's rows
    args = parser.parse_args(argv)
    for fault in args.inject_fault:
        if fault.partition(":")[0] not in FAULTS:
            parser.error(f"--inject-fault {fault!r}: the kind is one of {', '.join(FAULTS)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device!r}: gn_det checks cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, "
                     f"built with CUDA {torch.version.cuda}); run without --device to check the CPU path")
    if device.type == "cuda":
        if device.index is None:  # (torch.cuda.set_device wants an index)
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and args.part != "all":
        parser.error("--part applies without CUDA (--device cpu): on a GPU the kernels are checked themselves")
    if args.part == "interpreter" and not args.rows_out and not policy.triton_on_cpu():
        parser.error("--part interpreter needs TRITON_INTERPRET=1 GN_DET_TRITON_ON_CPU=1 set before the start "
                     "(--part all starts such a process itself)")
    args.device = device
    cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.reps = args.reps if args.reps is not None else ((5 if args.quick else 7) if cuda else 3)
    if args.time_limit < 0:
        parser.error(f"--time-limit {args.time_limit:g}: seconds >= 0 (0: no limit)")
    if args.warmup < 0 or args.reps < 1:
        parser.error(f"--warmup {args.warmup} / --reps {args.reps}: need warmup >= 0 and reps >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the check (see the module docstring); returns the exit status: 1 if any case failed."""
    args = parse_args(argv)
    # Decisions in this process only (the user's tuning cache is neither read nor written), and
    # the kernels checked whatever GN_DET_BACKEND says; both restored for a caller in-process.
    previous_cache = gn_det.set_tuning_cache(None)
    previous_backend = policy.set_backend("auto")
    try:
        return _run(args, argv, previous_backend)
    finally:
        gn_det.set_tuning_cache(previous_cache)
        policy.set_backend(previous_backend)


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]], backend_in_use: str) -> int:
    device = args.device
    cuda = device.type == "cuda"
    started = time.monotonic()
    deadline = started + args.time_limit if args.time_limit else None
    rows: List[dict] = []
    not_run: List[str] = []
    if args.rows_out:  # the interpreter subprocess: rows only, for the parent
        run_part("interpreter", args, device, DeviceTimer(device), deadline, rows, not_run)
        with open(args.rows_out, "w") as f:
            json.dump(_json_safe({"rows": rows, "not_run": not_run}), f)
        return 0

    info = machine_info(device)
    timer = DeviceTimer(device)
    notes = []
    if backend_in_use != "auto":
        notes.append(f"GN_DET_BACKEND={backend_in_use} turns the kernels off in this environment; checked anyway")
    if cuda:
        torch.cuda.set_device(device)
        parts = ["cuda"]
        print(f"gn_det check on {info['gpu']} (compute capability {info['compute_capability']}), "
              f"torch {info['torch']}, triton {info['triton']}, gn_det {info['gn_det']}")
    else:
        parts = {"all": ["cpu path", "interpreter"], "cpu-path": ["cpu path"],
                 "interpreter": ["interpreter"]}[args.part]
        print((f"CUDA is not available here (torch {info['torch']}, built with CUDA {torch.version.cuda})"
               if not torch.cuda.is_available() else "Checking on CPU (--device cpu)")
              + ": the Triton kernels do not run on a GPU. Checking what runs here: "
              + " and ".join(WHAT_RUNS_ON_CPU[p] for p in parts) + ".")
    for text in args.shapes:  # a filter that selects nothing is a mistake, not an empty run
        names = [name for part in parts for name in shape_table(part, args.quick)]
        if not any(name_matches(text, name) for name in names):
            print(f"python -m gn_det.check: error: --shapes {text!r} matches no case here; the names "
                  f"{'(with --quick) ' if args.quick else ''}are: {', '.join(dict.fromkeys(names))}", file=sys.stderr)
            return 2
    for note in notes:
        print(note)
    print(header(), flush=True)
    for part in parts:
        if part == "cpu path" and policy.triton_on_cpu():
            policy.set_backend("torch")  # CPU tensors would go to the interpreter in this process
            run_part(part, args, device, timer, deadline, rows, not_run)
            policy.set_backend("auto")
        elif part == "interpreter" and not policy.triton_on_cpu():
            why = run_interpreter_subprocess(args, deadline, rows, not_run)
            if why:
                notes.append(f"the Triton kernels under the interpreter not checked: {why}")
                print(notes[-1])
        else:
            run_part(part, args, device, timer, deadline, rows, not_run)

    line, counts = summary(rows, not_run, cuda)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"\nFailures ({len(failed)}):")
        for row in failed:
            print(f"  {row['label']}: {'; '.join(row['problems'])}")
    if not_run:
        print(f"\nNot run (--time-limit {args.time_limit:g} s reached): {len(not_run)} cases")
    path = _json_path(args.json, info)
    report = {
        "gn_det_check": FORMAT_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m gn_det.check"] + list(sys.argv[1:] if argv is None else argv)),
        "mode": "cuda" if cuda else "cpu",
        "parts": parts,
        "machine": info,
        "tolerances": {
            "metric": "max|actual - reference| / max(1, max|reference|), reference in float64 from the same inputs",
            "forward": {str(k)[6:]: v for k, v in TOLERANCE.items() if k in DTYPES.values()},
            "backward": {str(k)[6:]: v for k, v in GRAD_TOLERANCE.items() if k in DTYPES.values()},
            "why": "gn_det/tolerances.py",
        },
        "timing": describe_timing(timer, args.warmup, args.reps)
                  + ("" if cuda else "; the interpreter's cases are not timed"),
        "tuning": "measured in this process for each case's bucket (tuning cache off: the user's is neither read "
                  "nor written); rows carry gn_det.autotune_decisions()' entries for their bucket",
        "injected_faults": args.inject_fault,
        "notes": notes,
        "summary": counts,
        "rows": rows,
        "tuning_decisions": gn_det.autotune_decisions(),
        "seconds": round(time.monotonic() - started, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe(report), f, indent=1, default=str)
        f.write("\n")
    print(f"\nChecked in {report['seconds']:.0f} s. Report written to {path} (attach it to a bug report)")
    print(line, flush=True)
    return 1 if failed else 0


def _json_path(given: Optional[str], info: dict) -> str:
    name = f"check_{slug(machine_name(info))}.json"
    if given is None:
        return os.path.abspath(f"gn_det_{name}")
    if os.path.isdir(given) or given.endswith(os.sep):
        return os.path.abspath(os.path.join(given, name))
    return os.path.abspath(given)


if __name__ == "__main__":
    sys.exit(main())
