"""The policy's decided calls (gn_det.policy.calls): one decision per input signature, found by
one lookup on a repeat call, and forgotten by everything that changes a decision."""
import json

import pytest
import torch

import gn_det
from gn_cases import ALL_ACTIVATIONS
from gn_det.ops.autograd import OpCall
from gn_det.ops.functional import AtenCall
from gn_det.policy import calls, routing, switches, tuning
from gn_det.policy.calls import call_for
from gn_det.ops.activation import ACT_NONE, ACT_RELU
from gn_det.policy.switches import CALLS

CL = torch.channels_last


@pytest.fixture(autouse=True)
def fresh_calls():
    CALLS.clear()
    yield
    CALLS.clear()


def _layer_call(layer, x):
    return call_for(x, layer.num_groups, layer.weight, layer.bias, layer.eps, layer._act)


def test_a_repeat_call_finds_its_decision_by_one_lookup():
    layer = gn_det.GroupNorm(4, 8, activation="relu")
    x = torch.randn(2, 8, 5, 5).to(memory_format=CL)
    layer(x)
    assert len(CALLS) == 1
    (call,) = CALLS.values()
    assert isinstance(call, OpCall) and call.records_grad  # (the layer's parameters require grad)
    for _ in range(3):
        layer(x)
    assert list(CALLS.values()) == [call] and _layer_call(layer, x) is call
    # (a decision is not made again: _decide is not reached on a repeat call)
    real_decide = calls._decide
    made = []
    calls._decide = lambda *args: made.append(args) or real_decide(*args)
    try:
        layer(x)
        assert not made
        layer(torch.randn(3, 8, 5, 5))  # a new signature is decided
        assert len(made) == 1
    finally:
        calls._decide = real_decide


@pytest.mark.parametrize("change", ["shape", "strides", "dtype", "alignment", "grad", "residual dtype", "groups",
                                    "eps", "activation", "recomputed", "weight dtype", "no bias"])
def test_the_key_holds_what_a_decision_depends_on(change):
    x = torch.randn(2, 8, 6, 6)
    w, b, r = torch.ones(8), torch.zeros(8), torch.randn(2, 8, 6, 6)
    args = dict(x=x, num_groups=4, weight=w, bias=b, eps=1e-5, code=ACT_RELU, residual=r, output_recomputed=False,
                records_grad=False)
    base = calls.call_key(**args)
    other = dict(args)
    if change == "shape":
        other["x"] = torch.randn(2, 8, 6, 7)
    elif change == "strides":
        other["x"] = x.to(memory_format=CL)
    elif change == "dtype":
        other["x"] = x.double()
    elif change == "alignment":  # the same shape and strides, 4 bytes further: Triton specialises on it
        other["x"] = torch.randn(2 * 8 * 36 + 1)[1:].view(2, 8, 6, 6)
    elif change == "grad":
        other["records_grad"] = True
    elif change == "residual dtype":
        other["residual"] = r.half()
    elif change == "groups":
        other["num_groups"] = 2
    elif change == "eps":
        other["eps"] = 1e-6
    elif change == "activation":
        other["code"] = ACT_NONE
    elif change == "recomputed":
        other["output_recomputed"] = True
    elif change == "weight dtype":
        other["weight"] = w.half()
    elif change == "no bias":
        other["bias"] = None
    assert calls.call_key(**other) != base


def test_no_autograd_runs_under_no_grad():
    layer = gn_det.GroupNorm(4, 8, activation="relu")
    x = torch.randn(2, 8, 5, 5).to(memory_format=CL)  # (channels_last: the op's own path, not ATen's)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None
    (call,) = CALLS.values()
    assert isinstance(call, OpCall) and not call.records_grad
    y_train = layer(x)
    assert y_train.grad_fn is not None and len(CALLS) == 2
    torch.testing.assert_close(y, y_train.detach())


def _filled():
    layer = gn_det.GroupNorm(4, 8, activation="relu")
    layer(torch.randn(2, 8, 5, 5).to(memory_format=CL))
    layer(torch.randn(2, 8, 5, 5))
    assert len(CALLS) == 2


@pytest.mark.parametrize("setter", ["set_backend", "set_autotune", "set_verification", "clear_decisions",
                                    "set_tuning_cache", "set_routes", "record_verification", "measure_decision"])
