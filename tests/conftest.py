import os
import shutil
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests' shared helpers (gn_cases)

# Under pytest-xdist (make test: 2 workers on 2 cores), one thread per worker and per process it
# starts: torch's default of one per core would put twice as many busy threads as cores, and
# OpenMP threads that wait spin. Set before torch is imported (the test modules import it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# GN tuning decisions (GPU runs, and tests that turn tuning on) go to a folder of this run,
# not the user's cache; set before gn_det is imported, and inherited by subprocesses.
_TUNING_CACHE = tempfile.mkdtemp(prefix="gn_det_tuning_")
os.environ["GN_DET_CACHE_DIR"] = _TUNING_CACHE

# tests/interpreted runs the Triton kernels on CPU; TRITON_INTERPRET must be set before
# triton is imported, so those tests run in their own process (test_triton_interpreted.py).
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreted"]

INTERPRETER_SUITE = "test_triton_interpreted.py::test_triton_kernels_under_interpreter"

# One name per session, shared with pytest-xdist's workers (they inherit the environment of the
# process that starts them, which imports this file first): the interpreter suite's run folder.
# (Not a GN_DET_* name: gn_det refuses variables of its prefix that it does not read.)
_OWNS_RUN = "GN_TESTS_SESSION" not in os.environ  # this process started the session (not a worker, nor a suite it ran)
os.environ.setdefault("GN_TESTS_SESSION", uuid.uuid4().hex)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only a selected suite starts
def pytest_collection_modifyitems(config, items):
    """When the interpreter suite is selected, start its process now (once per session, in
    whichever process collects first), beside the other tests, and run the test that waits
    for it last (with --dist loadfile, its file is the last one handed out)."""
    waiting = [item for item in items if item.nodeid.endswith(INTERPRETER_SUITE)]
    if waiting and not config.option.collectonly:
        items[:] = [item for item in items if item not in waiting] + waiting
        waiting[0].module.start_in_background()


def pytest_sessionfinish(session, exitstatus):
    if _OWNS_RUN:  # the process that ends the session: after every xdist worker
        import test_triton_interpreted

        test_triton_interpreted.stop()
    shutil.rmtree(_TUNING_CACHE, ignore_errors=True)
