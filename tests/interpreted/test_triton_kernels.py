"""The Triton kernels run on CPU by Triton's interpreter, against float64 F.group_norm.
Run by tests/test_triton_interpreted.py in a process with TRITON_INTERPRET=1 and
GN_DET_TRITON_ON_CPU=1 (small shapes: the interpreter is slow)."""
import json
import os

import pytest
import torch

import gn_det
from gn_det.diagnostics.bench.memory import count_saved_tensors
from gn_det.policy import routing
from gn_det.ops.activation import ACT_RELU, RESIDUAL_ADD
from gn_det.policy import dispatch_path, triton_enabled_for
from gn_det.ops.torch_path import torch_group_norm_backward, torch_group_norm_forward
from gn_det.ops import triton_launch as group_norm_triton
from gn_det.ops.triton_launch import kernel_path, triton_group_norm_backward, triton_group_norm_forward
from gn_cases import (ALL_ACTIVATIONS, LAYER_CASES, check_forward_backward, check_one_value_per_group, check_residual,
                      check_scale_without_shift, check_strided_inputs, make_affine, make_input, reference)

CF, CL, CL3D = torch.contiguous_format, torch.channels_last, torch.channels_last_3d

assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("GN_DET_TRITON_ON_CPU") == "1"


@pytest.fixture(params=["by group size", "split reduction forced"])
def path(request, monkeypatch):
    """Runs a test under both kernel sets. These shapes are small, so by group size all but
    the largest take the one-program-per-group kernels; a limit of 0 forces every shape
    through the split reduction."""
    if request.param == "split reduction forced":
        monkeypatch.setattr(group_norm_triton, "GROUP_RESIDENT_MAX_ELEMENTS", 0)
    return request.param


def test_cpu_tensors_go_to_triton():
    assert triton_enabled_for(torch.zeros(2, 4, 3))


@pytest.mark.parametrize("dtype,activation,residual", [
    (torch.float32, "relu", None), (torch.bfloat16, "silu", None), (torch.float16, None, None),
    (torch.float32, "relu", "output"), (torch.bfloat16, "relu", "residual"),
])
def test_flat_group_tiles(dtype, activation, residual):
    # NCHW groups of 8 channels x 7 x 7 (detectron2's box head at 32 groups): rows 49 elements
    # apart, so each group is tiled flat (_flat_group_blocks), in accesses as wide as 392
    # elements allow; the per-channel dgamma/dbeta sums come from a channel mask.
    shape = (3, 16, 7, 7)
    assert group_norm_triton._flat_group_blocks(8, 49, False, torch.tensor([], dtype=dtype).element_size())
    if residual is None:
        check_forward_backward(shape, 2, dtype=dtype, activation=activation)
    else:
        check_residual(shape, 2, dtype=dtype, activation=activation, output_recomputed=residual == "residual")


