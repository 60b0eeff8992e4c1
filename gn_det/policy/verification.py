"""Verification at first use: the first time a bucket of inputs runs the Triton kernels, their
result is compared with gn_det's PyTorch path (``gn_det.ops.torch_path``: ATen's GroupNorm
kernels, the residual add and the activation) on the same inputs, and a bucket whose kernels
raise or disagree runs the PyTorch path from then on.

Verification wraps the operations from outside: where an input's bucket still has a check to
run, the policy (``calls.py``) decides that input to ``FirstUseVerification``, a backend
around the kernels and the PyTorch path; once its checks passed, the input is decided again,
to the kernels alone. Every way into the kernels takes the same decision: eager calls, the
custom op inside ``torch.compile``'d graphs (it runs eagerly, with real tensors, when the graph
runs), output recomputation, first-use tuning's runs, fused residuals, training and inference.

- **The bucket** (``tuning.VerifyKey``): the tuning bucket (GPU model, dtype, memory format,
  activation, ``floor(log2(C/G*S))``, ``floor(log2(N*G))``, residual or not) without
  train/infer, plus which kernel set normalises it (``triton_launch.kernel_path``). Each
  bucket has up to three checks (``tuning.CHECKS``): "forward" (y, mean, rstd), "backward"
  (dx, dgamma, dbeta, dresidual, with the residual kept) and "backward, output kept" (the same
  with ReLU's output kept in the residual's place). Each check runs at the first call that
  needs it, on that call's inputs.
- **Cost**: one extra PyTorch-path call per check and bucket, its comparison (a few host-device
  synchronisations), then nothing per call: a verified input is decided to the kernels alone.
  Outcomes that passed are verified again in each new process; failures are read from the
  disk cache (``tuning.py``), so a failed bucket is not tried again until triton, torch or
  gn_det's kernels change (each reads another cache file).
- **A disagreement** is settled by a float64 reference (the PyTorch path on the CPU, on float64
  NCHW copies of the inputs: other code than the GPU's and than its channels_last handling;
  computed then only): where the kernels agree with it and the PyTorch path does
  not, the kernels pass, the record says so and one warning per bucket says the PyTorch path
  was wrong there (on an H200, ATen's CUDA GroupNorm backward read channels_last tensors as
  NCHW: verification failed the right kernels and returned the wrong gradients). Where the
  reference cannot be computed (out of memory) or sides with neither, the kernels fail.
- **A failure** (the kernels raised, e.g. a compile error, out of resources at launch, an
  unsupported dtype; or disagreed beyond the tolerance): the call returns the PyTorch path's
  result (computed already), every later call of the bucket runs the PyTorch path (which
  implements every residual mode and output recomputation with the same saved tensors), one
  warning per bucket and process names the GPU, compute capability, versions, bucket and
  failure, and the outcome is recorded (``tuning.record_verification``: in the process,
  offered to the other ranks by ``synchronize_decisions``, where a failure on any rank wins,
  and in the disk cache). A forward that ran the kernels before its bucket failed (in backward)
  keeps their output; its recomputation, if any, then gets the PyTorch path's (equal up to
  rounding, not bitwise). ``torch.cuda.OutOfMemoryError`` is not a kernel fault: it is raised.
  A kernel that corrupts the CUDA context (an illegal memory access is sticky: every later CUDA
  call of the process fails) cannot be recovered from inside the process.
- **Not verified**: during CUDA-graph capture nothing can be compared (no synchronisation is
  allowed), so a bucket without a verification runs the PyTorch path there (verified at its
  first call outside a capture; warm-up runs before capture, which CUDA graphs need anyway,
  are such calls). ``torch.compile`` traces the custom op's fake implementation: nothing
  runs while tracing; the compiled graph's calls are verified as above.

Tolerances: ``gn_det.tolerances``' table (the tests' and the check's), applied to the largest
difference between the kernels and the PyTorch path relative to the PyTorch path's largest
magnitude, per tensor (each path rounds its output to the dtype once and accumulates in
float32); the mean's relative to ``|mean| + std``; a gradient's scale counts the activation's
largest derivative (``activation.Activation.max_slope``). Where a group's mean is large against
its standard deviation, ``x - mean`` loses ``|mean|/std`` times float32's precision in either
path: the tolerances of y, dx and dgamma are multiplied by ``max(1, max |mean| * rstd)``.

Switch: ``set_verification(enabled, on_cpu=False)`` (``switches.py``; on by default for CUDA;
``on_cpu`` also verifies the Triton interpreter on CPU, for tests). Outcomes and warnings are
kept in ``tuning.STORE``. ``inject_fault`` is the test hook.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import tuning
from ..ops.activation import ACTIVATION_TABLE, RESIDUAL_OUTPUT
from ..ops.torch_path import TORCH_PATH
from ..tolerances import GRAD_TOLERANCE, TOLERANCE, stats_tolerance
from .routing import route_key_of
from .switches import CALLS, SWITCHES, set_verification
from .tuning import CHECKS, STORE, VERIFY_FIELDS, Verification, VerifyKey

__all__ = ["FAULTS", "FirstUseVerification", "KERNEL_SET_NAMES", "inject_fault", "outcome",
"set_verification",
           "verification_enabled", "verify_key_of", "with_faults"]

TINY = 1e-30  # the least scale of a comparison (an all-zero result compares absolutely)
REPORT_TO = ("report it with this warning and the output of `python -m gn_det.env` (README, Bug reports); "
             "GN_DET_BACKEND=torch runs the PyTorch path everywhere meanwhile")

def verification_enabled(x: Tensor) -> bool:
    """Whether the kernels are verified for x's device (``switches.set_verification``)."""
    return SWITCHES.verify and (x.is_cuda or (SWITCHES.verify_on_cpu and x.device.type == "cpu"))


