"""Verification at first use: the first time a bucket of inputs runs the Triton kernels, their
result is compared with gn_det's PyTorch path (``group_norm_torch``: ATen's GroupNorm kernels,
the residual add and the activation) on the same inputs, and a bucket whose kernels raise or
disagree runs the PyTorch path from then on.

``dispatch.forward_impl`` / ``backward_impl`` call ``verified_forward`` / ``verified_backward``
for every input the kernels would take, so every way into the kernels is covered: eager calls
(``GroupNormFunction``), the custom op inside ``torch.compile``'d graphs (it runs eagerly, with
real tensors, when the graph runs), output recomputation (``recompute.py`` reruns
``forward_impl``), first-use tuning's runs, fused residuals, training and inference.

- **The bucket** (``tuning.VerifyKey``): the tuning bucket (GPU model, dtype, memory format,
  activation, ``floor(log2(C/G*S))``, ``floor(log2(N*G))``, residual or not) without
  train/infer, plus which kernel set normalises it (``group_norm_triton.kernel_path``). Each
  bucket has up to three checks (``tuning.CHECKS``): "forward" (y, mean, rstd), "backward"
  (dx, dgamma, dbeta, dresidual, with the residual kept) and "backward, output kept" (the same
  with ReLU's output kept in the residual's place). Each check runs at the first call that
  needs it, on that call's inputs.
- **Cost**: one extra PyTorch-path call per check and bucket, its comparison (a few host-device
  synchronisations), then a dictionary lookup by exact input per call (``tuning.STORE.checked_by_input``),
  no synchronisation. Outcomes that passed are verified again in each new process; failures are
  read from the disk cache (``tuning.py``), so a failed bucket is not tried again until triton,
  torch or gn_det's kernels change (each reads another cache file).
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

Tolerances (``TOLERANCE``): the largest difference between the kernels and the PyTorch path,
relative to the PyTorch path's largest magnitude, per tensor, at most tests/gn_cases.py's
tolerances against float64 (each path rounds its output to the dtype once and accumulates in
float32): forward 1e-5 (float32), 2e-3 (float16: 2 ulps of 1), 1.6e-2 (bfloat16: 2 ulps);
gradients 5e-5, 4e-3, 3e-2 (one more rounding, sums over N*S). The statistics are float32
whatever the dtype: float32's forward tolerance, the mean's relative to ``|mean| + std``, or
beyond about 2^15 elements per group sqrt(M) float32 ulps (``_stats_tolerance``: two correct
float32 sums drift that far apart in huge groups). Where a
group's mean is large against its standard deviation, ``x - mean`` loses ``|mean|/std`` times
float32's precision in either path: the tolerances of y, dx and dgamma are multiplied by
``max(1, max |mean| * rstd)``.

Switch: ``set_verification(enabled, on_cpu=False)`` (``switches.py``; on by default for CUDA;
``on_cpu`` also verifies the Triton interpreter on CPU, for tests). Outcomes and warnings are
kept in ``tuning.STORE``. ``inject_fault`` is the test hook.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import tuning
from .activation import RESIDUAL_OUTPUT
from .group_norm_torch import torch_group_norm_backward, torch_group_norm_forward
from .routing import route_key_of
from .switches import SWITCHES, set_verification
from .tuning import CHECKS, STORE, VERIFY_FIELDS, Verification, VerifyKey

__all__ = ["FAULTS", "KERNEL_SET_NAMES", "TOLERANCE", "inject_fault", "set_verification", "verification_enabled",
           "verified_backward", "verified_forward", "verify_key_of"]

# (forward, backward) tolerance per input dtype: see the module docstring.
TOLERANCE = {torch.float32: (1e-5, 5e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
STATS_TOLERANCE = TOLERANCE[torch.float32][0]  # mean and rstd are float32 for every dtype
TINY = 1e-30  # the least scale of a comparison (an all-zero result compares absolutely)
REPORT_TO = ("report it with this warning and the output of `python -m gn_det.env` (README, Bug reports); "
             "GN_DET_BACKEND=torch runs the PyTorch path everywhere meanwhile")

def verification_enabled(x: Tensor) -> bool:
    """Whether the kernels are verified for x's device (``switches.set_verification``)."""
    return SWITCHES.verify and (x.is_cuda or (SWITCHES.verify_on_cpu and x.device.type == "cpu"))


