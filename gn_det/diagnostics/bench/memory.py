"""Activation memory of a training step, measured without a device (``tools/benchmark_memory.py``).

- ``count_saved_tensors()``: bytes that autograd stores for backward, by unique storage
  (GN outputs under output recomputation cost nothing; what they are recomputed from is
  counted where GN saves it);
- ``saved_bytes(model, batch)``: one forward's unique storages saved for backward
  (saved-tensor hooks, deduplicated by storage), split into parameters and activations,
  and the activations by the module that made each tensor and the module that saved it;
- ``held_after_forward(model, batch)``: process RSS after a forward minus before (the memory
  the forward leaves held for backward), with glibc told to return large blocks to the OS;
- ``step_times(model, optimizer, batch)``: median training-step time;
- ``cuda_peak(model, batch)``: peak CUDA memory of a step, on a GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ...recompute import observe_saved_tensors

__all__ = ["SavedTensorCount", "count_saved_tensors", "held_after_forward", "return_freed_memory_to_os", "rss_mib",
           "saved_bytes", "step_times", "cuda_peak"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class SavedTensorCount:
    """What autograd stored for backward while counting: unique storages and their bytes.

    ``label`` (optional) names each storage when it is first saved, from the tensor (e.g.
    the module that made it and the one saving it); ``bytes_by_label`` sums by it. Storages in ``exclude`` (e.g. the parameters')
    are counted in ``excluded_bytes`` only."""

    def __init__(self, label: Optional[Callable[[Tensor], str]] = None, exclude: Tuple[int, ...] = ()) -> None:
        self.label = label
        self.exclude = set(exclude)
        self.seen: Dict[int, int] = {}
        self.bytes = 0
        self.excluded_bytes = 0
        self.bytes_by_label: Dict[str, int] = {}

    def add(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or tensor.device.type == "meta":
            return
        self.seen[key] = nbytes = storage.nbytes()
        if key in self.exclude:
            self.excluded_bytes += nbytes
            return
        self.bytes += nbytes
        if self.label is not None:
            name = self.label(tensor)
            self.bytes_by_label[name] = self.bytes_by_label.get(name, 0) + nbytes


@contextlib.contextmanager
def count_saved_tensors(label: Optional[Callable[[Tensor], str]] = None,
                        exclude: Tuple[int, ...] = ()) -> Iterator[SavedTensorCount]:
    """Count the unique storages autograd saves for backward inside the block (forwards run
    inside it; recomputed GN outputs are not saved, so not counted)."""
    count = SavedTensorCount(label, exclude)
    with observe_saved_tensors(count.add):
        yield count


def rss_mib() -> float:
    """This process's resident memory (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def return_freed_memory_to_os(mmap_threshold: int = 1 << 20) -> bool:
    """Make glibc serve blocks from ``mmap_threshold`` bytes by mmap (returned to the OS when
    freed, so RSS follows what is held; a fixed threshold stops glibc raising it as blocks are
    freed) and trim its heap. False where glibc is not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def _module_labels(model: nn.Module) -> Iterator[Callable[[Tensor], str]]:
    """A label for saved tensors: "<module type that made it> -> <module type saving it>",
    from forward hooks on every submodule (innermost module wins on both sides)."""
    running: List[str] = []
    made_by: Dict[int, tuple] = {}  # storage address -> (module type, weak reference to the output)

    def pre(module, args):
        running.append(type(module).__name__)

    def post(module, args, output):
        running.pop()
        for out in (output if isinstance(output, (tuple, list)) else output.values() if isinstance(output, dict)
                    else (output,)):
            key = out.untyped_storage().data_ptr() if isinstance(out, Tensor) else None
            known = made_by.get(key)
            if key is not None and (known is None or known[1]() is None):  # a freed tensor's address is reused
                made_by[key] = (type(module).__name__, weakref.ref(out))

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))

    def label(tensor: Tensor) -> str:
        known = made_by.get(tensor.untyped_storage().data_ptr())
        maker = known[0] if known is not None and known[1]() is not None else "(inside a module)"
        return f"{maker} -> {running[-1] if running else '(outside)'}"

    try:
        yield label
    finally:
        for handle in handles:
            handle.remove()


def saved_bytes(model: nn.Module, batch: List[Dict], autocast_dtype: Optional[torch.dtype] = None) -> Dict:
    """One training forward's storage saved for backward (the graph is dropped after).

    Returns ``{"activation_bytes", "parameter_bytes", "by_label": {label: bytes}}``:
    unique storages (a storage saved twice counts once), parameters (and their casts are
    activations) apart."""
    params = tuple(p.untyped_storage().data_ptr() for p in model.parameters())
    device = next(model.parameters()).device.type
    with _module_labels(model) as label, count_saved_tensors(label, exclude=params) as count:
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = model(batch)
    del losses  # the graph and what it saved go with it (no backward needed to count)
    return {"activation_bytes": count.bytes, "parameter_bytes": count.excluded_bytes,
            "by_label": dict(sorted(count.bytes_by_label.items(), key=lambda kv: -kv[1]))}


def held_after_forward(model: nn.Module, batch: List[Dict], repeats: int = 3) -> float:
    """MiB of RSS a training forward leaves held (its graph and saved tensors), the median of
    ``repeats`` forwards (each followed by its backward). Call ``return_freed_memory_to_os``
    first, so that what is freed leaves RSS."""
    held = []
    for _ in range(repeats):
        gc.collect()
        before = rss_mib()
        losses = model(batch)
        after = rss_mib()
        sum(losses.values()).backward()
        del losses
        model.zero_grad(set_to_none=True)
        held.append(after - before)
    return statistics.median(held)


def step_times(model: nn.Module, optimizer: torch.optim.Optimizer, batch: List[Dict], warmup: int,
               iters: int) -> List[float]:
    """Seconds of each of ``iters`` training steps (forward, backward, optimizer step) after
    ``warmup`` (CUDA-synchronised on a GPU)."""
    cuda = next(model.parameters()).is_cuda
    times = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def cuda_peak(model: nn.Module, batch: List[Dict]) -> Dict[str, float]:
    """Peak CUDA memory (MiB) of a training step, and the part above what was allocated
    before it (activations and gradients)."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sum(model(batch).values()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    return {"peak_mib": peak / 2**20, "peak_above_start_mib": (peak - base) / 2**20}
