"""gn_det in detectron2: norm names in every norm config key, MODEL.GN.* settings per config,
fused ReLUs with detectron2's state_dict keys, conversion of built models, and every config
under configs/ building on CPU."""
import glob
import inspect
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall, instantiate
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import build_backbone, build_model as d2_build_model, build_sem_seg_head
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.utils.events import EventStorage
from torch import nn

import gn_det
from gn_det.train.data import synthetic_batch
from gn_det.modeling.fuse import FusedBasicBlock, FusedBasicStem, FusedBottleneckBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_CONFIG = os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml")


def small(cfg):
    """CPU-sized settings that leave the architecture as it is."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    return cfg


def stock_cfg(name):
    return small(gn_det.get_config(model_zoo.get_config_file(name)))


def gn_layers(module):
    return [m for m in module.modules() if isinstance(m, gn_det.GroupNorm)]


# ----------------------------------------------------------------------------- norm names


def test_norm_name_is_exported():
    assert gn_det.NORM_NAME == "FastGN"
    assert isinstance(get_norm("FastGN", 64), gn_det.GroupNorm)
    assert type(get_norm("GN", 64)) is nn.GroupNorm  # detectron2's names keep their meaning
    assert get_norm("", 64) is None


def mask_rcnn_cfg_with_gn_in(key: str):
    """detectron2's stock Mask R-CNN R50-FPN config with MODEL.<key>.NORM = "FastGN"."""
    cfg = stock_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    getattr(cfg.MODEL, key).NORM = "FastGN"
    return cfg


@pytest.mark.parametrize("key", ["RESNETS", "FPN"])
def test_backbone_norm_keys(key):
    backbone = build_backbone(mask_rcnn_cfg_with_gn_in(key))
    if key == "RESNETS":
        assert isinstance(backbone.bottom_up.stem.conv1.norm, gn_det.GroupNorm)
        assert isinstance(backbone.bottom_up.res4[0].conv2.norm, gn_det.GroupNorm)
        assert backbone.fpn_lateral2.norm is None
    else:
        assert isinstance(backbone.fpn_lateral2.norm, gn_det.GroupNorm)
        assert isinstance(backbone.fpn_output5.norm, gn_det.GroupNorm)
        assert not isinstance(backbone.bottom_up.stem.conv1.norm, gn_det.GroupNorm)


@pytest.mark.parametrize("head", ["ROI_BOX_HEAD", "ROI_MASK_HEAD"])
def test_roi_head_norm_keys(head):
    cfg = mask_rcnn_cfg_with_gn_in(head)
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 2
    model = d2_build_model(cfg)
    box_gn = gn_layers(model.roi_heads.box_head)
    mask_gn = gn_layers(model.roi_heads.mask_head)
    assert (len(box_gn), len(mask_gn)) == ((2, 0) if head == "ROI_BOX_HEAD" else (0, 4))


def test_sem_seg_head_norm_key():
    cfg = stock_cfg("Misc/semantic_R_50_FPN_1x.yaml")
    cfg.MODEL.SEM_SEG_HEAD.NORM = "FastGN"
    shapes = {f"p{i}": ShapeSpec(channels=256, stride=2**i) for i in range(2, 6)}
    head = build_sem_seg_head(cfg, shapes)
    assert len(gn_layers(head)) > 0


def test_lazy_config_norm_argument():
    stem = instantiate(LazyCall(BasicStem)(in_channels=3, out_channels=64, norm="FastGN"))
    assert isinstance(stem.conv1.norm, gn_det.GroupNorm)
    block = instantiate(LazyCall(BottleneckBlock)(in_channels=64, out_channels=256, bottleneck_channels=64, norm="FastGN"))
    assert len(gn_layers(block)) == 4  # conv1..3 and the projection shortcut


def test_unknown_norm_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown norm 'FastGNN'; registered norms: .*FastGN.*FrozenBN"):
        get_norm("FastGNN", 64)


def test_register_a_norm_of_ones_own():
    @gn_det.register_norm("TestGN16")
    def gn16(channels):
        return gn_det.GroupNorm(16, channels)

    try:
        cfg = stock_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
        cfg.MODEL.FPN.NORM = "TestGN16"
        backbone = build_backbone(cfg)
        assert backbone.fpn_output2.norm.num_groups == 16
        with pytest.raises(KeyError, match="already registered"):
            gn_det.register_norm("TestGN16", lambda c: nn.Identity())
        with pytest.raises(ValueError, match="detectron2's own"):
            gn_det.register_norm("GN", lambda c: nn.Identity())
    finally:
        gn_det.modeling.NORM_REGISTRY.unregister("TestGN16")
    assert "TestGN16" not in gn_det.modeling.NORM_REGISTRY


