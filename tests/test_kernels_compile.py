"""The Triton kernels compile for the H100/H200 (sm_90) on a machine without a GPU, at the
specialisations real launches produce, without register spills (tools/compile_kernels.py).
The interpreter tests check what the kernels compute; this checks that the GPU compiler
accepts them, which the interpreter does not (it never folds arguments equal to 1 into
constants, for one)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GN_DET_TRITON_ON_CPU")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_kernels.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    assert " 0 failed or spilled" in out
    kernels = {line.split()[0] for line in out.splitlines() if line.startswith("_")}
    assert kernels == {"_group_forward_kernel", "_group_backward_kernel", "_stats_partial_kernel",
                       "_stats_finalize_kernel", "_forward_apply_kernel", "_backward_partial_kernel",
                       "_backward_finalize_kernel", "_backward_apply_kernel"}, kernels
