import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests' shared helpers (gn_cases)

# GN tuning decisions (GPU runs, and tests that turn tuning on) go to a folder of this run,
# not the user's cache; set before gn_det is imported, and inherited by subprocesses.
_TUNING_CACHE = tempfile.mkdtemp(prefix="gn_det_tuning_")
os.environ["GN_DET_CACHE_DIR"] = _TUNING_CACHE

# tests/interpreted runs the Triton kernels on CPU; TRITON_INTERPRET must be set before
# triton is imported, so those tests run in their own process (test_triton_interpreted.py).
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreted"]

INTERPRETER_SUITE = "test_triton_interpreted.py::test_triton_kernels_under_interpreter"
_started = []  # the module that started the interpreter suite


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only a selected suite starts
def pytest_collection_modifyitems(config, items):
    """When the interpreter suite is selected, start its process now, beside the other tests,
    and run the test that waits for it last."""
    waiting = [item for item in items if item.nodeid.endswith(INTERPRETER_SUITE)]
    if waiting and not config.option.collectonly:
        items[:] = [item for item in items if item not in waiting] + waiting
        waiting[0].module.start_in_background()
        _started.append(waiting[0].module)


def pytest_sessionfinish(session, exitstatus):
    for module in _started:
        module.stop()
    shutil.rmtree(_TUNING_CACHE, ignore_errors=True)