@pytest.mark.parametrize("shape,groups,dtype,activation", [
    ((1, 4, 31, 49), 2, torch.float32, "silu"),  # S = 1519: 2 splits of 2 windows per row
    ((2, 8, 9, 13), 4, torch.bfloat16, None),    # S = 117: windows cross into the next sample's rows
])
def test_shifted_windows(shape, groups, dtype, activation, monkeypatch):
    # NCHW rows whose starts are not 16-byte aligned (S not a multiple of 4 float32 / 8 bf16
    # elements) run the split kernels in windows shifted back to an aligned address: whole
    # 16-byte blocks, the neighbouring rows' elements left out of the sums and, in the apply
    # kernels, written with their own rows' parameters.
    monkeypatch.setattr(group_norm_triton, "GROUP_RESIDENT_MAX_ELEMENTS", 0)
    size = torch.tensor([], dtype=dtype).element_size()
    c, s = shape[1], shape[2] * shape[3]
    assert group_norm_triton._tiles(c, s, False, size)[4] == {"CHANNELS_LAST": False, "ALIGN": 16 // size,
                                                               "SHIFT": True}
    assert not group_norm_triton._tiles(8, 3, False, size)[4]["SHIFT"]  # rows shorter than a block
    assert not group_norm_triton._tiles(3, 31 * 49, False, size)[4]["SHIFT"]  # C * S not whole blocks
    check_forward_backward(shape, groups, dtype=dtype, activation=activation)
    check_residual(shape, groups, dtype=dtype, activation="relu", output_recomputed=True)
    if dtype == torch.float32:  # the per-element lane counts keep the shifted Welford exact
        x = make_input(shape, mean=1e4, std=1.0)
        weight, bias = make_affine(c)
        ref = reference(x, groups, weight, bias, 1e-5, None)
        assert ((gn_det.group_norm(x, groups, weight, bias).double() - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize("shape,groups", [((3, 8, 9, 13), 8)])  # a group per row: every neighbour another's
def test_shifted_windows_write_neighbours_with_their_own_statistics(shape, groups, monkeypatch):
    # A shifted window's end blocks hold the neighbouring rows' elements (another group's, or
    # the next sample's), which the forward apply writes with statistics it merged itself:
    # they must be the very bits the row's own programs merge and store (else two writes of
    # one element would differ). y is exactly the stored statistics' formula, element by element.
    monkeypatch.setattr(group_norm_triton, "GROUP_RESIDENT_MAX_ELEMENTS", 0)
    x = make_input(shape, mean=50.0)
    weight, bias = make_affine(shape[1])
    c = shape[1]
    assert group_norm_triton._tiles(c, shape[2] * shape[3], False, 4)[4]["SHIFT"]
    y, mean, rstd = triton_group_norm_forward(x, weight, bias, None, groups, 1e-5, 0)
    per_channel = lambda t: t.repeat_interleave(c // groups, dim=1)[:, :, None, None]  # noqa: E731
    expected = (x - per_channel(mean)) * (weight[None, :, None, None] * per_channel(rstd)) + bias[None, :, None, None]
    assert torch.equal(y, expected)


def test_shifted_windows_keep_a_neighbours_inf_out(monkeypatch):
    # A shifted window's end block holds the next row's first elements. An inf there, in
    # another group, must not reach this row's sums: 0 * inf would make its dgamma and its
    # group's dx NaN.
    monkeypatch.setattr(group_norm_triton, "GROUP_RESIDENT_MAX_ELEMENTS", 0)
    x = make_input((1, 4, 5, 7))  # S = 35: rows 1-3 start misaligned (4-element float32 blocks)
    x[0, 2, 0, 0] = float("inf")  # element 70: in row 1's last block [68, 72); channel 2 is group 1
    x.requires_grad_()
    weight, bias = make_affine(4)
    weight.requires_grad_()
    y = gn_det.group_norm(x, 2, weight, bias)
    assert torch.isfinite(y[:, :2]).all() and not torch.isfinite(y[:, 2:]).all()
    y[:, :2].sum().backward()  # only group 0's outputs reach the loss
    assert torch.isfinite(x.grad[:, :2]).all() and torch.isfinite(weight.grad[:2]).all()


@pytest.mark.parametrize("shape,groups,memory_format,stats", [
    ((1, 256, 8, 8), 2, CL, "lanes"),      # 128 channels per group: all 7 merge steps across a block's lanes
    ((1, 4, 32, 64), 1, CF, "lanes"),      # NCHW blocks of 4 rows holding a whole group of 4, 2 splits
    ((1, 192, 8, 12), 32, CL, "gathered"),  # 6 channels per group: group 21 spans both 128-channel blocks
    ((1, 12, 32, 32), 4, CF, "gathered"),  # NCHW 3 channels per group: blocks of 4 rows straddle groups
    ((1, 256, 8, 8), 1, CL, "finalized"),  # a group wider than a block: 512 records a lane, a launch instead
])
def test_forward_statistics_merged_by_the_apply(shape, groups, memory_format, stats, monkeypatch):
    # The split forward is two launches: the apply programs merge the partial-sums kernel's
    # records into their groups' statistics themselves, by lanes of whole groups or by reading
    # each group's records, across several spatial splits of both kernels; split 0's programs
    # store the statistics that backward reads. Where that would take more loads than a
    # launch, a finalize kernel merges them (three launches). At a mean large against the
    # spread: no accuracy lost in the merge.
    monkeypatch.setattr(group_norm_triton, "GROUP_RESIDENT_MAX_ELEMENTS", 0)
    n, c, s = shape[0], shape[1], shape[2] * shape[3]
    block_c, block_s, n_cblocks, _, layout = group_norm_triton._tiles(c, s, memory_format == CL, 4)
    splits, _ = group_norm_triton._splits(n * n_cblocks, s, block_s, group_norm_triton.CPU_RESIDENT_PROGRAMS)
    assert splits > 1 or stats == "gathered"
    expected = {"lanes": group_norm_triton.STATS_BY_LANES, "gathered": group_norm_triton.STATS_GATHERED,
                "finalized": group_norm_triton.STATS_FINALIZED}[stats]
    assert group_norm_triton._stats_merge(c // groups, splits, block_c, layout["SHIFT"]) == expected
    x = make_input(shape, memory_format=memory_format, mean=1e3, std=1.0)
    weight, bias = make_affine(c)
    y, mean, rstd = triton_group_norm_forward(x, weight, bias, None, groups, 1e-5, ACT_RELU)
    x64 = x.double().reshape(n, groups, -1)
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=2e-7, atol=0)
    torch.testing.assert_close(rstd.double(), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=0)
    ref = reference(x, groups, weight, bias, 1e-5, "relu")
    assert y.is_contiguous(memory_format=memory_format) and (y.double() - ref).abs().max().item() < 1e-3


def test_launcher_residual_gradient_in_x_layout(path):
    # The launchers take a residual in any layout (read through a copy dense in x's layout);
    # its gradient is written with x's offsets, so it comes back in x's layout, right.
    x = make_input((2, 8, 5, 6))
    r = make_input((2, 8, 5, 6), seed=3).contiguous(memory_format=CL)
    weight, bias = make_affine(8)
    y, mean, rstd = triton_group_norm_forward(x, weight, bias, r, 2, 1e-5, ACT_RELU)
    dy = make_input((2, 8, 5, 6), seed=5)
    dr = triton_group_norm_backward(dy, x, weight, bias, mean, rstd, r, 2, 1e-5, ACT_RELU, RESIDUAL_ADD)[3]
    z = torch.nn.functional.group_norm(x.double(), 2, weight.double(), bias.double(), 1e-5) + r.double()
    assert dr.is_contiguous() and torch.allclose(dr.double(), dy.double() * (z > 0), atol=1e-6)


def test_kernel_path_follows_group_size(monkeypatch):
    box_head = torch.zeros(2, 64, 7, 7)  # 2 channels x 49 positions per group at 32 groups
    assert kernel_path(box_head, 32) == "one program per group"
    assert kernel_path(torch.zeros(1, 64, 100, 100), 32) == "split reduction"  # 20000 per group
    monkeypatch.setattr(group_norm_triton, "GROUP_RESIDENT_MAX_ELEMENTS", 0)
    assert kernel_path(box_head, 32) == "split reduction"


ACTIVATIONS = ALL_ACTIVATIONS


@pytest.mark.parametrize(
    "shape,groups,memory_format",
    LAYER_CASES + [
        # Groups of 2 x 1536 and 2 x 1760 elements: one program each by group size; forced
        # through the split reduction, 2 (NCHW) and 4 (channels_last) spatial splits per
        # group, the last tile partly masked.
        ((1, 4, 32, 48), 2, CF),
        ((1, 8, 40, 44), 4, CL),
        ((1, 256, 4, 4), 2, CL),    # 128 channels per group: finalize loops over channel blocks
    ],
)
def test_kernels_match_reference(shape, groups, memory_format, path, request):
    # One activation per shape and kernel set, rotating: every activation meets every layout
    # and both kernel sets (each shape with all three is what the interpreter's time forbids).
    index = request.node.callspec.indices["shape"]
    activation = ACTIVATIONS[(index + (path == "split reduction forced")) % len(ACTIVATIONS)]
    check_forward_backward(shape, groups, memory_format=memory_format, activation=activation)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [CF, CL])
def test_half_precision(dtype, memory_format, path):
    check_forward_backward((2, 16, 9, 10), 4, dtype=dtype, memory_format=memory_format, activation="silu")


@pytest.mark.parametrize("shape,groups,memory_format,activation,output_recomputed", [
    ((2, 12, 7, 9), 4, CF, "relu", False),   # backward reads the output for ReLU's mask
    ((2, 12, 7, 9), 4, CF, "relu", True),    # backward reads the residual
    ((2, 12, 7, 9), 4, CL, "silu", False),
    ((1, 8, 40, 44), 4, CL, "relu", False),  # 4 spatial splits when forced
    ((1, 4, 32, 48), 2, CF, None, True),     # 2 spatial splits when forced
])
def test_residual_block_end(shape, groups, memory_format, activation, output_recomputed, path):
    check_residual(shape, groups, memory_format=memory_format, activation=activation,
                   output_recomputed=output_recomputed)


def test_residual_half_precision_mixed(path):
    check_residual((2, 16, 9, 10), 4, dtype=torch.bfloat16, memory_format=CL, residual_dtype=torch.float32)


def test_no_affine(path):
    check_forward_backward((2, 8, 5, 6), 2, affine=False, activation="relu")


@pytest.mark.parametrize("shape,groups,memory_format,activation", [
    ((2, 8, 5, 6), 2, CF, "relu"),
    ((2, 12, 7, 9), 4, CL, "silu"),
    ((2, 6, 3, 5, 4), 3, CL3D, None),
])
def test_scale_without_shift(shape, groups, memory_format, activation, path):
    # GroupNorm(..., bias=False): the kernels run with beta = 0; dx and dgamma as usual.
    check_scale_without_shift(shape, groups, memory_format=memory_format, activation=activation)


@pytest.mark.parametrize("memory_format", [CF, CL])
def test_large_mean(memory_format, path):
    x = make_input((1, 8, 40, 40), memory_format=memory_format, mean=1e4, std=1.0)
    weight, bias = make_affine(8)
    y = gn_det.group_norm(x, 4, weight, bias)
    ref = reference(x, 4, weight, bias, 1e-5, None)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-3


def test_strided_inputs(path):
    check_strided_inputs()


def test_one_value_per_group(path):
    check_one_value_per_group()


def test_constant_group_finite(path):
    x = torch.full((1, 4, 6, 6), -3.0, requires_grad=True)
    y = gn_det.group_norm(x, 2, *make_affine(4), activation="relu")
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_empty_batch_launches_nothing():
    m = gn_det.GroupNorm(4, 8, activation="relu")
    x = torch.zeros((0, 8, 5, 5), requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(m.weight.grad, torch.zeros(8))


@pytest.mark.parametrize("activation", [0, 1, 2])
def test_kernels_agree_with_torch_path(activation, path):
    x = make_input((2, 8, 9, 7), memory_format=CL)
    weight, bias = make_affine(8)
    grad = make_input((2, 8, 9, 7), seed=3)  # NCHW gradient for a channels_last input
    y, mean, rstd = triton_group_norm_forward(x, weight, bias, None, 4, 1e-5, activation)
    y_ref, mean_ref, rstd_ref = torch_group_norm_forward(x, weight, bias, None, 4, 1e-5, activation)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, mean_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd, rstd_ref, atol=1e-5, rtol=1e-5)
    got = triton_group_norm_backward(grad, x, weight, bias, mean, rstd, None, 4, 1e-5, activation)
    want = torch_group_norm_backward(grad, x, weight, bias, mean_ref, rstd_ref, None, 4, 1e-5, activation)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, CF), (torch.bfloat16, CL)])
