"""paths.decide, the one function that chooses a call's path: each step of its order (its
module docstring) on CPU, with the path and the reason it gives, and group_norm running what
it chose. The Triton kernels' steps (kernels, verification fallback) run under the interpreter:
tests/interpreted/test_paths.py; an unsupported GPU: tests/test_kernel_support.py."""
import dataclasses
import json
import time

import pytest
import torch

import gn_det
from gn_det.policy import paths, routing, switches, tuning
from gn_det.ops.activation import ACT_NONE, ACT_RELU, RESIDUAL_ADD
from gn_det.ops.autograd import OpCall
from gn_det.ops.torch_path import TORCH_PATH
from gn_det.ops.functional import aten_group_norm
from gn_cases import make_affine, make_input

CL = torch.channels_last


@pytest.fixture
def cpu_tuning(tmp_path):
    """Tuning on for CPU inputs, decisions in this process only; settings restored after."""
    previous = gn_det.set_autotune(True, on_cpu=True), gn_det.set_tuning_cache(None)
    tuning.clear_decisions()
    yield
    tuning.clear_decisions()
    gn_det.set_autotune(previous[0][0], on_cpu=previous[0][1])
    gn_det.set_tuning_cache(previous[1])


def test_plain_gn_on_contiguous_cpu_tensors_is_atens_own_op():
    x = make_input((2, 8, 5, 6))
    choice = paths.decide(x, 4, ACT_NONE)
    assert choice == (paths.ATEN, "plain GN on a contiguous CPU tensor: ATen's GroupNorm and autograd")
    assert type(gn_det.group_norm(x.requires_grad_(), 4).grad_fn).__name__ == "NativeGroupNormBackward0"
    # An activation, a residual, channels_last or bfloat16 take the op's path instead.
    for other in (paths.decide(x, 4, ACT_RELU), paths.decide(x, 4, ACT_NONE, x),
                  paths.decide(x.to(memory_format=CL), 4, ACT_NONE), paths.decide(x.bfloat16(), 4, ACT_NONE)):
        assert other.path == paths.TORCH and other.reason.startswith("cpu tensor (the Triton kernels run on CUDA")


def test_tracing_records_standard_operators():
    seen = []

    def traced(t):
        seen.append(paths.decide(t, 4, ACT_RELU))
        return gn_det.group_norm(t, 4, activation="relu")

    graph = torch.jit.trace(traced, make_input((2, 8, 5, 6)), check_trace=False).graph
    assert seen == [(paths.EXPORT, "tracing or export: standard operators only")]
    assert "aten::group_norm" in str(graph) and "aten::relu" in str(graph)


def test_compiled_graphs_hold_the_custom_op():
    seen = []

    def compiled(t):
        seen.append(paths.decide(t, 4, ACT_RELU))
        return t + 1

    torch.compile(compiled, backend="eager")(make_input((2, 8, 5, 6)))
    assert seen == [(paths.CUSTOM_OP, "inside torch.compile: the graph holds the custom op")]


def test_empty_inputs_take_the_ops_path_without_tuning(cpu_tuning):
    # (tuning's bucket of an empty input would be log2(0): it is never asked)
    x = torch.zeros(0, 8, 5, 6).to(memory_format=CL)
    choice = paths.decide(x, 4, ACT_RELU)
    assert choice.path == paths.TORCH and choice.reason.startswith("empty input, nothing to compute: cpu tensor")
    assert gn_det.group_norm(x, 4, activation="relu").shape == x.shape
    assert gn_det.autotune_decisions() == []


def _runners(slow):
    def make(path, run):
        def runner(x, weight, bias, residual):
            if path == slow:
                time.sleep(0.05)
            return run(x, weight, bias, residual)
        return runner
    return {"kernels": make("kernels", _op_path),
            "aten": make("aten", lambda x, w, b, r: aten_group_norm(x, 4, w, b, 1e-5, ACT_RELU, r))}


