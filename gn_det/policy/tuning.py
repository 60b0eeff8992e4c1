"""First-use tuning: the first time gn_det meets a bucket of inputs on a GPU model, it times its
kernels against PyTorch's GroupNorm (+ residual add + activation) at that input and runs the
faster from then on, the way cuDNN's benchmark mode picks convolution algorithms. So gn_det is
not slower than ``nn.GroupNorm`` (+ activation) on any GPU by more than the noise of one short
measurement, whether or not anyone benchmarked that GPU before.

A bucket (``TuneKey``) is a route key (``routing.py``: GPU model, dtype, memory format,
activation, ``floor(log2(C/G * S))``, ``floor(log2(N * G))``) plus whether a residual is fused
and whether the call is recorded for backward ("train": forward + backward are timed) or not
("infer": forward only). The candidates are the op's own path ("kernels": the Triton kernels on
CUDA) and ``ops.functional.aten_group_norm`` ("aten"). Each is run once untimed (a first run
compiles), then timed for about ``MEASURE_BUDGET_S`` (``MIN_TIMED_RUNS`` to ``MAX_TIMED_RUNS``
runs), on detached copies of the call's inputs outside any saved-tensor hooks. A run costs
the larger of its device time (``timing.DeviceTimer``: on a GPU with the host's launch time
hidden) and its host time to enqueue (``call_cost_ms``: a path faster on the device but slower
to enqueue would make a host-bound step slower); on CPU both are the wall time. The lower
median wins. The two paths give the same
results up to rounding.

Where a call asks tuning, and in which order tuning, the routes and a measurement are
consulted, is decided in one place: ``paths.decide``. Here: the decisions (measured, read from
the disk cache, or adopted from rank 0 and the other ranks by ``synchronize_decisions``:
``held_decision``) and the measurement (``measure_decision``). Once a bucket is decided,
finding its decision is a dictionary lookup: no host-device synchronisation.

Kernel verification (``verification.py``) keeps its outcomes here too, one ``Verification`` per
(``VerifyKey``, check): the tuning bucket without train/infer, plus which kernel set runs it.
``decisions()`` lists both kinds.

The disk cache: one JSON-lines file per (GPU model, kernel version, triton version, torch
version) under ``cache_directory()`` (``GN_DET_CACHE_DIR``, else ``$XDG_CACHE_HOME/gn_det``,
else ``~/.cache/gn_det``; ``set_tuning_cache``), one decision per line, each line appended under
an exclusive lock when the decision is made (processes deciding at once lose nothing; a new
decision costs one line, never a rewrite; no temporary file). A new version of triton, torch or
gn_det's kernels reads another file: everything is measured again, and kernels that failed
verification are tried again. Every line is
checked when read: lines that are not a valid decision (malformed, cut short, too deeply
nested, not UTF-8) are skipped with one warning naming the file; a file that cannot be read at
all is ignored with one warning. Read once per process and device, at the first decision needed.

Switches, read once: ``GN_DET_AUTOTUNE=0|1`` (default 1: tune CUDA inputs) at import into
``set_autotune`` (both in ``switches.py``); ``autotune_decisions()`` lists the tuning decisions
with their measured times. What this module keeps between calls is one object, ``STORE``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import statistics
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .routing import ROUTE_FIELDS, check_route, route_key_of
from .switches import CALLS, SWITCHES, autotune_from_environment, set_autotune
from .timing import DeviceTimer

try:
    import fcntl  # the cache file's lock (POSIX); elsewhere appends are left to O_APPEND alone
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "CHECKS", "KERNEL_SETS", "MAX_TIMED_RUNS", "MEASURE_BUDGET_S", "MIN_TIMED_RUNS", "PATHS", "TUNE_FIELDS", "VERIFY_FIELDS",
    "call_cost_ms",
    "Decision", "TuneKey", "Verification", "VerifyKey", "autotune_decisions", "autotune_enabled", "autotune_from_environment",
    "STORE", "Store", "cache_directory", "cache_file", "choose_path", "clear_decisions", "decisions", "failed_verification",
    "held_decision", "measure_decision",
    "record_verification", "set_autotune", "set_tuning_cache", "synchronize_decisions", "tune_key_of", "tuning_cache",
]

PATHS = ("kernels", "aten")  # the op's own path; PyTorch's GroupNorm (group_norm_op.aten_group_norm)
MEASURE_BUDGET_S = 2e-3  # timed runs of each candidate last about this long, after one untimed run
MIN_TIMED_RUNS, MAX_TIMED_RUNS = 3, 10  # a median of at least 3: one slow run decides nothing
MAX_HEAD_START_S = 0.05  # the longest head start a call the host enqueues slowly is retimed with
CACHE_FORMAT = 2  # (1: one JSON object rewritten per decision, in a .json file)

TUNE_FIELDS = ROUTE_FIELDS + ("residual", "passes")
TuneKey = Tuple[str, str, str, str, int, int, bool, str]
Runner = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]  # (x, weight, bias, residual) -> y


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which path a bucket runs, and why."""
    key: TuneKey
    path: str  # one of PATHS
    source: str  # "measured", "disk cache", "rank N" (adopted from that process)
    times_ms: Dict[str, float] = dataclasses.field(default_factory=dict)  # median per path
    shape: Tuple[int, ...] = ()  # the input the bucket was measured at

    def as_dict(self) -> dict:
        return dict(zip(TUNE_FIELDS, self.key), kind="tuning", path=self.path, source=self.source,
                    times_ms=dict(self.times_ms), shape=list(self.shape))