def verify_key_of(x: Tensor, num_groups: int, activation: int, residual: bool, masked: bool = False) -> VerifyKey:
    """The verification bucket of a non-empty dense input x ``(N, C, *)``; a call over image
    regions (``masked``) is a bucket of its own (its kernel path named ", masked")."""
    from ..ops.triton_launch import kernel_path  # (imports triton: only where the kernels run)

    path = kernel_path(x, num_groups)
    return route_key_of(x, num_groups, activation) + (bool(residual), path + ", masked" if masked else path)


def check_of(residual: bool, residual_mode: int) -> str:
    """Which backward check (``tuning.CHECKS``) a backward with this residual mode needs."""
    return CHECKS[2] if residual and residual_mode == RESIDUAL_OUTPUT else CHECKS[1]


def outcome(x: Tensor, num_groups: int, activation: int, residual: bool, check: str,
            masked: bool = False) -> Optional[bool]:
    """Whether x's bucket runs the kernels for ``check`` without verifying (True), runs the
    PyTorch path (False: the bucket failed, or inside a CUDA-graph capture, where nothing can
    be compared), or is to be verified at its next call (None)."""
    if not verification_enabled(x):
        return True
    key = verify_key_of(x, num_groups, activation, residual, masked)
    failed = tuning.failed_verification(key)
    if failed is not None:
        _warn(failed, from_record=True)
        return False
    passed = STORE.verifications.get((key, check))
    if passed is not None and passed.source != "disk cache":  # verified in this process (or adopted)
        return True
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # the PyTorch path, until verified outside a capture
    return None


