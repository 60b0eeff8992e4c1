"""The GN layer on CUDA (the Triton kernels) at detection-sized shapes. Runs only where a
GPU is; its CPU twins are tests/test_group_norm.py (PyTorch path) and
tests/interpreted/test_triton_kernels.py (the same kernels under Triton's interpreter).
Routes and tuning are off here (every shape runs the kernels), but in their own tests."""
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gn_det
from gn_det.policy import routing
from gn_det import policy
from gn_det.ops.activation import ACT_RELU
from gn_det.policy import dispatch_path, triton_enabled_for
from gn_cases import (ALL_ACTIVATIONS, check_forward_backward, check_one_value_per_group, check_residual,
                      check_scale_without_shift, check_strided_inputs, make_affine, make_input, reference)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CF, CL = torch.contiguous_format, torch.channels_last


@pytest.fixture(autouse=True)
def kernels_everywhere():
    """These tests are of the kernels: no route or tuning sends a shape to PyTorch's GroupNorm,
    and no verification failed (verification runs at each bucket's first use, as in any run: a
    failure would send the bucket to the PyTorch path, so it fails the test here; and this
    shows that the kernels pass verification at every shape these tests run: no false alarm)."""
    from gn_det.policy import tuning as decisions
    previous, tuning = routing.set_routes(None), gn_det.set_autotune(False)
    decisions.clear_decisions()
    yield
    failed = [row for row in decisions.decisions() if row["kind"] == "verification" and not row["passed"]]
    decisions.clear_decisions()
    routing.set_routes(previous)
    gn_det.set_autotune(*tuning[:1], on_cpu=tuning[1])
    assert not failed, f"the kernels failed verification: {failed}"


def test_cuda_tensors_go_to_triton():
    assert triton_enabled_for(torch.zeros(2, 4, 3, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_format", [CF, CL])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 256, 200, 336),  # FPN P2 at 1333x800, 2 images
        (1, 64, 400, 672),   # stem output, 1 image
        (2, 2048, 25, 42),   # res5
        (512, 256, 7, 7),    # box head
        (37, 256, 14, 14),   # mask head
    ],
)
def test_detection_shapes(shape, memory_format, dtype):
    check_forward_backward(shape, 32, dtype=dtype, memory_format=memory_format, activation="relu", device="cuda")