VERIFY_FIELDS = ROUTE_FIELDS + ("residual", "kernels")
VerifyKey = Tuple[str, str, str, str, int, int, bool, str]
KERNEL_SETS = ("one program per group", "split reduction")  # group_norm_triton.kernel_path
# What is compared: the forward (y, mean, rstd), and the backward (dx, dgamma, dbeta, dresidual)
# as it runs with the residual (or nothing) kept, or with ReLU's output kept in its place.
CHECKS = ("forward", "backward", "backward, output kept")


@dataclasses.dataclass(frozen=True)
class Verification:
    """Whether the kernels agreed with PyTorch's path on one check of a bucket (verification.py)."""
    key: VerifyKey
    check: str  # one of CHECKS
    passed: bool
    detail: str  # the largest difference against its tolerance, or the error the kernels raised
    source: str  # "verified" (here), "disk cache", "rank N"
    shape: Tuple[int, ...] = ()  # the input it was verified at

    def as_dict(self) -> dict:
        return dict(zip(VERIFY_FIELDS, self.key), kind="verification", check=self.check, passed=self.passed,
                    detail=self.detail, source=self.source, shape=list(self.shape))


def tune_key_of(x: Tensor, num_groups: int, activation: int, residual: bool, train: bool) -> TuneKey:
    """The bucket of a non-empty input x ``(N, C, *)`` (dense)."""
    return route_key_of(x, num_groups, activation) + (bool(residual), "train" if train else "infer")


# ----------------------------------------------------------------------------- switches

def autotune_enabled(x: Optional[Tensor] = None) -> bool:
    """Whether tuning is on (for x's device, when given): ``switches.set_autotune``."""
    if x is None:
        return SWITCHES.autotune
    return SWITCHES.autotune and (x.is_cuda or (SWITCHES.autotune_on_cpu and x.device.type == "cpu"))


