"""Weight Standardization (MODEL.GN.WEIGHT_STANDARDIZATION, the "FastGNWS" norm name, ws_norm,
convert_to_group_norm(weight_standardization=)): against float64 references of mmcv's ConvWS2d
and timm's StdConv2d definitions, written here, on every build path; state_dict keys; the cache;
autocast, channels_last, torch.compile, ONNX export, output recomputation, fused block ends."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet

import gn_det
from gn_det.errors import ConfigError
from gn_det.layers.weight_std import standardize_weight
from gn_det.lazy import build_lazy_model, lazy_gn_settings, load_lazy_config
from gn_det.modeling.weight_std import WSConv2d, WSTorchConv2d
from gn_cases import export_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
LAZY_WS = os.path.join(ROOT, "configs", "lazy", "mask_rcnn_gn_ws_R_50_FPN_2x.py")


def mmcv_reference(weight):
    """mmcv's ConvWS2d in float64: per output channel, mean and the unbiased std of the
    flattened weight, (w - mean) / (std + 1e-5)."""
    w = weight.detach().double()
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    std = flat.std(dim=1, unbiased=True).reshape(-1, *[1] * (w.dim() - 1))
    return (w - mean) / (std + 1e-5)


def timm_reference(weight):
    """timm's StdConv2d in float64: batch norm of the flattened weight in training mode (the
    population variance), eps 1e-6 inside the square root."""
    w = weight.detach().double()
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                        eps=1e-6).reshape_as(w)


REFERENCES = {"mmcv": mmcv_reference, "timm": timm_reference}


def standardized_convs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, WSConv2d)}


def gn_convs(model):
    return {name for name, m in model.named_modules()
            if isinstance(m, Conv2d) and isinstance(getattr(m, "norm", None), gn_det.GroupNorm)}


def reference_model(model, variant):
    """A copy of ``model`` with plain Conv2d layers whose weights are the float64 reference
    standardization of the WS layers' weights (rounded to their dtype)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, WSConv2d):
            m.__class__ = Conv2d
            with torch.no_grad():
                m.weight.copy_(REFERENCES[variant](m.weight).to(m.weight.dtype))
    return ref


# ----------------------------------------------------------------------------- the definition


@pytest.mark.parametrize("variant", ["mmcv", "timm"])
@pytest.mark.parametrize("shape,channels_last", [((16, 8, 3, 3), False), ((16, 8, 3, 3), True), ((32, 4, 1, 1), False),
                                                 ((64, 3, 7, 7), True)])
def test_standardize_weight_matches_float64_reference(variant, shape, channels_last):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05 + 0.01
    if channels_last:
        w = w.to(memory_format=torch.channels_last)
    got = standardize_weight(w, variant)
    torch.testing.assert_close(got.double(), REFERENCES[variant](w), rtol=1e-5, atol=1e-5)
    assert got.stride() == w.stride()  # memory format kept
    # the two definitions differ measurably on small fan-ins (n / (n - 1) and eps): not interchangeable
    other = REFERENCES["timm" if variant == "mmcv" else "mmcv"](w)
    if shape[1] * shape[2] * shape[3] <= 8:
        assert not torch.allclose(got.double(), other, rtol=1e-5, atol=1e-5)


def test_half_precision_weights_use_float32_statistics():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3) * 0.02 + 3.0  # mean large against the spread
    got = standardize_weight(w.to(torch.bfloat16), "mmcv")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), mmcv_reference(w.to(torch.bfloat16)), rtol=1e-2, atol=1e-2)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"MODEL.GN.WEIGHT_STANDARDIZATION='ws': expected one of '', 'mmcv', 'timm'"):
        gn_det.GNSettings(weight_standardization="ws")
    with pytest.raises(ConfigError, match=r"MODEL.GN.WEIGHT_STANDARDIZATION=True: expected one of"):
        gn_det.GNSettings(weight_standardization=True)
    with pytest.raises(ConfigError, match=r"gn.weight_standardization='std': expected one of"):
        lazy_gn_settings({"gn": {"weight_standardization": "std"}})
    with pytest.raises(ValueError, match="unbiased std of one value is NaN"):  # depthwise 1x1: fan-in 1
        WSConv2d(8, 8, 1, groups=8, weight_standardization="mmcv")
    WSConv2d(8, 8, 1, groups=8, weight_standardization="timm")  # defined there


