"""Verification at first use (gn_det/policy/verification.py) with the Triton kernels run by the
interpreter: kernels made to fail through the test hook ``inject_fault`` (a real Triton compile
error, triton's OutOfResources at launch, a result made wrong) on the eager, recomputed and
fused-residual paths, forward and backward; and two GLOO processes where only one rank's kernels
fail. Small shapes: the interpreter is slow."""
import json
import os
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import gn_det
from gn_det.ops import triton_launch
from gn_det.ops.torch_path import TORCH_PATH, Backend
from gn_det.policy import calls as policy_calls
from gn_det.policy import tuning, verification
from gn_det import policy
from gn_cases import GRAD_TOLERANCE, TOLERANCE, assert_close, make_affine, make_input

SHAPE, GROUPS = (2, 8, 4, 4), 2


@pytest.fixture
def verifying(tmp_path):
    """Verification on for the interpreter, tuning off, decisions kept under tmp_path."""
    previous = (verification.set_verification(True, on_cpu=True), gn_det.set_autotune(False),
                gn_det.set_tuning_cache(tmp_path))
    tuning.clear_decisions()
    tuning.STORE.warned.clear()
    yield tmp_path
    tuning.clear_decisions()
    verification.set_verification(*previous[0][:1], on_cpu=previous[0][1])
    gn_det.set_autotune(previous[1][0], on_cpu=previous[1][1])
    gn_det.set_tuning_cache(previous[2])


def _step(path: str):
    """One training step of a GN on ``path``; returns the output and the gradients of x,
    gamma, beta (and the residual)."""
    x = make_input(SHAPE).requires_grad_()
    weight, bias = (t.requires_grad_() for t in make_affine(SHAPE[1]))
    leaves = [x, weight, bias]
    if path == "eager":
        y = gn_det.group_norm(x, GROUPS, weight, bias, activation="relu")
        out = y
    elif path == "residual":
        residual = make_input(SHAPE, seed=3).requires_grad_()
        leaves.append(residual)
        y = out = gn_det.group_norm(x, GROUPS, weight, bias, activation="relu", residual=residual)
    else:  # recomputed: the output is not saved by its consumer, GN's forward runs again in backward
        scale = make_input(SHAPE, seed=4)
        with gn_det.recompute_outputs():
            y = gn_det.group_norm(x, GROUPS, weight, bias, activation="relu", output_recomputed=True)
            gn_det.recompute.record_output(y, bias, 1e-5)
            out = y * scale  # saves y: a handle, recomputed in backward
    grad = make_input(SHAPE, seed=5)
    grads = torch.autograd.grad(out, leaves, grad)
    return [y.detach()] + list(grads)