def cache_directory() -> Path:
    """Where the tuning files go unless ``set_tuning_cache`` said otherwise."""
    if os.environ.get("GN_DET_CACHE_DIR"):
        return Path(os.environ["GN_DET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gn_det"


class Store:
    """Everything this module keeps between calls, in one object (``STORE``), written by this
    module's functions and by ``verification.py``'s (its outcomes, warnings and per-input
    lookups: ``verified_forward`` / ``verified_backward``)."""

    def __init__(self, cache_dir: Optional[Path]) -> None:
        self.cache_dir = cache_dir  # where the decision files go (None: this process only); set_tuning_cache
        self.decisions: Dict[TuneKey, Decision] = {}
        self.unshared: Dict[TuneKey, Decision] = {}  # measured here, not yet offered to the other ranks
        self.loaded: set = set()  # device names whose cache file was read
        self.on_disk: set = set()  # what the cache files read or written hold (not written again)
        self.warned: set = set()  # cache files and verification buckets warned about
        # Verification outcomes (verification.py): by (bucket, check); the first failure of each
        # bucket (its kernels are then not used).
        self.verifications: Dict[Tuple[VerifyKey, str], Verification] = {}
        self.unshared_verifications: Dict[Tuple[VerifyKey, str], Verification] = {}
        self.failed: Dict[VerifyKey, Verification] = {}
        self.gloo_group = None  # synchronize_decisions' process group, created on its first call

    def forget(self) -> None:
        """Forget every decision and outcome (the cache directory and process group stay)."""
        for store in (self.decisions, self.unshared, self.loaded, self.on_disk, self.verifications,
                      self.unshared_verifications, self.failed, CALLS):
            store.clear()


STORE = Store(cache_directory())


def set_tuning_cache(directory: Union[str, Path, None]) -> Optional[Path]:
    """Keep decisions in files under ``directory`` (None: in this process only). Files already
    read stay read. Returns the directory before."""
    previous, STORE.cache_dir = STORE.cache_dir, None if directory is None else Path(directory)
    STORE.loaded.clear()
    STORE.on_disk.clear()
    CALLS.clear()
    return previous


def tuning_cache() -> Optional[Path]:
    """The directory of the tuning files (None: none kept)."""
    return STORE.cache_dir


# ----------------------------------------------------------------------------- decisions

def clear_decisions() -> None:
    """Forget every decision of this process, tuning and verification (the next call of each
    bucket measures and verifies again, or reads the disk cache)."""
    STORE.forget()


def autotune_decisions() -> List[dict]:
    """The tuning decisions of this process, one dict each: ``kind`` ("tuning"), the bucket's
    fields (``TUNE_FIELDS``), ``path``, ``source``, ``times_ms`` (median time of each path,
    forward [+ backward]) and the ``shape`` measured; sorted by bucket. ``decisions()`` also
    lists the kernels' verifications."""
    return [STORE.decisions[key].as_dict() for key in sorted(STORE.decisions)]


def decisions() -> List[dict]:
    """Every decision of this process, one dict each: the tuning decisions
    (``autotune_decisions``), then the verifications of the kernels against PyTorch's path
    (``kind`` "verification"): the bucket's fields (``VERIFY_FIELDS``: the tuning bucket
    without train/infer, plus ``kernels``, the kernel set that ran), ``check`` (one of
    ``CHECKS``), ``passed``, ``detail`` (the largest difference found against its tolerance, or
    the error the kernels raised), ``source`` ("verified", "disk cache" or "rank N") and the
    ``shape`` verified at; sorted by bucket and check."""
    return autotune_decisions() + [STORE.verifications[slot].as_dict() for slot in sorted(STORE.verifications)]


def failed_verification(key: VerifyKey) -> Optional[Verification]:
    """The failed verification that keeps the kernels off bucket ``key``, if any (the disk
    cache of its device read first)."""
    if key[0] not in STORE.loaded:
        _load(key[0])
    return STORE.failed.get(key)


def record_verification(verification: Verification) -> None:
    """Keep a verification's outcome: in this process, offered to the other ranks at the next
    ``synchronize_decisions``, and in the disk cache."""
    slot = (verification.key, verification.check)
    if verification.key[0] not in STORE.loaded:
        _load(verification.key[0])
    STORE.verifications[slot] = STORE.unshared_verifications[slot] = verification
    if not verification.passed:
        STORE.failed.setdefault(verification.key, verification)
    CALLS.clear()  # (the inputs decided to verification are decided again)
    _append(verification.key[0], [verification])


def held_decision(x: Tensor, num_groups: int, activation: int, residual: bool, train: bool) -> Optional[Decision]:
    """The decision this process holds for x's bucket (x dense, non-empty), its device's disk
    cache read first; None when there is none yet. Measures nothing (``measure_decision`` does).
    ``paths.decide`` asks only where tuning is on for x."""
    key = tune_key_of(x, num_groups, activation, residual, train)
    decision = STORE.decisions.get(key)
    if decision is None and key[0] not in STORE.loaded:
        _load(key[0])
        decision = STORE.decisions.get(key)
    return decision


def measure_decision(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], num_groups: int,
                     activation: int, train: bool, runners: Dict[str, Runner]) -> Decision:
    """Time ``runners`` (one per path in ``PATHS``) at this input (x dense, non-empty; weight,
    bias dense ``(C,)``) and keep the faster as its bucket's decision: in this process, offered
    to the other ranks, and in the disk cache."""
    key = tune_key_of(x, num_groups, activation, residual is not None, train)
    times = _measure(x, weight, bias, residual, train, runners)
    decision = Decision(key, min(PATHS, key=lambda p: times[p]), "measured", times, tuple(x.shape))
    STORE.decisions[key] = STORE.unshared[key] = decision
    CALLS.clear()
    _append(key[0], [decision])
    return decision


def choose_path(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], num_groups: int,
                activation: int, train: bool, runners: Dict[str, Runner]) -> str:
    """"kernels" or "aten" for x's bucket: the decision held, else one measured now (whatever
    the switches say: ``paths.decide`` is what asks tuning, where it is on)."""
    decision = held_decision(x, num_groups, activation, residual is not None, train)
    if decision is None:
        decision = measure_decision(x, weight, bias, residual, num_groups, activation, train, runners)
    return decision.path