# ----------------------------------------------------------------------------- build paths


def _images(n=1, size=64, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, 3, size, size) * 50


def test_yaml_config_build_standardizes_every_conv_feeding_a_gn_and_keeps_keys():
    plain = gn_det.build_model(gn_det.get_config(DEMO, ["MODEL.DEVICE", "cpu"])).eval()
    cfg = gn_det.get_config(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.GN.WEIGHT_STANDARDIZATION", "mmcv"])
    model = gn_det.build_model(cfg).eval()
    convs = standardized_convs(model)
    assert set(convs) == gn_convs(model) and len(convs) > 20  # stem, blocks, shortcuts, FPN, box and mask heads
    assert any(n.startswith("roi_heads.mask_head") for n in convs) and any(n.startswith("roi_heads.box_head") for n in convs)
    assert "backbone.fpn_lateral2" in convs and "backbone.bottom_up.stem.conv1" in convs
    assert {c.weight_standardization.name for c in convs.values()} == {"mmcv"}
    assert not standardized_convs(plain)
    assert list(model.state_dict()) == list(plain.state_dict())  # a checkpoint loads either way
    model.load_state_dict(plain.state_dict())
    x = _images()
    with torch.no_grad():
        got = model.backbone(x)
        expected = reference_model(model, "mmcv").backbone(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)


def test_lazy_config_build_with_timm_variant():
    # the GN+WS LazyConfig (its training steps are a slow test): mmcv's WS, RGB input everywhere
    cfg = load_lazy_config(LAZY_WS)
    assert lazy_gn_settings(cfg).weight_standardization == "mmcv"
    assert cfg.model.input_format == cfg.dataloader.train.mapper.image_format == cfg.dataloader.test.mapper.image_format == "RGB"
    model = build_lazy_model(LazyConfig.apply_overrides(cfg, ["train.device=cpu", "gn.weight_standardization=timm"])).eval()
    convs = standardized_convs(model)
    assert set(convs) == gn_convs(model) and len(convs) == 69  # every GN's conv: 53 + 8 FPN + 4 box + 4 mask
    assert {c.weight_standardization.name for c in convs.values()} == {"timm"}
    stem = model.backbone.bottom_up.stem
    x = _images(size=32)
    with torch.no_grad():
        got = stem(x)
        expected = reference_model(stem, "timm")(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_convert_to_group_norm_adds_weight_standardization():
    torch.manual_seed(0)
    net = ResNet(BasicStem(3, 64, norm="FrozenBN"), ResNet.make_default_stages(18, norm="FrozenBN")[:2],
                 out_features=["res3"]).eval()
    report = gn_det.convert_to_group_norm(net, num_groups=4, weight_standardization="mmcv")
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert set(report.standardized) == set(standardized_convs(net)) == gn_convs(net)
    assert "convs with standardized weights" in str(report)
    x = _images(size=32)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["res3"], reference_model(net, "mmcv")(x)["res3"], rtol=1e-4, atol=1e-4)


def test_one_layer_by_norm_name_and_by_ws_norm():
    # YAML: only the mask head's convs
    cfg = gn_det.get_config(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.ROI_MASK_HEAD.NORM", "FastGNWS"])
    convs = standardized_convs(gn_det.build_model(cfg))
    assert convs and all(name.startswith("roi_heads.mask_head.") for name in convs)
    # LazyConfig / Python: a factory for one layer, its own variant and GN settings
    factory = L(gn_det.ws_norm)(norm=L(gn_det.GroupNorm.factory)(num_groups=4), variant="timm")
    conv = Conv2d(8, 16, 3, padding=1, norm=instantiate(factory)(16))
    x = torch.randn(2, 8, 9, 9)
    with pytest.raises(ConfigError, match=r"asks for weight standardization \('timm'\).*gn_det.standardize_weights"):
        conv(x)  # built outside every build path and not yet standardized: never silently plain
    assert gn_det.standardize_weights(conv) == [""]
    assert conv.norm.num_groups == 4 and conv.weight_standardization.name == "timm"
    expected = conv.norm(F.conv2d(x.double(), timm_reference(conv.weight), conv.bias.double(), padding=1).float())
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)


def test_a_projects_own_conv_with_a_norm_under_settings():
    settings = gn_det.GNSettings(num_groups=4, weight_standardization="mmcv")
    with gn_det.gn_settings(settings):
        conv = Conv2d(8, 16, 3, norm=gn_det.modeling.get_norm("FastGN", 16))
    with pytest.raises(ConfigError, match="never standardized"):
        conv(torch.randn(1, 8, 5, 5))
    gn_det.modeling.finish_model(conv, settings)  # what every build path runs
    assert isinstance(conv, WSConv2d) and conv(torch.randn(1, 8, 5, 5)).shape == (1, 16, 3, 3)

    class MyConv(Conv2d):
        pass

    with pytest.raises(TypeError, match="is not detectron2's Conv2d"):
        WSConv2d.convert(MyConv(4, 4, 3), "mmcv")


def test_retinanet_head_convs_in_a_sequential_are_standardized():
    """detectron2's RetinaNet head puts torch's nn.Conv2d and its norm in an nn.Sequential (no
    detectron2 Conv2d norm=): those convolutions are standardized too, the keys unchanged."""
    from detectron2 import model_zoo

    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "FastGN", "MODEL.FPN.NORM", "FastGN",
            "MODEL.RETINANET.NORM", "FastGN", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    # (detectron2's own file: its anchor sizes are a YAML !!python tag)
    plain = gn_det.build_model(gn_det.get_config(path, opts, allow_unsafe=True)).eval()
    model = gn_det.build_model(gn_det.get_config(path, [*opts, "MODEL.GN.WEIGHT_STANDARDIZATION", "timm"],
                                                 allow_unsafe=True)).eval()
    head = {n for n, m in model.named_modules() if isinstance(m, WSTorchConv2d)}
    assert head == {f"head.{tower}.{i}" for tower in ("cls_subnet", "bbox_subnet") for i in (0, 3, 6, 9)}
    assert not any(isinstance(m, WSTorchConv2d) for m in model.head.cls_score.modules())  # no norm after it
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    reference = copy.deepcopy(model.head)
    for m in reference.modules():
        if isinstance(m, WSTorchConv2d):
            m.__class__ = torch.nn.Conv2d
            with torch.no_grad():
                m.weight.copy_(timm_reference(m.weight).float())
    features = [torch.randn(1, 256, size, size) for size in (8, 4, 2, 1, 1)]  # P3-P7
    with torch.no_grad():
        for got, expected in zip(model.head(features), reference(features)):
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_a_norm_asking_for_ws_after_no_convolution_fails_the_build_naming_it():
    settings = gn_det.GNSettings(num_groups=4, weight_standardization="mmcv")
    with gn_det.gn_settings(settings):
        module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Unflatten(1, (8, 1, 1)),
                                     gn_det.modeling.get_norm("FastGN", 8))
    with pytest.raises(ConfigError, match=r"^2: this norm asks for weight standardization .* no convolution is known"):
        gn_det.modeling.finish_model(module, settings)