@pytest.mark.parametrize("path", ["eager", "recomputed", "residual"])
@pytest.mark.parametrize("fault", verification.FAULTS)
def test_failing_kernels_fall_back_to_pytorch_once_and_are_recorded(verifying, fault, path):
    previous = policy.set_backend("torch")
    expected = _step(path)  # the PyTorch path throughout
    policy.set_backend(previous)
    for kernel_set in verification.KERNEL_SET_NAMES:
        gn_det.set_tuning_cache(verifying / kernel_set)
        tuning.clear_decisions()
        tuning.STORE.warned.clear()
        with warnings.catch_warnings(record=True) as caught, verification.inject_fault(kernel_set, fault):
            warnings.simplefilter("always")
            got = _step(path)  # training goes on
            again = _step(path)  # the bucket is decided: no second warning
        ours = [w for w in caught if "Triton GroupNorm kernels are not used" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        message = str(ours[0].message)
        for part in ("cpu (Triton interpreter)", f"torch {torch.__version__}", "triton ", "group_elements_log2=",
                     f"their {kernel_set}", "python -m gn_det.env", str(verifying / kernel_set)):
            assert part in message, (part, message)
        assert ("raised" if fault != "wrong" else "largest difference") in message
        for name, a, b, c in zip(("y", "dx", "dgamma", "dbeta", "dresidual"), got, again, expected):
            tol = (TOLERANCE if name == "y" else GRAD_TOLERANCE)[torch.float32]
            assert_close(a, c, tol, f"{kernel_set} {fault} {path}: {name}")
            assert_close(b, c, tol, f"{kernel_set} {fault} {path}, second step: {name}")
        if kernel_set == "forward":  # the forward's result is PyTorch's own
            assert torch.equal(got[0], expected[0])
        failed = [r for r in tuning.decisions() if r["kind"] == "verification" and not r["passed"]]
        assert len(failed) == 1 and failed[0]["check"].startswith(kernel_set) and failed[0]["source"] == "verified"
        # A new process reads the failure from the disk cache and does not try the kernels again.
        tuning.clear_decisions()
        tuning.STORE.warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = make_input(SHAPE)
            assert policy.dispatch_path(x, GROUPS, "relu", residual=path == "residual").startswith(
                "PyTorch: gn_det's PyTorch path (the kernels failed verification here")
            reloaded = _step(path)
        assert [r["source"] for r in tuning.decisions() if not r.get("passed", True)] == ["disk cache"]
        assert not [r for r in tuning.decisions() if r.get("passed")]  # nothing verified: the kernels did not run
        assert len([w for w in caught if "Triton GroupNorm kernels are not used" in str(w.message)]) == 1
        for a, c in zip(reloaded, expected):
            assert_close(a, c, GRAD_TOLERANCE[torch.float32], f"{kernel_set} {fault} {path}: reloaded")


@pytest.mark.parametrize("path_set", verification.PYTORCH_PATH_NAMES)
def test_a_wrong_pytorch_path_is_overruled_by_a_float64_reference(verifying, path_set):
    # On an H200, ATen's CUDA GroupNorm backward read channels_last memory as NCHW: verification
    # then failed the right kernels and returned the wrong gradients. Where the two paths
    # disagree, a float64 reference now says which one is wrong.
    previous = policy.set_backend("torch")
    expected = _step("residual")  # the PyTorch path, right
    policy.set_backend(previous)
    with warnings.catch_warnings(record=True) as caught, verification.inject_fault(path_set, "wrong"):
        warnings.simplefilter("always")
        got = _step("residual")
        _step("residual")  # decided: no second warning
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "kernels are not used" in m], messages
    ours = [m for m in messages if "PyTorch path (ATen's GroupNorm) gave a wrong" in m]
    assert len(ours) == 1 and "float64 reference" in ours[0], messages
    for name, a, c in zip(("y", "dx", "dgamma", "dbeta", "dresidual"), got, expected):
        assert_close(a, c, (TOLERANCE if name == "y" else GRAD_TOLERANCE)[torch.float32], f"{path_set}: {name}")
    rows = [r for r in tuning.decisions() if r["kind"] == "verification"]
    assert rows and all(r["passed"] for r in rows)
    assert [r["check"].split(",")[0] for r in rows if "float64 reference" in r["detail"]] == [path_set.split()[1]]


def test_a_comparison_that_raises_fails_the_kernels_without_arbitration(verifying, monkeypatch):
    # Kernels whose result cannot even be compared (here statistics of the wrong shape) fail
    # like kernels that raise: the PyTorch path's result, no float64 reference asked, nothing raised.
    original = triton_launch.TritonPlans.forward

    def misshapen(plans, *args):
        y, mean, rstd = original(plans, *args)
        return y, mean.reshape(-1, 1), rstd.reshape(-1, 1)

    asked = []
    monkeypatch.setattr(triton_launch.TritonPlans, "forward", misshapen)
    monkeypatch.setattr(verification, "_sides_with_kernels", lambda *a: asked.append(a) or True)
    previous = policy.set_backend("torch")
    expected = _step("eager")
    policy.set_backend(previous)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _step("eager")
    assert asked == [] and any("kernels are not used" in str(w.message) for w in caught)
    assert torch.equal(got[0], expected[0])


