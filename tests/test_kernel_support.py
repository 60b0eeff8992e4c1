"""Which GPUs, dtypes and tritons the Triton kernels run on (gn_det.policy.support), decided
before anything compiles; what `python -m gn_det.env` says about it."""
import warnings

import pytest
import torch
import triton

from gn_det import env
from gn_det.ops import occupancy
from gn_det.policy import support
from gn_det.policy import backend, triton_enabled_for


@pytest.mark.parametrize("arch,dtype,runs", [
    (60, torch.float32, False),  # Pascal: not supported by triton, never compiled for
    (61, torch.float16, False),
    (70, torch.float32, True), (70, torch.float16, True), (70, torch.bfloat16, False),  # V100: no bfloat16
    (75, torch.float16, True), (75, torch.bfloat16, False),  # T4
    (80, torch.bfloat16, True), (86, torch.bfloat16, True), (89, torch.float16, True),
    (90, torch.bfloat16, True), (100, torch.float32, True), (120, torch.bfloat16, True),
    (87, torch.bfloat16, True), (103, torch.float32, True), (121, torch.float16, True),  # same family as listed ones
    (130, torch.float32, False),  # newer than anything compiled for
    (90, torch.float64, False), (90, torch.int32, False),
])
def test_architecture_support(arch, dtype, runs):
    reason = support.architecture_support(arch, dtype)
    assert (reason is None) == runs, reason
    if not runs:
        assert f"sm_{arch}" in reason or str(dtype) in reason, reason


def test_reasons_say_what_is_needed():
    assert "8.0" in support.architecture_support(75, torch.bfloat16)
    assert "7.0" in support.architecture_support(60, torch.float32)


def test_every_supported_architecture_has_limits():
    # tools/compile_kernels.py sizes grids and checks limits by these; a supported
    # architecture without them would be checked against an H100's.
    assert set(support.SUPPORTED_ARCHITECTURES) <= set(occupancy.ARCHITECTURES)
    for arch in support.SUPPORTED_ARCHITECTURES:
        limits = occupancy.ARCHITECTURES[arch]
        assert limits.sms > 0 and limits.shared_bytes_per_block <= limits.shared_bytes
        assert limits.warps * 32 >= 1024  # a block of 32 warps fits: the kernels use 8 at most


OLD_TRITON = support._version_tuple(triton.__version__) < support.MIN_TRITON  # (compat_check's torch 2.5 venv)


@pytest.mark.skipif(OLD_TRITON, reason="this triton is older than the kernels need (test_triton_version_gate)")
def test_installed_triton_is_supported():
    # The set-up's triton (3.8) is within the range; the check reads its version.
    assert support.triton_support() is None


def test_installed_triton_is_judged_by_its_version():
    assert support.triton_support() == support.triton_version_support(triton.__version__)


@pytest.mark.parametrize("version,runs", [("3.0.0", False), ("3.1.0", False), ("3.1.1+gitabc", False),
                                          ("3.2.0", True), ("3.3.1", True), ("3.8.0", True), ("3.10.1+git4f2e", True)])
def test_triton_version_gate(version, runs):
    # torch 2.5 brings triton 3.1, whose interpreter cannot run the kernels (README: Compatibility).
    reason = support.triton_version_support(version)
    assert (reason is None) == runs, reason
    if not runs:  # names the triton found, the one needed and the torch that brings it
        assert f"triton {version} is older than 3.2" in reason and "torch (2.6 or newer" in reason, reason


def _decisions_and_warnings(calls):
    support._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = [support.decide_support(*call) for call in calls]
    return found, [str(w.message) for w in caught]


def test_old_triton_turns_the_kernels_off_with_one_warning():
    why = support.triton_version_support("3.1.0")
    calls = [(f"GPU {i} (NVIDIA H100 (sm_90))", 90, dtype, why)
             for i in (0, 1) for dtype in (torch.float32, torch.float16, torch.bfloat16)] * 2
    found, said = _decisions_and_warnings(calls)
    assert not any(f.ok for f in found) and all(f.reason.endswith(why) for f in found)
    assert found[0].reason.startswith("GPU 0 (NVIDIA H100 (sm_90)), float32: triton 3.1.0 is older than 3.2")
    assert len(said) == 1 and "triton 3.1.0 is older than 3.2" in said[0] and "every GPU" in said[0], said


def test_architecture_refusals_warn_once_per_gpu_and_dtype():
    t4, p100 = "GPU 0 (Tesla T4 (sm_75))", "GPU 1 (Tesla P100 (sm_60))"
    calls = [(t4, 75, torch.bfloat16, None), (t4, 75, torch.float16, None),
             (p100, 60, torch.float32, None), (p100, 60, torch.float16, None)]
    found, said = _decisions_and_warnings(calls * 2)
    assert [f.ok for f in found[:4]] == [False, True, False, False]
    assert len(said) == 3 and all("Triton kernels off for this GPU and dtype (GPU" in s for s in said), said


def test_version_tuple():
    assert support._version_tuple("3.1.0") < support.MIN_TRITON <= support._version_tuple("3.2.0")
    assert support._version_tuple("3.10.1+git4f2e") == (3, 10)


def test_not_cuda_is_refused():
    found = support.kernels_support(torch.device("cpu"), torch.float32)
    assert not found.ok and "cpu" in found.reason


def test_cpu_tensors_stay_off_the_kernels_without_the_interpreter():
    assert not triton_enabled_for(torch.zeros(2, 4, 3))


def test_env_reports_support():
    line = env.supported_line()
    assert "sm_70" in line and "sm_120" in line and "bfloat16 from sm_80" in line
    assert ("this triton runs them" in line) == (not OLD_TRITON)
    rows = dict(env.collect_env())
    assert rows["gn_det kernels"] == line


def test_env_reports_an_old_triton_with_the_reason():
    line = env.supported_line_for(support.triton_version_support("3.1.0"))
    assert line.endswith("triton 3.2+; off here: triton 3.1.0 is older than 3.2, the oldest gn_det's kernels are "
                         "checked with: upgrade torch (2.6 or newer brings triton 3.2+)"), line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_this_gpu_support_matches_its_capability():
    major, minor = torch.cuda.get_device_capability(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        found = support.kernels_support(torch.device("cuda", 0), dtype)
        assert found.ok == (support.architecture_support(10 * major + minor, dtype) is None
                            and support.triton_support() is None)
        x = torch.zeros(2, 4, 3, device="cuda", dtype=dtype)
        assert triton_enabled_for(x) == (found.ok and backend() == "auto")
    assert "GPU 0 kernels" in dict(env.collect_env())