# ----------------------------------------------------------------------------- measuring

def _measure(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], train: bool,
             runners: Dict[str, Runner]) -> Dict[str, float]:
    """Median milliseconds of each runner at this input: forward, and backward when ``train``."""
    inputs = [t.detach().requires_grad_(train) for t in (x, weight, bias)]
    if residual is not None:
        inputs.append(residual.detach().requires_grad_(train))
    else:
        inputs.append(None)
    grad = torch.ones_like(x) if train else None
    leaves = [t for t in inputs if t is not None]

    def run(runner: Runner) -> None:
        y = runner(*inputs)
        if train:
            torch.autograd.grad(y, leaves, grad)

    # Identity hooks: the caller's saved-tensor hooks (counting, recomputation) do not see these runs.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.set_grad_enabled(train):
        return {path: _time(run, runners[path], x.device) for path in PATHS}


def call_cost_ms(device_seconds: float, host_seconds: float) -> float:
    """What a call costs a training step, in ms: the larger of its device time (the host's
    launch hidden) and its host time to enqueue. A step's host runs ahead of the GPU only while
    it enqueues faster than the GPU computes; a path that is faster on the device but slower to
    enqueue makes a host-bound step slower, and is charged its host time."""
    return max(device_seconds, host_seconds) * 1e3


def _time(run: Callable[[Runner], None], runner: Runner, device: torch.device) -> float:
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # (events, spin kernel)
        run(runner)  # untimed: compiles the kernels the first time, fills the allocator's cache
        timer = _timer(device)

        def once() -> float:
            # Device time with the host's launch time hidden (as in a training step, where the
            # host runs ahead of the GPU): timed with plain events, the kernels' extra launches
            # made tuning measure the host, about 1 ms a call on an H200 at any shape, and pick
            # PyTorch's GroupNorm where the kernels ran 1.3 to 13 times faster. A call whose
            # enqueueing outlasted the head start (a busy host) is timed again with a longer one.
            seconds = timer(lambda: run(runner))
            if timer.last_host_bound:
                seconds = timer(lambda: run(runner), head_start_s=min(2 * timer.host_seconds, MAX_HEAD_START_S))
            return call_cost_ms(seconds, timer.host_seconds)

        first = once()
        runs = max(MIN_TIMED_RUNS, min(MAX_TIMED_RUNS, int(MEASURE_BUDGET_S * 1e3 / max(first, 1e-6))))
        return statistics.median([first] + [once() for _ in range(runs - 1)])


@functools.lru_cache(maxsize=None)
def _timer(device: torch.device) -> DeviceTimer:
    """One calibrated timer per device (its head-start kernel is calibrated once)."""
    return DeviceTimer(device)


# ----------------------------------------------------------------------------- the disk cache

