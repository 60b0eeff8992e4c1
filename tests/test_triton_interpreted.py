"""Runs tests/interpreted (the Triton kernels on CPU) in a process of its own, where
TRITON_INTERPRET=1 is set before triton is imported.

That process runs for minutes on one core, so it starts in the background as soon as the
suite is collected (tests/conftest.py calls ``start_in_background``) and works beside the
other tests; this test, moved to the end of the run, waits for it. With pytest-xdist (make
test's ``-n 2``) every worker collects the suite: the first to create the run's folder starts
the process, and whichever worker runs this test waits for the exit status the process
leaves there. The run's folder is named by ``GN_TESTS_SESSION``, which conftest.py sets once
per session, before the workers start."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 900


def run_dir() -> str:
    """This session's folder for the background run: output.txt, pid, rc."""
    return os.path.join(tempfile.gettempdir(), f"gn_det_interpreted_{os.environ['GN_TESTS_SESSION']}")


def start_in_background() -> None:
    """Starts the interpreter suite unless a process of this session already did."""
    folder = run_dir()
    try:
        os.mkdir(folder)  # atomic: one process of the session wins
    except FileExistsError:
        return
    env = dict(os.environ, TRITON_INTERPRET="1", GN_DET_TRITON_ON_CPU="1")
    suite = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-W",
             "ignore::RuntimeWarning", os.path.join(HERE, "interpreted")]
    output, rc = (shlex.quote(os.path.join(folder, name)) for name in ("output.txt", "rc"))
    # The shell writes the exit status when the suite ends, for whichever process waits.
    script = f"{shlex.join(suite)} > {output} 2>&1; echo $? > {rc}.tmp && mv {rc}.tmp {rc}"
    proc = subprocess.Popen(
        ["sh", "-c", script], cwd=os.path.dirname(HERE), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # Below the other tests' priority: it takes the cycles they leave idle (it has minutes
        # to spare before the last of them ends) rather than slowing them down.
        preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None,
    )
    with open(os.path.join(folder, "pid"), "w") as f:
        f.write(str(proc.pid))


def stop() -> None:
    """Ends the background run if it is still going (the session ended before its test),
    and removes its folder. Called once, by the process that ends the session."""
    folder = run_dir()
    try:
        pid = int(open(os.path.join(folder, "pid")).read())
        os.killpg(pid, signal.SIGKILL)  # the shell and the suite it started (its own session)
    except (OSError, ValueError):
        pass
    shutil.rmtree(folder, ignore_errors=True)


def test_triton_kernels_under_interpreter():
    start_in_background()  # already started, unless this module's test was run on its own
    folder = run_dir()
    started = os.path.getmtime(folder)
    rc_file, output_file = os.path.join(folder, "rc"), os.path.join(folder, "output.txt")
    while not os.path.exists(rc_file):
        if time.time() - started > TIMEOUT_S:
            raise AssertionError(f"the interpreter suite ran over {TIMEOUT_S} s")
        time.sleep(1.0)
    text = open(output_file).read()
    returncode = int(open(rc_file).read())
    assert returncode == 0, text[-9000:]
    assert " passed" in text and "failed" not in text