def verify_key_of(kernels: ModuleType, x: Tensor, num_groups: int, activation: int, residual: bool) -> VerifyKey:
    """The verification bucket of a non-empty dense input x ``(N, C, *)``."""
    return route_key_of(x, num_groups, activation) + (bool(residual), kernels.kernel_path(x, num_groups))


# ----------------------------------------------------------------------------- the test hook

FAULTS = ("compile", "launch", "wrong")
KERNEL_SET_NAMES = ("forward", "backward")
PYTORCH_PATH_NAMES = ("pytorch forward", "pytorch backward")  # "wrong" only: the reference made wrong
_faults: Dict[str, str] = {}  # kernel set -> fault; empty but while a test injects one


@contextlib.contextmanager
def inject_fault(kernel_set: str, fault: str) -> Iterator[None]:
    """For tests only: make the "forward" or "backward" Triton kernels of every call inside the
    block fail in one way, as a GPU might: "compile" launches, in their place, a kernel that
    Triton cannot compile (``tl.arange`` over a size that is not a power of two: Triton's own
    compile error, or its interpreter's); "launch" raises triton's ``OutOfResources`` (shared
    memory), what a launch needing more than the GPU has raises; "wrong" runs the kernels and
    then changes one element of their first result (y, or dx) by a quarter of its largest
    magnitude, as a race or masking fault would. "pytorch forward" / "pytorch backward" with
    "wrong" do that to the PyTorch path's result that verification compares the kernels with
    (not to its float64 reference), as a fault of ATen's would. Everything else (verification,
    fall back, arbitration, warnings, records) runs as it does for a real fault."""
    if not (kernel_set in KERNEL_SET_NAMES and fault in FAULTS or kernel_set in PYTORCH_PATH_NAMES and fault == "wrong"):
        raise ValueError(f"inject_fault({kernel_set!r}, {fault!r}): kernel_set is one of {KERNEL_SET_NAMES}, "
                         f"fault one of {FAULTS}; or kernel_set one of {PYTORCH_PATH_NAMES}, fault 'wrong'")
    previous = _faults.get(kernel_set)
    _faults[kernel_set] = fault
    try:
        yield
    finally:
        if previous is None:
            del _faults[kernel_set]
        else:
            _faults[kernel_set] = previous


@functools.lru_cache(maxsize=None)
def _uncompilable_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def uncompilable(X, SIZE: tl.constexpr):
        offs = tl.arange(0, SIZE)  # SIZE = 3: not a power of two, which Triton refuses to compile
        tl.store(X + offs, tl.load(X + offs))

    return uncompilable


def _with_fault(kernel_set: str, run, *args):
    fault = _faults[kernel_set]
    x = args[1] if kernel_set.endswith("backward") else args[0]
    if fault == "compile":
        _uncompilable_kernel()[(1,)](x, 3)
    elif fault == "launch":
        from triton.runtime.errors import OutOfResources
        raise OutOfResources(1 << 30, 232448, "shared memory")
    out = run(*args)
    first = out[0]
    first[(0,) * first.dim()] += 0.25 * first.abs().max().item() + 1.0
    return out


def _faulty_or(kernel_set: str, run, *args):
    """run(*args), or with the fault a test injected into ``kernel_set``."""
    return _with_fault(kernel_set, run, *args) if _faults and kernel_set in _faults else run(*args)


def _pytorch_forward(*args):
    """The PyTorch path's forward that verification compares the kernels with."""
    return _faulty_or("pytorch forward", torch_group_norm_forward, *args)


def _pytorch_backward(*args):
    return _faulty_or("pytorch backward", torch_group_norm_backward, *args)


