"""Verification's comparison and records on CPU (gn_det/policy/verification.py, tuning.py);
the kernels themselves, faults injected, run in tests/interpreted/test_verification.py and
tests/test_group_norm_cuda.py."""
import json

import pytest
import torch

import gn_det
from gn_det.policy import tuning, verification
from gn_det.tolerances import STATS_TOLERANCE, TOLERANCE
from gn_det.ops.activation import ACT_RELU
from gn_det.ops.torch_path import torch_group_norm_backward, torch_group_norm_forward
from gn_cases import make_affine, make_input

KEY = ("cpu", "float32", "nchw", "relu", 6, 2, False, "split reduction")


def _forward(dtype=torch.float32, mean=0.0, std=1.0):
    x = make_input((2, 8, 4, 4), dtype=dtype, mean=mean, std=std)
    weight, bias = make_affine(8)
    return x, weight, torch_group_norm_forward(x, weight, bias, None, 2, 1e-5, ACT_RELU)


def _backward(shape, groups, activation, seed):
    """PyTorch's GN backward of a random dy at a random x of ``shape`` (N, C): (x, weight, mean,
    rstd, dy, (dx, dgamma, dbeta, None)), for the judge (verification._backward_difference)."""
    x = make_input(shape)
    weight, bias = make_affine(shape[1])
    y, mean, rstd = torch_group_norm_forward(x, weight, bias, None, groups, 1e-5, activation)
    dy = make_input(shape, seed=seed)
    grads = torch_group_norm_backward(dy, x, weight, bias, mean, rstd, None, groups, 1e-5, activation)
    return x, weight, mean, rstd, dy, (*grads[:3], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_differences_within_tolerance_pass_and_beyond_fail(dtype):
    x, weight, (y, mean, rstd) = _forward(dtype)
    tol = TOLERANCE[dtype]
    scale = y.float().abs().max().item()
    assert verification._forward_difference((y, mean, rstd), (y, mean, rstd), dtype, weight) is None
    for off, passes in ((0.4, True), (3.0, False)):  # fractions of the tolerance, on the largest element
        wrong = y.clone()
        wrong.view(-1)[y.float().abs().argmax()] += torch.tensor(off * tol * scale, dtype=dtype)
        problem = verification._forward_difference((wrong, mean, rstd), (y, mean, rstd), dtype, weight)
        assert (problem is None) is passes, problem
    problem = verification._forward_difference((y, mean * 0 + float("nan"), rstd), (y, mean, rstd), dtype, weight)
    assert problem.startswith("mean: 4 element(s) non-finite in one path only")
    # NaN where PyTorch's has NaN too (the input held one) agrees.
    nan = y.clone()
    nan.view(-1)[0] = float("nan")
    assert verification._forward_difference((nan, mean, rstd), (nan.clone(), mean, rstd), dtype, weight) is None


def test_statistics_compare_relative_to_their_spread_and_condition():
    # A zero-mean group's mean is all rounding: judged against |mean| + std, not |mean|.
    x, weight, (y, mean, rstd) = _forward()
    mean0 = torch.zeros_like(mean)
    off = mean0 + 0.5 * STATS_TOLERANCE / rstd  # half the tolerance of the std
    assert verification._forward_difference((y, off, rstd), (y, mean0, rstd), torch.float32, weight) is None
    assert verification._forward_difference((y, mean0 + 1e-3, rstd), (y, mean0, rstd), torch.float32, weight)
    # A large mean against the standard deviation loosens y's tolerance by |mean| * rstd.
    x, weight, (y, mean, rstd) = _forward(mean=1e4)
    assert verification._condition(mean, rstd) > 1e3
    wrong = y.clone()
    wrong.view(-1)[0] += 1e-3 * y.abs().max()  # 100x float32's tolerance, within the condition's
    assert verification._forward_difference((wrong, mean, rstd), (y, mean, rstd), torch.float32, weight) is None


def test_backward_differences_name_the_gradient():
    x, weight, (y, mean, rstd) = _forward()
    bias = torch.zeros(8)
    dy = torch.randn_like(x)
    grads = torch_group_norm_backward(dy, x, weight, bias, mean, rstd, None, 2, 1e-5, ACT_RELU)
    assert verification._backward_difference(grads, grads, dy, x, weight, mean, rstd, None, ACT_RELU) is None
    wrong = (grads[0], grads[1] * 1.01, grads[2], None)
    assert verification._backward_difference(wrong, grads, dy, x, weight, mean, rstd, None, ACT_RELU).startswith("dgamma:")
    wrong = (grads[0] + 1e-3 * dy, grads[1], grads[2], None)
    assert verification._backward_difference(wrong, grads, dy, x, weight, mean, rstd, None, ACT_RELU).startswith("dx:")


def test_gradients_that_cancel_are_judged_against_their_terms():
    # Groups of two elements: dx cancels to rounding (|dx| ~ 1e-3 of its terms), so float32
    # rounding of the terms, 1e-6 of them, is 1e-3 of the result: not a fault.
    x, weight, mean, rstd, dy, grads = _backward((2, 6), 3, 0, seed=5)
    rounded = (grads[0] + 1e-6 * dy.abs().max() * weight.abs().max() * rstd.max(), *grads[1:3], None)
    assert rounded[0].sub(grads[0]).abs().max() > 1e-4 * grads[0].abs().max()  # large against the result
    assert verification._backward_difference(rounded, grads, dy, x, weight, mean, rstd, None, ACT_RELU) is None
    wrong = (grads[0] * 3, *grads[1:3], None)  # cancels wrong: caught
    assert verification._backward_difference(wrong, grads, dy, x, weight, mean, rstd, None, ACT_RELU)


def test_switches_and_hook_check_their_arguments():
    with pytest.raises(TypeError, match="set_verification takes booleans"):
        verification.set_verification("1")
    with pytest.raises(ValueError, match="kernel_set is one of"):
        with verification.inject_fault("apply", "wrong"):
            pass
    with verification.inject_fault("forward", "wrong"), verification.inject_fault("forward", "launch"):
        assert verification._faults == {"forward": "launch"}
    assert verification._faults == {}


def test_outcomes_are_recorded_listed_and_failures_reloaded_from_disk(tmp_path):
    previous = gn_det.set_tuning_cache(tmp_path)
    tuning.clear_decisions()
    try:
        tuning.record_verification(tuning.Verification(KEY, "forward", True, "agreed", "verified", (2, 8, 4, 4)))
        tuning.record_verification(tuning.Verification(KEY, "backward", False, "dx: largest difference 1", "verified",
                                                       (2, 8, 4, 4)))
        rows = gn_det.decisions()
        assert [(r["kind"], r["check"], r["passed"]) for r in rows] == [
            ("verification", "backward", False), ("verification", "forward", True)]
        assert rows[0]["kernels"] == "split reduction" and rows[0]["detail"] == "dx: largest difference 1"
        assert gn_det.autotune_decisions() == []  # the tuning decisions alone
        (path,) = tmp_path.iterdir()
        assert [json.loads(line)["check"] for line in path.read_text().splitlines()] == ["forward", "backward"]
        # Another process: the failure is read (the bucket stays off the kernels), the pass is not
        # (each process verifies again), and recording the same outcome again adds no line.
        tuning.clear_decisions()
        failed = tuning.failed_verification(KEY)
        assert failed.source == "disk cache" and failed.check == "backward"
        assert [r["check"] for r in gn_det.decisions()] == ["backward"]
        tuning.record_verification(tuning.Verification(KEY, "forward", True, "agreed", "verified", (2, 8, 4, 4)))
        assert len(path.read_text().splitlines()) == 2
    finally:
        tuning.clear_decisions()
        gn_det.set_tuning_cache(previous)


def test_gradients_of_groups_of_one_value_are_judged_against_the_gradient_they_sum():
    # G = C: xhat is 0, dgamma is the rounding of x * scale + shift (rstd = 1/sqrt(eps)) times dy:
    # 1e-5 where PyTorch's is 0. Judged against sum |dy| (xhat's RMS is 1 in a group): not a fault.
    x, weight, mean, rstd, dy, grads = _backward((4, 8), 8, 2, seed=2)
    rounded = (grads[0], grads[1] + 1.2e-5, grads[2], None)
    assert verification._backward_difference(rounded, grads, dy, x, weight, mean, rstd, None, ACT_RELU) is None
    wrong = (grads[0], grads[1] + 0.5, grads[2], None)
    assert verification._backward_difference(wrong, grads, dy, x, weight, mean, rstd, None, ACT_RELU).startswith("dgamma:")