# ----------------------------------------------------------------------------- training, cache


@pytest.mark.parametrize("variant", ["mmcv", "timm"])
def test_gradient_through_the_standardization_matches_float64(variant):
    # the hand-written backward against autograd through the float64 reference definitions
    torch.manual_seed(0)
    conv = WSConv2d(4, 8, 3, bias=False, weight_standardization=variant)
    x = torch.randn(2, 4, 7, 7)
    conv(x).square().sum().backward()
    w64 = conv.weight.detach().double().requires_grad_()
    reference = mmcv_reference_with_grad(w64) if variant == "mmcv" else timm_reference_with_grad(w64)
    F.conv2d(x.double(), reference).square().sum().backward()
    # the gradient is a difference of terms of the size of its largest elements: tolerance relative to those
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=0, atol=1e-5 * w64.grad.abs().max().item())


def test_gradient_of_a_constant_channel_is_finite():
    w = torch.ones(2, 3, 3, 3)
    w[1] = torch.randn(3, 3, 3)
    w.requires_grad_()
    standardize_weight(w, "mmcv").mul(torch.randn(2, 3, 3, 3)).sum().backward()
    assert torch.isfinite(w.grad).all()  # autograd through the std of a constant would give NaN


def mmcv_reference_with_grad(w):
    flat = w.reshape(w.shape[0], -1)
    return (w - flat.mean(1).view(-1, 1, 1, 1)) / (flat.std(1).view(-1, 1, 1, 1) + 1e-5)