def test_replace_gn_switch():
    cfg = stock_cfg("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml")
    assert not gn_layers(gn_det.build_model(cfg))
    cfg.MODEL.GN.REPLACE_GN = True
    model = gn_det.build_model(cfg)
    assert not [m for m in model.modules() if type(m) is nn.GroupNorm]
    assert len(gn_layers(model)) > 50


# ----------------------------------------------------------------------------- settings


def test_two_configs_with_different_group_counts_in_one_process():
    cfg32 = small(gn_det.get_config(MAIN_CONFIG))
    cfg16 = small(gn_det.get_config(MAIN_CONFIG, ["MODEL.GN.NUM_GROUPS", 16]))
    cfg_cpg = small(gn_det.get_config(MAIN_CONFIG, ["MODEL.GN.CHANNELS_PER_GROUP", 16, "MODEL.GN.EPS", 1e-3]))
    m16 = gn_det.build_model(cfg16)
    m32 = d2_build_model(cfg32)  # detectron2's own build_model: the registered builders apply the config
    m_cpg = gn_det.build_model(cfg_cpg)
    assert {m.num_groups for m in gn_layers(m16)} == {16}
    assert {m.num_groups for m in gn_layers(m32)} == {32}
    assert {m.num_groups * 16 == m.num_channels for m in gn_layers(m_cpg)} == {True}
    assert {m.eps for m in gn_layers(m_cpg)} == {1e-3}
    assert gn_det.modeling.current_gn_settings() == gn_det.GNSettings()  # nothing leaked


# ----------------------------------------------------------------------------- fused activation


def test_relus_fused_where_detectron2_applies_them():
    model = gn_det.build_model(small(gn_det.get_config(MAIN_CONFIG)))
    bottom_up = model.backbone.bottom_up
    assert type(bottom_up.stem) is FusedBasicStem and bottom_up.stem.conv1.norm.activation == "relu"
    block = bottom_up.res3[1]
    assert type(block) is FusedBottleneckBlock
    assert [block.conv1.norm.activation, block.conv2.norm.activation, block.conv3.norm.activation] == ["relu", "relu", None]
    for conv in list(model.roi_heads.box_head.children())[:4]:
        assert conv.norm.activation == "relu" and conv.activation is None
    assert all(c.norm.activation == "relu" for c in model.roi_heads.mask_head.conv_norm_relus)
    assert model.backbone.fpn_output2.norm.activation is None  # no ReLU after FPN convs


