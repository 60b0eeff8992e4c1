"""GN output recomputation (gn_det.set_recompute_output, MODEL.GN.RECOMPUTE_OUTPUT): the same
gradients with it on and off, less saved for backward, in-place changes honoured."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import gn_det
from gn_det import recompute
from gn_det.diagnostics.bench.memory import count_saved_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_gn_stack(activation, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), gn_det.GroupNorm(4, 16, activation=activation),
        nn.Conv2d(16, 16, 3, padding=1), gn_det.GroupNorm(4, 16, activation=activation),
        nn.Conv2d(16, 8, 3, padding=1),
    )


def grads(model: nn.Module, *inputs: torch.Tensor, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with count_saved_tensors() as count:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = sum(model(x).float().square().sum() for x in inputs)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], count.bytes


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_bit_identical_and_outputs_not_saved(activation, channels_last):
    model = conv_gn_stack(activation)
    x = torch.randn(2, 3, 16, 16)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    expected, saved_off = grads(model, x)
    assert gn_det.set_recompute_output(model, True) is model and gn_det.recompute_output_enabled(model)
    got, saved_on = grads(model, x)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert saved_off - saved_on == 2 * x.shape[0] * 16 * 16 * 16 * 4  # the two GN outputs, fp32
    gn_det.set_recompute_output(model, False)
    assert not gn_det.recompute_output_enabled(model)
    assert grads(model, x)[1] == saved_off


def test_gradient_accumulation_two_forwards_one_backward():
    model = conv_gn_stack("relu")
    x1, x2 = torch.randn(2, 3, 12, 12), torch.randn(1, 3, 20, 16)
    expected, _ = grads(model, x1, x2)
    gn_det.set_recompute_output(model, True)
    got, _ = grads(model, x1, x2)  # each forward's handles recompute from that forward's tensors
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_bf16_autocast_within_rounding():
    model = conv_gn_stack("relu")
    x = torch.randn(2, 3, 16, 16)
    expected, saved_off = grads(model, x, autocast=True)
    gn_det.set_recompute_output(model, True)
    got, saved_on = grads(model, x, autocast=True)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-3)
    # GN runs in bf16 under autocast: the next conv saves GN's output itself (no cast copy), so it is not saved.
    assert saved_off - saved_on == 2 * 2 * 16 * 16 * 16 * 2


def test_output_modified_in_place_before_save_is_saved_as_usual():
    torch.manual_seed(0)
    gn, conv = gn_det.GroupNorm(2, 8, activation="relu"), nn.Conv2d(8, 4, 1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)

    def run():
        y = gn(x)
        y.mul_(2)  # the saved values are not GN's output any more
        conv(y).square().sum().backward()
        return [t.grad.clone() for t in (x, conv.weight, gn.weight)]

    expected = run()
    with gn_det.recompute_outputs():
        x.grad = conv.weight.grad = gn.weight.grad = None
        got = run()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_output_modified_in_place_after_save_raises_as_autograd_does():
    gn, conv = gn_det.GroupNorm(2, 8, activation="relu"), nn.Conv2d(8, 4, 1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with gn_det.recompute_outputs():
        y = gn(x)
        out = conv(y)
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_views_of_the_output_and_outer_hooks():
    torch.manual_seed(0)
    gn = gn_det.GroupNorm(2, 8)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 8, 3, 3, requires_grad=True)
    packed = []

    def run():
        y = gn(x)
        out = torch.nn.functional.conv2d(y[:, :, 1:, :5], w)  # the conv saves a view
        return torch.autograd.grad(out.square().sum(), (x, w, gn.weight))

    expected = run()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        if gn_det.recompute._top_hooks is None:  # torch < 2.8: they cannot be chained, and are not dropped
            with pytest.raises(RuntimeError, match=r"hooks set outside it .* torch >= 2\.8 chains them"):
                with gn_det.recompute_outputs():
                    pass
            return
        with gn_det.recompute_outputs():
            got = run()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert packed and not any(t.shape == (2, 8, 5, 5) for t in packed)  # outer hooks see what is saved as is


def test_outer_hooks_refused_where_torch_cannot_chain_them(monkeypatch):
    """torch < 2.8 has no reader for the active saved-tensor hooks (run for real by
    tools/compat_check.sh); here, that torch stood in for by hiding the reader: save_on_cpu
    around a recomputing model raises, naming the torch that chains them, instead of being
    bypassed; without outer hooks, or without grad, nothing changes."""
    monkeypatch.setattr(gn_det.recompute, "_top_hooks", None)
    model = gn_det.set_recompute_output(conv_gn_stack("relu"), True)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    with torch.no_grad(), torch.autograd.graph.save_on_cpu():
        model(x)
    with torch.autograd.graph.save_on_cpu(), pytest.raises(RuntimeError) as info:
        model(x)
    assert "torch.autograd.graph.save_on_cpu" in str(info.value) and f"torch {torch.__version__} cannot" in str(
        info.value) and "torch >= 2.8 chains them" in str(info.value)


def test_torch_compile_leaves_it_off():
    model = conv_gn_stack("relu")
    x = torch.randn(2, 3, 16, 16)
    expected, _ = grads(model, x)
    gn_det.set_recompute_output(model, True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    model.zero_grad(set_to_none=True)
    compiled(x).square().sum().backward()
    for a, p in zip(expected, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_resnet_fpn_backbone_gradients_bit_identical(monkeypatch):
    # Block ends fused (GN + shortcut add + ReLU in one pass) or not, outputs recomputed or
    # not: the same outputs and gradients, bit for bit in fp32, from the same state_dict.
    from detectron2.modeling import build_backbone

    def backbone(fuse: bool):
        cfg = gn_det.get_config(os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"),
                                ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", 0,
                                 "MODEL.GN.FUSE_ACTIVATION", fuse])
        return build_backbone(cfg)

    unfused, fused = backbone(False), backbone(True)
    fused.load_state_dict(unfused.state_dict())  # the same keys and shapes
    x = torch.randn(1, 3, 64, 96)

    def run(model):
        params = tuple(p.untyped_storage().data_ptr() for p in model.parameters())
        model.zero_grad(set_to_none=True)
        with count_saved_tensors(exclude=params) as count:
            out = model(x)
            loss = sum(f.square().sum() for f in out.values())
        loss.backward()
        return out, [p.grad.clone() for p in model.parameters()], count.bytes

    out_unfused, expected, saved_unfused = run(unfused)
    out_fused, got, saved_fused = run(fused)
    assert all(torch.equal(out_unfused[k], out_fused[k]) for k in out_unfused)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert saved_fused == saved_unfused  # the fused block end keeps the output the next conv keeps
    gn_det.set_recompute_output(fused, True)
    _, got, saved_recomputed = run(fused)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    # What stays: x for each GN (as frozen BN's convs keep their inputs) but the projections';
    # no GN output, no block output (recomputed from the block's conv output and shortcut,
    # block after block).
    assert saved_recomputed < 0.55 * saved_unfused
    # The projections' GN inputs (4 block shortcuts, 4 FPN laterals: 1x1 convolutions) are
    # among what is not kept: each is its convolution's output, run again in backward.
    from gn_det.modeling.projections import projection_convs

    convs = projection_convs(fused)
    assert len(convs) == 8 and all(tuple(c.kernel_size) == (1, 1) for c in convs)
    sizes = []
    hooks = [c.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size())) for c in convs]
    _, got, saved_with_projections = run(fused)
    for hook in hooks:
        hook.remove()
    monkeypatch.setattr(recompute, "_projection_finders", [])  # no finder: detectron2's not registered
    gn_det.set_recompute_output(fused, True)  # again, now without the projections
    _, got_without, saved_without_projections = run(fused)
    assert all(torch.equal(a, b) for a, b in zip(expected, got)) and saved_with_projections == saved_recomputed
    assert all(torch.equal(a, b) for a, b in zip(expected, got_without))
    assert saved_without_projections - saved_with_projections == sum(sizes)


def test_projection_shortcut_recomputed_under_bf16_autocast():
    # The shortcut convolution runs again in backward under the forward's autocast state:
    # the same bf16 output, so the same gradients as saving it.
    from detectron2.modeling.backbone.resnet import BottleneckBlock

    from gn_det.modeling.projections import projection_convs

    torch.manual_seed(0)
    block = BottleneckBlock(32, 64, bottleneck_channels=16, stride=2, norm=gn_det.GroupNorm.factory(num_groups=4))
    assert projection_convs(block) == [block.shortcut]
    x = torch.randn(2, 32, 12, 10)
    expected, saved = grads(block, x, autocast=True)
    gn_det.set_recompute_output(block, True)
    got, saved_recomputed = grads(block, x, autocast=True)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert saved - saved_recomputed >= 2 * 64 * 6 * 5 * 2  # at least the bf16 shortcut output


def test_config_key_reaches_detectron2_build_model_and_lazy_settings():
    from detectron2.modeling import build_model

    cfg = gn_det.get_config(os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"),
                            ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.GN.RECOMPUTE_OUTPUT", True])
    assert gn_det.recompute_output_enabled(build_model(cfg))
    cfg.MODEL.GN.RECOMPUTE_OUTPUT = False
    assert not gn_det.recompute_output_enabled(build_model(cfg))
    large = gn_det.get_config(os.path.join(ROOT, "configs", "large_image", "scratch_mask_rcnn_gn_1600_1img.yaml"))
    assert large.MODEL.GN.RECOMPUTE_OUTPUT is True
    from gn_det.lazy import lazy_gn_settings, load_lazy_config

    lazy = load_lazy_config(os.path.join(ROOT, "configs", "lazy", "mask_rcnn_gn_R_50_FPN_50ep_LSJ_1024.py"))
    assert lazy_gn_settings(lazy).recompute_output is True


@pytest.mark.slow  # a Mask R-CNN step twice: about 20 s on 2 cores
def test_whole_mask_rcnn_losses_and_gradients_bit_identical():
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from gn_det.train.data import synthetic_batch

    cfg = gn_det.get_config(os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"),
                            ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", 0])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = synthetic_batch(1, 96, 128, boxes_per_image=4, num_classes=80)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same proposal and ROI sampling
        with EventStorage(0):
            losses = model(batch)
        sum(losses.values()).backward()
        return {k: v.detach() for k, v in losses.items()}, [p.grad.clone() for p in model.parameters()]

    losses_off, grads_off = step()
    gn_det.set_recompute_output(model, True)
    losses_on, grads_on = step()
    assert all(torch.equal(losses_off[k], losses_on[k]) for k in losses_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads_on))


def test_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = conv_gn_stack("relu")
    x = torch.randn(2, 3, 16, 16)
    expected, _ = grads(model, x)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(gn_det.set_recompute_output(model, True))  # as finish_model does, before DDP
        got, saved = grads(ddp, x)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert saved < grads(gn_det.set_recompute_output(model, False), x)[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_gradients_bit_identical_with_the_kernels(channels_last):
    model = conv_gn_stack("relu").cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    # cuDNN's default convolution backward may add in any order: the comparison is of GN's,
    # the kernels' both times (tuning, which recomputation skips, could pick PyTorch's GN).
    tuning = gn_det.set_autotune(False)
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            expected, saved_off = grads(model, x)
            gn_det.set_recompute_output(model, True)
            got, saved_on = grads(model, x)
    finally:
        gn_det.set_autotune(tuning[0], on_cpu=tuning[1])
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert saved_off - saved_on == 2 * 2 * 16 * 32 * 32 * 4


def test_inference_tracing_and_copies_unaffected():
    import copy

    model = gn_det.set_recompute_output(conv_gn_stack("relu"))
    x = torch.randn(1, 3, 12, 12)
    with torch.inference_mode():
        expected = model(x)
    traced = torch.jit.trace(model, x)  # no hooks while tracing: the trace checks pass
    assert torch.equal(traced(x), expected)
    copied = copy.deepcopy(model)
    assert gn_det.recompute_output_enabled(copied) and torch.equal(copied(x), expected)
