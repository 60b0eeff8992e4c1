"""The switches that steer every GN call, in one object with one owner: this module.

Each switch is set by an explicit call (``set_backend``, ``set_autotune``, ``set_verification``)
or once, at import, from its environment variable; per call it is read from ``SWITCHES``
(timm's ``set_fast_norm`` style: nothing reads the environment per call, and nothing else
writes these values). ``paths.decide`` reads them to choose a call's path.

- ``backend``: ``set_backend``; ``GN_DET_BACKEND`` (auto | torch) at import.
- ``autotune``, ``autotune_on_cpu``: ``set_autotune(enabled, on_cpu=)``; ``GN_DET_AUTOTUNE``
  (1 | 0) at import; CPU inputs are tuned for tests only.
- ``verify``, ``verify_on_cpu``: ``set_verification(enabled, on_cpu=)``; on by default for
  CUDA; the interpreter on CPU is verified for tests only.

The policy's state, besides these switches, is ``tuning.STORE`` (decisions, verification
outcomes), ``routing``'s routes in use (``set_routes``) and ``CALLS`` here: every input
signature decided so far, mapped to the call that runs it (``calls.py``). Whatever changes a
decision empties ``CALLS``: every setter here, ``set_routes``, tuning's and verification's
records, ``clear_decisions``, ``synchronize_decisions``, ``set_tuning_cache``, and the tests'
``verification.inject_fault``.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Tuple

__all__ = ["BACKENDS", "CALLS", "CALLS_MAX", "SWITCHES", "DecidedCalls", "Switches", "autotune_from_environment", "backend",
           "backend_from_environment", "set_autotune", "set_backend", "set_verification"]

BACKENDS = ("auto", "torch")


@dataclasses.dataclass
class Switches:
    """What steers each GN call (see the module docstring). Written by the setters only."""

    backend: str = "auto"  # "auto": Triton kernels on CUDA; "torch": PyTorch operations everywhere
    autotune: bool = True  # first-use tuning of CUDA inputs (tuning.py)
    autotune_on_cpu: bool = False  # ... and of CPU inputs (tests)
    verify: bool = True  # first-use verification of the kernels on CUDA (verification.py)
    verify_on_cpu: bool = False  # ... and of the Triton interpreter on CPU (tests)


SWITCHES = Switches()
# The decided calls (calls.py): input signature -> the call that runs it. Emptied by whatever
# changes a decision (the module docstring), and when it holds CALLS_MAX signatures (multi-scale
# training meets a bounded but large number of shapes).
class DecidedCalls(dict):
    """``CALLS``' kind: a dict whose ``clear`` also counts (``generation``), so that a call decided
    while another thread changed a decision is not kept after the change (``keep``); the count
    and the keeping share a lock, lookups take none."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0
        self.lock = threading.Lock()

    def clear(self) -> None:
        with self.lock:
            self.generation += 1
            super().clear()

    def keep(self, key: tuple, value: object, generation: int) -> None:
        """``self[key] = value`` unless cleared since ``generation`` (read before deciding); all
        are forgotten first when ``CALLS_MAX`` are held."""
        with self.lock:
            if self.generation != generation:
                return
            if len(self) >= CALLS_MAX:
                self.generation += 1
                super().clear()
            self[key] = value


CALLS = DecidedCalls()
CALLS_MAX = 1 << 14


def set_backend(name: str) -> str:
    """Choose the backend: "auto" (the default) runs the Triton kernels on CUDA; "torch" runs
    PyTorch operations everywhere, the escape hatch should the kernels ever fail on a machine.
    Returns the backend before, to restore it with. ``GN_DET_BACKEND`` is read once, at
    import, into the first call."""
    if name not in BACKENDS:
        raise ValueError(f"{name!r} is not a gn_det backend: use 'auto' (Triton kernels on CUDA, the default) or "
                         "'torch' (PyTorch operations everywhere)")
    previous, SWITCHES.backend = SWITCHES.backend, name
    CALLS.clear()
    return previous


def backend() -> str:
    """The backend in use (see ``set_backend``)."""
    return SWITCHES.backend


def backend_from_environment() -> str:
    """``GN_DET_BACKEND`` (case-insensitive; "auto" when unset), checked."""
    value = os.environ.get("GN_DET_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"GN_DET_BACKEND={os.environ['GN_DET_BACKEND']!r} is not a gn_det backend: use 'auto' (Triton "
                         "kernels on CUDA, the default) or 'torch' (PyTorch operations everywhere)")
    return value


def autotune_from_environment() -> bool:
    """``GN_DET_AUTOTUNE`` (0 or 1; 1 when unset), checked."""
    value = os.environ.get("GN_DET_AUTOTUNE", "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"GN_DET_AUTOTUNE={os.environ['GN_DET_AUTOTUNE']!r}: use 1 (tune each new bucket of inputs "
                         "on CUDA, the default) or 0 (the kernels everywhere, but where routes.json routes)")
    return value == "1"


def _check_booleans(name: str, enabled: object, on_cpu: object) -> None:
    if not isinstance(enabled, bool) or not isinstance(on_cpu, bool):
        raise TypeError(f"{name} takes booleans, got enabled={enabled!r}, on_cpu={on_cpu!r}")


def set_autotune(enabled: bool, *, on_cpu: bool = False) -> Tuple[bool, bool]:
    """Tune (the default) or not. Off, every bucket runs the kernels but where ``routes.json``
    routes it, and decisions already made are not used. ``on_cpu`` also tunes CPU inputs (the
    CPU path against ATen's GroupNorm, or the Triton interpreter where tests turn it on).
    Returns the settings before, ``(enabled, on_cpu)``. ``GN_DET_AUTOTUNE`` is read once, at
    import, into the first call."""
    _check_booleans("set_autotune", enabled, on_cpu)
    previous = (SWITCHES.autotune, SWITCHES.autotune_on_cpu)
    SWITCHES.autotune, SWITCHES.autotune_on_cpu = enabled, on_cpu
    CALLS.clear()
    return previous


def set_verification(enabled: bool, *, on_cpu: bool = False) -> Tuple[bool, bool]:
    """Verify the kernels at the first use of each bucket (the default, on CUDA) or not (they
    then run unverified, as in benchmarks of the kernels themselves). ``on_cpu`` also verifies
    the Triton interpreter on CPU (tests). Returns the settings before, ``(enabled, on_cpu)``."""
    _check_booleans("set_verification", enabled, on_cpu)
    previous = (SWITCHES.verify, SWITCHES.verify_on_cpu)
    SWITCHES.verify, SWITCHES.verify_on_cpu = enabled, on_cpu
    CALLS.clear()
    return previous


set_backend(backend_from_environment())  # a GN_DET_BACKEND that is not a backend fails here, at import, with the fix
set_autotune(autotune_from_environment())  # a bad GN_DET_AUTOTUNE fails here, at import, naming the value
