"""The one timer of gn_det: first-use tuning's (``tuning.py``), the benchmarks' and
``python -m gn_det.check``'s (tools/benchmark_norm.py, gn_det.diagnostics.check): device time on CUDA with
the host's launch time hidden, wall time on CPU."""
from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["DeviceTimer"]


class DeviceTimer:
    """Seconds taken by a callable. On CUDA, device time between two events, the GPU kept busy
    by a spin kernel of ``HEAD_START_S`` seconds while the callable's kernels are enqueued, so
    they run back to back from the start event and the host's launch time is hidden, as in a
    training step where the CPU runs ahead of the GPU. The host's own time to enqueue is kept
    (``host_seconds``, of the last call), and a call whose enqueueing outlasts the head start is
    counted in ``host_bound`` (its device time then includes waiting for the host). On CPU:
    wall time (``time.perf_counter``)."""

    HEAD_START_S = 2e-3

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host_seconds = 0.0
        self.host_bound = 0
        self.last_host_bound = False  # whether the last call's enqueueing outlasted its head start
        self.head_start_cycles = 0
        if self.cuda and hasattr(torch.cuda, "_sleep"):  # (a private helper: without it, plain events)
            # Calibrate the spin kernel: cycles per second of torch.cuda._sleep.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(10**7)
            end.record()
            end.synchronize()
            self.head_start_cycles = int(10**7 / (start.elapsed_time(end) / 1e3) * self.HEAD_START_S)

    def __call__(self, fn: Callable[[], object], head_start_s: float = HEAD_START_S) -> float:
        """Seconds taken by ``fn()`` (device time on CUDA), after a head start of ``head_start_s``
        (the class's 2 ms unless given: a caller whose call outlasted it, ``last_host_bound``,
        may time it again with a longer one)."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            self.host_seconds = time.perf_counter() - start
            self.last_host_bound = False
            return self.host_seconds
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if self.head_start_cycles:
            torch.cuda._sleep(int(self.head_start_cycles * head_start_s / self.HEAD_START_S))
        start.record()
        host_start = time.perf_counter()
        fn()
        self.host_seconds = time.perf_counter() - host_start
        end.record()
        end.synchronize()
        self.last_host_bound = self.host_seconds > (head_start_s if self.head_start_cycles else 0)
        self.host_bound += self.last_host_bound
        return start.elapsed_time(end) / 1e3
