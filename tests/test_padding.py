"""GN over each image's own region of a padded batch (issue 35): the stride rule, the PyTorch
path against a crop-and-normalize reference, the layer inside ``gn_det.image_regions``, the call
key, torch.compile, tracing, recomputation. (The Triton kernels' masked paths:
tests/interpreted/test_masked_kernels.py; detectron2's side: tests/test_padding_detectron2.py.)"""
import pytest
import torch
import torch.nn.functional as F

import gn_det
from gn_det.ops.activation import ACT_NONE, ACT_RELU, ACT_SILU, RESIDUAL_ADD, RESIDUAL_OUTPUT
from gn_det.ops.torch_path import torch_group_norm_backward, torch_group_norm_forward
from gn_det.padding import PaddingError, current_regions, image_regions, level_stride
from gn_det.policy.switches import CALLS

ACTS = {ACT_NONE: lambda t: t, ACT_RELU: F.relu, ACT_SILU: F.silu}


def test_level_stride_follows_stride_two_chains():
    assert level_stride(800, 200) == 4 and level_stride(800, 25) == 32
    assert level_stride(801, 26) == 32  # ceil(801 / 32): no whole ratio, a power of two
    assert level_stride(801, 401) == 2 and level_stride(801, 801) == 1
    assert level_stride(96, 2) == 64 and level_stride(224, 4) == 64  # P6: not the whole ratios 48, 56
    assert level_stride(96, 32) == 3  # no power of two fits: the whole ratio
    with pytest.raises(PaddingError, match="no stride of the padded input's 800"):
        level_stride(800, 300)
    with pytest.raises(PaddingError, match="0 positions"):
        level_stride(800, 0)


@pytest.mark.parametrize("h", [1, 31, 32, 33, 100, 127])
def test_the_region_rule_is_the_size_an_image_alone_has_after_stride_two_layers(h):
    """ceil(h / s) is what a chain of stride-2 layers (size ceil(n / 2) each, as convolutions
    padded by k // 2 and detectron2's pools give) leaves of an image of h rows, whatever the
    padding, so an image's region is the same alone and batched."""
    x = torch.zeros(1, 1, h, 3)
    pool = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    for k in range(1, 6):
        x = pool(x)
        padded = torch.zeros(1, 1, 160, 3)
        for _ in range(k):
            padded = pool(padded)
        with image_regions([(h, 3)], (160, 3)) as regions:
            assert regions.valid_sizes(padded)[0, 0].item() == x.shape[2]