@functools.lru_cache(maxsize=None)
def _versions() -> Dict[str, str]:
    """What a decision depends on beside the GPU: the kernels' and the PyTorch path's source
    (hashed), triton's and torch's versions."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    ops = here.parent / "ops"
    # (and how they were measured: decisions timed by an older tuning.py / timing.py are retaken)
    for path in (ops / "triton_kernels.py", ops / "triton_launch.py", ops / "torch_path.py", ops / "autograd.py",
                 ops / "functional.py", here / "tuning.py", here / "timing.py"):
        digest.update(path.read_bytes())
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"kernel_version": digest.hexdigest()[:12], "triton": triton_version, "torch": torch.__version__}


def cache_file(device_name: str) -> Optional[Path]:
    """The decisions file of a device name in the cache directory (None: no disk cache)."""
    if STORE.cache_dir is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-") or "device"
    versions = _versions()
    return STORE.cache_dir / f"{slug}-k{versions['kernel_version']}-triton{versions['triton']}-torch{versions['torch']}.jsonl"


def _warn_once(path: Path, why: str) -> None:
    if path not in STORE.warned:
        STORE.warned.add(path)
        warnings.warn(f"gn_det decisions cache {path}: {why}", RuntimeWarning, stacklevel=5)


def _check_times(times: object) -> Dict[str, float]:
    if not isinstance(times, dict) or set(times) != set(PATHS) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0 for t in times.values()):
        raise ValueError(f"times_ms must map {', '.join(PATHS)} to milliseconds, got {times!r}")
    return {path: float(t) for path, t in times.items()}


def _check_shape(shape: object) -> Tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"shape must be a list of sizes, got {shape!r}")
    return tuple(shape)


def _check_value(row: dict, field: str, allowed: tuple) -> None:
    if row.get(field) not in allowed or type(row.get(field)) is not type(allowed[0]):
        raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}, got {row.get(field)!r}")


def _record_of(row: object, device_name: str) -> Union[Decision, Verification]:
    """The decision a cache line holds, every field checked (ValueError naming the field)."""
    if not isinstance(row, dict):
        raise ValueError(f"a line must hold an object, got {type(row).__name__}")
    _check_value(row, "cache_format", (CACHE_FORMAT,))
    route = check_route(row, "a decision")
    if route[0] != device_name:
        raise ValueError(f"device {route[0]!r} in the file of {device_name!r}")
    _check_value(row, "residual", (False, True))
    shape = _check_shape(row.get("shape"))
    if row.get("kind") == "tuning":
        _check_value(row, "passes", ("train", "infer"))
        _check_value(row, "path", PATHS)
        return Decision(route + (row["residual"], row["passes"]), row["path"], "disk cache", _check_times(row.get("times_ms")),
                        shape)
    if row.get("kind") == "verification":
        _check_value(row, "kernels", KERNEL_SETS)
        _check_value(row, "check", CHECKS)
        _check_value(row, "passed", (False, True))
        if not isinstance(row.get("detail"), str):
            raise ValueError(f"detail must be a string, got {row.get('detail')!r}")
        return Verification(route + (row["residual"], row["kernels"]), row["check"], row["passed"], row["detail"],
                            "disk cache", shape)
    raise ValueError(f"kind must be 'tuning' or 'verification', got {row.get('kind')!r}")


def _read(device_name: str) -> List[Union[Decision, Verification]]:
    """The decisions in a device's cache file, in the order written ([] when there is none).
    Whatever cannot be read is skipped with one warning per file: the whole file (permissions,
    not a file), or each line that is not UTF-8 JSON of a valid decision (nesting too deep for
    the parser, a list where a string belongs, a line cut short by a writer that was killed)."""
    path = cache_file(device_name)
    if path is None:
        return []
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # (nothing decided yet; the write will say what is wrong)
        return []
    except OSError as exc:
        _warn_once(path, f"cannot be read ({exc}); decisions are measured and verified again in this process")
        return []
    records, bad = [], []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(_record_of(json.loads(line.decode("utf-8")), device_name))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # (JSON and Unicode errors are ValueErrors)
            bad.append(f"line {number}: {type(exc).__name__}: {str(exc)[:200]}")
    if bad:
        _warn_once(path, f"{len(bad)} unreadable line(s) skipped (first: {bad[0]}); the other decisions are used")
    return records


def _load(device_name: str) -> None:
    """Read a device's cache file into this process (once): tuning decisions (the last line of a
    bucket wins: decisions adopted from rank 0 are written after one's own) and failed
    verifications. Decisions this process holds already stay."""
    STORE.loaded.add(device_name)
    last: Dict[TuneKey, Decision] = {}
    for record in _read(device_name):
        if isinstance(record, Decision):
            last[record.key] = record
        elif not record.passed:
            STORE.verifications.setdefault((record.key, record.check), record)
            STORE.failed.setdefault(record.key, record)
        STORE.on_disk.add(_disk_key(record))
    for key, decision in last.items():
        STORE.decisions.setdefault(key, decision)
    CALLS.clear()


def _disk_key(record: Union[Decision, Verification]) -> tuple:
    if isinstance(record, Decision):
        return ("tuning", record.key, record.path)
    return ("verification", record.key, record.check, record.passed)


def _append(device_name: str, records: List[Union[Decision, Verification]]) -> None:
    """Add decisions to the device's cache file: one line each, appended under an exclusive
    lock (``fcntl.flock``; concurrent writers queue and none overwrites another's lines), in
    one write. Costs the new lines only, never a rewrite; no temporary file. A cache that
    cannot be written warns once; the decisions stay in this process."""
    path = cache_file(device_name)
    records = [r for r in records if _disk_key(r) not in STORE.on_disk]
    if path is None or not records:
        return
    rows = [{k: v for k, v in dict(r.as_dict(), cache_format=CACHE_FORMAT).items() if k != "source"} for r in records]
    text = "".join(json.dumps(row) + "\n" for row in rows)  # (read back as "disk cache")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
                except OSError:  # a file system without locks (some network mounts): O_APPEND alone
                    pass
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                text = "\n" + text  # a writer killed mid-line: its fragment stays a line of its own
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError as exc:
        if (path, "write") not in STORE.warned:
            STORE.warned.add((path, "write"))
            warnings.warn(f"gn_det decisions cache {path} cannot be written ({exc}): decisions are kept in this "
                          "process only", RuntimeWarning, stacklevel=4)
        return
    STORE.on_disk.update(_disk_key(r) for r in records)


# ----------------------------------------------------------------------------- several processes

def synchronize_decisions(group=None) -> int:
    """Make every process of a distributed run hold the same decisions: each offers those it
    made since the last call (tuning measurements, kernel verifications), and for each bucket
    every process adopts the offer of the lowest rank, but that a verification that failed on
    any rank wins over one that passed (the kernels are then used on no rank for that bucket).
    A collective: every rank calls it at the same point (gn_det's trainers after each step),
    never from inside a forward, so ranks that meet different shapes, or whose kernels fail
    where others' pass, cannot deadlock. Objects travel over a gloo group (created on the
    first call when the default group is not gloo): no CUDA synchronisation. Returns how many
    decisions were adopted from other ranks; 0 outside a distributed run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    if group is None:
        if dist.get_backend() != "gloo" and STORE.gloo_group is None:
            STORE.gloo_group = dist.new_group(backend="gloo")
        group = STORE.gloo_group
    world = dist.get_world_size(group)
    if world == 1:
        return 0
    offers: List[Optional[list]] = [None] * world
    mine = [d.as_dict() for d in STORE.unshared.values()] + [v.as_dict() for v in STORE.unshared_verifications.values()]
    dist.all_gather_object(offers, mine, group=group)
    STORE.unshared.clear()
    STORE.unshared_verifications.clear()
    me = dist.get_rank(group)
    chosen: Dict[tuple, Tuple[int, Union[Decision, Verification]]] = {}
    for rank, rows in enumerate(offers):  # ascending: the lowest rank's offer of a bucket wins
        for row in rows:
            record = _record_of(dict(row, cache_format=CACHE_FORMAT), row["device"])
            slot = record.key if isinstance(record, Decision) else (record.key, record.check)
            held = chosen.get(slot)
            if held is None or isinstance(record, Verification) and held[1].passed and not record.passed:
                chosen[slot] = (rank, record)
    adopted = 0
    new_rows: Dict[str, list] = {}
    for slot, (rank, record) in chosen.items():
        own = "measured" if isinstance(record, Decision) else "verified"
        source = own if rank == me else f"rank {rank}"
        adopted += rank != me
        record = dataclasses.replace(record, source=source)
        if isinstance(record, Decision):
            STORE.decisions[slot] = record
        else:
            STORE.verifications[slot] = record
            if not record.passed:
                STORE.failed.setdefault(record.key, record)
        if rank != me:
            new_rows.setdefault(record.key[0], []).append(record)
    CALLS.clear()
    for device_name, records in new_rows.items():
        _append(device_name, records)
    return adopted