@pytest.mark.parametrize("block_type,fused_type", [(BasicBlock, FusedBasicBlock), (BottleneckBlock, FusedBottleneckBlock)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])  # identity shortcut, and a shortcut conv + GN
def test_block_end_fused_same_results_and_state_dict(block_type, fused_type, channels_last, stride):
    # relu_(norm(conv(x)) + shortcut) as one GN pass: detectron2's block gives the same
    # output and gradients, bit for bit in fp32, with the same state_dict.
    kwargs = {"bottleneck_channels": 32} if block_type is BottleneckBlock else {}
    in_channels = 64 if stride == 1 else 32
    torch.manual_seed(0)
    plain = block_type(in_channels, 64, stride=stride, norm="FastGN", **kwargs)
    for p in plain.parameters():  # GN's gamma and beta away from 1 and 0
        nn.init.uniform_(p, 0.5, 1.5) if p.dim() == 1 else None
    fused = block_type(in_channels, 64, stride=stride, norm="FastGN", **kwargs)
    fused.load_state_dict(plain.state_dict())
    assert gn_det.fuse_norm_activation(fused) > 0 and type(fused) is fused_type
    assert list(fused.state_dict()) == list(plain.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    plain, fused = plain.to(memory_format=memory_format), fused.to(memory_format=memory_format)
    x = torch.randn(2, in_channels, 12, 10).to(memory_format=memory_format)
    results = []
    for block in (plain, fused):
        xg = x.clone().requires_grad_()
        y = block(xg)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        results.append((y, xg.grad, [p.grad for p in block.parameters()]))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert y1.is_contiguous(memory_format=memory_format)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def _losses_and_detections(model, batch, seed=0):
    torch.manual_seed(seed)
    model.train()
    with EventStorage(0):
        losses = {k: v.item() for k, v in model(batch).items()}
    model.eval()
    with torch.no_grad():
        det = model([{"image": batch[0]["image"], "height": 192, "width": 224}])[0]["instances"]
    return losses, det


def test_same_keys_shapes_and_outputs_as_detectron2_gn_model():
    d2_model = d2_build_model(stock_cfg("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"))
    cfg = small(gn_det.get_config(MAIN_CONFIG))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # keep detections from an untrained model
    d2_model.roi_heads.box_predictor.test_score_thresh = 0.0
    ours = gn_det.build_model(cfg)
    d2_state = d2_model.state_dict()
    our_state = ours.state_dict()
    assert list(our_state) == list(d2_state)
    assert all(our_state[k].shape == d2_state[k].shape for k in d2_state)
    with torch.no_grad():  # a trained-looking GN: non-trivial affine everywhere
        for name, tensor in d2_state.items():
            if name.endswith("norm.weight") or name.endswith("norm.bias"):
                tensor.uniform_(0.5, 1.5) if name.endswith("weight") else tensor.uniform_(-0.2, 0.2)
    incompatible = ours.load_state_dict(d2_state)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    batch = synthetic_batch(2, 192, 224, num_classes=80)
    d2_losses, d2_det = _losses_and_detections(d2_model, batch)
    our_losses, our_det = _losses_and_detections(ours, batch)
    assert d2_losses.keys() == our_losses.keys()
    for key in d2_losses:
        assert our_losses[key] == pytest.approx(d2_losses[key], rel=1e-4, abs=1e-5), key
    assert len(our_det) == len(d2_det) > 0
    torch.testing.assert_close(our_det.pred_boxes.tensor, d2_det.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(our_det.scores, d2_det.scores, atol=1e-5, rtol=1e-4)


def _detectron_c2_name(name: str) -> str:
    """A detectron2 ResNet parameter name as Detectron's ImageNet .pkl files spell it."""
    parts = name.split(".")
    suffix = {"weight": "_w", "bias": "_b"}[parts[-1]]
    if parts[-2] == "norm":
        suffix = {"weight": "_gn_s", "bias": "_gn_b"}[parts[-1]]
        parts = parts[:-1]
    if parts[0] == "stem":
        return "conv1" + suffix
    stage, block, conv = parts[0], parts[1], parts[2]
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[conv]
    return f"{stage}_{block}_{branch}{suffix}"


def test_detectron_r50_gn_pkl_names_load(tmp_path):
    model = gn_det.build_model(small(gn_det.get_config(MAIN_CONFIG)))
    bottom_up = model.backbone.bottom_up.state_dict()
    gen = np.random.default_rng(0)
    blobs = {_detectron_c2_name(k): gen.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in bottom_up.items()}
    assert "res2_0_branch2a_gn_s" in blobs and "conv1_gn_b" in blobs
    path = tmp_path / "R-50-GN.pkl"
    path.write_bytes(pickle.dumps(blobs))
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(path)))
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    loaded = model.backbone.bottom_up.res2[0].conv1.norm.weight.detach().numpy()
    np.testing.assert_array_equal(loaded, blobs["res2_0_branch2a_gn_s"])


# ----------------------------------------------------------------------------- conversion


def test_convert_frozen_bn_mask_rcnn_trains_a_step():
    cfg = stock_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    model = d2_build_model(cfg)
    stem_bn = model.backbone.bottom_up.stem.conv1.norm
    stem_gamma, stem_beta = stem_bn.weight.clone(), stem_bn.bias.clone()
    report = gn_det.convert_to_group_norm(model, channels_per_group=16, add_to_norm_free_convs=True)
    assert len(report.replaced) == 53 and {old for _, old in report.replaced} == {"FrozenBatchNorm2d"}
    assert "backbone.fpn_lateral2" in report.added and "backbone.fpn_output5" in report.added
    assert "roi_heads.mask_head.mask_fcn1" in report.added
    assert not [n for n in report.added if n.startswith("proposal_generator")]
    assert model.backbone.fpn_lateral2.bias is None and "backbone.fpn_lateral2" in report.dropped_bias
    assert report.fused_activations > 0 and "replaced 53 FrozenBatchNorm2d" in str(report)
    stem_gn = model.backbone.bottom_up.stem.conv1.norm
    assert isinstance(stem_gn, gn_det.GroupNorm) and stem_gn.num_groups == 4  # 64 channels / 16
    torch.testing.assert_close(stem_gn.weight.detach(), stem_gamma)  # started from BN's affine
    torch.testing.assert_close(stem_gn.bias.detach(), stem_beta)
    assert not stem_gn.weight.requires_grad  # the stem is frozen (FREEZE_AT=2): so is its GN
    assert model.backbone.bottom_up.res3[0].conv1.norm.weight.requires_grad
    batch = synthetic_batch(2, 160, 192, num_classes=80)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.backbone.fpn_output2.norm.weight.detach().clone()
    model.train()
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()
    assert not torch.equal(before, model.backbone.fpn_output2.norm.weight.detach())


