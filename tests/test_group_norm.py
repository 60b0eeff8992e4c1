"""gn_det.GroupNorm / gn_det.group_norm on CPU (the PyTorch path) against float64
F.group_norm, and the layer's contract: drop-in for nn.GroupNorm (every constructor argument,
bias=False included), errors, autocast, torch.compile, tracing and ONNX export, saved
activation memory."""
import inspect
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gn_det
from gn_det.ops.activation import ACT_RELU
from gn_det.ops.functional import aten_group_norm
from gn_det.layers import group_norm as group_norm_module
from gn_det.layers.group_norm import resolve_num_groups
from gn_cases import (ALL_ACTIVATIONS, ACT_FNS, GRAD_TOLERANCE, LAYER_CASES, TOLERANCE, assert_close, check_forward_backward,
                      check_one_value_per_group, check_residual, check_scale_without_shift, check_strided_inputs,
                      export_onnx, make_affine, make_input, reference)

NN_HAS_BIAS = "bias" in inspect.signature(nn.GroupNorm.__init__).parameters  # torch >= 2.14

CL = torch.channels_last
CL3D = torch.channels_last_3d
CF = torch.contiguous_format


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("shape,groups,memory_format", LAYER_CASES)
def test_matches_reference(shape, groups, memory_format, activation):
    check_forward_backward(shape, groups, memory_format=memory_format, activation=activation)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [CF, CL])
def test_half_precision_keeps_dtype(dtype, memory_format):
    check_forward_backward((2, 16, 9, 10), 4, dtype=dtype, memory_format=memory_format, activation="relu")


