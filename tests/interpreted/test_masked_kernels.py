"""The masked Triton kernels (valid regions of a zero-padded batch, issue 35) under Triton's
interpreter, against an independent float64 reference: each sample's crop x[n, :, :vh, :vw]
normalised alone by F.group_norm (+ residual crop, + activation) and pasted into zeros, its
gradients by autograd through that. Every kernel set, both layouts, float32 / bfloat16 (float16
on one set), every activation, both residual modes; each batch holds a full region, partial
ones, a 1 x 1 one and an empty one. Run in the interpreter's own process (tests/interpreted)."""
import os

import pytest
import torch
import torch.nn.functional as F

from gn_det.ops import triton_launch
from gn_det.ops.activation import ACT_RELU, ACT_SILU, RESIDUAL_ADD, RESIDUAL_OUTPUT
from gn_det.ops.triton_launch import (kernel_set, masked_kernels_support, triton_group_norm_backward,
                                      triton_group_norm_forward)
from gn_det.tolerances import GRAD_TOLERANCE, TOLERANCE, relu_unambiguous_grad, scaled_error
from gn_cases import ACT_FNS, make_affine, make_input

assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("GN_DET_TRITON_ON_CPU") == "1"

CF, CL = torch.contiguous_format, torch.channels_last
ACT_CODES = {None: 0, "relu": ACT_RELU, "silu": ACT_SILU}
EPS = 1e-5


@pytest.fixture
def small_split_tiles(monkeypatch):
    """The split reduction on small shapes, in small tiles over several spatial splits (so that
    the regions' rows and columns end inside tiles and splits, and some splits hold none of a
    region): no group normalised by one program, tiles of 32 positions (NCHW) or 256 elements
    (channels_last), a wave of 16 programs."""
    for name, value in (("GROUP_RESIDENT_MAX_ELEMENTS", 0), ("_NCHW_MAX_BLOCK_S", 32), ("_SHIFTED_MAX_BLOCK_S", 32),
                        ("_TILE_ELEMENTS", 256), ("_SHIFTED_TILE_ELEMENTS", 128), ("CPU_RESIDENT_PROGRAMS", 16)):
        monkeypatch.setattr(triton_launch, name, value)