class FirstUseVerification:
    """A backend (``gn_det.ops.torch_path.Backend``'s two methods) that runs ``kernels`` where
    their bucket passed verification, ``reference`` (the PyTorch path) where it failed, and
    verifies the kernels against it at the first call of each check. Every outcome recorded
    empties the policy's decided calls (``tuning.record_verification``), so the next call of
    this input is decided again: to the kernels alone once their checks passed."""

    __slots__ = ("kernels", "reference")

    def __init__(self, kernels, reference) -> None:
        self.kernels, self.reference = kernels, reference

    def forward(self, x, weight, bias, residual, num_groups, eps, activation, valid=None):
        masked = valid is not None
        runs = outcome(x, num_groups, activation, residual is not None, CHECKS[0], masked)
        if runs is not None:
            return (self.kernels if runs else self.reference).forward(x, weight, bias, residual, num_groups, eps,
                                                                      activation, valid)
        args = (x, weight, bias, residual, num_groups, eps, activation, valid)
        problem, result, overruled = _compare(lambda: self.kernels.forward(*args), self.reference.forward(*args),
                                              lambda a, b: _forward_difference(a, b, x.dtype, weight),
                                              TORCH_PATH.forward, args)
        return _conclude(verify_key_of(x, num_groups, activation, residual is not None, masked), CHECKS[0], x, problem,
                         result, overruled)

    def backward(self, grad_y, x, weight, bias, mean, rstd, saved, num_groups, eps, activation, residual_mode,
                 valid=None):
        check = check_of(saved is not None, residual_mode)
        masked = valid is not None
        args = (grad_y, x, weight, bias, mean, rstd, saved, num_groups, eps, activation, residual_mode, valid)
        runs = outcome(x, num_groups, activation, saved is not None, check, masked)
        if runs is not None:
            return (self.kernels if runs else self.reference).backward(*args)
        problem, result, overruled = _compare(
            lambda: self.kernels.backward(*args), self.reference.backward(*args),
            lambda a, b: _backward_difference(a, b, grad_y, x, weight, mean, rstd, saved, activation),
            TORCH_PATH.backward, args)
        return _conclude(verify_key_of(x, num_groups, activation, saved is not None, masked), check, x, problem,
                         result, overruled)


# ----------------------------------------------------------------------------- the test hook

FAULTS = ("compile", "launch", "wrong")
KERNEL_SET_NAMES = ("forward", "backward")
PYTORCH_PATH_NAMES = ("pytorch forward", "pytorch backward")  # "wrong" only: the reference made wrong
_faults: Dict[str, str] = {}  # kernel set -> fault; empty but while a test injects one


@contextlib.contextmanager
def inject_fault(kernel_set: str, fault: str) -> Iterator[None]:
    """For tests only: make the "forward" or "backward" Triton kernels of every call decided
    inside the block fail in one way, as a GPU might: "compile" launches, in their place, a
    kernel that Triton cannot compile (``tl.arange`` over a size that is not a power of two:
    Triton's own compile error, or its interpreter's); "launch" raises triton's
    ``OutOfResources`` (shared memory), what a launch needing more than the GPU has raises;
    "wrong" runs the kernels and then changes one element of their first result (y, or dx) by
    a quarter of its largest magnitude, as a race or masking fault would. "pytorch forward" /
    "pytorch backward" with "wrong" do that to the PyTorch path's result that verification
    compares the kernels with (not to its float64 reference), as a fault of ATen's would.
    Everything else (verification, fall back, arbitration, warnings, records) runs as it does
    for a real fault. The faulty backends are put in place when a call is decided
    (``with_faults``), never on the per-call path: entering and leaving the block empties the
    decided calls."""
    if not (kernel_set in KERNEL_SET_NAMES and fault in FAULTS or kernel_set in
  PYTORCH_PATH_NAMES and fault == "wrong"):
        raise ValueError(f"inject_fault({kernel_set!r}, {fault!r}): kernel_set is one of {KERNEL_SET_NAMES}, "
                         f"fault one of {FAULTS}; or kernel_set one of {PYTORCH_PATH_NAMES}, fault 'wrong'")
    previous = _faults.get(kernel_set)
    _faults[kernel_set] = fault
    CALLS.clear()
    try:
        yield
    finally:
        if previous is None:
            del _faults[kernel_set]
        else:
            _faults[kernel_set] = previous
        CALLS.clear()