def test_routed_shapes_run_pytorch_groupnorm(dtype, memory_format, monkeypatch, tmp_path):
    # A route (as tools/benchmark_norm.py --write-routes writes one where the kernels lost)
    # sends its bucket to PyTorch's GroupNorm: same results, dtype and memory format.
    shape = (2, 64, 5, 6)
    x = make_input(shape, dtype, memory_format)
    key = routing.route_key_of(x, 32, ACT_RELU)
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"routes": [dict(zip(routing.ROUTE_FIELDS, key), measured="1.2x (a test)")]}))
    previous = routing.set_routes(routes)
    try:
        assert dispatch_path(x, 32, "relu") == "PyTorch: ATen GroupNorm, routed (Triton measured slower here)"
        assert dispatch_path(x, 32, None).startswith("Triton")  # no activation: another bucket
        weight, bias = make_affine(64)
        y = gn_det.group_norm(x.requires_grad_(), 32, weight, bias, activation="relu")
        assert type(y.grad_fn).__name__ != "GroupNormFunctionBackward"  # ATen's own autograd
        check_forward_backward(shape, 32, dtype=dtype, memory_format=memory_format, activation="relu")
    finally:
        routing.set_routes(previous)
    assert dispatch_path(x, 32, "relu").startswith("Triton")


