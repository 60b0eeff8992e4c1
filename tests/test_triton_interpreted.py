"""Runs tests/interpreted (the Triton kernels on CPU) in a process of its own, where
TRITON_INTERPRET=1 is set before triton is imported.

That process runs for minutes on one core, so it starts in the background as soon as the
suite is collected (tests/conftest.py calls ``start_in_background``) and works beside the
other tests on the second core; this test, moved to the end of the run, waits for it."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 900
_run: Optional[tuple] = None  # (process, output file, start time) once started


def start_in_background() -> None:
    global _run
    if _run is not None:
        return
    env = dict(os.environ, TRITON_INTERPRET="1", GN_DET_TRITON_ON_CPU="1")
    output = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: nothing blocks on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
         os.path.join(HERE, "interpreted")],
        cwd=os.path.dirname(HERE), env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
        # Below the other tests' priority: it takes the cycles they leave idle (it has minutes
        # to spare before the last of them ends) rather than slowing them down.
        preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None,
    )
    _run = (proc, output, time.monotonic())


def stop() -> None:
    """Ends the background run if it is still going (the session ended before its test)."""
    if _run is not None and _run[0].poll() is None:
        _run[0].kill()
        _run[0].wait()


def test_triton_kernels_under_interpreter():
    start_in_background()  # already started, unless this module's test was run on its own
    proc, output, started = _run
    try:
        proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        stop()
        raise AssertionError(f"the interpreter suite ran over {TIMEOUT_S} s") from None
    output.seek(0)
    text = output.read()
    assert proc.returncode == 0, text[-9000:]
    assert " passed" in text and "failed" not in text