def test_kernels_that_agree_are_used_and_verified_once(verifying, monkeypatch):
    got = _step("residual")
    rows = [r for r in tuning.decisions() if r["kind"] == "verification"]
    assert sorted(r["check"] for r in rows) == ["backward, output kept", "forward"] and all(r["passed"] for r in rows)
    calls = []
    counted = Backend(lambda *a: calls.append(a) or TORCH_PATH.forward(*a), TORCH_PATH.backward)
    monkeypatch.setattr(policy_calls, "TORCH_PATH", counted)  # the PyTorch path the policy decides with
    again = _step("residual")  # decided: the kernels alone
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(got, again))


def _rank_process(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    verification.set_verification(True, on_cpu=True)
    gn_det.set_autotune(False)
    gn_det.set_tuning_cache(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if rank == 1:  # only rank 1's kernels are wrong
            with verification.inject_fault("forward", "wrong"):
                _step("eager")
        else:
            _step("eager")
            gn_det.group_norm(make_input((1, 4, 3, 3)), 2)  # a bucket only rank 0 meets
        adopted = gn_det.synchronize_decisions()
        gn_det.synchronize_decisions()  # nothing new: nobody waits on anybody
        path = policy.dispatch_path(make_input(SHAPE), GROUPS, "relu")
        _step("eager")  # the next step: the PyTorch path on both ranks (rank 0 warns now, naming rank 1)
    rows = [r for r in tuning.decisions() if r["check"] == "forward" and r["shape"] == list(SHAPE)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rows": rows, "adopted": adopted, "path": path,
                   "warnings": [str(w.message) for w in caught if "kernels are not used" in str(w.message)]}, f)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_agree_when_one_ranks_kernels_fail(tmp_path):
    context = mp.start_processes(_rank_process, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # a deadlock would hang here: fail instead
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError("the ranks did not finish: a deadlock")
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    for rank in ranks:  # both hold the failure: the kernels are used on neither for that bucket
        (row,) = rank["rows"]
        assert not row["passed"] and "largest difference" in row["detail"]
        assert rank["path"].startswith("PyTorch: gn_det's PyTorch path")
        assert len(rank["warnings"]) == 1
    assert ranks[0]["rows"][0]["source"] == "rank 1" and ranks[1]["rows"][0]["source"] == "verified"
    assert "verification (rank 1: output: largest difference" in ranks[0]["warnings"][0]
    assert ranks[0]["adopted"] == 1 and ranks[1]["adopted"] >= 1  # rank 1 adopts rank 0's passes


def test_benchmark_norm_reports_the_verification_that_ran(verifying):
    # tools/benchmark_norm.py's per-row verification column, from real verifications: a bucket
    # whose kernels were made wrong reads as failed, one whose kernels agreed as passed.
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "tools"))
    try:
        from benchmark_norm import describe_verification, verification_of
    finally:
        sys.path.pop(0)
    wrong, right = make_input((1, 32, 2, 2)), make_input((1, 32, 4, 4), seed=1)
    with warnings.catch_warnings(), verification.inject_fault("forward", "wrong"):
        warnings.simplefilter("ignore")
        gn_det.group_norm(wrong, 32, activation="relu")
    gn_det.group_norm(right, 32, activation="relu")
    failed, passed = (verification_of(gn_det.decisions(), x, relu=True) for x in (wrong, right))
    assert [(c["check"], c["passed"], c["source"]) for c in failed] == [("forward", False, "verified")]
    described = describe_verification(failed)
    assert described.startswith("forward FAILED (") and "PyTorch's path since" in described
    assert describe_verification(passed) == "forward passed"
    assert verification_of(gn_det.decisions(), wrong, relu=False) == []  # no activation: another bucket