@pytest.mark.parametrize("memory_format", [CF, CL])
def test_output_recomputation_reruns_the_kernels_bit_identically(memory_format, path):
    torch.manual_seed(0)
    gn, conv = gn_det.GroupNorm(2, 8, activation="relu"), torch.nn.Conv2d(8, 4, 3)
    x = torch.randn(2, 8, 6, 6).to(memory_format=memory_format).requires_grad_()
    assert dispatch_path(x, 2, "relu").startswith("Triton")

    def run():
        with count_saved_tensors() as count:
            loss = conv(gn(x)).square().sum()
        return torch.autograd.grad(loss, (x, conv.weight, gn.weight, gn.bias)), count.bytes

    expected, saved = run()
    with gn_det.recompute_outputs():  # the conv's backward gets its input from the kernels, rerun
        got, saved_recomputing = run()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert saved - saved_recomputing == x.numel() * 4  # the GN output, not saved


def test_tuning_measures_the_kernels_against_aten():
    # First-use tuning on real clocks: the kernels under the interpreter (Python, per program)
    # against ATen's GroupNorm: ATen is faster by far, and gives the same results.
    previous = gn_det.set_autotune(True, on_cpu=True), gn_det.set_tuning_cache(None)
    try:
        x = make_input((2, 8, 5, 6), memory_format=CL).requires_grad_()
        weight, bias = make_affine(8)
        y = gn_det.group_norm(x, 2, weight, bias, activation="relu")
        (row,) = gn_det.autotune_decisions()
        assert row["path"] == "aten" and row["times_ms"]["kernels"] > row["times_ms"]["aten"] > 0
        assert dispatch_path(x, 2, "relu").startswith("PyTorch: ATen GroupNorm, tuned (measured: kernels ")
        assert (y.double() - reference(x, 2, weight, bias, 1e-5, "relu")).abs().max().item() < 1e-5
    finally:
        gn_det.set_autotune(previous[0][0], on_cpu=previous[0][1])
        gn_det.set_tuning_cache(previous[1])
        from gn_det.policy import tuning
        tuning.clear_decisions()


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.bfloat16, 1e30), (torch.float16, 2e4)])
@pytest.mark.parametrize("memory_format", [CF, CL])
def test_values_at_the_dtype_limits_are_accurate_or_non_finite(dtype, scale, memory_format, path):
    # float32/bfloat16 deviations near 1e30: their squares overflow; rstd = rsqrt(inf) = 0 gave
    # an output of beta, finite and wrong. float16's largest values square well within float32.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4) * scale
    x = (x.clamp(-6e4, 6e4) if dtype is torch.float16 else x).to(dtype).contiguous(memory_format=memory_format)
    y = triton_group_norm_forward(x, torch.ones(8, dtype=dtype), torch.zeros(8, dtype=dtype), None, 4, 1e-5, 0)[0]
    error = (y.double() - torch.nn.functional.group_norm(x.double(), 4)).abs().max()
    assert not torch.isfinite(y).all() if scale > 1e20 else error < 1e-2