def timm_reference_with_grad(w):
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(w)


def test_cached_without_gradient_and_renewed_when_the_weight_changes():
    torch.manual_seed(0)
    conv = WSConv2d(4, 8, 3, weight_standardization="mmcv")
    with torch.no_grad():
        first = conv.standardized_weight()
        assert conv.standardized_weight() is first  # no recomputation per call
    assert conv.standardized_weight() is not first and conv.standardized_weight().requires_grad  # training: autograd
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(torch.randn(1, 4, 5, 5)).sum().backward()
    optimizer.step()  # in place: the weight's version changes
    with torch.inference_mode():
        renewed = conv.standardized_weight()
    torch.testing.assert_close(renewed.double(), mmcv_reference(conv.weight), rtol=1e-5, atol=1e-5)
    # a frozen layer in training uses the cache made under inference_mode: it can be saved for backward
    conv.weight.requires_grad_(False)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None
    conv.load_state_dict({"weight": torch.ones_like(conv.weight) + torch.arange(3.0).view(1, 1, 1, 3),
                          "bias": conv.bias.detach()})
    with torch.no_grad():
        torch.testing.assert_close(conv.standardized_weight().double(), mmcv_reference(conv.weight), rtol=1e-5, atol=1e-5)
    assert "_ws_cache" not in conv.__getstate__()
    # a write through .data leaves the version counter as it was (an EMA's update, say): the
    # cache is made again when the mode is next set, as an evaluation does
    with torch.no_grad():
        stale = conv.standardized_weight()
    conv.weight.data.add_(torch.randn_like(conv.weight))
    conv.eval()
    with torch.no_grad():
        fresh = conv.standardized_weight()
    assert not torch.equal(fresh, stale)
    torch.testing.assert_close(fresh.double(), mmcv_reference(conv.weight), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- autocast, layout, compile, export


def _ws_block(channels_last=False, seed=0):
    torch.manual_seed(seed)
    with gn_det.gn_settings(gn_det.GNSettings(num_groups=4)):
        block = BottleneckBlock(16, 32, bottleneck_channels=8, stride=2, norm="FastGN")
    gn_det.modeling.finish_model(block, gn_det.GNSettings(weight_standardization="mmcv"))
    for p in block.parameters():  # GN affine away from identity, so every term matters
        if p.dim() == 1:
            with torch.no_grad():
                p.uniform_(0.5, 1.5)
    return block.to(memory_format=torch.channels_last) if channels_last else block


def test_fused_block_end_channels_last_and_autocast():
    block = _ws_block()
    assert type(block).__name__ == "FusedBottleneckBlock" and len(standardized_convs(block)) == 4
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        expected = reference_model(block, "mmcv")(x)
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)
        cl = _ws_block(channels_last=True)
        got = cl(x.to(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(x)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


def test_output_recomputation_reruns_the_standardized_projection_bit_identically():
    def grads(block):
        x = torch.randn(2, 16, 10, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
        block(x).square().sum().backward()
        return [x.grad] + [p.grad for p in block.parameters()]

    expected = grads(_ws_block())
    block = _ws_block()
    gn_det.set_recompute_output(block, True)
    assert gn_det.modeling.projections.projection_convs(block) == [block.shortcut] and isinstance(block.shortcut, WSConv2d)
    got = grads(block)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_torch_compile_fullgraph():
    block = _ws_block()
    x = torch.randn(2, 16, 10, 10)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert block.conv1.weight.grad is not None


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_uses_standard_ops(dynamo):
    pytest.importorskip("onnx")
    from onnx import numpy_helper

    block = _ws_block().eval()
    x = torch.randn(1, 16, 10, 10)
    proto = export_onnx(block, x, dynamo)
    ops = {node.op_type for node in proto.graph.node}
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    if not dynamo:  # the standardization recorded as operators
        assert {"ReduceMean", "Sqrt", "Div", "Sub", "Conv"} <= ops, ops
    else:  # the exporter folds it into the weights: they are the standardized ones
        standardized = mmcv_reference(block.conv2.weight).float()
        weights = [numpy_helper.to_array(t) for t in proto.graph.initializer]
        assert any(w.shape == standardized.shape and torch.allclose(torch.from_numpy(w.copy()), standardized, atol=1e-5)
                   for w in weights)