def test_random_odd_shapes():
    rng = random.Random(0)
    for trial in range(12):
        rank = rng.choice([2, 3, 4, 5])
        groups = rng.choice([1, 2, 3, 5])
        channels = groups * rng.randint(1, 4)
        shape = [rng.randint(1, 3), channels] + [rng.choice([1, 2, 3, 5, 7, 11]) for _ in range(rank - 2)]
        fmt = {4: rng.choice([CF, CL]), 5: rng.choice([CF, CL3D])}.get(rank, CF)
        check_forward_backward(tuple(shape), groups, memory_format=fmt, activation=rng.choice([None, "silu"]),
                               affine=rng.random() < 0.8, seed=trial)


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (0, 8)])
def test_empty_input(shape):  # (an empty spatial size is refused: tests/test_calls.py)
    m = gn_det.GroupNorm(4, 8, activation="relu")
    x = torch.zeros(shape, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(m.weight.grad, torch.zeros(8)) and torch.equal(m.bias.grad, torch.zeros(8))


def test_one_group_is_layer_norm_with_per_channel_affine():
    x = make_input((2, 6, 5, 4))
    weight, bias = make_affine(6)
    y = gn_det.group_norm(x, 1, weight, bias)
    expected = F.layer_norm(x, x.shape[1:]) * weight.view(1, 6, 1, 1) + bias.view(1, 6, 1, 1)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_groups_equal_channels_is_instance_norm():
    x = make_input((2, 6, 5, 4))
    weight, bias = make_affine(6)
    y = gn_det.group_norm(x, 6, weight, bias)
    torch.testing.assert_close(y, F.instance_norm(x, weight=weight, bias=bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", [CF, CL])
def test_large_mean_is_accurate(memory_format):
    # mean/std = 1e4. torch 2.14's own CPU GroupNorm on channels_last float32 input is off
    # by 20%-165% here; gn_det computes channels_last statistics itself (two-pass + Chan).
    x = make_input((2, 32, 16, 16), memory_format=memory_format, mean=1e4, std=1.0)
    weight, bias = make_affine(32)
    y = gn_det.group_norm(x, 8, weight, bias)
    ref = reference(x, 8, weight, bias, 1e-5, None)
    rel_l2 = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel_l2 < 1e-3, rel_l2


def _rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("shape, memory_format", [((2, 32, 16, 16), CF), ((2, 32, 16, 16), CL), ((2, 16, 4, 6, 5), CL3D)])
def test_large_mean_gradients_are_accurate(shape, memory_format):
    # mean/std = 1e3, fused ReLU: the gradients are accurate too. In float32 the activation's
    # input z carries an absolute error of ~ulp(1e3) = 6e-5, so a z that close to 0 can take
    # the other side of ReLU than in float64, and one such element moves dx by O(1). The
    # reference therefore uses our forward's own mask (y > 0): this also checks that the
    # backward's recomputed mask agrees with the forward's output.
    x = make_input(shape, memory_format=memory_format, mean=1e3, std=1.0).requires_grad_()
    weight, bias = make_affine(shape[1])
    weight.requires_grad_()
    bias.requires_grad_()
    grad = make_input(shape, memory_format=memory_format, seed=5)
    y = gn_det.group_norm(x, 8, weight, bias, activation="relu")
    y.backward(grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    F.group_norm(x64, 8, w64, b64, 1e-5).backward(grad.double() * (y.detach() > 0))
    for name, actual, expected in (("x", x.grad, x64.grad), ("weight", weight.grad, w64.grad), ("bias", bias.grad, b64.grad)):
        assert _rel_l2(actual, expected) < 1e-3, (name, _rel_l2(actual, expected))
    assert x.grad.is_contiguous(memory_format=memory_format)


def test_one_value_per_group():
    check_one_value_per_group()


def test_constant_group_is_finite():
    x = torch.full((2, 4, 3, 3), 7.0, requires_grad=True)
    weight, bias = make_affine(4)
    y = gn_det.group_norm(x, 2, weight, bias, activation="silu")
    assert torch.isfinite(y).all()
    # rstd = 1/sqrt(eps) ~ 316 amplifies the float32 rounding of the mean (ulp(7) ~ 5e-7).
    torch.testing.assert_close(y, F.silu(bias).view(1, 4, 1, 1).expand_as(y), atol=5e-4, rtol=0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_fp16_near_range():
    # Values up to ~6e4: their squares overflow float16, the float32 statistics do not.
    x = (make_input((2, 8, 12, 12), dtype=torch.float64) * 2e4).clamp(-6.5e4, 6.5e4).half()
    weight, bias = make_affine(8)
    y = gn_det.group_norm(x, 4, weight, bias)
    assert torch.isfinite(y).all()
    assert_close(y, reference(x, 4, weight, bias, 1e-5, None), TOLERANCE[torch.float16], "fp16 near range")


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("memory_format", [CF, CL])
def test_gradcheck_float64(activation, memory_format):
    x = make_input((2, 6, 3, 4), dtype=torch.float64, memory_format=memory_format).requires_grad_()
    weight, bias = make_affine(6, dtype=torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, w, b: gn_det.group_norm(a, 3, w, b, 1e-5, activation), (x, weight, bias), eps=1e-6, atol=1e-6
    )


def test_gradcheck_no_affine():
    x = make_input((3, 4, 5), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: gn_det.group_norm(a, 2, activation="silu"), (x,))


def test_strided_views_and_odd_gradients():
    check_strided_inputs()


def test_nan_and_inf_propagate_like_nn_group_norm():
    x = make_input((2, 8, 4, 4))
    x[0, 0, 1, 1] = float("nan")
    x[1, 7, 0, 0] = float("inf")
    ours = gn_det.GroupNorm(4, 8)(x)
    theirs = nn.GroupNorm(4, 8)(x)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.isfinite(ours[0, 2:]).all() and torch.isfinite(ours[1, :6]).all()  # other groups untouched


# ----------------------------------------------------------------------------- the module


def test_module_is_drop_in_for_nn_group_norm():
    ours = gn_det.GroupNorm(4, 12)
    theirs = nn.GroupNorm(4, 12)
    assert isinstance(ours, nn.GroupNorm)
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.bias.uniform_()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 12, 5, 6))
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    plain = gn_det.GroupNorm(4, 12, eps=1e-3, affine=False)
    assert plain.weight is None and plain.eps == 1e-3
    torch.testing.assert_close(plain(x), F.group_norm(x, 4, eps=1e-3), atol=1e-6, rtol=1e-6)


def _positional(params):
    return [name for name, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def test_constructor_takes_every_nn_group_norm_argument():
    # The installed torch's own signature is the reference: each of its arguments is taken,
    # of the same kind (positional or keyword-only), in the same position, with the same default.
    ours = inspect.signature(gn_det.GroupNorm.__init__).parameters
    theirs = inspect.signature(nn.GroupNorm.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, f"nn.GroupNorm's argument {name!r} is missing"
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, name
    assert _positional(ours) == _positional(theirs)  # gn_det's own activation is keyword-only
    assert ours["bias"].kind is inspect.Parameter.KEYWORD_ONLY and ours["bias"].default is True  # with any torch
    assert ours["activation"].kind is inspect.Parameter.KEYWORD_ONLY and ours["activation"].default is None


def test_constructor_positional_device_and_dtype_like_nn_group_norm():
    ours = gn_det.GroupNorm(4, 8, 1e-3, True, "cpu", torch.float64)
    theirs = nn.GroupNorm(4, 8, 1e-3, True, "cpu", torch.float64)
    assert ours.weight.dtype == theirs.weight.dtype == torch.float64 and ours.eps == theirs.eps == 1e-3
    assert ours.bias.dtype == torch.float64


@pytest.mark.skipif(not NN_HAS_BIAS, reason="this torch's nn.GroupNorm has no bias argument")
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("shape,groups,memory_format", LAYER_CASES)
def test_scale_without_shift_matches_nn_group_norm(shape, groups, memory_format, activation):
    theirs = nn.GroupNorm(groups, shape[1], bias=False)
    ours = gn_det.GroupNorm(groups, shape[1], bias=False, activation=activation)
    with torch.no_grad():
        theirs.weight.copy_(make_affine(shape[1])[0])
    assert ours.bias is None and theirs.bias is None
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    ours.load_state_dict(theirs.state_dict())
    if activation is None:
        assert repr(ours) == repr(theirs)
    x = make_input(shape, memory_format=memory_format).requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    y, y_theirs = ours(x), ACT_FNS[activation](theirs(x_theirs))
    torch.testing.assert_close(y, y_theirs, atol=1e-5, rtol=1e-5)
    grad = make_input(shape, memory_format=memory_format, seed=3)
    y.backward(grad)
    y_theirs.backward(grad)
    assert_close(x.grad, x_theirs.grad, GRAD_TOLERANCE[torch.float32], "dx")
    assert_close(ours.weight.grad, theirs.weight.grad, GRAD_TOLERANCE[torch.float32], "dweight")
    check_scale_without_shift(shape, groups, memory_format=memory_format, activation=activation)  # float64 reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [CF, CL])
def test_scale_without_shift_half_precision(dtype, memory_format):
    check_scale_without_shift((2, 16, 9, 10), 4, dtype=dtype, memory_format=memory_format, activation="relu")


def test_scale_without_shift_with_a_torch_before_the_bias_argument(monkeypatch):
    # An older torch's nn.GroupNorm has no bias argument: gn_det then registers the shift as
    # None itself. Simulated here with the installed torch's constructor minus that argument.
    real_init = nn.GroupNorm.__init__

    def init_without_bias(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        real_init(self, num_groups, num_channels, eps, affine, device, dtype)

    monkeypatch.setattr(nn.GroupNorm, "__init__", init_without_bias)
    monkeypatch.setattr(group_norm_module, "_NN_GROUP_NORM_HAS_BIAS", False)
    m = gn_det.GroupNorm(4, 8, bias=False, activation="relu")
    assert m.bias is None and list(m.state_dict()) == ["weight"] and "bias=False" in repr(m)
    m.reset_parameters()  # nn.GroupNorm's own would zero a None bias
    assert torch.equal(m.weight, torch.ones(8))
    assert gn_det.GroupNorm(4, 8).bias is not None
    plain = gn_det.GroupNorm(4, 8, affine=False, bias=False)
    assert plain.weight is None and plain.bias is None
    check_scale_without_shift((2, 8, 5, 6), 4, activation="silu")
    check_scale_without_shift((2, 8, 5, 6), 4, memory_format=CL)
    monkeypatch.undo()
    if NN_HAS_BIAS:  # the state_dict is the installed torch's
        m.load_state_dict(nn.GroupNorm(4, 8, bias=False).state_dict())


def test_from_channels_and_factory_take_bias():
    m = gn_det.GroupNorm.from_channels(64, channels_per_group=8, bias=False)
    assert m.num_groups == 8 and m.bias is None and m.weight.shape == (64,)
    make = gn_det.GroupNorm.factory(num_groups=16, bias=False, activation="relu")
    m = make(64)
    assert m.num_groups == 16 and m.bias is None and m.activation == "relu"
    assert make(32).bias is None


@pytest.mark.parametrize("memory_format", [CF, CL])
def test_scale_without_shift_on_the_aten_route(memory_format):
    # The path a measured route sends a shape to (PyTorch's GroupNorm) with no shift, and
    # with neither scale nor shift.
    x = make_input((2, 8, 5, 6), memory_format=memory_format).requires_grad_()
    weight = make_affine(8)[0].requires_grad_()
    y = aten_group_norm(x, 4, weight, None, 1e-5, ACT_RELU)
    assert y.is_contiguous(memory_format=memory_format)
    assert_close(y, reference(x, 4, weight, None, 1e-5, "relu"), TOLERANCE[torch.float32], "aten route, bias None")
    y.sum().backward()
    assert weight.grad is not None and torch.isfinite(x.grad).all()
    assert_close(aten_group_norm(x, 4, None, None, 1e-5, ACT_RELU), reference(x, 4, None, None, 1e-5, "relu"),
                 TOLERANCE[torch.float32], "aten route, no affine")


def test_module_with_activation_keeps_state_dict_and_repr():
    m = gn_det.GroupNorm(2, 8, activation="ReLU")
    assert m.activation == "relu"
    assert list(m.state_dict()) == ["weight", "bias"]
    assert "activation=relu" in repr(m)
    x = make_input((2, 8, 3, 3))
    torch.testing.assert_close(m(x), F.relu(F.group_norm(x, 2, m.weight, m.bias)))


def test_num_groups_from_groups_or_channels_per_group():
    assert resolve_num_groups(256, num_groups=32) == 32
    assert resolve_num_groups(256, channels_per_group=16) == 16
    assert resolve_num_groups(256, num_groups=32, channels_per_group=64) == 4  # channels_per_group wins
    m = gn_det.GroupNorm.from_channels(64, channels_per_group=8)
    assert m.num_groups == 8 and m.num_channels == 64
    with pytest.raises(ValueError, match=r"^num_groups=32 does not divide the 48 channels .*\(in layer 'res2.conv1'\)$"):
        resolve_num_groups(48, num_groups=32, layer="res2.conv1")
    with pytest.raises(ValueError, match=r"^channels_per_group=16 does not divide the 50 channels of a GN layer"):
        resolve_num_groups(50, channels_per_group=16)
    with pytest.raises(ValueError, match=r"^num_groups=4 does not divide the 10 channels .*\(in GroupNorm\)$"):
        gn_det.GroupNorm(4, 10)


def test_bad_inputs_have_clear_errors():
    m = gn_det.GroupNorm(4, 8)
    with pytest.raises(ValueError, match=r"at least 2 dims, got shape \(8,\)"):
        m(torch.zeros(8))
    with pytest.raises(ValueError, match=r"weight has shape \(8,\), expected \(12,\)"):
        m(torch.zeros(2, 12, 3, 3))
    with pytest.raises(ValueError, match="6 channels .* not divisible into num_groups=4"):
        gn_det.group_norm(torch.zeros(2, 6, 3), 4)
    with pytest.raises(TypeError, match="dtype torch.int64 is not supported"):
        m(torch.zeros(2, 8, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="Unknown GN activation 'tanh'"):
        gn_det.GroupNorm(4, 8, activation="tanh")
    with pytest.raises(ValueError, match=r"^eps=-1.0: eps must be > 0"):
        gn_det.GroupNorm(4, 8, eps=-1.0)


def test_autocast_keeps_input_dtype():
    # nn.GroupNorm is on autocast's float32 list; gn_det runs in the input's dtype.
    m = gn_det.GroupNorm(4, 16, activation="relu")
    x = make_input((2, 16, 6, 6), dtype=torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert_close(y, reference(x, 4, m.weight, m.bias, 1e-5, "relu"), TOLERANCE[torch.bfloat16], "autocast")


# ----------------------------------------------------------------------------- compile/trace/export


def _conv_gn(activation="relu", bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), gn_det.GroupNorm(2, 8, activation=activation, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
def test_torch_compile_fullgraph(bias):
    model = _conv_gn(bias=bias)
    compiled = torch.compile(model, fullgraph=True)
    x = make_input((2, 3, 9, 9))
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    grads_compiled = [p.grad.clone() for p in model.parameters()]  # conv weight and bias, gamma (and beta)
    model.zero_grad()
    model(x).sum().backward()
    for compiled_grad, p in zip(grads_compiled, model.parameters()):
        torch.testing.assert_close(compiled_grad, p.grad, atol=1e-5, rtol=1e-5)
    assert model[1].bias is None or model[1].bias.grad is not None


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch 2.5 registers it, for ONNX export")
def test_the_forward_op_has_no_registered_decomposition():
    # With one, inductor's fallback for the op raises wherever CI is set in the environment
    # (GitHub Actions, GitLab CI, ... set it): torch's own CI check in make_fallback, reached
    # when a compiled graph holds the op (seen in make test's -n 2 runs, CI=true).
    from torch._decomp import decomposition_table, get_decompositions

    assert _FORWARD_OP not in decomposition_table and not get_decompositions([_FORWARD_OP])


def test_torch_compile_records_the_op_not_the_export_path():
    # The compiled graph holds gn_det's op (the Triton kernels on CUDA), not group_norm's export
    # path: torch 2.7's dynamo (2.7.1 measured) folds torch.compiler.is_exporting() to True in
    # every torch.compile trace.
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_conv_gn(), backend=recording_backend, fullgraph=True)(make_input((2, 3, 9, 9)))
    assert any("gn_det.group_norm_forward" in t for t in targets) and not any("group_norm" in t and "gn_det" not in t
                                                                            for t in targets), targets


@pytest.mark.parametrize("bias", [True, False])
def test_jit_trace_records_standard_ops(bias):
    model = _conv_gn(bias=bias)
    x = make_input((2, 3, 9, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::group_norm" in kinds and "aten::relu" in kinds
    assert not any(kind.startswith("gn_det::") for kind in kinds)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("dynamo,bias", [(False, True), (True, True), (False, False), (True, False)])
def test_onnx_export_uses_standard_ops(dynamo, bias):
    pytest.importorskip("onnx")  # installed by make setup (requirements/test.txt)
    model = _conv_gn(bias=bias)
    x = make_input((2, 3, 9, 9))
    # (dynamo on torch 2.5: through the op's decomposition, test_onnx_exports_a_graph_holding_the_op)
    proto = export_onnx(model, x, dynamo)
    ops = {node.op_type for node in proto.graph.node}
    assert {"InstanceNormalization", "Relu"} <= ops or {"GroupNormalization", "Relu"} <= ops, ops
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    _check_onnx_runs_like(proto, model, x)


def _check_onnx_runs_like(proto, model: nn.Module, x: torch.Tensor) -> None:
    """The ONNX model, run by onnx's reference evaluator, gives the module's output."""
    reference_evaluator = pytest.importorskip("onnx.reference")
    (out,) = reference_evaluator.ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)


_FORWARD_OP = torch.ops.gn_det.group_norm_forward.default


@pytest.mark.parametrize("dtype,activation,residual,memory_format", [
    (torch.float32, None, False, CF), (torch.float32, "relu", True, CL), (torch.float32, "silu", True, CF),
    (torch.float16, "relu", True, CL), (torch.bfloat16, "silu", False, CF), (torch.float64, None, True, CF)])
def test_forward_op_decomposition_matches_the_op(dtype, activation, residual, memory_format):
    # What ONNX's dynamo=True exporter puts in place of the op on torch 2.5 (torch._decomp's table there).
    from gn_det.ops.activation import activation_code
    from gn_det.policy.calls import group_norm_forward_decomposition as decomposition
    x = make_input((2, 8, 5, 6), dtype=dtype, memory_format=memory_format)
    weight, bias = make_affine(8)
    res = make_input((2, 8, 5, 6), dtype=dtype, seed=3) if residual else None
    args = (x, weight, bias, 4, 1e-5, activation_code(activation), res)
    expected, got = _FORWARD_OP(*args), decomposition(*args)
    for name, e, g in zip(("output", "mean", "rstd"), expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert_close(g, e, TOLERANCE[dtype], f"decomposition's {name}")


@pytest.mark.skipif(hasattr(torch.compiler, "is_exporting"), reason="torch 2.6+: exported graphs do not hold the op "
                    "(test_onnx_export_uses_standard_ops), and its decomposition is not registered")
def test_onnx_exports_a_graph_holding_the_op():
    # torch 2.5 cannot tell export from torch.compile (no torch.compiler.is_exporting), so
    # the graphs it exports hold gn_det's op: ONNX export decomposes it into standard ops.
    onnx = pytest.importorskip("onnx")

    class HoldsTheOp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gn = _conv_gn(activation="silu")

        def forward(self, x):
            y = self.conv(x)
            return _FORWARD_OP(y, self.gn.weight, self.gn.bias, 2, 1e-5, 2, y)[0]

    model = HoldsTheOp().eval()
    x = make_input((2, 3, 9, 9))
    program = torch.export.export(model, (x,))
    assert _FORWARD_OP in {node.target for node in program.graph.nodes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(program, dynamo=True, verbose=False).model_proto
    assert {"Sigmoid"} <= {node.op_type for node in proto.graph.node}
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node), onnx.helper.printable_graph(proto.graph)
    _check_onnx_runs_like(proto, model, x)


# ----------------------------------------------------------------------------- memory


def _saved_bytes(fn, x) -> int:
    """Bytes of the distinct tensor storages autograd saves while running fn(x)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    storages.pop(x.untyped_storage().data_ptr(), None)  # the input is kept alive by its producer anyway
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_fused_activation_saves_no_output(activation):
    x = make_input((2, 64, 32, 32)).requires_grad_()
    ours = gn_det.GroupNorm(32, 64, activation=activation)
    plain = nn.GroupNorm(32, 64)
    ours_saved = _saved_bytes(ours, x)
    theirs_saved = _saved_bytes(lambda t: ACT_FNS[activation](plain(t)), x)
    # gn_det saves only the (N, G) statistics beside x; GroupNorm + activation also saves a
    # full activation-sized tensor (ReLU's output or SiLU's input).
    assert ours_saved < 4096, ours_saved
    assert theirs_saved >= x.numel() * x.element_size(), theirs_saved


def test_backend_is_set_explicitly_and_checked(monkeypatch):
    from gn_det.policy import backend, backend_from_environment, set_backend, triton_enabled_for

    monkeypatch.setenv("GN_DET_BACKEND", "trition")
    with pytest.raises(ValueError, match=r"GN_DET_BACKEND='trition' is not a gn_det backend: use 'auto'"):
        backend_from_environment()
    monkeypatch.setenv("GN_DET_BACKEND", "Torch")
    assert backend_from_environment() == "torch"
    assert backend() == "auto"  # the variable is read once, at import, not on every call
    with pytest.raises(ValueError, match=r"'trition' is not a gn_det backend"):
        set_backend("trition")
    previous = set_backend("torch")
    try:
        assert previous == "auto" and backend() == "torch" and not triton_enabled_for(torch.zeros(2, 4, 3))
    finally:
        set_backend(previous)
    assert backend() == "auto"


def test_a_bad_backend_variable_fails_at_import():
    env = dict(os.environ, GN_DET_BACKEND="trition")
    proc = subprocess.run([sys.executable, "-c", "import gn_det"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "GN_DET_BACKEND='trition' is not a gn_det backend" in proc.stderr


def test_double_backward_is_refused_clearly():
    # gn_det's backward is not differentiable (the Triton kernels are not): a second-order
    # gradient must raise, not come out silently wrong.
    x = make_input((2, 8, 5, 5)).requires_grad_()
    y = gn_det.group_norm(x, 4, activation="relu")
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


# ----------------------------------------------------------------------------- residual (block ends)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("output_recomputed", [False, True])
@pytest.mark.parametrize("shape,groups,memory_format", [LAYER_CASES[2], LAYER_CASES[3], LAYER_CASES[1]])
def test_residual_matches_reference(shape, groups, memory_format, activation, output_recomputed):
    check_residual(shape, groups, memory_format=memory_format, activation=activation,
                   output_recomputed=output_recomputed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_half_precision_and_mixed_layouts_and_dtypes(dtype):
    check_residual((2, 16, 9, 10), 4, dtype=dtype, memory_format=CL, residual_format=CF)
    check_residual((2, 16, 9, 10), 4, dtype=dtype, residual_dtype=torch.float32, output_recomputed=True)
    check_residual((2, 16, 9, 10), 4, dtype=torch.float32, residual_dtype=dtype)


def test_residual_block_end_keeps_what_the_next_layer_keeps():
    # relu(GN(x) + r): backward keeps x and the output (which a following conv keeps anyway),
    # not the sum, and not r; when the output is to be recomputed it keeps r instead.
    x, r = make_input((2, 64, 16, 16)).requires_grad_(), make_input((2, 64, 16, 16), seed=3).requires_grad_()
    layer = gn_det.GroupNorm(32, 64)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer.forward_residual(x, r)
    big = {ptr for ptr, t in kept.items() if t.numel() == x.numel()}
    assert big == {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gn_det.group_norm(x, 32, layer.weight, layer.bias, activation="relu", residual=r, output_recomputed=True)
    big = {ptr for ptr, t in kept.items() if t.numel() == x.numel()}
    assert big == {x.untyped_storage().data_ptr(), r.untyped_storage().data_ptr()}


def test_residual_bad_inputs_have_clear_errors():
    x = make_input((2, 8, 5, 5))
    with pytest.raises(ValueError, match=r"residual must be a tensor of the input's shape \(2, 8, 5, 5\).*\(2, 8, 5, 1\)"):
        gn_det.group_norm(x, 4, residual=x[..., :1])
    with pytest.raises(TypeError, match="residual dtype torch.int64 is not supported"):
        gn_det.group_norm(x, 4, residual=torch.ones(2, 8, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="applies its own activation \\('relu'\\)"):
        gn_det.GroupNorm(4, 8, activation="relu").forward_residual(x, x)


def test_residual_under_tracing_and_compile():
    layer = gn_det.GroupNorm(4, 8)
    with torch.no_grad():
        layer.weight.copy_(make_affine(8)[0])
    x, r = make_input((2, 8, 5, 5)), make_input((2, 8, 5, 5), seed=3)
    expected = F.relu(F.group_norm(x, 4, layer.weight, layer.bias) + r)

    class BlockEnd(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = layer

        def forward(self, x, r):
            return self.norm.forward_residual(x, r)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(BlockEnd(), (x, r))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert {"aten::group_norm", "aten::add", "aten::relu"} <= kinds
    assert not any(kind.startswith("gn_det::") for kind in kinds)  # standard operators only
    torch.testing.assert_close(traced(x, r), expected)
    compiled = torch.compile(BlockEnd(), backend="aot_eager", fullgraph=True)
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    out = compiled(xg, rg)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    x64, r64 = x.double().requires_grad_(), r.double().requires_grad_()
    F.relu(F.group_norm(x64, 4, layer.weight.double(), layer.bias.double()) + r64).square().sum().backward()
    assert_close(xg.grad, x64.grad, GRAD_TOLERANCE[torch.float32], "dx under torch.compile")
    assert_close(rg.grad, r64.grad, GRAD_TOLERANCE[torch.float32], "dresidual under torch.compile")