def with_faults(kernels, reference):
    """(kernels, reference) as ``inject_fault`` makes them (the same ones outside its block)."""
    if not _faults:
        return kernels, reference
    kernels = _Faulty(kernels, _faults.get("forward"), _faults.get("backward"))
    reference = _Faulty(reference, _faults.get("pytorch forward"), _faults.get("pytorch backward"))
    return kernels, reference


@functools.lru_cache(maxsize=None)
def _uncompilable_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def uncompilable(X, SIZE: tl.constexpr):
        offs = tl.arange(0, SIZE)  # SIZE = 3: not a power of two, which Triton refuses to compile
        tl.store(X + offs, tl.load(X + offs))

    return uncompilable


class _Faulty:
    """A backend whose forward and/or backward fail as ``inject_fault`` says."""

    def __init__(self, backend, forward_fault: Optional[str], backward_fault: Optional[str]) -> None:
        self.backend, self.forward_fault, self.backward_fault = backend, forward_fault, backward_fault

    @staticmethod
    def _run(fault: Optional[str], run, x: Tensor, *args):
        if fault == "compile":
            _uncompilable_kernel()[(1,)](x, 3)
        elif fault == "launch":
            from triton.runtime.errors import OutOfResources
            raise OutOfResources(1 << 30, 232448, "shared memory")
        out = run(*args)
        if fault == "wrong":
            first = out[0]
            first[(0,) * first.dim()] += 0.25 * first.abs().max().item() + 1.0
        return out

    def forward(self, *args):
        return self._run(self.forward_fault, self.backend.forward, args[0], *args)

    def backward(self, *args):
        return self._run(self.backward_fault, self.backend.backward, args[1], *args)


# ----------------------------------------------------------------------------- outcomes

def _conclude(key: VerifyKey, check: str, x: Tensor, problem: Optional[str], result, overruled:
Optional[str] = None):
    """Records the check's outcome (``overruled``: the PyTorch path's disagreement, where the
    float64 reference sided with the kernels) and returns ``result``."""
    detail = problem or ("agreed within tolerance" if overruled is None else
                         f"agreed with a float64 reference where gn_det's PyTorch path did not ({overruled})")
    verification = Verification(key, check, problem is None, detail, "verified", tuple(x.shape))
    tuning.record_verification(verification)
    if problem is None:
        if overruled is not None:
            _warn_pytorch_path(verification)
    else:
        _warn(verification, from_record=False)
    return result


def _compare(run_kernels: Callable[[], tuple], want: tuple, difference: Callable[[tuple, tuple],
Optional[str]],
             reference_path: Callable[..., tuple], reference_args: tuple) -> Tuple[Optional[str], tuple, Optional[str]]:
    """Runs the kernels and compares their result with ``want``, the PyTorch path's, by
    ``difference``; a disagreement goes to the float64 reference (``_sides_with_kernels``).
    Returns (the problem or None, the result to return, the PyTorch path's disagreement that
    the reference overruled or None). A comparison that raises fails the kernels as a kernel
    error does, without a reference."""
    try:
        got = run_kernels()
        problem = difference(got, want)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # any error of the kernels: they are not used for this bucket
        return _error(exc), want, None
    if problem is not None and _sides_with_kernels(difference, got, want, reference_path, *reference_args):
        return None, got, problem
    return problem, got if problem is None else want, None