@pytest.mark.parametrize("activation", [None, "silu"])
def test_sequences_and_volumes(activation):
    check_forward_backward((3, 96, 1001), 32, activation=activation, device="cuda")
    check_forward_backward((2, 64, 9, 17, 23), 16, activation=activation, device="cuda",
                           memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("memory_format", [CF, CL])
def test_torch_backend_on_cuda(monkeypatch, memory_format):
    # GN_DET_BACKEND=torch: PyTorch operations on CUDA tensors, the same results.
    previous = gn_det.policy.set_backend("torch")
    try:
        assert not triton_enabled_for(torch.zeros(2, 4, 3, device="cuda"))
        check_forward_backward((2, 64, 33, 35), 32, dtype=torch.bfloat16, memory_format=memory_format,
                               activation="relu", device="cuda")
    finally:
        gn_det.policy.set_backend(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [CF, CL])
@pytest.mark.parametrize("shape", [(2, 256, 50, 84), (64, 256, 7, 7)])  # both kernel sets
def test_scale_without_shift_cuda(shape, memory_format, dtype):
    # GroupNorm(..., bias=False): the kernels with beta = 0, dx and dgamma against float64.
    check_scale_without_shift(shape, 32, dtype=dtype, memory_format=memory_format, activation="relu", device="cuda")
    if dtype == torch.float32 and "bias" in inspect.signature(nn.GroupNorm.__init__).parameters:  # torch >= 2.14
        theirs = nn.GroupNorm(32, shape[1], bias=False).cuda()
        ours = gn_det.GroupNorm(32, shape[1], bias=False).cuda()
        assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
        x = make_input(shape, device="cuda", memory_format=memory_format)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_strided_inputs_cuda():
    check_strided_inputs(device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_value_per_group_cuda(dtype):
    check_one_value_per_group(device="cuda", dtype=dtype)


def test_large_mean_cuda():
    x = make_input((2, 256, 100, 168), device="cuda", mean=1e4, std=1.0, memory_format=CL)
    weight, bias = make_affine(256, device="cuda")
    y = gn_det.group_norm(x, 32, weight, bias)
    ref = reference(x, 32, weight, bias, 1e-5, None)
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize("shape", [(2, 256, 50, 84), (64, 256, 7, 7)])  # both kernel sets
def test_no_host_device_sync(shape):
    m = gn_det.GroupNorm(32, 256, activation="relu").cuda()
    x = make_input(shape, device="cuda").requires_grad_()
    m(x).sum().backward()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape,memory_format,stats", [
    ((2, 256, 200, 336), CL, "lanes"), ((2, 256, 200, 336), CL, "gathered"), ((2, 256, 200, 336), CL, "finalized"),
    ((2, 256, 200, 336), CF, "gathered"), ((2, 256, 200, 336), CF, "finalized"),
    ((2, 2048, 25, 42), CF, "gathered"), ((2, 2048, 25, 42), CF, "finalized"),  # shifted windows
])
def test_forward_statistics_each_merge(shape, memory_format, stats, monkeypatch):
    # Each of the forward apply's ways to its groups' statistics (STATS), forced where it is
    # valid at detection shapes, whatever the launcher's cost rule would pick: the same
    # results, at a mean large against the spread.
    from gn_det.ops import triton_launch as group_norm_triton
    mode = {"lanes": group_norm_triton.STATS_BY_LANES, "gathered": group_norm_triton.STATS_GATHERED,
            "finalized": group_norm_triton.STATS_FINALIZED}[stats]
    monkeypatch.setattr(group_norm_triton, "_stats_merge", lambda *args: mode)
    check_forward_backward(shape, 32, dtype=torch.bfloat16, memory_format=memory_format, activation="relu",
                           device="cuda", mean=100.0)


@pytest.mark.parametrize("shape,memory_format", [((2, 2048, 25, 42), CF), ((2, 256, 200, 336), CL)])
def test_forward_bitwise_run_to_run(shape, memory_format):
    # The split forward's apply programs each merge their groups' statistics; with shifted
    # windows (res5's S = 1050 in NCHW) two programs write a row's end elements, with what they
    # merged separately. Deterministic only if they merged the same bits: five runs agree.
    x = make_input(shape, torch.bfloat16, memory_format, "cuda", mean=3.0)
    weight, bias = make_affine(shape[1], "cuda")
    first = gn_det.group_norm(x, 32, weight, bias, activation="relu")
    for _ in range(4):
        assert torch.equal(gn_det.group_norm(x, 32, weight, bias, activation="relu"), first)


def test_more_than_2_to_31_elements():
    x = torch.randn(1, 64, 2**13, 2**12 + 1, device="cuda", dtype=torch.bfloat16)  # 2.15e9 elements
    y = gn_det.group_norm(x, 32)
    last = x[:, -2:].float()  # the last group, beyond 2**31
    expected = (last - last.mean()) / torch.sqrt(last.var(unbiased=False) + 1e-5)
    torch.testing.assert_close(y[:, -2:].float(), expected, atol=2e-2, rtol=2e-2)


def test_one_group_of_more_than_2_to_31_elements():
    # The group's size, cpg * S, is past int32: the statistics count it in float32.
    x = torch.randn(1, 2, 2**15, 2**15 + 8, device="cuda", dtype=torch.bfloat16)  # 2.15e9 elements, G = 1
    x[0, 0] += 3.0  # group mean 1.5, variance 1 + 1.5^2
    weight = torch.ones(2, device="cuda", requires_grad=True)
    y = gn_det.group_norm(x, 1, weight, torch.zeros(2, device="cuda"))
    assert abs(y[0, 0].float().mean().item() - 1.5 / 3.25 ** 0.5) < 2e-2
    assert abs(y[0, 1].float().mean().item() + 1.5 / 3.25 ** 0.5) < 2e-2
    y.float().square().sum().backward()  # dgamma summed = 2 * sum(xhat^2) = 2 * numel at gamma = 1
    assert abs(weight.grad.sum().item() / (2 * x.numel()) - 1.0) < 2e-2


