"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) cleanly.

``stop_on_signals()`` makes both signals raise ``Stopped`` (a ``KeyboardInterrupt``), which
``tools/train_net.py`` turns into one line naming the last checkpoint. Some regions hold the
first signal until they end, because code interrupted at an arbitrary bytecode there fails in
a way that buries that line or loses work:

- a training step (``StopAtStepEnd``): it can be receiving a batch from a data-loader worker
  (a file-descriptor handshake with the worker's resource-sharer thread, which then prints a
  traceback of its own); training stops when the step ends, before the other hooks run;
- a checkpoint save (``signals_held``, in ``SafeCheckpointer.save``): torch's zip writer,
  interrupted, raises a RuntimeError of its own; the file and the pointer to it are completed,
  then training stops;
- in a distributed run, the whole training loop: the processes agree at the end of each step
  whether any of them was signalled (one all-reduce of one integer), so all of them stop after
  the same step and none is left waiting in a collective for one that has gone. A signal
  during an evaluation or a save stops the run at the next step's end.

Elsewhere (set-up, evaluation in one process) a signal stops at once; so does a second signal
anywhere, except the same signal again within ``REPEAT_WINDOW_S`` of the one held: that is one
request delivered twice. A terminal's Ctrl-C reaches every process of its foreground group (a
distributed run's workers too), and ``tools/train_net.py``'s parent process forwards it to them
as well; a cluster scheduler may signal every process of a job, and its launcher too.
"""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Iterator, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["REPEAT_WINDOW_S", "STOP_SIGNALS", "StopAtStepEnd", "Stopped", "signals_held", "stop_on_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The same signal again this soon after the one held (measured when each is handled, at a
# bytecode of the main thread, so a long operation under way can delay the copy) is a copy of
# it, not a second request; a person pressing Ctrl-C again to stop at once takes longer.
REPEAT_WINDOW_S = 2.0


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: training stops where it is. ``signum`` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Pending:
    """The signal held, and by how many regions (read and written in the main thread only)."""

    installed = False  # stop_on_signals() was called (in every process of a run, or in none)
    holds = 0  # regions under way that hold a signal: a step, a save, a distributed training loop
    signum: Optional[int] = None
    held_at = 0.0  # time.monotonic() when the held signal was handled


_PENDING = _Pending()


def _stop_now(signum: int) -> None:
    for sig in STOP_SIGNALS:  # once: a further signal must not interrupt the clean stop
        signal.signal(sig, signal.SIG_IGN)
    _PENDING.signum = None
    raise Stopped(signum)


def _on_signal(signum, frame) -> None:
    if _PENDING.holds:
        now = time.monotonic()
        if _PENDING.signum is None:
            _PENDING.signum, _PENDING.held_at = signum, now  # raised where the region holding it ends
            return
        if signum == _PENDING.signum and now - _PENDING.held_at < REPEAT_WINDOW_S:
            return  # a copy of the held signal (a Ctrl-C that reached this process twice)
    _stop_now(signum)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise ``Stopped`` in this process (call it in the main thread of
    each training process; the ``StopAtStepEnd`` hook holds them to the end of a step)."""
    _PENDING.installed, _PENDING.holds, _PENDING.signum = True, 0, None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A SIGINT/SIGTERM during the block is held to its end, then raised as ``Stopped``, unless
    an outer region still holds it (a step under way; a distributed training loop, whose
    processes stop together at a step's end). A second signal is raised at once (not a copy of
    the first: ``REPEAT_WINDOW_S``)."""
    _PENDING.holds += 1
    try:
        yield
    finally:
        _PENDING.holds -= 1
    if not _PENDING.holds and _PENDING.signum is not None:
        _stop_now(_PENDING.signum)


def _agreed_signal(signum: Optional[int]) -> int:
    """The largest signal number held by any process (0: none), the same on every process."""
    if comm.get_world_size() == 1:
        return signum or 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    held = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
    return int(held.item())


class StopAtStepEnd(HookBase):
    """Holds a SIGINT/SIGTERM that arrives during a training step (in a distributed run, during
    training) until the step ends, then stops training with ``Stopped``, on every process
    together. Register it first, so that its ``after_step`` runs before the other hooks' (the
    step that was stopped gets no checkpoint or evaluation). Without ``stop_on_signals()`` it
    does nothing."""

    def before_train(self) -> None:
        if comm.get_world_size() > 1:
            _PENDING.holds += 1  # the loop: the processes stop together, at a step's end

    def before_step(self) -> None:
        _PENDING.holds += 1

    def after_step(self) -> None:
        _PENDING.holds -= 1
        signum = _agreed_signal(_PENDING.signum) if _PENDING.installed else 0
        if signum:
            _stop_now(signum)

    def after_train(self) -> None:  # the loop's hold, and that of a step that raised (it does not reach after_step)
        _PENDING.holds = 0