def test_tuning_chooses_aten_where_measured_faster(cpu_tuning):
    x = make_input((2, 8, 5, 6), memory_format=CL)
    weight, bias = make_affine(8)
    # No decision yet and nothing to measure with: the op's path, said so.
    assert paths.decide(x, 4, ACT_RELU, train=False) == (paths.TORCH, "not tuned yet: cpu tensor (the Triton "
                                                         "kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 "
                                                         "GN_DET_TRITON_ON_CPU=1)")

    def measure(train):
        assert train is False  # (nothing here requires a gradient)
        return tuning.measure_decision(x, weight, bias, None, 4, ACT_RELU, train, _runners(slow="kernels"))

    choice = paths.decide(x, 4, ACT_RELU, None, weight, bias, measure=measure)
    assert choice == (paths.ATEN_TUNED, "tuned: ATen's GroupNorm measured faster for this bucket")
    explained = paths.decide(x, 4, ACT_RELU, train=False, explain=True)
    assert explained.path == paths.ATEN_TUNED and explained.reason.startswith("tuned (measured: kernels ")
    assert paths.dispatch_path(x, 4, "relu", train=False).startswith("PyTorch: ATen GroupNorm, tuned (measured: ")
    # The output recomputed: never ATen's GroupNorm (it would keep its output).
    assert paths.decide(x, 4, ACT_RELU, train=False, output_recomputed=True).path == paths.TORCH
    # Tuning off: decisions are not used.
    gn_det.set_autotune(False)
    assert paths.decide(x, 4, ACT_RELU, train=False).path == paths.TORCH


def test_a_route_sends_its_bucket_to_aten(cpu_tuning, tmp_path):
    x = make_input((2, 8, 5, 6), memory_format=CL)
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"routes": [dict(zip(routing.ROUTE_FIELDS, routing.route_key_of(x, 4, ACT_RELU)),
                                                  measured="a test")]}))
    previous = routing.set_routes(routes)
    try:
        # A seed decision where tuning holds none (tuning on, for CPU inputs here).
        assert paths.decide(x, 4, ACT_RELU, train=True) == (paths.ATEN_TUNED, "routed (Triton measured slower here)")
        assert paths.dispatch_path(x, 4, "relu") == "PyTorch: ATen GroupNorm, routed (Triton measured slower here)"
        assert paths.decide(x, 4, ACT_NONE, train=True).path == paths.TORCH  # another bucket
    finally:
        routing.set_routes(previous)
    assert paths.decide(x, 4, ACT_RELU, train=True).path == paths.TORCH


def test_the_torch_backend_and_float64_take_the_pytorch_path():
    x = make_input((2, 8, 5, 6), memory_format=CL)
    previous = switches.set_backend("torch")
    try:
        assert paths.decide(x, 4, ACT_RELU) == (paths.TORCH, "the backend is 'torch' (set_backend / GN_DET_BACKEND)")
    finally:
        switches.set_backend(previous)
    assert paths.decide(x.double(), 4, ACT_RELU) == (paths.TORCH, "float64: the exact PyTorch path, for reference checks")
    assert paths.dispatch_path(x, 4, "relu") == "PyTorch: channels_last statistics + ATen backward"
    assert paths.dispatch_path(x.contiguous(), 4, "relu") == "PyTorch: ATen GroupNorm + activation"
    assert paths.dispatch_path(x[:0], 4, "relu") == "nothing (empty input)"


def test_the_switches_are_one_object_written_by_their_setters():
    before = dataclasses.replace(switches.SWITCHES)
    try:
        assert switches.set_backend("torch") == before.backend and switches.SWITCHES.backend == "torch"
        assert gn_det.set_autotune(False, on_cpu=True) == (before.autotune, before.autotune_on_cpu)
        assert switches.set_verification(False) == (before.verify, before.verify_on_cpu)
        assert switches.SWITCHES == switches.Switches(backend="torch", autotune=False, autotune_on_cpu=True,
                                                      verify=False, verify_on_cpu=False)
        assert gn_det.policy.backend() == "torch" and not tuning.autotune_enabled()
        with pytest.raises(ValueError, match="'cuda' is not a gn_det backend"):
            switches.set_backend("cuda")
        assert switches.SWITCHES.backend == "torch"  # a refused value changes nothing
    finally:
        switches.set_backend(before.backend)
        gn_det.set_autotune(before.autotune, on_cpu=before.autotune_on_cpu)
        switches.set_verification(before.verify, on_cpu=before.verify_on_cpu)
    assert switches.SWITCHES == before


def _op_path(x, w, b, r):
    """The op on the PyTorch path, as a tuning candidate (with autograd when x requires grad)."""
    mode = RESIDUAL_ADD if r is not None else 0
    return OpCall(TORCH_PATH, 4, 1e-5, ACT_RELU, mode, torch.is_grad_enabled() and x.requires_grad, True)(x, w, b, r)