def test_autocast_runs_in_bfloat16():
    m = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), gn_det.GroupNorm(32, 64, activation="relu")).cuda()
    x = torch.randn(2, 16, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16


def test_fused_activation_saves_memory():
    x = make_input((2, 256, 200, 336), device="cuda", dtype=torch.bfloat16).requires_grad_()
    ours = gn_det.GroupNorm(32, 256, activation="silu").cuda()
    plain = nn.GroupNorm(32, 256).cuda()

    def held(fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = fn(x)
        held_bytes = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        del out
        return held_bytes

    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours_held = held(ours)
        theirs_held = held(lambda t: F.silu(plain(t)))
    assert ours_held < x.numel() * x.element_size() // 4, ours_held
    assert theirs_held >= x.numel() * x.element_size(), theirs_held


def test_torch_compile_fullgraph_cuda():
    model = nn.Sequential(nn.Conv2d(8, 64, 3), gn_det.GroupNorm(32, 64, activation="relu")).cuda()
    x = torch.randn(2, 8, 33, 35, device="cuda")
    y = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)


def test_routed_shape_runs_pytorch_groupnorm_in_the_input_dtype(monkeypatch, tmp_path):
    # Under bf16 autocast a routed shape runs F.group_norm (upcast to float32 by autocast) and
    # still returns bf16 in the input's memory format, as the kernels do.
    x = make_input((2, 256, 25, 42), torch.bfloat16, CL, device="cuda").requires_grad_()
    routes = tmp_path / "routes.json"
    key = routing.route_key_of(x, 32, ACT_RELU)
    routes.write_text(json.dumps({"routes": [dict(zip(routing.ROUTE_FIELDS, key), measured="a test")]}))
    routing.set_routes(routes)  # (kernels_everywhere restores the routes after)
    layer = gn_det.GroupNorm(32, 256, activation="relu").cuda()
    assert dispatch_path(x, 32, "relu").endswith("routed (Triton measured slower here)")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    y.float().square().sum().backward()
    ref = reference(x, 32, layer.weight, layer.bias, 1e-5, "relu")
    assert (y.double().cpu() - ref).abs().max().item() < 3e-2 * max(1.0, ref.abs().max().item())
    assert x.grad is not None and torch.isfinite(x.grad).all() and layer.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [CF, CL])
@pytest.mark.parametrize("output_recomputed", [False, True])
@pytest.mark.parametrize("shape", [(2, 256, 50, 84), (200, 256, 14, 14)])  # res4-like (split) and mask head (per group)
def test_residual_block_end_cuda(shape, memory_format, dtype, output_recomputed):
    check_residual(shape, 32, dtype=dtype, memory_format=memory_format, device="cuda",
                   output_recomputed=output_recomputed)


def test_first_use_tuning_on_cuda(tmp_path):
    # Tuning on (kernels_everywhere turned it off): the first call of a bucket measures both
    # paths on CUDA events, the decision is kept and written, the results match either way.
    from gn_det.policy import tuning
    gn_det.set_autotune(True)
    previous = gn_det.set_tuning_cache(tmp_path)
    tuning.clear_decisions()
    try:
        x = make_input((2, 256, 50, 84), torch.bfloat16, CL, device="cuda").requires_grad_()
        layer = gn_det.GroupNorm(32, 256, activation="relu").cuda()
        y = layer(x)
        (row,) = gn_det.autotune_decisions()
        assert row["source"] == "measured" and row["device"] == torch.cuda.get_device_name()
        assert all(t > 0 for t in row["times_ms"].values()) and row["path"] in ("kernels", "aten")
        ref = reference(x, 32, layer.weight, layer.bias, 1e-5, "relu")
        assert (y.double().cpu() - ref).abs().max().item() < 3e-2 * max(1.0, ref.abs().max().item())
        layer(make_input((2, 256, 52, 80), torch.bfloat16, CL, device="cuda").requires_grad_())  # same bucket
        assert len(gn_det.autotune_decisions()) == 1
        (path,) = tmp_path.iterdir()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["path"] for r in lines if r["kind"] == "tuning"] == [row["path"]]
    finally:
        gn_det.set_tuning_cache(previous)
        tuning.clear_decisions()


