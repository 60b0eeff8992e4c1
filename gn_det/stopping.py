"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) cleanly.

``stop_on_signals()`` makes both signals raise ``Stopped`` (a ``KeyboardInterrupt``), which
``tools/train_net.py`` turns into one line naming the last checkpoint. Inside a training step,
the first signal is held until the step ends and the ``StopAtStepEnd`` hook raises it there:
a step interrupted at an arbitrary bytecode can be in the middle of receiving a batch from a
data-loader worker (a file-descriptor handshake with the worker's resource-sharer thread), and
the worker then prints a traceback of its own. Outside a step (set-up, evaluation, a checkpoint
being written, which ``SafeCheckpointer`` makes atomic) a signal stops at once; so does a second
signal during a step that does not end.

In a distributed run the processes agree, at the end of each step, whether any of them was
signalled (one all-reduce of one integer), so all of them stop after the same step and none is
left waiting in a collective for a process that has gone.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["StopAtStepEnd", "Stopped", "stop_on_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: training stops where it is. ``signum`` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Pending:
    """The signal held during a step (read by the handler and the hook, in the main thread)."""

    installed = False  # stop_on_signals() was called (in every process of a run, or in none)
    in_step = False
    signum: Optional[int] = None


_PENDING = _Pending()


def _stop_now(signum: int) -> None:
    for sig in STOP_SIGNALS:  # once: a further signal must not interrupt the clean stop
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def _on_signal(signum, frame) -> None:
    if _PENDING.in_step and _PENDING.signum is None:
        _PENDING.signum = signum  # StopAtStepEnd raises it when the step ends
        return
    _stop_now(signum)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise ``Stopped`` in this process (call it in the main thread of
    each training process; the ``StopAtStepEnd`` hook holds them to the end of a step)."""
    _PENDING.installed, _PENDING.in_step, _PENDING.signum = True, False, None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def _agreed_signal(signum: Optional[int]) -> int:
    """The largest signal number held by any process (0: none), the same on every process."""
    if comm.get_world_size() == 1:
        return signum or 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    held = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
    return int(held.item())


class StopAtStepEnd(HookBase):
    """Holds a SIGINT/SIGTERM that arrives during a training step until the step ends, then
    stops training with ``Stopped``. Register it first, so that its ``after_step`` runs before
    the other hooks' (checkpoints and evaluation run unheld, and are not run for the step that
    was stopped). Without ``stop_on_signals()`` it does nothing."""

    def before_step(self) -> None:
        _PENDING.in_step = True

    def after_step(self) -> None:
        _PENDING.in_step = False
        signum = _agreed_signal(_PENDING.signum) if _PENDING.installed else 0
        if signum:
            _stop_now(signum)

    def after_train(self) -> None:  # a step that raised does not reach after_step
        _PENDING.in_step = False
