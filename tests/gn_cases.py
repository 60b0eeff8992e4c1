"""Shared cases and checks for GN layer tests: the CPU path, the Triton kernels under the
interpreter, and the same kernels on CUDA."""
from __future__ import annotations

import io
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import gn_det
# Tolerances per dtype on the scaled error (gn_det/tolerances.py states them and why): the
# same table ``python -m gn_det.check`` judges by.
from gn_det.ops.activation import ACTIVATION_TABLE
from gn_det.tolerances import GRAD_TOLERANCE, TOLERANCE, relu_unambiguous_grad, scaled_error

# The reference activations: the standard-operator form of every activation the kernels fuse;
# the tests that cover every activation take them from here (one more row in the table, one
# more case in each).
ACT_FNS = {a.name: a.export for a in ACTIVATION_TABLE}
ALL_ACTIVATIONS = tuple(ACT_FNS)

# (shape, groups, memory format): every rank, both memory formats, odd sizes, batch 1.
LAYER_CASES = [
    ((2, 6), 3, torch.contiguous_format),                    # (N, C)
    ((3, 8, 17), 4, torch.contiguous_format),                # sequences (N, C, L)
    ((2, 12, 7, 9), 4, torch.contiguous_format),             # images
    ((2, 12, 7, 9), 4, torch.channels_last),
    ((1, 64, 13, 11), 32, torch.channels_last),              # batch 1, detectron2's 32 groups
    ((2, 6, 3, 5, 4), 3, torch.contiguous_format),           # volumes
    ((2, 6, 3, 5, 4), 3, torch.channels_last_3d),
]


def make_input(shape: Sequence[int], dtype=torch.float32, memory_format=torch.contiguous_format,
               device="cpu", mean: float = 0.0, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * std + mean
    return x.to(dtype=dtype).to(device=device, memory_format=memory_format)


def make_affine(channels: int, device="cpu", dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    bias = (torch.rand(channels, generator=gen, dtype=torch.float64) - 0.5).to(device=device, dtype=dtype)
    return weight, bias


def reference(x: torch.Tensor, groups: int, weight, bias, eps: float, activation: Optional[str]) -> torch.Tensor:
    """F.group_norm + activation in float64 on CPU."""
    w = None if weight is None else weight.detach().double().cpu()
    b = None if bias is None else bias.detach().double().cpu()
    return ACT_FNS[activation](F.group_norm(x.detach().double().cpu(), groups, w, b, eps))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = scaled_error(actual.detach().cpu(), expected.detach().cpu())
    assert err <= tol, f"{what}: max abs error / max(1, max|reference|) = {err:.3g} > {tol:g}"


def check_forward_backward(shape, groups, dtype=torch.float32, memory_format=torch.contiguous_format,
                           activation=None, device="cpu", affine=True, mean=0.0, std=1.0, eps=1e-5,
                           check_backward=True, seed=0) -> None:
    """gn_det.group_norm against float64 F.group_norm (+ activation): output dtype, memory
    format and values; gradients of x, weight and bias for a random upstream gradient."""
    x = make_input(shape, dtype, memory_format, device, mean, std, seed).requires_grad_(check_backward)
    weight, bias = make_affine(shape[1], device) if affine else (None, None)
    if affine:
        weight.requires_grad_(check_backward)
        bias.requires_grad_(check_backward)
    y = gn_det.group_norm(x, groups, weight, bias, eps, activation)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=memory_format), "output lost the input's memory format"
    x64 = x.detach().double().cpu().requires_grad_(check_backward)
    w64 = b64 = None
    if affine:
        w64 = weight.detach().double().cpu().requires_grad_(check_backward)
        b64 = bias.detach().double().cpu().requires_grad_(check_backward)
    z64 = F.group_norm(x64, groups, w64, b64, eps)
    ref = ACT_FNS[activation](z64)
    assert_close(y, ref, TOLERANCE[dtype], f"forward {tuple(shape)} {dtype} {memory_format} act={activation}")
    if not check_backward or x.numel() == 0:
        return
    grad = make_input(shape, dtype, memory_format, device, seed=seed + 7)
    if activation == "relu":  # (ReLU's mask where z is within rounding of 0 may rightly differ)
        grad = relu_unambiguous_grad(z64.detach(), grad)
    inputs = (x, weight, bias) if affine else (x,)
    grads = torch.autograd.grad(y, inputs, grad)
    ref_inputs = (x64, w64, b64) if affine else (x64,)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double().cpu())
    assert grads[0].dtype == x.dtype
    assert grads[0].is_contiguous(memory_format=memory_format), "dx lost the input's memory format"
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert_close(got, want, GRAD_TOLERANCE[dtype], f"{name} {tuple(shape)} {dtype} {memory_format} act={activation}")


