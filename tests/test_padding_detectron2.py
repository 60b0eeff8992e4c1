"""detectron2's side of ignoring the padding (issue 35; gn_det/modeling/padding.py), with
detectron2's real modules on CPU: which GN layers are marked, the image regions the hooks open
around the backbone and dense heads (and close, also after an exception or an interrupt), the
anchors outside an image's region excluded from the RPN's and RetinaNet's labels, proposals and
detections, the layers beside GN that read beyond a region (ResNet's stem pool, P6/P7, ROIAlign,
the semantic head's upsampling): an image's outputs alone and batched with a larger one are the
same (and detectron2's own for an image that needs no padding), and deep copies and pickles of a
model with the hooks. Each comparison also checks that detectron2's own model differs."""
import copy
import io
import os
import warnings

import pytest
import torch
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import gn_det
from gn_det.errors import ConfigError
from gn_det.modeling import padding as mp
from gn_det.modeling.padding import PaddingRetinaNet, PaddingRPN, anchors_inside, ignore_padding
from gn_det.padding import current_regions, image_regions
from gn_det.train.data import synthetic_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")  # ResNet-18, 64-channel FPN, GN everywhere
SMALL, LARGE = (40, 52), (64, 96)
ALONE = (64, 64)  # SMALL alone, padded to the backbone's size divisibility (32)


def _cfg(meta="GeneralizedRCNN"):
    cfg = gn_det.get_config(DEMO)
    cfg.MODEL.META_ARCHITECTURE = meta
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 60
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 30
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 60
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 30
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    return cfg


def _retinanet_cfg():
    cfg = _cfg("RetinaNet")
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.RETINANET.NORM = "FastGN"
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 50
    return cfg


def _build(cfg):
    torch.manual_seed(0)
    return gn_det.build_model(cfg)


def _gn(module):
    return [m for m in module.modules() if isinstance(m, gn_det.GroupNorm)]


def _image(size, seed):
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed)) * 255


class _Capture:
    """current_regions() (sizes, padded size) each time a module's forward ends."""

    def __init__(self, *modules):
        self.seen = []
        for module in modules:
            module.register_forward_hook(self)

    def __call__(self, module, args, output):
        regions = current_regions()
        self.seen.append(None if regions is None else ([tuple(s) for s in regions.sizes.tolist()], regions.padded_size))


# ----------------------------------------------------------------------------- marking


def _hooked(module, fn, pre=False):
    return list((module._forward_pre_hooks if pre else module._forward_hooks).values()).count(fn)


def test_marks_exactly_the_gn_layers_over_the_images_feature_maps():
    panoptic = _build(_panoptic_cfg())
    retinanet = _build(_retinanet_cfg())
    for model, dense in ((panoptic, ("backbone", "proposal_generator", "sem_seg_head")),
                         (retinanet, ("backbone", "head"))):
        expected = {id(m) for name in dense for m in _gn(getattr(model, name))}
        assert ignore_padding(model) is model
        marked = {id(m) for m in _gn(model) if m.__dict__.get("ignore_padding")}
        assert marked == expected and len(marked) > 10
        assert all(not m.ignore_padding for m in _gn(getattr(model, "roi_heads", nn.Identity())))
    assert len(_gn(panoptic.roi_heads)) >= 8 and len(_gn(panoptic.sem_seg_head)) >= 3  # box and mask heads
    assert len(_gn(retinanet.head)) == 4
    assert type(panoptic.proposal_generator) is PaddingRPN and type(retinanet) is PaddingRetinaNet
    # the hooks, once each (ignore_padding is idempotent)
    ignore_padding(panoptic)
    assert _hooked(panoptic, mp._meta_pre_hook, pre=True) == _hooked(panoptic, mp._meta_hook) == 1
    assert _hooked(panoptic.backbone, mp._backbone_pre_hook, pre=True) == 1
    assert _hooked(panoptic.backbone.bottom_up.stem, mp._zero_padding_hook) == 1
    assert _hooked(panoptic.roi_heads.box_pooler, mp._pooler_pre_hook, pre=True) == 1
    assert _hooked(panoptic.roi_heads.mask_pooler, mp._pooler_pre_hook, pre=True) == 1
    upsamples = [m for m in panoptic.sem_seg_head.modules() if isinstance(m, nn.Upsample)]
    assert upsamples and all(_hooked(m, mp._upsample_pre_hook, pre=True) == _hooked(m, mp._upsample_hook) == 1
                             for m in upsamples)
    assert _hooked(panoptic.sem_seg_head.predictor, mp._edge_padding_hook) == 1
    top = retinanet.backbone.top_block
    assert _hooked(top.p6, mp._zero_padding_hook) == _hooked(top.p7, mp._zero_padding_hook) == 1


