"""Issue 35's proof: with MODEL.GN.IGNORE_PADDING an image's outputs do not depend on the images
batched with it, and without it they do. Real models (GN Mask R-CNN, the demo's; RetinaNet with
GN in its head), trained briefly on the embedded dataset, real validation images, detectron2's
own mappers and meta-architectures.

Alone: the image by itself (padded to its own size rounded up to 32). Batched: the image first,
then a portrait image enlarged to be taller and wider (so the first image gains padding at its
bottom and right). The comparisons allow float32 rounding: convolution algorithms may differ
with the input's size, so features are compared to 1e-4 of their largest magnitude, scores to
1e-4 and boxes to 0.01 px; detections within 1e-3 of another detection's score or of the
lowest score kept (ties, the cut-off) may swap places.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.model_zoo import get_config_file
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

import gn_det
from gn_det.padding import image_regions
from gn_det.train.data.datasets import SHAPES_TRAIN, SHAPES_VAL, register_shapes_dataset

FEATURE_TOL = 1e-4  # of the level's largest magnitude
SCORE_TOL, BOX_TOL, TIE = 1e-4, 1e-2, 1e-3


def mask_rcnn_cfg(ignore_padding: bool):
    cfg = gn_det.get_config("configs/demo/mask_rcnn_gn_shapes.yaml")
    cfg.MODEL.GN.IGNORE_PADDING = ignore_padding
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # compare every detection kept, not only confident ones
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


def retinanet_cfg(ignore_padding: bool):
    cfg = gn_det.get_config(get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"), allow_unsafe=True)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
        "MODEL.RESNETS.NORM", "FastGN", "MODEL.FPN.NORM", "FastGN", "MODEL.FPN.OUT_CHANNELS", "64",
        "MODEL.RETINANET.NORM", "FastGN", "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CONVS", "2",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.GN.NUM_GROUPS", "16",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]]",
        "INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "320", "INPUT.MIN_SIZE_TEST", "192",
        "INPUT.MAX_SIZE_TEST", "320", "DATASETS.TRAIN", f"('{SHAPES_TRAIN}',)", "DATASETS.TEST", f"('{SHAPES_VAL}',)",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "20",
    ])
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    cfg.MODEL.GN.IGNORE_PADDING = ignore_padding
    return cfg


def trained(cfg, iterations: int, lr: float):
    """A model trained ``iterations`` steps on the embedded set (SGD, linear warm-up)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    loader = iter(build_detection_train_loader(cfg))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    with EventStorage():
        for step in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 10)
            losses = sum(model(next(loader)).values())
            optimizer.zero_grad()
            losses.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
    return model.eval()


def with_setting(model, cfg, ignore_padding: bool):
    """The same weights in a model built with the setting on or off."""
    other = build_model(cfg.clone() if cfg.MODEL.GN.IGNORE_PADDING == ignore_padding else _flipped(cfg))
    other.load_state_dict(model.state_dict())
    return other.eval()


def _flipped(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.GN.IGNORE_PADDING = not cfg.MODEL.GN.IGNORE_PADDING
    return cfg


@pytest.fixture(scope="module")
def images():
    """(image alone, the larger image): dataset dicts mapped by detectron2's test mapper."""
    register_shapes_dataset()
    cfg = mask_rcnn_cfg(True)
    mapper = DatasetMapper(cfg, is_train=False)
    records = DatasetCatalog.get(SHAPES_VAL)
    landscape = next(r for r in records if r["width"] > 1.5 * r["height"])
    portrait = next(r for r in records if r["height"] > 1.3 * r["width"])
    first, second = mapper(copy.deepcopy(landscape)), mapper(copy.deepcopy(portrait))
    h, w = first["image"].shape[1:]
    big = F.interpolate(second["image"][None].float(), size=(h + 70, max(w, second["image"].shape[2]) + 45),
                        mode="bilinear", align_corners=False)[0].round().clamp(0, 255).to(second["image"].dtype)
    second.update(image=big, height=big.shape[1], width=big.shape[2])
    return first, second


@pytest.fixture(scope="module")
def mask_rcnn():
    register_shapes_dataset()
    cfg = mask_rcnn_cfg(True)
    return trained(cfg, 40, 0.02), cfg


@pytest.fixture(scope="module")
def retinanet():
    register_shapes_dataset()
    cfg = retinanet_cfg(True)
    return trained(cfg, 30, 0.01), cfg


def run(model, inputs):
    """(outputs, the backbone's features) of ``model`` on ``inputs``."""
    captured = {}
    handle = model.backbone.register_forward_hook(lambda m, args, out: captured.update(out))
    try:
        with torch.no_grad():
            outputs = model([dict(i) for i in inputs])
    finally:
        handle.remove()
    return outputs, captured


def feature_difference(alone: dict, batched: dict, image_size) -> float:
    """The largest difference over the image's region, relative to each level's largest magnitude."""
    worst = 0.0
    for name, a in alone.items():
        stride = 2 ** int(name[1:])  # detectron2's names: p<k> at stride 2^k
        vh, vw = math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)
        a, b = a[0, :, :vh, :vw], batched[name][0, :, :vh, :vw]
        worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item())
    return worst


