"""Host (Python) time per GN call without a GPU: what tools/benchmark_host.py measures with.

On a machine without a GPU the Triton kernels cannot launch, but everything the host does
before the driver's launch can run: ``stand_in_gpu`` makes Triton's driver a stand-in for a
GPU of the given architecture (kernels compile for it offline, load as dummies, and each
launch stops at a no-op launcher: Triton's own binding, specialisation and cache lookup all
run), and makes gn_det's policy send CPU tensors to the Triton kernels as it sends CUDA ones
(decided once per signature, planned once, as after first-use verification on a GPU; the
outputs are left unwritten). Allocations are the CPU allocator's, not CUDA's caching
allocator's: a proxy, said so in every result. (Meta tensors would be the obvious stand-ins,
but their ``empty_like`` runs Python, ~30 us a call.)
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator, Tuple

from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from ...policy import paths
from ...policy.switches import CALLS
from .inspection import CompileOnlyDriver

__all__ = ["StandInDriver", "host_seconds", "host_seconds_alternating", "keep_freed_memory", "stand_in_gpu",
           "triton_launches_skipped"]


def _loaded_fields() -> int:
    """How many values this Triton's ``CompiledKernel`` takes from ``load_binary`` (5 from
    triton 3.3 or so, with the threads a block may have; 4 before)."""
    import inspect

    from triton.compiler.compiler import CompiledKernel

    try:
        return 5 if "n_max_threads" in inspect.getsource(CompiledKernel._init_handles) else 4
    except (OSError, TypeError):
        return 5


_LOADED_FIELDS = _loaded_fields()


class _StandInUtils:
    """What Triton asks of a driver's utils when it loads a compiled kernel."""

    def __init__(self, sm_count: int) -> None:
        self.sm_count = sm_count

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills[, max threads]): dummies, as many as this Triton reads
        return (1, 1, 64, 0, 1024)[:_LOADED_FIELDS]

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": self.sm_count, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}


STAND_IN_DEVICE = 4096  # (no real GPU has this number)


def _no_op_launch(*args) -> None:
    return None


class StandInDriver(CompileOnlyDriver):
    """Triton's driver for a GPU that is not there: compile for ``target``, load as dummies,
    launch as no-ops."""

    def __init__(self, target: GPUTarget, sm_count: int = 132) -> None:
        super().__init__(target)
        self.utils = _StandInUtils(sm_count)

    def launcher_cls(self, src, metadata):
        return _no_op_launch

    def get_current_device(self) -> int:
        # A device number of its own: Triton keeps compiled kernels per device number, and the
        # stand-in's (loaded as dummies) must not serve inspection.recording_launches's
        # compile-only driver (device 0), whose compile hook only sees kernels not yet cached.
        return STAND_IN_DEVICE

    def get_device_capability(self, device=None) -> Tuple[int, int]:
        return divmod(self.target.arch, 10)


@contextlib.contextmanager
def stand_in_gpu(arch: int = 90) -> Iterator[None]:
    """Within it, Triton launches on a stand-in GPU (module docstring) and gn_det's policy
    sends CPU tensors to the Triton kernels (whose launches then do nothing)."""
    kernels_off = paths._kernels_off
    saved_driver = getattr(driver, "_active", None)
    driver.set_active(StandInDriver(GPUTarget("cuda", arch, 32)))
    paths._kernels_off = lambda x: None if x.device.type in ("cpu", "meta") else kernels_off(x)
    CALLS.clear()
    try:
        yield
    finally:
        paths._kernels_off = kernels_off
        driver.set_active(saved_driver)
        CALLS.clear()


def _seconds_per_call(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def host_seconds(fn: Callable[[], object], number: int = 200, repeats: int = 7) -> Tuple[float, float]:
    """(least, median) seconds per call of ``fn`` over ``repeats`` timings of ``number``
    calls each, after ``number`` untimed calls (real clock, ``time.perf_counter``)."""
    _seconds_per_call(fn, number)
    times = [_seconds_per_call(fn, number) for _ in range(repeats)]
    return min(times), statistics.median(times)


def host_seconds_alternating(first: Callable[[], object], second: Callable[[], object], number: int = 200,
                             repeats: int = 7) -> Tuple[float, float]:
    """The least seconds per call of ``first`` and of ``second``, timed in alternation
    (``number`` calls of one, then of the other, ``repeats`` times, after ``number`` untimed
    calls of each): slow drifts of a shared machine reach both alike."""
    _seconds_per_call(first, number), _seconds_per_call(second, number)
    a, b = [], []
    for _ in range(repeats):
        a.append(_seconds_per_call(first, number))
        b.append(_seconds_per_call(second, number))
    return min(a), min(b)


def keep_freed_memory() -> bool:
    """Make the CPU allocator keep freed memory for reuse, as CUDA's caching allocator does
    (glibc's ``mallopt``: no ``mmap``/``munmap`` per large tensor, no trimming); without it a
    2 MB tensor costs ~7 us of system calls here, which a GPU's allocations do not. False where
    the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError, TypeError):
        return False


@contextlib.contextmanager
def triton_launches_skipped() -> Iterator[None]:
    """Within it, every gn_det kernel launch returns at once: what a call costs without Triton's
    launch path (the direct launch's checks and the launcher, or the public path's binding,
    specialisation and cache lookup), so that a call's host time splits into gn_det's and
    Triton's."""
    from ...ops import direct_launch, triton_kernels

    kernels = [getattr(triton_kernels, name) for name in dir(triton_kernels) if name.endswith("_kernel")]
    for kernel in kernels:
        kernel.run = _skipped_launch
    sites = {site: site.run for site in direct_launch.sites() if site.direct}
    for site in sites:
        site.run = _skipped_launch
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run  # back to the class's method
        for site, run in sites.items():
            site.run = run


def _skipped_launch(*args, **kwargs) -> None:
    return None
