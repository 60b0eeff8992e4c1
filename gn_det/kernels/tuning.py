"""First-use tuning: the first time gn_det meets a bucket of inputs on a GPU model, it times its
kernels against PyTorch's GroupNorm (+ residual add + activation) at that input and runs the
faster from then on, the way cuDNN's benchmark mode picks convolution algorithms. So gn_det is
not slower than ``nn.GroupNorm`` (+ activation) on any GPU by more than the noise of one short
measurement, whether or not anyone benchmarked that GPU before.

A bucket (``TuneKey``) is a route key (``routing.py``: GPU model, dtype, memory format,
activation, ``floor(log2(C/G * S))``, ``floor(log2(N * G))``) plus whether a residual is fused
and whether the call is recorded for backward ("train": forward + backward are timed) or not
("infer": forward only). The candidates are the op's own path ("kernels": the Triton kernels on
CUDA) and ``group_norm_op.aten_group_norm`` ("aten"). Each is run once untimed (a first run
compiles), then timed for about ``MEASURE_BUDGET_S`` (``MIN_TIMED_RUNS`` to ``MAX_TIMED_RUNS``
runs; CUDA events on a GPU, ``time.perf_counter`` on CPU), on detached copies of the call's
inputs outside any saved-tensor hooks; the lower median wins. The two paths give the same
results up to rounding.

Where a decision comes from, in order: this process's decisions (measured, read from the disk
cache, or adopted from rank 0 and the other ranks by ``synchronize_decisions``); the routes in
use (``routes.json``: seed decisions, never measured again); a measurement. Nothing is measured
inside ``torch.compile`` graphs (``group_norm`` gives them the custom op before asking) or
during CUDA-graph capture (there a bucket without a decision runs the kernels). Once a bucket
is decided, choosing its path is a dictionary lookup: no host-device synchronisation.

The disk cache: one JSON file per (GPU model, kernel version, triton version, torch version)
under ``cache_directory()`` (``GN_DET_CACHE_DIR``, else ``$XDG_CACHE_HOME/gn_det``, else
``~/.cache/gn_det``; ``set_tuning_cache``), written atomically after each new decision (merged
with what another process wrote meanwhile). A file that is not valid, or made for another
GPU or version, is ignored with one warning and written anew.

Switches, read once: ``GN_DET_AUTOTUNE=0|1`` (default 1: tune CUDA inputs) at import into
``set_autotune``; ``autotune_decisions()`` lists the decisions with their measured times.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .routing import ROUTE_FIELDS, aten_route, route_key_of

__all__ = [
    "MAX_TIMED_RUNS", "MEASURE_BUDGET_S", "MIN_TIMED_RUNS", "PATHS", "TUNE_FIELDS", "Decision", "TuneKey", "autotune_decisions",
    "autotune_enabled", "autotune_from_environment", "cache_directory", "cache_file", "choose_path", "clear_decisions", "decided_path",
    "set_autotune", "set_tuning_cache", "synchronize_decisions", "tune_key_of", "tuning_cache",
]

PATHS = ("kernels", "aten")  # the op's own path; PyTorch's GroupNorm (group_norm_op.aten_group_norm)
MEASURE_BUDGET_S = 2e-3  # timed runs of each candidate last about this long, after one untimed run
MIN_TIMED_RUNS, MAX_TIMED_RUNS = 3, 10  # a median of at least 3: one slow run decides nothing
CACHE_FORMAT = 1

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
        return dict(zip(TUNE_FIELDS, self.key), path=self.path, source=self.source, times_ms=dict(self.times_ms),
                    shape=list(self.shape))


def tune_key_of(x: Tensor, num_groups: int, activation: int, residual: bool, train: bool) -> TuneKey:
    """The bucket of a non-empty input x ``(N, C, *)`` (dense)."""
    return route_key_of(x, num_groups, activation) + (bool(residual), "train" if train else "infer")


# ----------------------------------------------------------------------------- switches

_tune_cpu = False
_enabled = True  # set by set_autotune only: at import from GN_DET_AUTOTUNE, later by an explicit call


def autotune_from_environment() -> bool:
    """``GN_DET_AUTOTUNE`` (0 or 1; 1 when unset), checked."""
    value = os.environ.get("GN_DET_AUTOTUNE", "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"GN_DET_AUTOTUNE={os.environ['GN_DET_AUTOTUNE']!r}: use 1 (tune each new bucket of inputs "
                         "on CUDA, the default) or 0 (the kernels everywhere, but where routes.json routes)")
    return value == "1"


def set_autotune(enabled: bool, *, on_cpu: bool = False) -> Tuple[bool, bool]:
    """Tune (the default) or not. Off, every bucket runs the kernels but where ``routes.json``
    routes it, and decisions already made are not used. ``on_cpu`` also tunes CPU inputs (the
    CPU path against ATen's GroupNorm, or the Triton interpreter where tests turn it on).
    Returns the settings before, ``(enabled, on_cpu)``. ``GN_DET_AUTOTUNE`` is read once, at
    import, into the first call."""
    global _enabled, _tune_cpu
    if not isinstance(enabled, bool) or not isinstance(on_cpu, bool):
        raise TypeError(f"set_autotune takes booleans, got enabled={enabled!r}, on_cpu={on_cpu!r}")
    previous = (_enabled, _tune_cpu)
    _enabled, _tune_cpu = enabled, on_cpu
    _by_input.clear()
    return previous


def autotune_enabled(x: Optional[Tensor] = None) -> bool:
    """Whether tuning is on (for x's device, when given)."""
    if x is None:
        return _enabled
    return _enabled and (x.is_cuda or (_tune_cpu and x.device.type == "cpu"))


def cache_directory() -> Path:
    """Where the tuning files go unless ``set_tuning_cache`` said otherwise."""
    if os.environ.get("GN_DET_CACHE_DIR"):
        return Path(os.environ["GN_DET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gn_det"


_cache_dir: Optional[Path] = cache_directory()


def set_tuning_cache(directory: Union[str, Path, None]) -> Optional[Path]:
    """Keep decisions in files under ``directory`` (None: in this process only). Files already
    read stay read. Returns the directory before."""
    global _cache_dir
    previous, _cache_dir = _cache_dir, None if directory is None else Path(directory)
    _loaded.clear()
    _by_input.clear()
    return previous


def tuning_cache() -> Optional[Path]:
    """The directory of the tuning files (None: none kept)."""
    return _cache_dir


# ----------------------------------------------------------------------------- decisions

_decisions: Dict[TuneKey, Decision] = {}
_unshared: Dict[TuneKey, Decision] = {}  # measured here, not yet offered to the other ranks
# The decided path by exact input (device, dtype, shape, strides, G, activation, residual,
# train): a lookup of ~1 us where the bucket's key takes several. Cleared with any change.
_by_input: Dict[tuple, str] = {}
_BY_INPUT_MAX = 1 << 16
_loaded: set = set()  # device names whose cache file was read
_warned: set = set()


def clear_decisions() -> None:
    """Forget every decision of this process (the next call of each bucket measures again,
    or reads the disk cache)."""
    _decisions.clear()
    _unshared.clear()
    _loaded.clear()
    _by_input.clear()


def autotune_decisions() -> List[dict]:
    """The decisions of this process, one dict each: the bucket's fields (``TUNE_FIELDS``),
    ``path``, ``source``, ``times_ms`` (median time of each path, forward [+ backward]) and
    the ``shape`` measured; sorted by bucket."""
    return [_decisions[key].as_dict() for key in sorted(_decisions)]


def decided_path(x: Tensor, num_groups: int, activation: int, residual: bool = False, train: bool = True) -> Optional[Decision]:
    """The decision this process holds for x's bucket (None: none yet, or tuning is off);
    measures nothing."""
    if not autotune_enabled(x) or x.numel() == 0:
        return None
    return _decisions.get(tune_key_of(x, num_groups, activation, residual, train))


def choose_path(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], num_groups: int,
                activation: int, train: bool, runners: Dict[str, Runner]) -> str:
    """"kernels" or "aten" for this call of ``group_norm`` (x dense, non-empty; weight, bias
    dense ``(C,)``). Measures ``runners`` (one per path) when the bucket has no decision yet
    and tuning is on for x (see the module docstring)."""
    if not autotune_enabled(x):
        return "aten" if aten_route(x, num_groups, activation) is not None else "kernels"
    exact = (x.device, x.dtype, x.shape, x.stride(), num_groups, activation, residual is not None, train)
    path = _by_input.get(exact)
    if path is not None:
        return path
    key = tune_key_of(x, num_groups, activation, residual is not None, train)
    decision = _decisions.get(key)
    if decision is None and key[0] not in _loaded:
        _load(key[0])
        decision = _decisions.get(key)
    if decision is not None:
        if len(_by_input) >= _BY_INPUT_MAX:
            _by_input.clear()
        _by_input[exact] = decision.path
        return decision.path
    if aten_route(x, num_groups, activation) is not None:
        return "aten"  # a seed decision: not measured
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return "kernels"  # no measuring inside a CUDA graph; the bucket is decided later, outside
    times = _measure(x, weight, bias, residual, train, runners)
    decision = Decision(key, min(PATHS, key=lambda p: times[p]), "measured", times, tuple(x.shape))
    _decisions[key] = _unshared[key] = decision
    _by_input.clear()
    _save(key[0])
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


def _time(run: Callable[[Runner], None], runner: Runner, device: torch.device) -> float:
    run(runner)  # untimed: compiles the kernels the first time, fills the allocator's cache
    if device.type == "cuda":
        def timed(count: int) -> List[float]:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
            for start, end in events:
                start.record()
                run(runner)
                end.record()
            torch.cuda.synchronize(device)
            return [start.elapsed_time(end) for start, end in events]
    else:
        def timed(count: int) -> List[float]:
            times = []
            for _ in range(count):
                start = time.perf_counter()
                run(runner)
                times.append((time.perf_counter() - start) * 1e3)
            return times
    first = timed(1)
    runs = max(MIN_TIMED_RUNS, min(MAX_TIMED_RUNS, int(MEASURE_BUDGET_S * 1e3 / max(first[0], 1e-6))))
    return statistics.median(first + timed(runs - 1))


# ----------------------------------------------------------------------------- the disk cache

@functools.lru_cache(maxsize=None)
def _versions() -> Dict[str, str]:
    """What a decision depends on beside the GPU: the kernels' and the PyTorch path's source
    (hashed), triton's and torch's versions."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("group_norm_triton.py", "group_norm_torch.py", "autograd.py", "group_norm_op.py"):
        digest.update((here / name).read_bytes())
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"kernel_version": digest.hexdigest()[:12], "triton": triton_version, "torch": torch.__version__}


def cache_file(device_name: str) -> Optional[Path]:
    """The tuning file of a device name in the cache directory (None: no disk cache)."""
    if _cache_dir is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-") or "device"
    versions = _versions()
    return _cache_dir / f"{slug}-k{versions['kernel_version']}-triton{versions['triton']}-torch{versions['torch']}.json"


def _warn_once(path: Path, why: str) -> None:
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"gn_det tuning cache {path}: {why}; ignored, and written anew from this run's measurements",
                      RuntimeWarning, stacklevel=4)


def _read(device_name: str) -> List[Decision]:
    """The decisions in a device's cache file ([] when there is none, or it is not valid or
    not this GPU's and versions': one warning)."""
    path = cache_file(device_name)
    if path is None or not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _warn_once(path, f"not readable JSON ({exc})")
        return []
    header = dict(format=CACHE_FORMAT, device=device_name, **_versions())
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in header.items()):
        got = {k: data.get(k) for k in header} if isinstance(data, dict) else type(data).__name__
        _warn_once(path, f"made for {got}, not {header}")
        return []
    decisions = []
    try:
        for entry in data["decisions"]:
            key = tuple(entry[field] for field in TUNE_FIELDS)
            valid = (key[0] == device_name and entry["path"] in PATHS and isinstance(entry["times_ms"], dict)
                     and all(isinstance(key[i], int) for i in (4, 5)) and key[7] in ("train", "infer"))
            if not valid:
                raise ValueError(f"entry {entry!r}")
            decisions.append(Decision(key, entry["path"], "disk cache", {k: float(v) for k, v in entry["times_ms"].items()},
                                      tuple(entry.get("shape", ()))))
    except (KeyError, TypeError, ValueError) as exc:
        _warn_once(path, f"a malformed decision ({exc})")
        return []
    return decisions


def _load(device_name: str) -> None:
    _loaded.add(device_name)
    for decision in _read(device_name):
        _decisions.setdefault(decision.key, decision)


def _save(device_name: str) -> None:
    """Write the device's decisions (this process's measured and adopted ones, over what the
    file holds now) to its cache file, atomically; a cache that cannot be written warns once."""
    path = cache_file(device_name)
    if path is None:
        return
    entries = {d.key: d for d in _read(device_name)}
    entries.update((k, d) for k, d in _decisions.items() if k[0] == device_name)
    rows = [entries[k].as_dict() for k in sorted(entries)]
    for row in rows:
        del row["source"]  # read back as "disk cache"
    data = dict(format=CACHE_FORMAT, device=device_name, **_versions(), decisions=rows)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as exc:
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"gn_det tuning cache {path} cannot be written ({exc}): decisions are kept in this "
                          "process only", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- several processes

_gloo_group = None


def synchronize_decisions(group=None) -> int:
    """Make every process of a distributed run hold the same decisions: each offers those it
    measured since the last call, and for each bucket every process adopts the offer of the
    lowest rank. A collective: every rank calls it at the same point (gn_det's trainers after
    each step), never from inside a forward, so ranks that meet different shapes cannot
    deadlock. Objects travel over a gloo group (created on the first call when the default
    group is not gloo): no CUDA synchronisation. Returns how many decisions were adopted from
    other ranks; 0 outside a distributed run."""
    global _gloo_group
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    if group is None:
        if dist.get_backend() != "gloo" and _gloo_group is None:
            _gloo_group = dist.new_group(backend="gloo")
        group = _gloo_group
    world = dist.get_world_size(group)
    if world == 1:
        return 0
    offers: List[Optional[list]] = [None] * world
    dist.all_gather_object(offers, [d.as_dict() for d in _unshared.values()], group=group)
    _unshared.clear()
    me = dist.get_rank(group)
    chosen: Dict[TuneKey, Tuple[int, dict]] = {}
    for rank, entries in enumerate(offers):  # ascending: the lowest rank's offer of a bucket wins
        for entry in entries:
            chosen.setdefault(tuple(entry[field] for field in TUNE_FIELDS), (rank, entry))
    adopted = 0
    _by_input.clear()
    for key, (rank, entry) in chosen.items():
        source = "measured" if rank == me else f"rank {rank}"
        adopted += rank != me
        _decisions[key] = Decision(key, entry["path"], source, entry["times_ms"], tuple(entry["shape"]))
    for device_name in {key[0] for key in chosen}:
        _save(device_name)
    return adopted


set_autotune(autotune_from_environment())  # a bad GN_DET_AUTOTUNE fails here, at import, naming the value
