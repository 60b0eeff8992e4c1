"""Runs tests/interpreted (the Triton kernels on CPU) in a process of its own, where
TRITON_INTERPRET=1 is set before triton is imported."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", GN_DET_TRITON_ON_CPU="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
         os.path.join(HERE, "interpreted")],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