@pytest.mark.parametrize("fault", ["compile", "launch", "wrong"])
@pytest.mark.parametrize("kernel_set", ["forward", "backward"])
@pytest.mark.parametrize("output_recomputed", [False, True])
def test_failing_kernels_fall_back_to_pytorch_on_cuda(tmp_path, fault, kernel_set, output_recomputed):
    # CUDA twin of tests/interpreted/test_verification.py: a real Triton compile error, triton's
    # OutOfResources, a wrong element; a residual block's end (the fused residual, with and
    # without output recomputation): PyTorch's result, one warning naming the GPU, recorded.
    import warnings
    from gn_det.policy import tuning, verification
    from gn_cases import GRAD_TOLERANCE, assert_close
    previous = gn_det.set_tuning_cache(tmp_path)
    tuning.STORE.warned.clear()

    def step():
        x = make_input((2, 64, 24, 20), device="cuda").requires_grad_()
        residual = make_input((2, 64, 24, 20), device="cuda", seed=3).requires_grad_()
        weight, bias = (t.requires_grad_() for t in make_affine(64, device="cuda"))
        y = gn_det.group_norm(x, 32, weight, bias, activation="relu", residual=residual,
                              output_recomputed=output_recomputed)
        return [y.detach()] + list(torch.autograd.grad(y, [x, weight, bias, residual], torch.ones_like(y)))

    try:
        backend = policy.set_backend("torch")
        expected = step()
        policy.set_backend(backend)
        with warnings.catch_warnings(record=True) as caught, verification.inject_fault(kernel_set, fault):
            warnings.simplefilter("always")
            got, again = step(), step()
        ours = [str(w.message) for w in caught if "kernels are not used" in str(w.message)]
        assert len(ours) == 1 and torch.cuda.get_device_name() in ours[0] and "compute capability" in ours[0]
        for a, b, c in zip(got, again, expected):
            assert_close(a, c, GRAD_TOLERANCE[torch.float32], f"{kernel_set} {fault}")
            assert_close(b, c, GRAD_TOLERANCE[torch.float32], f"{kernel_set} {fault}, second step")
        (row,) = [r for r in tuning.decisions() if r["kind"] == "verification" and not r["passed"]]
        assert row["check"].startswith(kernel_set) and row["device"] == torch.cuda.get_device_name()
    finally:
        tuning.clear_decisions()  # (the fixture's check is for the real kernels)
        gn_det.set_tuning_cache(previous)



def test_split_grids_fill_one_wave_cuda():
    # The partial-sums kernels' grids come from their compiled occupancy on this GPU: the
    # resident-program counts are whole SMs' worth, and the grid is at most one wave.
    from gn_det.ops import triton_launch as group_norm_triton, occupancy
    x = torch.randn(2, 256, 200, 336, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, device="cuda", requires_grad=True)
    gn_det.group_norm(x, 32, w, torch.zeros_like(w), activation="relu").sum().backward()
    sms = occupancy.device_limits(x.device.index).sms
    found = {key[1]: count for key, count in group_norm_triton._resident.items() if key[0] == x.device.index}
    assert {"_stats_partial_kernel", "_backward_partial_kernel"} <= set(found), found
    assert all(count % sms == 0 and count >= sms for count in found.values()), found
    splits, _ = group_norm_triton._splits(2 * 64, 200 * 336, 1024, found["_stats_partial_kernel"])
    assert 2 * 64 * splits <= found["_stats_partial_kernel"]