def check_one_value_per_group(device="cpu", dtype=torch.float32) -> None:
    """G = C on (N, C) input: every group holds one value (on the GPU, Triton folds the
    kernels' channels-per-group and spatial-size arguments, both 1, into constants). The
    normalised value is 0, so the output is act(beta), x gets no gradient, gamma none, beta dy.
    rstd = 1/sqrt(eps) ~ 316 amplifies the rounding of x - mean in implementations that
    compute x * scale + shift, hence the absolute tolerance of test_constant_group_is_finite."""
    x = make_input((4, 8), dtype=dtype, device=device).requires_grad_()
    weight, bias = make_affine(8, device=device)
    weight.requires_grad_()
    bias.requires_grad_()
    y = gn_det.group_norm(x, 8, weight, bias, activation="silu")
    expected = F.silu(bias.detach().float()).expand(4, 8)
    torch.testing.assert_close(y.float(), expected, atol=5e-4, rtol=TOLERANCE[dtype])
    grad = make_input((4, 8), dtype=dtype, device=device, seed=2)
    y.backward(grad)
    torch.testing.assert_close(x.grad.float(), torch.zeros_like(x, dtype=torch.float32), atol=5e-4, rtol=0)
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight), atol=5e-3, rtol=0)
    sig = torch.sigmoid(bias.detach().float())
    expected_dbias = (grad.float() * (sig * (1 + bias.detach().float() * (1 - sig)))).sum(0)
    torch.testing.assert_close(bias.grad.float(), expected_dbias, atol=1e-4, rtol=GRAD_TOLERANCE[dtype])


def check_strided_inputs(device="cpu") -> None:
    """Non-dense views: a strided channels_last input, a strided upstream gradient, gamma and
    beta that are every other element of larger tensors, and an expanded (stride 0) gradient."""
    base = make_input((2, 8, 10, 12), memory_format=torch.channels_last, device=device)
    x = base[:, :, ::2, 1:].requires_grad_()  # a non-contiguous view
    wide_weight, wide_bias = make_affine(16, device=device)
    wide_weight.requires_grad_()
    wide_bias.requires_grad_()
    weight, bias = wide_weight[::2], wide_bias[1::2]  # strided (C,) views
    y = gn_det.group_norm(x, 4, weight, bias, activation="relu")
    assert_close(y, reference(x, 4, weight, bias, 1e-5, "relu"), TOLERANCE[torch.float32], "strided view")
    grad = make_input((2, 8, 10, 22), device=device)[:, :, ::2, ::2]  # a strided upstream gradient
    dx, dweight, dbias = torch.autograd.grad(y, (x, wide_weight, wide_bias), grad)
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = wide_weight.detach().double().cpu().requires_grad_()
    b64 = wide_bias.detach().double().cpu().requires_grad_()
    ref_y = F.relu(F.group_norm(x64, 4, w64[::2], b64[1::2]))
    ref = torch.autograd.grad(ref_y, (x64, w64, b64), grad.double().cpu())
    for name, actual, expected in zip(("dx", "dweight", "dbias"), (dx, dweight, dbias), ref):
        assert_close(actual, expected, GRAD_TOLERANCE[torch.float32], f"{name} for strided inputs")
    x.grad = None
    gn_det.group_norm(x, 4, weight, bias).sum().backward()  # an expanded (stride 0) gradient
    assert torch.isfinite(x.grad).all()