def reference(x, valid, groups, weight, bias, residual, act, eps=1e-5):
    """Each image cropped to its region, normalized in float64 by F.group_norm, pasted into zeros."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n, (vh, vw) in enumerate(valid.tolist()):
        if vh * vw == 0:
            continue
        y = F.group_norm(x[n:n + 1, :, :vh, :vw].double(), groups, weight.double(), bias.double(), eps)
        if residual is not None:
            y = y + residual[n:n + 1, :, :vh, :vw].double()
        out[n:n + 1, :, :vh, :vw] = ACTS[act](y)
    return out


VALID = torch.tensor([[5, 7], [3, 4], [0, 0], [1, 1]], dtype=torch.int32)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("act", [ACT_NONE, ACT_RELU, ACT_SILU])
@pytest.mark.parametrize("with_residual", [False, True])
def test_pytorch_path_matches_crop_and_normalize(memory_format, act, with_residual):
    torch.manual_seed(0)
    x = (torch.randn(4, 8, 5, 7) * 3 + 2).contiguous(memory_format=memory_format).requires_grad_()
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    r = torch.randn(4, 8, 5, 7, requires_grad=True) if with_residual else None
    y, mean, rstd = torch_group_norm_forward(x.detach(), w.detach(), b.detach(), None if r is None else r.detach(),
                                             4, 1e-5, act, VALID)
    want = reference(x, VALID, 4, w, b, r, act)
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=memory_format)
    assert torch.isfinite(mean).all() and torch.isfinite(rstd).all()  # the empty image included
    assert mean[2].eq(0).all()
    dy = torch.randn(want.shape, dtype=torch.float64)
    want.backward(dy)
    mode = RESIDUAL_OUTPUT if act == ACT_RELU and with_residual else RESIDUAL_ADD
    saved = y if mode == RESIDUAL_OUTPUT else (None if r is None else r.detach())
    got = torch_group_norm_backward(dy.float(), x.detach(), w.detach(), b.detach(), mean, rstd, saved, 4, 1e-5, act,
                                    mode, VALID)
    for name, g, expected in zip(("dx", "dweight", "dbias", "dresidual"), got, (x.grad, w.grad, b.grad,
                                                                                   None if r is None else r.grad)):
        if expected is not None:
            torch.testing.assert_close(g.double(), expected.double(), atol=1e-4, rtol=1e-4, msg=name)
    outside = ~gn_det.ops.torch_path.region_mask(x, VALID).expand(x.shape)
    assert y[outside].eq(0).all() and got[0][outside].eq(0).all()
    if r is not None:
        assert got[3][outside].eq(0).all()


def test_the_region_of_the_whole_tensor_is_plain_group_norm():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 5, 7)
    full = torch.tensor([[5, 7], [5, 7]], dtype=torch.int32)
    torch.testing.assert_close(gn_det.group_norm(x, 4, valid=full), F.group_norm(x, 4), atol=1e-6, rtol=1e-5)


def test_group_norm_clamps_regions_and_checks_them():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 5, 7)
    clamped = gn_det.group_norm(x, 4, valid=torch.tensor([[50, 70], [-3, 2]]))
    torch.testing.assert_close(clamped[0], F.group_norm(x[:1], 4)[0], atol=1e-6, rtol=1e-5)
    assert clamped[1].eq(0).all()
    with pytest.raises(ValueError, match=r"valid regions need an \(N, C, H, W\) input"):
        gn_det.group_norm(torch.randn(2, 8, 5), 4, valid=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"valid must be an int32 tensor of shape \(2, 2\)"):
        gn_det.ops.functional.group_norm_op(x, 4, valid=torch.zeros(3, 2, dtype=torch.int32))


def _layer(activation="relu"):
    torch.manual_seed(3)
    layer = gn_det.GroupNorm(4, 8, activation=activation)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    layer.ignore_padding = True
    return layer


def test_layer_inside_image_regions_gives_an_image_its_result_alone():
    layer = _layer()
    torch.manual_seed(4)
    image = torch.randn(1, 8, 6, 9)  # a (24, 36) image's map at stride 4
    batch = torch.randn(2, 8, 10, 10)  # batched with a (40, 40) image: padded to (40, 40)
    batch[:1, :, :6, :9] = image
    with image_regions([(24, 36)], (24, 36)):
        alone = layer(image)
    with image_regions([(24, 36), (40, 40)], (40, 40)):
        batched = layer(batch)
    torch.testing.assert_close(batched[:1, :, :6, :9], alone, atol=1e-6, rtol=1e-5)
    assert batched[0, :, 6:].eq(0).all() and batched[0, :, :, 9:].eq(0).all()
    whole = layer(batch)  # no regions: the whole tensor, as nn.GroupNorm
    torch.testing.assert_close(whole, F.relu(F.group_norm(batch, 4, layer.weight, layer.bias)))
    layer.ignore_padding = False
    with image_regions([(24, 36), (40, 40)], (40, 40)):  # a layer without the flag: the whole tensor
        torch.testing.assert_close(layer(batch), whole)


def test_block_end_writes_zero_in_the_padding():
    layer = _layer(None)
    x, shortcut = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with image_regions([(8, 12), (16, 16)], (16, 16)):  # stride 4: (2, 3) and (4, 4)
        y = layer.forward_residual(x, shortcut, "relu")
    assert y[0, :, 2:].eq(0).all() and y[0, :, :, 3:].eq(0).all()
    want = F.relu(F.group_norm(x[:1, :, :2, :3], 4, layer.weight, layer.bias) + shortcut[:1, :, :2, :3])
    torch.testing.assert_close(y[:1, :, :2, :3], want)


def test_a_layer_that_ignores_padding_refuses_other_batches_and_ranks():
    layer = _layer()
    with image_regions([(8, 8), (16, 16)], (16, 16)):
        with pytest.raises(PaddingError, match="got a batch of 3 inside image_regions of 2 images"):
            layer(torch.randn(3, 8, 4, 4))
        with pytest.raises(PaddingError, match="got a 3-D input"):
            layer(torch.randn(2, 8, 16))
        with pytest.raises(PaddingError, match="no stride of the padded input's 16"):
            layer(torch.randn(2, 8, 5, 4))
    assert current_regions() is None  # closed, after the errors too


def test_regions_values_are_no_part_of_the_call_key():
    """One decided call serves every image size (multi-scale training): no cache keyed on them."""
    layer = _layer()
    x = torch.randn(2, 8, 10, 10)
    CALLS.clear()
    with image_regions([(17, 30), (40, 40)], (40, 40)):
        layer(x)
    held = dict(CALLS)
    for sizes in ([(40, 12), (21, 40)], [(1, 1), (40, 40)]):
        with image_regions(sizes, (40, 40)):
            layer(x)
    assert CALLS == held and len(held) == 1


def test_gradients_are_zero_in_the_padding_and_match_the_crop():
    layer = _layer()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with image_regions([(12, 8), (24, 24)], (24, 24)):  # stride 4: (3, 2)
        layer(x).square().sum().backward()
    assert x.grad[0, :, 3:].eq(0).all() and x.grad[0, :, :, 2:].eq(0).all()
    crop = x.detach()[:1, :, :3, :2].clone().requires_grad_()
    F.relu(F.group_norm(crop, 4, layer.weight.detach(), layer.bias.detach())).square().sum().backward()
    torch.testing.assert_close(x.grad[:1, :, :3, :2], crop.grad, atol=1e-5, rtol=1e-4)


def test_torch_compile_takes_the_regions_as_a_tensor_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), _layer())
    compiled = torch.compile(net, fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(2, 8, 8, 10)
    for sizes in ([(13, 20), (30, 40)], [(17, 33), (32, 21)], [(32, 40), (5, 5)]):
        with image_regions(sizes, (32, 40)):
            torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every size


def test_tracing_records_the_regions_in_standard_operators():
    x = torch.randn(2, 8, 5, 7)
    valid = torch.tensor([[5, 7], [3, 4]], dtype=torch.int32)
    w, b = torch.randn(8), torch.randn(8)
    traced = torch.jit.trace(lambda x, v: gn_det.group_norm(x, 4, w, b, activation="silu", valid=v), (x, valid))
    assert "gn_det::" not in str(traced.graph)
    torch.testing.assert_close(traced(x, valid), gn_det.group_norm(x, 4, w, b, activation="silu", valid=valid),
                               atol=1e-5, rtol=1e-5)
    other = torch.tensor([[2, 2], [5, 1]], dtype=torch.int32)  # the regions are an input, not a constant
    torch.testing.assert_close(traced(x, other), gn_det.group_norm(x, 4, w, b, activation="silu", valid=other),
                               atol=1e-5, rtol=1e-5)


def test_recomputed_outputs_keep_the_regions():
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), _layer(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              _layer())
    x = torch.randn(2, 8, 6, 6)
    grads = []
    for recompute in (False, True):
        gn_det.set_recompute_output(net, recompute)
        net.zero_grad()
        with image_regions([(12, 8), (24, 24)], (24, 24)):
            net(x).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    gn_det.set_recompute_output(net, False)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