def test_decide_names_the_kernels_and_the_pytorch_path_on_cuda():
    # GPU twin of tests/test_paths.py's backend and float64 cases (tuning off: kernels_everywhere).
    from gn_det.policy import paths
    x = torch.zeros(2, 64, 8, 8, device="cuda")
    assert paths.decide(x, 32, ACT_RELU) == (paths.KERNELS, "the Triton kernels (verified at the bucket's first use)")
    previous = gn_det.policy.set_backend("torch")
    try:
        assert paths.decide(x, 32, ACT_RELU) == (paths.TORCH, "the backend is 'torch' (set_backend / GN_DET_BACKEND)")
    finally:
        gn_det.policy.set_backend(previous)
    assert paths.decide(x.double(), 32, ACT_RELU).path == paths.TORCH
    assert paths.decide(x[:0], 32, ACT_RELU).reason.startswith("empty input, nothing to compute: ")


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_inputs_behave_alike_for_every_activation_on_cuda(activation, memory_format, dtype):
    """The CUDA twin of tests/test_calls.py's: an empty spatial size is refused, no ROIs give an
    empty output with gradients, for every activation, layout and dtype."""
    layer = gn_det.GroupNorm(4, 8, activation=activation).cuda().to(dtype)
    with pytest.raises(ValueError, match="empty spatial size"):
        layer(torch.zeros(2, 8, 0, 5, device="cuda", dtype=dtype).to(memory_format=memory_format))
    x = torch.zeros(0, 8, 7, 7, device="cuda", dtype=dtype).to(memory_format=memory_format).requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_image_regions_on_the_kernels_match_the_crop(dtype, memory_format):
    """Issue 35 on a GPU: the masked kernels (verified at first use against the masked PyTorch
    path) give each image its result alone, 0 outside its region, at detection shapes (the CPU
    twins: tests/test_padding.py, tests/interpreted/test_masked_kernels.py)."""
    torch.manual_seed(0)
    layer = gn_det.GroupNorm(32, 256, activation="relu").cuda()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    layer.ignore_padding = True
    x = torch.randn(2, 256, 100, 168, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    with gn_det.image_regions([(280, 600), (400, 672)], (400, 672)):  # stride 4: (70, 150) and the whole map
        y = layer(x)
    y.float().square().sum().backward()
    crop = x.detach()[:1, :, :70, :150].clone().requires_grad_()
    want = F.relu(F.group_norm(crop.float(), 32, layer.weight, layer.bias))
    want.square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y[:1, :, :70, :150].float(), want, atol=tol, rtol=tol)
    assert y[0, :, 70:].eq(0).all() and y[0, :, :, 150:].eq(0).all()
    assert x.grad[0, :, 70:].eq(0).all() and x.grad[0, :, :, 150:].eq(0).all()
    torch.testing.assert_close(x.grad[:1, :, :70, :150].float(), crop.grad.float(), atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("shape,memory_format,residual", [
    ((2, 256, 100, 152), CF, False), ((2, 256, 100, 152), CL, True), ((512, 256, 7, 7), CF, False),
    ((50, 256, 14, 14), CF, False)])
def test_direct_launches_compute_what_public_launches_compute(shape, memory_format, residual):
    """The direct launches (gn_det.ops.direct_launch: each launch site's second and later calls)
    give the public launches' results, bit for bit, forward and backward: the CPU twin,
    tests/test_direct_launch.py, shows the launcher is handed the same arguments; this, that the
    real launcher then computes the same."""
    from gn_det.ops import direct_launch
    from gn_det.policy.switches import CALLS

    torch.manual_seed(0)
    x = make_input(shape, torch.bfloat16, memory_format, device="cuda").requires_grad_()
    r = torch.randn_like(x).requires_grad_() if residual else None
    results = {}
    try:
        for direct in (False, True):
            direct_launch.enabled = direct
            CALLS.clear()
            layer = gn_det.GroupNorm(32, shape[1], activation=None if residual else "relu").cuda()
            for _ in range(3):  # the first call records each site; later ones run directly (when enabled)
                y = layer.forward_residual(x, r) if residual else layer(x)
                grads = torch.autograd.grad(y.float().square().sum(), [x, layer.weight] + ([r] if residual else []))
            results[direct] = (y, *grads)
        assert any(site.direct for site in direct_launch.sites())
    finally:
        direct_launch.enabled = True
        CALLS.clear()
    for public, direct in zip(results[False], results[True]):
        assert torch.equal(public, direct)