def test_the_config_setting_applies_it_at_build():
    cfg = _cfg()
    cfg.MODEL.GN.IGNORE_PADDING = True
    model = _build(cfg)
    assert type(model.proposal_generator) is PaddingRPN and _hooked(model, mp._meta_pre_hook, pre=True) == 1
    assert all(m.ignore_padding for m in _gn(model.backbone)) and not any(m.ignore_padding for m in _gn(model.roi_heads))


def test_the_detectron2_methods_called_have_the_signatures_relied_on():
    """PaddingRPN and PaddingRetinaNet call these of detectron2's classes with one image's anchors
    (gn_det/modeling/hooks.py's list records them)."""
    import inspect

    from detectron2.modeling.proposal_generator import proposal_utils

    relied = {
        RPN.label_and_sample_anchors: "(self, anchors: List[detectron2.structures.boxes.Boxes], gt_instances: "
                                      "List[detectron2.structures.instances.Instances]) -> Tuple[List[torch.Tensor], "
                                      "List[torch.Tensor]]",
        RPN.predict_proposals: "(self, anchors: List[detectron2.structures.boxes.Boxes], pred_objectness_logits: "
                               "List[torch.Tensor], pred_anchor_deltas: List[torch.Tensor], image_sizes: "
                               "List[Tuple[int, int]])",
        RetinaNet.label_anchors: "(self, anchors, gt_instances)",
        RetinaNet.inference_single_image: "(self, anchors: List[detectron2.structures.boxes.Boxes], box_cls: "
                                          "List[torch.Tensor], box_delta: List[torch.Tensor], image_size: "
                                          "Tuple[int, int])",
    }
    for fn, signature in relied.items():
        assert str(inspect.signature(fn)) == signature, fn.__qualname__
    assert "image_sizes" in inspect.signature(proposal_utils.find_top_rpn_proposals).parameters


def test_a_model_not_built_like_a_meta_architecture_is_refused_by_name():
    with pytest.raises(ConfigError, match="no `backbone` module .*none of backbone, proposal_generator, head"):
        ignore_padding(nn.Sequential(nn.Conv2d(3, 8, 3), gn_det.GroupNorm(4, 8)))


def test_torch_group_norm_layers_and_foreign_generators_are_named_in_warnings():
    cfg = _cfg("ProposalNetwork")
    cfg.MODEL.FPN.NORM = "GN"  # detectron2's nn.GroupNorm
    model = _build(cfg)

    class OwnRPN(RPN):
        def predict_proposals(self, *args):
            return super().predict_proposals(*args)

    model.proposal_generator.__class__ = OwnRPN
    with pytest.warns(UserWarning) as record:
        ignore_padding(model)
    text = "\n".join(str(w.message) for w in record)
    assert "8 torch.nn.GroupNorm layer(s)" in text
    assert "OwnRPN overrides predict_proposals" in text
    assert type(model.proposal_generator) is OwnRPN  # left as it is


# ----------------------------------------------------------------------------- the forward's regions


