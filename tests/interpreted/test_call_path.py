"""The call path of the Triton kernels as a model calls them (under Triton's interpreter): a
repeat call plans nothing and reaches the launch through at most 5 gn_det frames in 3 files,
with verification and tuning on."""
import os
import sys

import pytest
import torch

import gn_det
from gn_det.ops import triton_kernels, triton_launch
from gn_det.policy import switches
from gn_det.policy.switches import CALLS

PACKAGE = os.path.dirname(os.path.abspath(gn_det.__file__))
KERNELS = [getattr(triton_kernels, name) for name in dir(triton_kernels) if name.endswith("_kernel")]


@pytest.fixture
def tuned_and_verified():
    """Tuning on (its default: it measures CUDA inputs; on CPU the interpreter would always lose
    to ATen, so CPU inputs are not tuned) and verification on for the interpreter too
    (conftest.py): the switches a GPU call runs with."""
    previous = switches.set_autotune(True)
    CALLS.clear()
    yield
    switches.set_autotune(previous[0], on_cpu=previous[1])
    CALLS.clear()


def _gn_det_frames():
    """(function, file) of the gn_det frames on the stack above the caller."""
    frames, frame = [], sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(PACKAGE + os.sep):
            frames.append((frame.f_code.co_name, os.path.relpath(path, PACKAGE)))
        frame = frame.f_back
    return frames


@pytest.fixture
def launches(monkeypatch):
    """Every launch of a gn_det kernel, as the gn_det frames that led to it (each kernel's
    ``run``, which ``kernel[grid](...)`` calls, is wrapped to look at its stack)."""
    seen = []
    for kernel in KERNELS:
        real = kernel.run

        def run(*args, _real=real, **kwargs):
            seen.append(_gn_det_frames())
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return seen


@pytest.fixture
def plans(monkeypatch):
    """How many plans are made (the real planning functions, counted)."""
    made = []
    for name in ("plan_forward", "plan_backward"):
        real = getattr(triton_launch, name)
        monkeypatch.setattr(triton_launch, name,
                            lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    return made


@pytest.mark.parametrize("shape,memory_format", [((1, 16, 24, 24), torch.channels_last)])  # the split reduction:
# the longest path (three launches forward, three backward); one program per group has fewer
def test_a_repeat_call_plans_nothing_and_launches_within_five_frames_in_three_files(
        shape, memory_format, tuned_and_verified, launches, plans):
    layer = gn_det.GroupNorm(2, shape[1], activation="relu")
    x = torch.randn(shape).to(memory_format=memory_format).requires_grad_()
    for _ in range(2):  # the first: tuning, verification, planning; the second: verification settled
        layer(x).sum().backward()
    decided = [c for c in CALLS.values() if type(c.backend).__name__ == "TritonPlans"]
    assert decided, f"the kernels were not decided for this input: {list(CALLS.values())}"
    plans.clear()
    launches.clear()
    y = layer(x)
    y.sum().backward()
    assert plans == [], "a repeat call planned"
    assert launches, "no kernel was launched"
    for frames in launches:
        files = {path for _, path in frames}
        assert len(frames) <= 5 and len(files) <= 3, frames
    forward = launches[0]
    assert forward[-1] == ("forward", os.path.join("layers", "group_norm.py")), forward
    with torch.no_grad():  # a signature of its own (no autograd machinery: one frame fewer)
        layer(x)
        layer(x)
        plans.clear()
        launches.clear()
        layer(x)
        assert launches and all(len(frames) <= 4 for frames in launches) and plans == []