def test_what_changes_a_decision_empties_the_decided_calls(setter, tmp_path):
    _filled()
    if setter == "set_backend":
        switches.set_backend(switches.set_backend("torch"))
    elif setter == "set_autotune":
        enabled, on_cpu = switches.set_autotune(False)
        switches.set_autotune(enabled, on_cpu=on_cpu)
    elif setter == "set_verification":
        enabled, on_cpu = switches.set_verification(True)
        switches.set_verification(enabled, on_cpu=on_cpu)
    elif setter == "clear_decisions":
        tuning.clear_decisions()
    elif setter == "set_tuning_cache":
        gn_det.set_tuning_cache(gn_det.set_tuning_cache(None))
    elif setter == "set_routes":
        path = tmp_path / "routes.json"
        path.write_text(json.dumps({"routes": []}))
        routing.set_routes(routing.set_routes(path))
    elif setter == "record_verification":
        key = ("cpu", "float32", "nchw", "relu", 6, 2, False, "split reduction")
        previous = gn_det.set_tuning_cache(None)
        try:
            tuning.record_verification(tuning.Verification(key, "forward", True, "agreed", "verified", (2, 8, 5, 5)))
        finally:
            gn_det.set_tuning_cache(previous)
            tuning.clear_decisions()
    elif setter == "measure_decision":
        previous = gn_det.set_tuning_cache(None)
        x = torch.randn(2, 8, 5, 5)
        w, b = torch.ones(8), torch.zeros(8)
        try:
            aten = AtenCall(4, 1e-5, ACT_RELU, plain=False)
            tuning.measure_decision(x, w, b, None, 4, ACT_RELU, False, {"kernels": aten, "aten": aten})
        finally:
            gn_det.set_tuning_cache(previous)
            tuning.clear_decisions()
    assert not CALLS


def test_the_decided_calls_are_bounded():
    previous = switches.CALLS_MAX
    switches.CALLS_MAX = 3
    try:
        layer = gn_det.GroupNorm(2, 4, activation="relu")
        for size in range(3, 10):
            layer(torch.randn(1, 4, size, size).to(memory_format=CL))
            assert len(CALLS) <= 3
    finally:
        switches.CALLS_MAX = previous


def test_a_call_decided_across_a_change_is_not_kept():
    """A thread that decided under the old switches while another changed them (which empties
    CALLS) does not put its stale decision back."""
    CALLS.clear()
    layer = gn_det.GroupNorm(2, 4, activation="relu")
    x = torch.randn(1, 4, 5, 5).to(memory_format=CL)
    generation = CALLS.generation
    stale = calls._decide(x, 2, layer.weight, layer.bias, 1e-5, layer._act, None, False, True)[0]
    previous = gn_det.policy.set_backend("torch")  # another thread's change, while this one decided
    try:
        CALLS.keep(("stale",), stale, generation)
        assert ("stale",) not in CALLS
        CALLS.keep(("fresh",), stale, CALLS.generation)
        assert ("fresh",) in CALLS
    finally:
        gn_det.policy.set_backend(previous)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_every_activation_refuses_an_empty_spatial_size_as_group_norm_does(activation, memory_format):
    layer = gn_det.GroupNorm(4, 8, activation=activation)
    x = torch.zeros(2, 8, 0, 5).to(memory_format=memory_format)
    with pytest.raises(RuntimeError):
        torch.nn.functional.group_norm(x, 4)  # (torch's own refusal, which gn_det follows)
    with pytest.raises(ValueError, match="empty spatial size"):
        layer(x)
    with pytest.raises(ValueError, match="empty spatial size"):
        layer.half()(x.half()) if activation else gn_det.group_norm(x.half(), 4, activation=activation)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_every_activation_returns_no_rois_as_group_norm_does(activation):
    layer = gn_det.GroupNorm(4, 8, activation=activation)
    x = torch.zeros(0, 8, 7, 7, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad is not None


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_no_rois_keep_the_inputs_dtype_and_layout(activation):
    x = torch.zeros(0, 8, 3, 3, dtype=torch.bfloat16).to(memory_format=CL)
    y = gn_det.group_norm(x, 4, torch.ones(8), torch.zeros(8), activation=activation, residual=torch.zeros(0, 8, 3, 3))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)


def test_arguments_that_are_not_tensors_get_the_checked_error():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="residual must be a tensor"):
        gn_det.group_norm(x, 2, residual=3.0)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        gn_det.group_norm([1.0, 2.0], 2)


def test_a_triton_plans_object_is_not_a_backend_to_hand_out():
    from gn_det.ops.functional import group_norm_op
    from gn_det.ops.triton_launch import TritonPlans

    with pytest.raises(ValueError, match="one input signature"):
        group_norm_op(torch.randn(2, 4, 3, 3), 2, backend=TritonPlans())


def test_a_layer_pickled_with_activation_as_an_attribute_loads():
    import pickle

    layer = gn_det.GroupNorm(2, 4, activation="relu")
    state = layer.__dict__.copy()
    state["activation"] = state.pop("_act") and "relu"  # (how an older gn_det pickled it)
    old = gn_det.GroupNorm.__new__(gn_det.GroupNorm)
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    assert again.activation == "relu" and torch.equal(again(torch.randn(1, 4, 2, 2)).clamp(max=0), torch.zeros(1, 4, 2, 2))