def _proposal_network():
    model = ignore_padding(_build(_cfg("ProposalNetwork")))
    return model.eval()


def test_regions_are_open_during_the_backbone_and_rpn_head_and_closed_after():
    model = _proposal_network()
    capture = _Capture(model.backbone.bottom_up.stem, model.backbone, model.proposal_generator.rpn_head)
    with torch.no_grad():
        model([{"image": _image(SMALL, 0)}, {"image": _image(LARGE, 1)}])
        assert current_regions() is None and mp._forwards() == []
        model([{"image": _image(SMALL, 0)}])
    assert current_regions() is None
    assert capture.seen == [([SMALL, LARGE], LARGE)] * 3 + [([SMALL], ALONE)] * 3
    # the backbone alone (outside its meta-architecture's forward): no regions, as today
    model.backbone(torch.zeros(1, 3, 64, 64))
    assert capture.seen[-1] is None
    # a project's own block around the backbone: the hooks leave it alone
    with image_regions([(40, 50)], (64, 64)):
        model.backbone(torch.zeros(1, 3, 64, 64))
    assert capture.seen[-1] == ([(40, 50)], (64, 64))


def test_regions_are_closed_after_an_exception_and_after_an_interrupt():
    model = _proposal_network()
    raised = []

    def fail(module, args, output):
        if raised:
            raise raised.pop()

    capture = _Capture(model.proposal_generator.rpn_head)
    model.proposal_generator.rpn_head.register_forward_hook(fail)
    batch = [{"image": _image(SMALL, 0)}]
    with torch.no_grad():
        raised.append(RuntimeError("in the RPN head"))
        with pytest.raises(RuntimeError, match="in the RPN head"):
            model(batch)
        assert current_regions() is None and mp._forwards() == []  # the always_call forward hook
        raised.append(KeyboardInterrupt())  # no forward hook runs: the next forward finds it stale
        with pytest.raises(KeyboardInterrupt):
            model(batch)
        assert current_regions() is not None
        model([{"image": _image(LARGE, 1)}])
    assert current_regions() is None and mp._forwards() == []
    assert capture.seen[-1] == ([LARGE], LARGE)