def regions(h: int, w: int, rotate: int) -> torch.Tensor:
    """Four samples' valid regions: full, partial (ending inside rows and columns), 1 x 1 and
    empty (vh = 0 or vw = 0), in a rotating order (so that an empty or full sample sits beside
    each of the others: a shifted window's neighbouring rows cross samples)."""
    rows = [(h, w), (max(1, h - 2), min(w, w // 2 + 1)), (1, 1), (0, w) if rotate % 2 else (h, 0)]
    rows = rows[rotate % 4:] + rows[:rotate % 4]
    return torch.tensor(rows, dtype=torch.int32)


def masked_reference(x, weight, bias, residual, groups, activation, valid):
    """(y, z, mean, rstd) in float64, and the float64 leaves (x, weight, bias, residual) for
    autograd: each sample's crop normalised alone (its (n, group) statistics over the crop),
    pasted into zeros; z is the activation's input (0 outside)."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    r64 = None if residual is None else residual.detach().double().requires_grad_()
    n, c = x.shape[:2]
    ys, zs, means, rstds = [], [], [], []
    for i, (vh, vw) in enumerate(valid.tolist()):
        y, z = x64.new_zeros((c,) + tuple(x.shape[2:])), x64.new_zeros((c,) + tuple(x.shape[2:]))
        mean, rstd = x64.new_zeros(groups), x64.new_full((groups,), EPS ** -0.5)
        if vh * vw:
            crop = x64[i:i + 1, :, :vh, :vw]
            zc = F.group_norm(crop, groups, w64, b64, EPS)
            if r64 is not None:
                zc = zc + r64[i:i + 1, :, :vh, :vw]
            z = F.pad(zc[0], (0, x.shape[3] - vw, 0, x.shape[2] - vh))
            y = F.pad(ACT_FNS[activation](zc)[0], (0, x.shape[3] - vw, 0, x.shape[2] - vh))
            per_group = crop.detach().reshape(groups, -1)
            mean, rstd = per_group.mean(1), (per_group.var(1, unbiased=False) + EPS).rsqrt()
        ys.append(y)
        zs.append(z)
        means.append(mean)
        rstds.append(rstd)
    return torch.stack(ys), torch.stack(zs).detach(), torch.stack(means), torch.stack(rstds), (x64, w64, b64, r64)


def inside_mask(shape, valid) -> torch.Tensor:
    rows = torch.arange(shape[2])[None, :, None] < valid[:, 0, None, None]
    cols = torch.arange(shape[3])[None, None, :] < valid[:, 1, None, None]
    return (rows & cols)[:, None].expand(shape)


def assert_close(actual, expected, tol, what):
    err = scaled_error(actual, expected)
    assert err <= tol, f"{what}: scaled error {err:.3g} > {tol:g}"


# (kernel set, shape, groups, layout, dtype, activation, residual: None, "add" or "output" (ReLU's
# output kept for backward: RESIDUAL_OUTPUT)); "split" cases run in small_split_tiles.
CASES = [
    ("flat", (4, 16, 7, 7), 2, CF, torch.float32, "relu", None),
    ("flat", (4, 16, 7, 7), 2, CF, torch.bfloat16, "silu", "add"),
    ("one program per group", (4, 8, 6, 8), 2, CF, torch.float32, "relu", "output"),
    ("one program per group", (4, 8, 5, 7), 2, CL, torch.bfloat16, None, "add"),
    ("one program per group", (4, 8, 5, 7), 2, CL, torch.float16, "relu", None),
    ("by lanes", (4, 8, 8, 12), 2, CF, torch.float32, None, None),
    ("by lanes", (4, 16, 9, 10), 4, CL, torch.bfloat16, "relu", "output"),
    ("gathered", (4, 12, 8, 8), 4, CF, torch.bfloat16, "silu", None),
    ("gathered", (4, 24, 6, 10), 4, CL, torch.float32, "relu", "add"),
    ("shifted windows", (4, 8, 9, 13), 4, CF, torch.float32, "silu", "add"),
    ("shifted windows", (4, 8, 7, 9), 2, CF, torch.bfloat16, "relu", "output"),
    ("finalized", (4, 256, 3, 5), 1, CL, torch.float32, None, None),
    # Maps one position wide or high (the kernels test a width-1 map's regions as its transpose's).
    ("one program per group", (4, 8, 9, 1), 2, CL, torch.bfloat16, "relu", "add"),
    ("shifted windows", (4, 8, 37, 1), 2, CF, torch.float32, "silu", None),
    ("by lanes", (4, 16, 1, 40), 4, CL, torch.float32, "relu", "output"),
    pytest.param("finalized", (4, 256, 6, 5), 1, CL, torch.bfloat16, "silu", "add", marks=pytest.mark.slow),
]
RESIDENT_SETS = ("flat", "one program per group")


@pytest.mark.parametrize("kernels,shape,groups,memory_format,dtype,activation,residual", CASES)
def test_masked_kernels_match_cropped_reference(kernels, shape, groups, memory_format, dtype, activation, residual,
                                                request):
    if kernels not in RESIDENT_SETS:
        request.getfixturevalue("small_split_tiles")
    size = torch.tensor([], dtype=dtype).element_size()
    assert kernel_set(shape, size, memory_format == CL, groups, triton_launch.CPU_RESIDENT_PROGRAMS, masked=True) == kernels
    assert masked_kernels_support(torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format), groups)
    index = request.node.callspec.indices["kernels"]
    valid = regions(shape[2], shape[3], index)
    inside = inside_mask(shape, valid)
    # The padding holds values far from the regions' (any leak into the statistics shows).
    x = make_input(shape, dtype, memory_format, seed=index)
    x = torch.where(inside, x, x + 50.0).contiguous(memory_format=memory_format)
    weight, bias = make_affine(shape[1])
    r = None if residual is None else make_input(shape, dtype, memory_format, seed=index + 3)
    act = ACT_CODES[activation]

    y, mean, rstd = triton_group_norm_forward(x, weight, bias, r, groups, EPS, act, valid)
    ref, z64, mean64, rstd64, (x64, w64, b64, r64) = masked_reference(x, weight, bias, r, groups, activation, valid)
    what = f"{kernels} {tuple(shape)} {dtype} {memory_format} act={activation} residual={residual}"
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format), what
    assert torch.all(y[~inside] == 0), f"y outside the regions: {what}"
    assert_close(y, ref, TOLERANCE[dtype], f"y {what}")
    assert_close(mean, mean64, TOLERANCE[torch.float32], f"mean {what}")
    assert_close(rstd / rstd64, torch.ones_like(rstd64), TOLERANCE[torch.float32], f"rstd {what}")
    empty = (valid[:, 0] * valid[:, 1] == 0)
    assert torch.all(mean[empty] == 0) and torch.allclose(rstd[empty], torch.full_like(rstd[empty], EPS ** -0.5))

    # The upstream gradient is nonzero outside the regions too: it must be ignored there.
    grad = make_input(shape, dtype, memory_format, seed=index + 7)
    if activation == "relu":  # (ReLU's mask where z is within rounding of 0 may rightly differ)
        grad = relu_unambiguous_grad(torch.where(inside, z64, torch.ones_like(z64)), grad)
    mode = RESIDUAL_OUTPUT if residual == "output" else RESIDUAL_ADD
    saved = y if residual == "output" else r
    dx, dweight, dbias, dres = triton_group_norm_backward(grad, x, weight, bias, mean, rstd, saved, groups, EPS, act,
                                                          mode, valid)
    leaves = [t for t in (x64, w64, b64, r64) if t is not None]
    want = torch.autograd.grad(ref, leaves, grad.double())
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=memory_format), what
    assert torch.all(dx[~inside] == 0), f"dx outside the regions: {what}"
    for name, got, expected in zip(("dx", "dweight", "dbias", "dresidual"), (dx, dweight, dbias, dres), want):
        assert_close(got, expected, GRAD_TOLERANCE[dtype], f"{name} {what}")
    if residual is None:
        assert dres is None
    else:
        assert torch.all(dres[~inside] == 0), f"dresidual outside the regions: {what}"


@pytest.mark.parametrize("kernels,shape,groups,memory_format", [
    ("flat", (2, 16, 7, 7), 2, CF),
    ("one program per group", (2, 8, 5, 7), 2, CL),
    ("by lanes", (2, 16, 9, 10), 4, CL),
    ("gathered", (2, 12, 8, 8), 4, CF),
    ("shifted windows", (2, 8, 9, 13), 4, CF),
])
def test_full_regions_match_the_unmasked_kernels(kernels, shape, groups, memory_format, request):
    # Regions covering the whole map: the masked kernels compute what the unmasked ones do
    # (within float32 rounding: the split counts come by another formula); valid=None runs the
    # unmasked kernels themselves (their bits: the same launches as a call without it).
    if kernels not in RESIDENT_SETS:
        request.getfixturevalue("small_split_tiles")
    assert kernel_set(shape, 4, memory_format == CL, groups, triton_launch.CPU_RESIDENT_PROGRAMS) == kernels
    x = make_input(shape, memory_format=memory_format)
    weight, bias = make_affine(shape[1])
    r = make_input(shape, memory_format=memory_format, seed=3)
    full = torch.tensor([shape[2:]] * shape[0], dtype=torch.int32)
    plain = triton_group_norm_forward(x, weight, bias, r, groups, EPS, ACT_SILU)
    assert all(torch.equal(a, b) for a, b in zip(plain, triton_group_norm_forward(x, weight, bias, r, groups, EPS,
                                                                                  ACT_SILU, None)))
    masked = triton_group_norm_forward(x, weight, bias, r, groups, EPS, ACT_SILU, full)
    for name, a, b in zip(("y", "mean", "rstd"), masked, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} {kernels}")
    grad = make_input(shape, memory_format=memory_format, seed=7)
    plain_grads = triton_group_norm_backward(grad, x, weight, bias, plain[1], plain[2], r, groups, EPS, ACT_SILU)
    masked_grads = triton_group_norm_backward(grad, x, weight, bias, plain[1], plain[2], r, groups, EPS, ACT_SILU,
                                              RESIDUAL_ADD, full)
    for name, a, b in zip(("dx", "dweight", "dbias", "dresidual"), masked_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{name} {kernels}")


def test_masked_kernels_support_and_valid_checks():
    # Shape, layout and dtype only: every 4-D float input in either dense layout.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fmt in (CF, CL):
            assert masked_kernels_support(torch.empty(2, 8, 5, 7, dtype=dtype).contiguous(memory_format=fmt), 4)
    assert not masked_kernels_support(torch.empty(2, 8, 5, 7, dtype=torch.float64), 4)
    assert not masked_kernels_support(torch.empty(2, 8, 35), 4)  # (N, C, L)
    assert not masked_kernels_support(torch.empty(2, 8, 5, 7, 3), 4)  # volumes
    assert not masked_kernels_support(torch.empty(2, 8, 10, 14)[:, :, ::2, ::2], 4)  # not dense
    # The kernels' quotient by W is exact up to H * W * W = 2^32 (and at W = 1, as the transpose).
    meta = dict(device="meta")
    assert masked_kernels_support(torch.empty(1, 32, 1024, 2048, **meta), 32)
    assert masked_kernels_support(torch.empty(1, 32, 2 ** 20, 1, **meta), 32)
    assert not masked_kernels_support(torch.empty(1, 32, 1025, 2048, **meta), 32)
    x = torch.randn(2, 8, 5, 7)
    weight, bias = make_affine(8)
    for bad in (torch.zeros(2, 2), torch.zeros(3, 2, dtype=torch.int32), torch.zeros(2, 2, 2, dtype=torch.int32),
                torch.zeros(2, 4, dtype=torch.int32)[:, ::2]):
        with pytest.raises(ValueError, match="valid must be"):
            triton_group_norm_forward(x, weight, bias, None, 4, EPS, 0, bad)
    with pytest.raises(ValueError, match="4-D"):
        triton_group_norm_forward(torch.randn(2, 8, 35), weight, bias, None, 4, EPS, 0,
                                  torch.zeros(2, 2, dtype=torch.int32))
    # One plan serves any regions (values never reach the host), and the masked and unmasked
    # plans of one signature are kept apart.
    plans = triton_launch.TritonPlans()
    for valid in ([[5, 7], [0, 0]], [[2, 3], [5, 1]]):
        valid = torch.tensor(valid, dtype=torch.int32)
        y = plans.forward(x, weight, bias, None, 4, EPS, 0, valid)[0]
        assert torch.all(y[~inside_mask(x.shape, valid)] == 0)
    unmasked = plans.forward(x, weight, bias, None, 4, EPS, 0)[0]
    assert plans.forward_plan is not None and plans.masked_forward_plan is not None
    assert plans.masked_forward_plan.masked and not plans.forward_plan.masked
    assert torch.equal(unmasked, triton_group_norm_forward(x, weight, bias, None, 4, EPS, 0)[0])


def _padding_cases():
    """CASES' ReLU-output cases and one with the residual added run by default; the rest are slow."""
    fast = {2, 6, 8, 10}  # (indices in CASES: one program per group, by lanes, gathered, shifted windows)
    return [case if i in fast else pytest.param(*case, marks=pytest.mark.slow)
            for i, case in enumerate(CASES) if not hasattr(case, "marks")]


@pytest.mark.parametrize("kernels,shape,groups,memory_format,dtype,activation,residual", _padding_cases())
def test_what_the_padding_holds_changes_nothing(kernels, shape, groups, memory_format, dtype, activation, residual,
                                                request):
    """Non-finite values in the padding (inf, -inf, NaN: what a diverging layer may leave there)
    change no output bit of the masked kernels, forward or backward, with the residual kept
    (add) or the ReLU output kept (output): padding x and the upstream gradient there are never
    read into a sum."""
    if kernels not in RESIDENT_SETS:
        request.getfixturevalue("small_split_tiles")
    index = request.node.callspec.indices["kernels"]
    valid = regions(shape[2], shape[3], index)
    inside = inside_mask(shape, valid)
    x = make_input(shape, dtype, memory_format, seed=index)
    weight, bias = make_affine(shape[1])
    r = None if residual is None else make_input(shape, dtype, memory_format, seed=index + 3)
    grad = make_input(shape, dtype, memory_format, seed=index + 7)
    act = ACT_CODES[activation]
    mode = RESIDUAL_OUTPUT if residual == "output" else RESIDUAL_ADD
    runs = []
    for fill in (0.0, float("inf"), float("-inf"), float("nan")):
        xf = torch.where(inside, x, torch.full_like(x, fill)).contiguous(memory_format=memory_format)
        gf = torch.where(inside, grad, torch.full_like(grad, fill)).contiguous(memory_format=memory_format)
        y, mean, rstd = triton_group_norm_forward(xf, weight, bias, r, groups, EPS, act, valid)
        saved = y if residual == "output" else r
        runs.append((y, mean, rstd) + tuple(triton_group_norm_backward(gf, xf, weight, bias, mean, rstd, saved,
                                                                       groups, EPS, act, mode, valid)))
    names = ("y", "mean", "rstd", "dx", "dweight", "dbias", "dresidual")
    for fill, run in zip(("inf", "-inf", "nan"), runs[1:]):
        for name, got, want in zip(names, run, runs[0]):
            if want is not None:
                assert torch.equal(got, want), f"{name} with {fill} in the padding: {kernels} {tuple(shape)} {dtype}"