def _sides_with_kernels(difference, got, want, path, *args) -> bool:
    """Whether a float64 reference agrees with the kernels' result (``got``) and not with the
    PyTorch path's (``want``), by ``difference`` (one of the comparisons above). The reference is
    ``path`` (a PyTorch-path function) run on the CPU on float64, contiguous (NCHW) copies of its
    tensor arguments: other code than the GPU's, and than its channels_last handling. False
    where it cannot be computed or compared (out of memory, say): the disagreement then stays a
    failure of the kernels."""
    try:
        reference = path(*((a.detach().to("cpu", torch.float64) if a.is_floating_point() else a.to("cpu")).contiguous()
                           if isinstance(a, Tensor) else a for a in args))  # (regions stay int32)
        device = got[0].device
        reference = tuple(None if t is None else t.to(device) for t in reference)
        return difference(got, reference) is None and difference(want, reference) is not None
    except Exception:  # (torch.cuda.OutOfMemoryError included: the conservative outcome stands)
        return False


# ----------------------------------------------------------------------------- comparing

def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()).rstrip(".")
    return f"the kernels raised {type(exc).__module__}.{type(exc).__name__}: {text[:400]}"


def _condition(mean: Tensor, rstd: Tensor) -> float:
    """max(1, max |mean| * rstd): how many times float32's precision x - mean may lose."""
    return max(1.0, (mean.abs() * rstd).amax().item()) if mean.numel() else 1.0


Pair = Tuple[str, Optional[Tensor], Optional[Tensor], float, float]


def _differences(pairs: List[Pair]) -> Optional[str]:
    """The first of ``(name, kernels', PyTorch's, tolerance, least scale)`` whose largest
    difference is over tolerance * max(PyTorch's largest magnitude, least scale), described;
    None when all agree. Non-finite values agree where both sides hold the same one."""
    measured = []
    for name, got, want, tol, least in pairs:
        if want is None or want.numel() == 0:
            continue
        got, want = got.float(), want.float()
        finite = torch.isfinite(want) & torch.isfinite(got)
        mismatched = ~finite & ~((got == want) | (got.isnan() & want.isnan()))
        diff = torch.where(finite, (got - want).abs(), 0.0).amax()
        scale = torch.where(finite, want.abs(), 0.0).amax()
        measured.append((name, tol, least, torch.stack([diff, scale, mismatched.sum().float()])))
    if not measured:
        return None
    values = torch.stack([m[3] for m in measured]).tolist()  # one synchronisation for all of them
    for (name, tol, least, _), (diff, scale, mismatched) in zip(measured, values):
        scale = max(scale, least)
        if mismatched:
            return f"{name}: {int(mismatched)} element(s) non-finite in one path only"
        if diff > tol * scale:
            return (f"{name}: largest difference {diff:.3g} against PyTorch's, {diff / scale:.3g} of the scale "
                    f"{scale:.3g}, over the tolerance {tol:.3g}")
    return None