def unmatched(a, b) -> list:
    """The detections of ``a`` with no twin in ``b`` (same class, score within SCORE_TOL, box within
    BOX_TOL px, mask IoU > 0.99), leaving out those whose score is within TIE of a neighbour's or
    of the lowest score kept (where rounding may reorder or cut them)."""
    a, b = a["instances"], b["instances"]
    lowest = min(a.scores.min().item(), b.scores.min().item()) if len(a) and len(b) else 0.0
    missing = []
    for i in range(len(a)):
        s = a.scores[i].item()
        others = torch.cat([a.scores[:i], a.scores[i + 1:]])
        if s - lowest < TIE or (others - s).abs().lt(TIE).any():
            continue
        twins = (b.pred_classes == a.pred_classes[i]) & (b.scores - s).abs().lt(SCORE_TOL) & (
            (b.pred_boxes.tensor - a.pred_boxes.tensor[i]).abs().amax(dim=1).lt(BOX_TOL))
        if a.has("pred_masks") and twins.any():
            j = int(twins.nonzero()[0])
            inter = (a.pred_masks[i] & b.pred_masks[j]).sum().item()
            union = (a.pred_masks[i] | b.pred_masks[j]).sum().item()
            twins = twins if union == 0 or inter / union > 0.99 else twins & False
        if not twins.any():
            missing.append((i, s))
    return missing


def check_alone_equals_batched(model, images, expect_equal: bool):
    first, second = images
    (alone,), features_alone = run(model, [first])
    (batched, _), features_batched = run(model, [first, second])
    size = tuple(first["image"].shape[1:])
    difference = feature_difference(features_alone, features_batched, size)
    missing = unmatched(alone, batched) + unmatched(batched, alone)
    if expect_equal:
        assert difference < FEATURE_TOL, f"features over the image's region differ by {difference:.2e}"
        assert len(alone["instances"]) == len(batched["instances"]) and len(alone["instances"]) > 0
        assert not missing, f"detections without a twin: {missing}"
    else:  # the effect is real: the padding changes the image's features and detections
        assert difference > 1e-2, f"features differ by only {difference:.2e} without the setting"
        assert missing, "without the setting the detections were the same"


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_an_image_alone_and_batched_gives_the_same_outputs(arch, images, request):
    model, _ = request.getfixturevalue(arch)
    check_alone_equals_batched(model, images, expect_equal=True)


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_without_the_setting_the_batch_changes_an_image(arch, images, request):
    model, cfg = request.getfixturevalue(arch)
    check_alone_equals_batched(with_setting(model, cfg, False), images, expect_equal=False)


def test_training_mode_features_and_losses_of_an_image_do_not_depend_on_its_batch(mask_rcnn, images):
    """In training mode (GN has no running statistics, so train and eval compute alike), the
    image's backbone/FPN features over its region are the same alone and batched, and so are its
    RPN and ROI losses with sampling fixed (the same seed): computed from its slice of the batched
    features (cut to its own padded size) and from its own."""
    model, _ = mask_rcnn
    model.train()
    try:
        first, second = images
        record = DatasetCatalog.get(SHAPES_VAL)
        mapper = DatasetMapper(mask_rcnn_cfg(True), is_train=True, augmentations=[])
        first = mapper(copy.deepcopy(next(r for r in record if r["file_name"].endswith(first["file_name"][-10:]))))
        second = dict(second, instances=first["instances"][:0])
        losses, features = [], []
        for inputs in ([first], [first, second]):
            images_ = model.preprocess_image(inputs)
            with image_regions(images_.image_sizes, images_.tensor.shape[-2:]), torch.no_grad():
                feats = model.backbone(images_.tensor)
            features.append(feats)
            own = images_.tensor[:1, :, :math.ceil(first["image"].shape[1] / 32) * 32,
                                 :math.ceil(first["image"].shape[2] / 32) * 32]
            own_feats = {k: f[:1, :, :math.ceil(own.shape[2] / 2 ** int(k[1:])), :math.ceil(own.shape[3] / 2 ** int(k[1:]))]
                         for k, f in feats.items()}  # (p<k>: stride 2^k)
            own_images = ImageList(own, images_.image_sizes[:1])
            gt = [inputs[0]["instances"]]
            torch.manual_seed(11)
            with torch.no_grad(), EventStorage():
                proposals, rpn_losses = model.proposal_generator(own_images, own_feats, gt)
                _, roi_losses = model.roi_heads(own_images, own_feats, proposals, gt)
            losses.append({**rpn_losses, **roi_losses})
        assert feature_difference(features[0], features[1], tuple(first["image"].shape[1:])) < FEATURE_TOL
        for name in losses[0]:
            torch.testing.assert_close(losses[1][name], losses[0][name], atol=1e-4, rtol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}\n{losses}")
    finally:
        model.eval()