def test_convert_group_norm_keeps_groups_and_outputs():
    model = d2_build_model(stock_cfg("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml")).eval()
    image = synthetic_batch(1, 128, 160)[0]["image"]
    with torch.no_grad():
        features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
    report = gn_det.convert_to_group_norm(model)
    assert {old for _, old in report.replaced} == {"GroupNorm"}
    assert not [m for m in model.modules() if type(m) is nn.GroupNorm]
    with torch.no_grad():
        converted = model.backbone(model.preprocess_image([{"image": image}]).tensor)
    for key in features:
        torch.testing.assert_close(converted[key], features[key], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- configs


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_every_config_builds_and_runs(path):
    cfg = small(gn_det.get_config(path))
    model = gn_det.build_model(cfg).eval()
    assert len(gn_layers(model)) > 0 and not [m for m in model.modules() if type(m) is nn.GroupNorm]
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)}])
    assert "instances" in out[0]


# ----------------------------------------------------------------------------- the settings table


def test_usage_doc_lists_the_config_keys_from_the_settings_table():
    with open(os.path.join(ROOT, "docs", "USAGE.md")) as f:
        assert gn_det.GNSettings.keys_markdown() in f.read()


def test_add_gn_config_declares_every_settings_field_with_its_default():
    from detectron2.config import get_cfg

    cfg = gn_det.add_gn_config(get_cfg())
    assert gn_det.GNSettings.from_cfg(cfg) == gn_det.GNSettings()
    assert set(cfg.MODEL.GN) == {"NUM_GROUPS", "CHANNELS_PER_GROUP", "EPS", "FUSE_ACTIVATION", "REPLACE_GN",
                                "RECOMPUTE_OUTPUT", "IGNORE_PADDING", "WEIGHT_STANDARDIZATION"}
    assert cfg.MODEL.CHANNELS_LAST is False
    cfg.MODEL.GN.EPS = 1  # YAML's 1 for 1.0
    assert gn_det.GNSettings.from_cfg(cfg).eps == 1.0
    cfg.MODEL.GN.FUSE_ACTIVATION = "yes"
    with pytest.raises(gn_det.errors.ConfigError, match=r"MODEL.GN.FUSE_ACTIVATION='yes': expected a bool"):
        gn_det.GNSettings.from_cfg(cfg)


def test_registered_builder_names_still_build_detectron2s_modules():
    cfg = small(gn_det.get_config(MAIN_CONFIG, ["MODEL.GN.NUM_GROUPS", 16]))
    ours = d2_build_model(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_fastgn_resnet_fpn_backbone"
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastGNConvFCHead"
    cfg.MODEL.ROI_MASK_HEAD.NAME = "FastGNMaskRCNNConvUpsampleHead"
    aliased = d2_build_model(cfg)
    assert list(aliased.state_dict()) == list(ours.state_dict())
    assert {m.num_groups for m in gn_layers(aliased)} == {16}
    assert type(aliased.backbone.bottom_up.stem) is FusedBasicStem


def test_a_configurable_head_built_directly_from_a_config_gets_its_settings():
    from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead

    cfg = small(gn_det.get_config(MAIN_CONFIG, ["MODEL.GN.CHANNELS_PER_GROUP", 64, "MODEL.GN.EPS", 1e-4]))
    head = FastRCNNConvFCHead(cfg, ShapeSpec(channels=256, height=7, width=7))
    assert {(m.num_groups, m.eps) for m in gn_layers(head)} == {(4, 1e-4)}


@pytest.mark.skipif("bias" not in inspect.signature(nn.GroupNorm).parameters,
                    reason="nn.GroupNorm(bias=False) needs torch 2.14")
def test_convert_keeps_a_group_norm_without_shift_and_its_scale():
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.GroupNorm(8, 32, bias=False))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    report = gn_det.convert_to_group_norm(model)
    assert report.replaced == [("1", "GroupNorm")]
    assert isinstance(model[1], gn_det.GroupNorm) and model[1].bias is None and list(model.state_dict()) == [
        "0.weight", "0.bias", "1.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