def _kernels_forward(kernels: ModuleType, *args):
    return _faulty_or("forward", kernels.triton_group_norm_forward, *args)


def _kernels_backward(kernels: ModuleType, *args):
    return _faulty_or("backward", kernels.triton_group_norm_backward, *args)


# ----------------------------------------------------------------------------- the paths

def verified_forward(
    kernels: ModuleType, x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: int,
    residual: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """``triton_group_norm_forward``'s result (``kernels`` is group_norm_triton) where the
    bucket's kernels passed verification, else the PyTorch path's; verifies at first use."""
    exact = (x.device, x.dtype, x.shape, x.stride(), num_groups, activation, residual is not None, "forward")
    use = STORE.checked_by_input.get(exact)
    if use:
        return _kernels_forward(kernels, x, weight, bias, num_groups, eps, activation, residual)
    if use is False:
        return torch_group_norm_forward(x, weight, bias, num_groups, eps, activation, residual)
    runs = _first_use(kernels, exact, x, num_groups, activation, residual is not None, "forward")
    if runs is not None:
        return (_kernels_forward(kernels, x, weight, bias, num_groups, eps, activation, residual) if runs else
                torch_group_norm_forward(x, weight, bias, num_groups, eps, activation, residual))
    key = verify_key_of(kernels, x, num_groups, activation, residual is not None)
    args = (x, weight, bias, num_groups, eps, activation, residual)
    problem, result, overruled = _compare(lambda: _kernels_forward(kernels, *args), _pytorch_forward(*args),
                                          lambda a, b: _forward_difference(a, b, x.dtype, weight),
                                          torch_group_norm_forward, args)
    return _conclude(key, "forward", x, exact, problem, result, overruled)


def verified_backward(
    kernels: ModuleType, grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
    eps: float, activation: int, residual: Optional[Tensor], residual_mode: int,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``triton_group_norm_backward``'s result where the bucket's kernels passed verification,
    else the PyTorch path's; verifies at first use (see ``verified_forward``)."""
    check = CHECKS[2] if residual is not None and residual_mode == RESIDUAL_OUTPUT else CHECKS[1]
    exact = (x.device, x.dtype, x.shape, x.stride(), num_groups, activation, residual is not None, check)
    kernel_args = (grad_y, x, weight, bias, mean, rstd, num_groups, activation, residual, residual_mode)
    torch_args = (grad_y, x, weight, bias, mean, rstd, num_groups, activation, eps, residual, residual_mode)
    use = STORE.checked_by_input.get(exact)
    if use:
        return _kernels_backward(kernels, *kernel_args)
    if use is False:
        return torch_group_norm_backward(*torch_args)
    runs = _first_use(kernels, exact, x, num_groups, activation, residual is not None, check)
    if runs is not None:
        return _kernels_backward(kernels, *kernel_args) if runs else torch_group_norm_backward(*torch_args)
    key = verify_key_of(kernels, x, num_groups, activation, residual is not None)
    problem, result, overruled = _compare(
        lambda: _kernels_backward(kernels, *kernel_args), _pytorch_backward(*torch_args),
        lambda a, b: _backward_difference(a, b, grad_y, x, weight, mean, rstd, residual),
        torch_group_norm_backward, torch_args)
    return _conclude(key, check, x, exact, problem, result, overruled)


def _first_use(kernels: ModuleType, exact: tuple, x: Tensor, num_groups: int, activation: int, residual: bool,
               check: str) -> Optional[bool]:
    """Whether a call without a remembered outcome runs the kernels (True) or the PyTorch path
    (False) without verifying, or None: verify now."""
    if not verification_enabled(x):
        _remember(exact, True)
        return True
    key = verify_key_of(kernels, x, num_groups, activation, residual)
    failed = tuning.failed_verification(key)
    if failed is not None:
        _warn(failed, from_record=True)
        _remember(exact, False)
        return False
    passed = STORE.verifications.get((key, check))
    if passed is not None and passed.source != "disk cache":  # verified in this process (or adopted)
        _remember(exact, True)
        return True
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # nothing can be compared inside a CUDA graph: the PyTorch path, until verified outside
    return None


def _remember(exact: tuple, runs_kernels: bool) -> None:
    if len(STORE.checked_by_input) >= tuning._BY_INPUT_MAX:
        STORE.checked_by_input.clear()
    STORE.checked_by_input[exact] = runs_kernels


def _conclude(key: VerifyKey, check: str, x: Tensor, exact: tuple, problem: Optional[str], result,
              overruled: Optional[str] = None):
    """Records the check's outcome (``overruled``: the PyTorch path's disagreement, where the
    float64 reference sided with the kernels) and returns ``result``."""
    detail = problem or ("agreed within tolerance" if overruled is None else
                         f"agreed with a float64 reference where gn_det's PyTorch path did not ({overruled})")
    verification = Verification(key, check, problem is None, detail, "verified", tuple(x.shape))
    tuning.record_verification(verification)
    if problem is None:
        _remember(exact, True)
        if overruled is not None:
            _warn_pytorch_path(verification)
    else:
        _warn(verification, from_record=False)
    return result


def _compare(run_kernels: Callable[[], tuple], want: tuple, difference: Callable[[tuple, tuple], Optional[str]],
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
        reference = path(*(a.detach().to("cpu", torch.float64).contiguous() if isinstance(a, Tensor) else a
                           for a in args))
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
    stats_tol = _stats_tolerance(y.numel() // max(1, mean_ref.numel()))
    return _differences([("output", y, y_ref, TOLERANCE[dtype][0] * condition, TINY),
                         ("mean", mean, mean_ref, stats_tol, mean_scale),
                         ("rstd", rstd, rstd_ref, stats_tol * condition, TINY)])


def _stats_tolerance(group_elements: int) -> float:
    """The statistics' tolerance for groups of this many elements: float32's, or where larger
    sqrt(M) float32 ulps, the random-walk growth of a float32 sum over M elements, by which two
    correct float32 paths may differ in huge groups (measured on an H200: ATen's rstd and the
    kernels' 1.1e-5 apart at 2^26 elements per group, 5.7e-4 at 2^31)."""
    return max(STATS_TOLERANCE, math.sqrt(group_elements) * 2.0 ** -24)


def _backward_difference(got, want, grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                         residual: Optional[Tensor]) -> Optional[str]:
    """The gradients compared, each against the magnitude of the terms it is made of, not only of
    its result: dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)) cancels to almost
    nothing in a group of two elements (where both paths' roundings are all that is left), and
    dgamma, dbeta are sums over N * S of terms of either sign. dgamma's terms count |xhat| + 1:
    xhat has RMS 1 over a group, but is 0 in a group of one value (or constant), where its
    rounding (``x * scale + shift`` with rstd = 1/sqrt(eps)) is all dgamma holds."""
    tol = TOLERANCE[x.dtype][1] * _condition(mean, rstd)
    res_tol = tol if residual is None else max(tol, TOLERANCE.get(residual.dtype, TOLERANCE[x.dtype])[1])
    n, c = x.shape[:2]
    per_channel = (n, c) + (1,) * (x.dim() - 2)
    channel_rstd = rstd.repeat_interleave(c // rstd.shape[1], dim=1).view(per_channel)
    channel_mean = mean.repeat_interleave(c // mean.shape[1], dim=1).view(per_channel)
    dy = grad_y.float().abs()  # (an activation's derivative is at most 1.1: SiLU's)
    xhat = (x.float() - channel_mean).mul_(channel_rstd).abs_()
    sums = [d for d in range(x.dim()) if d != 1]
    scales = torch.stack([(dy * (weight.float().abs().view(1, c, *per_channel[2:]) * channel_rstd)).amax(),
                          (dy * xhat.add_(1.0)).sum(sums).amax(), dy.sum(sums).amax()]).tolist()
    names = ("dx", "dgamma", "dbeta", "dresidual")
    return _differences([(name, g, w, res_tol if name == "dresidual" else tol, TINY if i == 3 else 1.1 * scales[i])
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
