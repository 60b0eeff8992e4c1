"""tools/setup_env.sh: idempotent on a complete environment; a failure names its step and
package instead of printing pip's whole output."""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "setup_env.sh")


def test_second_run_does_nothing():
    env = dict(os.environ, GN_DET_VENV=sys.prefix)  # the environment running these tests
    start = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "installing" not in proc.stdout, proc.stdout
    assert proc.stdout.count("in place") >= 3 and "detectron2: kept" in proc.stdout, proc.stdout
    assert elapsed < 120, f"a no-op setup took {elapsed:.0f} s"


def test_unreachable_registry_names_step_and_package(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = dict(
        os.environ,
        GN_DET_VENV=str(tmp_path / "venv"),
        PIP_CONFIG_FILE=os.devnull,  # no extra index or find-links from the machine's pip config
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(empty),
    )
    env.pop("PIP_EXTRA_INDEX_URL", None)
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "FAILED at step 'torch' (package: torch==2.14.1 torchvision==0.29.1)" in out, out
    assert "No matching distribution" in out or "Could not find a version" in out, out
    assert "full log:" in out
    assert len(out.splitlines()) < 20, "the failure should be a short message, not pip's whole output"


def test_too_little_disk_fails_before_pip(tmp_path):
    # A fresh venv cannot hold the torch pair: the free space is checked before pip unpacks it.
    env = dict(os.environ, GN_DET_VENV=str(tmp_path / "venv"), GN_DET_TORCH_FREE_MB=str(10**12))
    start = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "FAILED at step 'torch'" in out and "MB free on the disk of" in out, out
    assert "installing torch" not in out, out
    assert not (tmp_path / "venv" / "setup-logs").exists(), "pip should not have run"
    assert time.monotonic() - start < 60
