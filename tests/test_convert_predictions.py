"""convert_to_group_norm(add_to_norm_free_convs=True) on detectron2's stock models: the
prediction layers (logits, box deltas) never get a norm, and the report says which it left
alone and why."""
import torch
from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.layers import Conv2d
from detectron2.modeling import build_model as d2_build_model

import gn_det


def test_mask_rcnn_predictions_keep_no_norm_at_default_groups():
    """The stock COCO Mask R-CNN (80 classes): 80 logit maps are not divisible by 32 groups,
    and normalizing them would change what the model predicts."""
    cfg = gn_det.get_config(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = d2_build_model(cfg)
    predictor = model.roi_heads.mask_head.predictor
    bias = predictor.bias.detach().clone()
    report = gn_det.convert_to_group_norm(model, add_to_norm_free_convs=True, add_within=("",))  # everything
    assert predictor.out_channels == 80 and predictor.norm is None and torch.equal(predictor.bias, bias)
    skipped = dict(report.skipped)
    assert set(skipped) == {"roi_heads.mask_head.predictor", "proposal_generator.rpn_head.objectness_logits",
                            "proposal_generator.rpn_head.anchor_deltas"}
    assert skipped["roi_heads.mask_head.predictor"].startswith("prediction layer (mask logits")
    assert "RPN objectness logits" in skipped["proposal_generator.rpn_head.objectness_logits"]
    assert "skipped roi_heads.mask_head.predictor: prediction layer" in str(report)
    # the layers that are not predictions still got theirs
    assert {"roi_heads.mask_head.mask_fcn4", "backbone.fpn_output2", "proposal_generator.rpn_head.conv"} <= set(
        report.added)
    assert not [name for name in report.added if name.endswith(tuple(gn_det.modeling.convert.PREDICTION_LAYERS))]


def test_retinanet_score_and_box_convs_keep_no_norm():
    """detectron2's RetinaNet LazyConfig: the head's cls_score and bbox_pred are left alone."""
    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
    model = instantiate(cfg.model)
    weights = {name: getattr(model.head, name).weight.detach().clone() for name in ("cls_score", "bbox_pred")}
    report = gn_det.convert_to_group_norm(model, add_to_norm_free_convs=True, add_within=("backbone.", "head."))
    skipped = dict(report.skipped)
    assert set(skipped) == {"head.cls_score", "head.bbox_pred"}
    assert "class logits" in skipped["head.cls_score"] and "box deltas" in skipped["head.bbox_pred"]
    for name, weight in weights.items():
        layer = getattr(model.head, name)
        assert type(layer) is torch.nn.Conv2d and layer.bias is not None and torch.equal(layer.weight, weight)
    assert isinstance(model.backbone.fpn_lateral3, Conv2d) and "backbone.fpn_lateral3" in report.added
    model.eval()
    with torch.no_grad():  # the converted model still predicts
        (out,) = model([{"image": torch.zeros(3, 64, 64), "height": 64, "width": 64}])
    assert "instances" in out