def test_inputs_without_images_and_other_batches_get_no_regions_with_a_warning():
    model = _proposal_network()
    capture = _Capture(model.backbone)
    images = torch.zeros(1, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(KeyError):  # detectron2's own error for inputs without "image"
            model([{"not_image": images[0]}])
        model.backbone.register_forward_pre_hook(lambda m, args: (torch.cat([args[0], args[0]]),), prepend=True)
        model([{"image": images[0]}])  # the backbone gets 2 images for 1
    text = "\n".join(str(w.message) for w in record)
    assert "inputs have no \"image\" tensor each" in text and "not the padded batch of its 1 input images" in text
    assert capture.seen == [None] and current_regions() is None and mp._forwards() == []


def test_nested_models_get_their_own_regions_and_the_outer_ones_come_back():
    outer = _proposal_network()
    inner = copy.deepcopy(outer)  # a deep copy's hooks act on the copy
    capture_inner = _Capture(inner.proposal_generator.rpn_head)
    capture_outer = _Capture(outer.proposal_generator.rpn_head, outer.proposal_generator)  # before, after the inner

    def call_inner(module, args, output):
        inner([{"image": _image(SMALL, 2)}])

    outer.proposal_generator.rpn_head.register_forward_hook(call_inner)
    with torch.no_grad():
        outer([{"image": _image(LARGE, 0)}, {"image": _image(SMALL, 1)}])
    assert capture_inner.seen == [([SMALL], ALONE)]
    assert capture_outer.seen == [([LARGE, SMALL], LARGE)] * 2
    assert current_regions() is None and mp._forwards() == []


def _panoptic_cfg():
    cfg = _cfg("PanopticFPN")
    cfg.MODEL.SEM_SEG_HEAD.NORM = "FastGN"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    return cfg


def _assert_same_instances(batched, alone, count):
    assert len(alone) == len(batched) == count
    torch.testing.assert_close(batched.scores, alone.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    assert torch.equal(batched.pred_classes, alone.pred_classes)


@pytest.mark.parametrize("small", [SMALL, (64, 64)], ids=["padded-alone", "unpadded-alone"])
def test_mask_rcnn_and_semantic_outputs_of_an_image_alone_and_batched_are_the_same(small):
    """PanopticFPN (Mask R-CNN and SemSegFPNHead, GN everywhere): an image's detections, masks
    and semantic logits alone and batched with a larger image. A 64 x 64 image needs no padding
    alone: its maps end at its regions, which ResNet's stem pool, ROIAlign and the bilinear
    upsampling read differently from a batch's padding (gn_det.modeling.padding, 4.); its
    outputs are also detectron2's own (the setting changes nothing for it)."""
    cfg = _panoptic_cfg()
    model = _build(cfg).eval()
    plain = copy.deepcopy(model)
    ignore_padding(model)
    image = {"image": _image(small, 0)}
    batch = [image, {"image": _image(LARGE, 1)}]
    with torch.no_grad():
        alone, batched = model([image])[0], model(batch)[0]
        plain_alone, plain_batched = plain([image])[0], plain(batch)[0]
    _assert_same_instances(batched["instances"], alone["instances"], cfg.TEST.DETECTIONS_PER_IMAGE)
    assert torch.equal(batched["instances"].pred_masks, alone["instances"].pred_masks)
    torch.testing.assert_close(batched["sem_seg"], alone["sem_seg"], rtol=1e-4, atol=1e-3)
    # the effect is real
    plain_b, plain_a = plain_batched["instances"], plain_alone["instances"]
    assert len(plain_b) != len(plain_a) or not torch.allclose(plain_b.scores, plain_a.scores)
    assert not torch.allclose(plain_batched["sem_seg"], plain_alone["sem_seg"], rtol=1e-4, atol=1e-3)
    if small == (64, 64):
        _assert_same_instances(plain_alone["instances"], alone["instances"], cfg.TEST.DETECTIONS_PER_IMAGE)
        torch.testing.assert_close(plain_alone["sem_seg"], alone["sem_seg"], rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- RPN


def _levels(padded, images, fill):
    """Feature maps (N, C, H/s, W/s) per RPN level of a padded input ``padded``: each image's
    region (the GN rule, ceil(size / s)) from its own fixed random map, 0 on a ring of one
    position around it (what a 3x3 convolution at the region's border reads: GN writes 0 in the
    padding), and ``fill`` beyond."""
    features = {}
    for level, stride in zip(("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64)):
        H, W = -(-padded[0] // stride), -(-padded[1] // stride)
        maps = []
        for seed, (h, w) in images:
            gen = torch.Generator().manual_seed(seed * 10 + stride)
            region = torch.randn(64, -(-h // stride), -(-w // stride), generator=gen)
            x = fill(64, H, W).clone()
            x[:, :region.shape[1] + 1, :region.shape[2] + 1] = 0
            x[:, :region.shape[1], :region.shape[2]] = region
            maps.append(x)
        features[level] = torch.stack(maps)
    return features


def _junk(c, h, w):  # large values where the padding is: its anchors would win every top-k
    return torch.full((c, h, w), 30.0)


def _rpn():
    model = ignore_padding(_build(_cfg()))
    rpn = model.proposal_generator
    with torch.no_grad():  # objectness that grows with the features, so the junk scores highest
        rpn.rpn_head.objectness_logits.weight.abs_()
        rpn.rpn_head.conv.weight.add_(0.02)
    return rpn


# SMALL's boxes: the first, in its bottom-right corner, has best anchors whose centre lies outside
BOXES = [[38.0, 34.0, 50.0, 40.0], [4.0, 6.0, 30.0, 28.0]]


def _gt(size, boxes):
    gt = Instances(size)
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    gt.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    return gt


def _alone_and_batched(anchor_generator, strides):
    """("alone" / "batched", the gt instances, the anchors over that batch's padded maps): the
    small image alone, then batched with a larger one."""
    gt_small = _gt(SMALL, BOXES)
    gt_large = _gt(LARGE, [[20.0, 10.0, 90.0, 60.0]])
    for name, padded, gts in (("alone", ALONE, [gt_small]), ("batched", LARGE, [gt_small, gt_large])):
        yield name, gts, anchor_generator([torch.zeros(len(gts), 1, -(-padded[0] // s), -(-padded[1] // s))
                                           for s in strides])


def test_rpn_labels_outside_are_ignored_and_an_images_sample_is_the_same_alone_and_batched():
    rpn = _rpn()
    plain = copy.deepcopy(rpn)
    plain.__class__ = RPN
    runs = {}
    for name, gts, anchors in _alone_and_batched(rpn.anchor_generator, (4, 8, 16, 32, 64)):
        inside = torch.cat(anchors_inside(anchors, SMALL))
        for module in (rpn, plain):
            torch.manual_seed(0)
            labels, boxes = module.label_and_sample_anchors(anchors, gts)
            runs[name, module is rpn] = (labels[0], boxes[0], inside, Boxes.cat(anchors).tensor)
    for name in ("alone", "batched"):
        labels, _, inside, _ = runs[name, True]
        assert (labels[~inside] == -1).all() and (labels[inside] == 1).sum() > 0 and (labels[inside] == 0).sum() > 0
    (la, ba, ia, aa), (lb, bb, ib, ab) = runs["alone", True], runs["batched", True]
    assert torch.equal(aa[ia], ab[ib])  # the same anchors inside, in the same order
    assert torch.equal(la[ia], lb[ib]) and torch.equal(ba[ia][la[ia] == 1], bb[ib][lb[ib] == 1])
    # detectron2's own labels: an anchor outside is a positive, and the sample changes with the batch
    (pa, _, _, _), (pb, _, _, _) = runs["alone", False], runs["batched", False]
    assert (pb[~ib] == 1).any() and (pa[~ia] == 1).any() and not torch.equal(pa[ia], pb[ib])


@pytest.mark.parametrize("training", [False, True])
def test_rpn_proposals_of_an_image_alone_and_batched_are_the_same(training):
    rpn = _rpn()
    plain = copy.deepcopy(rpn)
    plain.__class__ = RPN
    results = {}
    for name, padded, images in (("alone", ALONE, [(0, SMALL)]), ("batched", LARGE, [(0, SMALL), (1, LARGE)])):
        features = _levels(padded, images, _junk)
        image_list = ImageList(torch.zeros(len(images), 3, *padded), [size for _, size in images])
        for module in (rpn, plain):
            module.train(training)
            with torch.no_grad():
                features_list = [features[f] for f in module.in_features]
                anchors = module.anchor_generator(features_list)
                logits, deltas = module.rpn_head(features_list)
                logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
                deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                          for x in deltas]
                results[name, module is rpn] = module.predict_proposals(anchors, logits, deltas,
                                                                        image_list.image_sizes)[0]
                if not training and module is rpn:  # the whole RPN forward gives the same
                    forward, _ = module(image_list, features)
                    assert torch.equal(forward[0].proposal_boxes.tensor, results[name, True].proposal_boxes.tensor)
    alone, batched = results["alone", True], results["batched", True]
    assert len(alone) == len(batched) == rpn.post_nms_topk[training]
    torch.testing.assert_close(batched.objectness_logits, alone.objectness_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.proposal_boxes.tensor, alone.proposal_boxes.tensor, rtol=1e-5, atol=1e-4)
    # detectron2's own: the batched image's proposals come from its padding too (the junk scores highest)
    plain_batched = results["batched", False]
    assert len(plain_batched) != len(alone) or not torch.allclose(plain_batched.objectness_logits,
                                                                   alone.objectness_logits)


# ----------------------------------------------------------------------------- RetinaNet


def test_retinanet_labels_outside_are_ignored_and_the_same_alone_and_batched():
    model = ignore_padding(_build(_retinanet_cfg()))
    runs = {}
    for name, gts, anchors in _alone_and_batched(model.anchor_generator, (8, 16, 32, 64, 128)):
        inside = torch.cat(anchors_inside(anchors, SMALL))
        labels, boxes = model.label_anchors(anchors, gts)
        plain_labels, _ = RetinaNet.label_anchors(model, anchors, gts)
        runs[name] = labels[0], boxes[0], inside, Boxes.cat(anchors).tensor, plain_labels[0]
        assert (labels[0][~inside] == -1).all() and (labels[0][inside] == 0).sum() > 0
        assert (labels[0][inside] == model.num_classes).sum() > 0
    (la, ba, ia, aa, pa), (lb, bb, ib, ab, pb) = runs["alone"], runs["batched"]
    assert torch.equal(aa[ia], ab[ib]) and torch.equal(la[ia], lb[ib])
    fg = la[ia] == 0
    assert torch.equal(ba[ia][fg], bb[ib][fg])
    assert (pb[~ib] == 0).any() and (pa[~ia] == 0).any()  # detectron2's own: anchors outside as foreground


@pytest.mark.parametrize("small,large", [
    (SMALL, (128, 128)), ((64, 64), (128, 128)),
    ((64, 64), (96, 128))],  # P6 (stride 64) of a 96-row batch: 2 rows, not a stride of 48
    ids=["padded-alone", "unpadded-alone", "P6-stride-not-a-whole-ratio"])
def test_retinanet_head_outputs_and_detections_of_an_image_alone_and_batched_are_the_same(small, large):
    cfg = _retinanet_cfg()
    model = _build(cfg).eval()
    with torch.no_grad():  # scores spread out (no near-ties at the top-k boundary)
        model.head.cls_score.weight.normal_(0, 0.3)
    plain = copy.deepcopy(model)
    ignore_padding(model)
    logits = []  # (cloned: forward_inference applies sigmoid_ in place)
    model.head.register_forward_hook(lambda m, args, out: logits.append([x.clone() for x in out[0]]))
    image = {"image": _image(small, 0)}
    batch = [image, {"image": _image(large, 1)}]
    with torch.no_grad():
        alone, batched = model([image])[0]["instances"], model(batch)[0]["instances"]
        plain_alone, plain_batched = plain([image])[0]["instances"], plain(batch)[0]["instances"]
    for stride, level_alone, level_batched in zip((8, 16, 32, 64, 128), *logits):  # P3..P7 over the region
        h, w = -(-small[0] // stride), -(-small[1] // stride)
        torch.testing.assert_close(level_batched[:1, :, :h, :w], level_alone[:, :, :h, :w], rtol=1e-4, atol=1e-4)
    _assert_same_instances(batched, alone, cfg.TEST.DETECTIONS_PER_IMAGE)
    assert len(plain_batched) != len(plain_alone) or not torch.allclose(plain_batched.scores, plain_alone.scores)
    if small == (64, 64):
        _assert_same_instances(plain_alone, alone, cfg.TEST.DETECTIONS_PER_IMAGE)


# ----------------------------------------------------------------------------- copies and pickles


class ProjectRPN(RPN):
    """A project's RPN subclass that changes none of the methods gn_det's replaces."""

    def describe(self):
        return "project"


def _roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_deep_copies_and_pickles_keep_the_marks_hooks_and_classes():
    model = _build(_cfg("ProposalNetwork")).eval()
    model.proposal_generator.__class__ = ProjectRPN
    ignore_padding(model)
    made = type(model.proposal_generator)
    assert made is not ProjectRPN and issubclass(made, ProjectRPN) and issubclass(made, mp._RPNExcluding)
    retinanet = ignore_padding(_build(_retinanet_cfg()))
    for loaded in (copy.deepcopy(model), _roundtrip(model)):
        assert type(loaded.proposal_generator) is made and loaded.proposal_generator.describe() == "project"
        assert sorted(m.ignore_padding for m in _gn(loaded)) == sorted(m.ignore_padding for m in _gn(model))
        capture = _Capture(loaded.proposal_generator.rpn_head)
        with torch.no_grad():
            loaded([{"image": _image(SMALL, 0)}, {"image": _image(LARGE, 1)}])
        assert capture.seen == [([SMALL, LARGE], LARGE)]
        assert current_regions() is None
    for loaded in (copy.deepcopy(retinanet), _roundtrip(retinanet)):
        assert type(loaded) is PaddingRetinaNet
        assert mp._meta_pre_hook in loaded._forward_pre_hooks.values()
        assert mp._backbone_pre_hook in loaded.backbone._forward_pre_hooks.values()
        assert all(m.ignore_padding for m in _gn(loaded.head))


def test_a_training_step_runs_with_the_setting():
    """PanopticFPN's training forward and backward with every hook (RPN sampling, ROI pooling,
    the semantic head's upsampling)."""
    model = ignore_padding(_build(_panoptic_cfg()))
    batch = synthetic_batch(1, *SMALL, boxes_per_image=2, num_classes=3)
    batch += synthetic_batch(1, *LARGE, boxes_per_image=2, num_classes=3, seed=1)
    for item in batch:
        item["sem_seg"] = torch.randint(0, 4, item["image"].shape[-2:])
    with EventStorage(0):
        losses = model(batch)
    assert {"loss_rpn_cls", "loss_cls", "loss_mask", "loss_sem_seg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert current_regions() is None and mp._forwards() == []
    assert all(p.grad is not None for p in model.sem_seg_head.parameters())


def test_inference_called_without_the_forward_opens_the_regions_too():
    """detectron2's test-time augmentation calls GeneralizedRCNN.inference itself, not the forward:
    the regions are opened there too (an image alone and batched: the same detections), the
    forward still opens them once, and the model copies and pickles with it."""
    cfg = _cfg()
    model = _build(cfg).eval()
    plain = copy.deepcopy(model)
    ignore_padding(model)
    assert type(model).__name__ == "PaddingGeneralizedRCNN" and isinstance(model, type(plain))
    image = {"image": _image(SMALL, 0)}
    batch = [image, {"image": _image(LARGE, 1)}]
    seen = _Capture(model.backbone)
    with torch.no_grad():
        alone = model.inference([image], do_postprocess=False)[0]
        batched = model.inference(batch, do_postprocess=False)[0]
        plain_alone = plain.inference([image], do_postprocess=False)[0]
        plain_batched = plain.inference(batch, do_postprocess=False)[0]
        model(batch)  # the forward: regions opened once, by its own hooks
    assert seen.seen == [([SMALL], ALONE), ([SMALL, LARGE], LARGE), ([SMALL, LARGE], LARGE)]
    assert current_regions() is None and mp._forwards() == []
    _assert_same_instances(batched, alone, cfg.TEST.DETECTIONS_PER_IMAGE)
    assert len(plain_batched) != len(plain_alone) or not torch.allclose(plain_batched.scores, plain_alone.scores)
    for copied in (copy.deepcopy(model), torch.load(io.BytesIO(_saved(model)), weights_only=False)):
        assert type(copied) is type(model)
        with torch.no_grad():
            _assert_same_instances(copied.inference(batch, do_postprocess=False)[0], alone,
                                   cfg.TEST.DETECTIONS_PER_IMAGE)


def _saved(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()