def _forward_difference(got, want, dtype: torch.dtype, weight: Tensor) -> Optional[str]:
    (y, mean, rstd), (y_ref, mean_ref, rstd_ref) = got, want
    condition = _condition(mean_ref, rstd_ref)
    # The mean's error is relative to |mean| + std (a zero-mean group's mean is all rounding).
    mean_scale = (mean_ref.abs().amax() + rstd_ref.reciprocal().amax()).item()
    stats_tol = stats_tolerance(y.numel() // max(1, mean_ref.numel()))
    return _differences([("output", y, y_ref, TOLERANCE[dtype] * condition, TINY),
                         ("mean", mean, mean_ref, stats_tol, mean_scale),
                         ("rstd", rstd, rstd_ref, stats_tol * condition, TINY)])


def _backward_difference(got, want, grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
rstd: Tensor,
                         residual: Optional[Tensor], activation: int) -> Optional[str]:
    """The gradients compared, each against the magnitude of the terms it is made of, not only of
    its result: dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)) cancels to almost
    nothing in a group of two elements (where both paths' roundings are all that is left), and
    dgamma, dbeta are sums over N * S of terms of either sign. dgamma's terms count |xhat| + 1:
    xhat has RMS 1 over a group, but is 0 in a group of one value (or constant), where its
    rounding (``x * scale + shift`` with rstd = 1/sqrt(eps)) is all dgamma holds."""
    tol = GRAD_TOLERANCE[x.dtype] * _condition(mean, rstd)
    res_tol = tol if residual is None else max(tol, GRAD_TOLERANCE.get(residual.dtype, GRAD_TOLERANCE[x.dtype]))
    n, c = x.shape[:2]
    per_channel = (n, c) + (1,) * (x.dim() - 2)
    channel_rstd = rstd.repeat_interleave(c // rstd.shape[1], dim=1).view(per_channel)
    channel_mean = mean.repeat_interleave(c // mean.shape[1], dim=1).view(per_channel)
    dy = grad_y.float().abs()
    slope = ACTIVATION_TABLE[activation].max_slope  # (the activation's largest derivative)
    xhat = (x.float() - channel_mean).mul_(channel_rstd).abs_()
    sums = [d for d in range(x.dim()) if d != 1]
    scales = torch.stack([(dy * (weight.float().abs().view(1, c, *per_channel[2:]) * channel_rstd)).amax(),
                          (dy * xhat.add_(1.0)).sum(sums).amax(), dy.sum(sums).amax()]).tolist()
    names = ("dx", "dgamma", "dbeta", "dresidual")
    return _differences([(name, g, w, res_tol if name == "dresidual" else tol, TINY if i == 3 else slope * scales[i])
                         for i, (name, g, w) in enumerate(zip(names, got, want))])


# ----------------------------------------------------------------------------- warnings

@functools.lru_cache(maxsize=None)
def _machine(device: str) -> str:
    import triton

    where = device
    if torch.cuda.is_available() and device != "cpu":
        index = next((i for i in range(torch.cuda.device_count()) if torch.cuda.get_device_name(i) == device), None)
        if index is not None:
            where += " (compute capability {}.{})".format(*torch.cuda.get_device_capability(index))
    elif device == "cpu":
        where = "cpu (Triton interpreter)"
    return f"{where}, torch {torch.__version__}, triton {triton.__version__}"


def _bucket(key: VerifyKey) -> str:
    return ", ".join(f"{field}={value}" for field, value in zip(VERIFY_FIELDS, key))


def _warn_pytorch_path(verification: Verification) -> None:
    """Once per bucket: gn_det's PyTorch path (the verification reference, and the fall back)
    disagreed with float64 where the kernels agreed; the kernels are used."""
    if (verification.key, "pytorch path") in STORE.warned:
        return
    STORE.warned.add((verification.key, "pytorch path"))
    warnings.warn(
        f"gn_det: on {_machine(verification.key[0])}, gn_det's PyTorch path (ATen's GroupNorm) gave a wrong "
        f"{verification.check} for the bucket ({_bucket(verification.key)}) at input shape "
        f"{list(verification.shape)}: the Triton kernels {verification.detail}. The kernels are used for "
        f"this bucket; the PyTorch path (GN_DET_BACKEND=torch, "
        f"and any bucket whose kernels fail) may be wrong here: {REPORT_TO.split(';')[0]}", stacklevel=4)


def _warn(verification: Verification, from_record: bool) -> None:
    if verification.key in STORE.warned:
        return
    STORE.warned.add(verification.key)
    if from_record:
        when = (f"they failed their {verification.check} verification ({verification.source}: "
                f"{verification.detail})")
    else:
        when = f"they failed their {verification.check} verification at input shape {list(verification.shape)}: " \
               f"{verification.detail}"
    where = tuning.cache_file(verification.key[0])
    warnings.warn(
        f"gn_det: the Triton GroupNorm kernels are not used on {_machine(verification.key[0])} for the bucket "
        f"[{_bucket(verification.key)}]: {when}. This bucket runs gn_det's PyTorch path instead (same results up to rounding, "
        f"slower){'' if where is None else f'; recorded in {where}, not tried again until triton, torch or gn_det change'}. "
        f"Please {REPORT_TO}.", RuntimeWarning, stacklevel=2)