def check_scale_without_shift(shape, groups, dtype=torch.float32, memory_format=torch.contiguous_format,
                              activation=None, device="cpu", eps=1e-5) -> None:
    """``gn_det.GroupNorm(..., bias=False)``, a scale without a shift: ``bias`` is None, the
    state_dict holds only ``weight``, and the output, dx and dgamma match float64
    ``F.group_norm(x, G, gamma, None)`` (+ activation)."""
    layer = gn_det.GroupNorm(groups, shape[1], eps=eps, bias=False, activation=activation, device=device)
    assert layer.bias is None and [name for name, _ in layer.named_parameters()] == ["weight"]
    assert list(layer.state_dict()) == ["weight"]
    with torch.no_grad():
        layer.weight.copy_(make_affine(shape[1], device)[0])  # not all ones: dgamma is then informative
    x = make_input(shape, dtype, memory_format, device).requires_grad_()
    y = layer(x)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=memory_format)
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = layer.weight.detach().double().cpu().requires_grad_()
    ref = ACT_FNS[activation](F.group_norm(x64, groups, w64, None, eps))
    what = f"{tuple(shape)} {dtype} {memory_format} act={activation} bias=False"
    assert_close(y, ref, TOLERANCE[dtype], f"forward {what}")
    grad = make_input(shape, dtype, memory_format, device, seed=7)
    y.backward(grad)
    ref.backward(grad.double().cpu())
    assert_close(x.grad, x64.grad, GRAD_TOLERANCE[dtype], f"dx {what}")
    assert_close(layer.weight.grad, w64.grad, GRAD_TOLERANCE[dtype], f"dweight {what}")
    assert layer.bias is None


def check_residual(shape, groups, dtype=torch.float32, memory_format=torch.contiguous_format, activation="relu",
                   residual_dtype=None, residual_format=torch.contiguous_format, output_recomputed=False,
                   device="cpu") -> None:
    """``group_norm(x, ..., residual=r)`` = act(GN(x) + r), the fused block end, against
    float64 F.group_norm + r (+ activation): output dtype, layout and values; dx, dweight,
    dbias and dr (in r's dtype). ``output_recomputed`` picks what backward keeps (the
    residual; else, with ReLU, the output): the gradients must not depend on it."""
    x = make_input(shape, dtype, memory_format, device).requires_grad_()
    residual_dtype = residual_dtype or dtype
    r = make_input(shape, residual_dtype, residual_format, device, seed=3).requires_grad_()
    weight, bias = make_affine(shape[1], device)
    weight.requires_grad_()
    bias.requires_grad_()
    y = gn_det.group_norm(x, groups, weight, bias, 1e-5, activation, residual=r, output_recomputed=output_recomputed)
    what = f"{tuple(shape)} {dtype} {memory_format} act={activation} residual {residual_dtype} {residual_format}"
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=memory_format), what
    x64, r64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, r, weight, bias))
    ref = ACT_FNS[activation](F.group_norm(x64, groups, w64, b64, 1e-5) + r64)
    assert_close(y, ref, TOLERANCE[dtype], f"forward {what}")
    grad = make_input(shape, dtype, memory_format, device, seed=7)
    got = torch.autograd.grad(y, (x, r, weight, bias), grad)
    want = torch.autograd.grad(ref, (x64, r64, w64, b64), grad.double().cpu())
    assert got[1].dtype == residual_dtype, f"dresidual in {got[1].dtype}, not the residual's {residual_dtype}"
    coarser = max(GRAD_TOLERANCE[dtype], GRAD_TOLERANCE[residual_dtype])  # dresidual is rounded to r's dtype
    for name, g, w, tol in zip(("dx", "dresidual", "dweight", "dbias"), got, want,
                               (GRAD_TOLERANCE[dtype], coarser, GRAD_TOLERANCE[dtype], GRAD_TOLERANCE[dtype])):
        assert_close(g, w, tol, f"{name} {what}")


def export_onnx(model: torch.nn.Module, x: torch.Tensor, dynamo: bool):
    """``model`` exported to ONNX (torch.export's exporter with ``dynamo``, else TorchScript's),
    as an onnx ModelProto; the exporters' warnings silenced."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        return onnx.load_from_string(buffer.getvalue())
