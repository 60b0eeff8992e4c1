"""Issue 36's two additions for the detection study: the embedded dataset's 300-image validation
split (``gn_det_shapes_val300``) with a bootstrap standard error of COCO AP over its images
(``gn_det.train.ap_bootstrap``), and the builder option ``MODEL.RESNETS.CONV_BIAS`` that gives
detectron2's ResNet convolutions biases when no norm is set."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")
from detectron2.data import DatasetCatalog, MetadataCatalog

import gn_det
from gn_det.config import ResNetSettings
from gn_det.errors import ConfigError
from gn_det.train import ap_bootstrap
from gn_det.train.data import shapes
from gn_det.train.data.datasets import (SHAPES_VAL, SHAPES_VAL300, check_datasets_exist,
                                        register_shapes_dataset)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
NO_NORM = [item for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
                            "MODEL.ROI_MASK_HEAD.NORM") for item in (key, "")]
CONV_BIAS = ["MODEL.RESNETS.CONV_BIAS", "True", "MODEL.BACKBONE.NAME", "build_fastgn_resnet_fpn_backbone"]


# --- the 300-image split ---

@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    shapes.ensure_shapes_dataset(root)
    return root


def _load(root, split):
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def _image_hashes(root, split):
    return {hashlib.sha1(open(os.path.join(root, split, name), "rb").read()).hexdigest()
            for name in os.listdir(os.path.join(root, split))}


def test_val300_is_a_300_image_split_beside_train_and_val(shapes_root):
    assert shapes.SPLITS == {"train": (300, 0), "val": (60, 1), "val300": (300, 2)}  # train/val as before
    coco = _load(shapes_root, "val300")
    assert len(coco["images"]) == 300 and len(os.listdir(os.path.join(shapes_root, "val300"))) == 300
    assert len(coco["annotations"]) > 600  # 2-6 shapes an image, a few hidden
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    assert len(_load(shapes_root, "val")["images"]) == 60


def test_val300_is_deterministic_and_not_val_drawn_again(shapes_root, tmp_path):
    # the generator draws image after image from the split's seed: its first 4 images again
    shapes.generate_split(str(tmp_path), "val300", 4, 2)
    again, full = _load(str(tmp_path), "val300"), _load(shapes_root, "val300")
    assert again["images"] == full["images"][:4]
    assert again["annotations"] == [a for a in full["annotations"] if a["image_id"] <= 4]
    for name in ("000001.jpg", "000004.jpg"):
        assert open(tmp_path / "val300" / name, "rb").read() == open(os.path.join(shapes_root, "val300", name),
                                                                      "rb").read()
    # its own seed: no image of val (or train) among val300's
    val300 = _image_hashes(shapes_root, "val300")
    assert len(val300) == 300
    assert not val300 & _image_hashes(shapes_root, "val") and not val300 & _image_hashes(shapes_root, "train")
    assert full["images"][0] != _load(shapes_root, "val")["images"][0]


def test_a_root_stamped_before_val300_gets_only_val300(shapes_root):
    """A root generated before val300 existed ("1 seed=0 train=300 val=60") keeps its train and
    val files as they are (another process may be reading them) and gets val300 added."""
    stamp = os.path.join(shapes_root, "VERSION")
    assert open(stamp).read().split() == ["1", "seed=0", "train=300", "val=60", "val300=300"]
    val300_json = os.path.join(shapes_root, "annotations", "instances_val300.json")
    before = open(val300_json).read()
    kept = {s: os.stat(os.path.join(shapes_root, "annotations", f"instances_{s}.json")).st_mtime_ns
            for s in ("train", "val")}
    with open(stamp, "w") as f:
        f.write("1 seed=0 train=300 val=60\n")
    os.remove(val300_json)
    paths = shapes.ensure_shapes_dataset(shapes_root)
    assert open(paths["val300"][0]).read() == before  # the same images again
    assert {s: os.stat(paths[s][0]).st_mtime_ns for s in ("train", "val")} == kept  # not rewritten
    assert open(stamp).read().split()[-1] == "val300=300"


def test_what_a_stamp_says_is_there():
    assert shapes._stamped_splits("1 seed=0 train=300 val=60\n", 0) == {"train": 300, "val": 60}
    assert shapes._stamped_splits("1 seed=0 train=300 val=60", 3) == {}  # another seed: all again
    assert shapes._stamped_splits("0 seed=0 train=300 val=60", 0) == {}  # another version: all again
    assert shapes._stamped_splits("", 0) == {}


def test_val300_is_registered_beside_val():
    register_shapes_dataset()
    records = DatasetCatalog.get(SHAPES_VAL300)
    assert len(records) == 300 and all(os.path.isfile(r["file_name"]) for r in records)
    assert all(os.path.basename(os.path.dirname(r["file_name"])) == "val300" for r in records)
    assert MetadataCatalog.get(SHAPES_VAL300).thing_classes == list(shapes.CLASSES)
    assert len(DatasetCatalog.get(SHAPES_VAL)) == 60  # the demo's and the tests' split stays
    check_datasets_exist([SHAPES_VAL300])  # what train_net checks before evaluating


# --- AP with a bootstrap standard error ---

def _detections(coco, seed=0):
    """Detections of a COCO dict's shapes as a model might give them: most found (boxes and
    masks shifted a little, some with the wrong class), some missed, some false alarms,
    scores drawn (a few tied)."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    out = []
    for a in coco["annotations"]:
        if rng.random() < 0.15:
            continue
        h, w = sizes[a["image_id"]]
        dx, dy = rng.integers(-4, 5, 2)
        polygons = [[v + (dx if i % 2 == 0 else dy) for i, v in enumerate(p)] for p in a["segmentation"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        rle["counts"] = rle["counts"].decode()
        x, y, bw, bh = a["bbox"]
        category = a["category_id"] if rng.random() > 0.1 else 1 + (a["category_id"] % 3)
        score = round(float(rng.uniform(0.05, 1)), 1 if rng.random() < 0.2 else 6)  # some scores tie
        out.append({"image_id": a["image_id"], "category_id": category, "score": score, "segmentation": rle,
                    "bbox": [x + dx, y + dy, bw * rng.uniform(0.85, 1.15), bh * rng.uniform(0.85, 1.15)]})
    for image_id, (h, w) in sizes.items():  # false alarms
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            box = [x, y, 20.0, 20.0]
            rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + 20, y, x + 20, y + 20, x, y + 20]], h, w))
            rle["counts"] = rle["counts"].decode()
            out.append({"image_id": image_id, "category_id": int(rng.integers(1, 4)), "score": float(rng.uniform(0, 0.6)),
                        "segmentation": rle, "bbox": box})
    return out


def _cocoeval_ap(coco, detections, iou_type):
    """pycocotools' own AP (stats[0]), in percent, as detectron2 computes it."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = copy.deepcopy(detections)
    if iou_type == "segm":
        for d in detections:
            d.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(coco)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[0] * 100


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("boot"))
    with open(shapes.generate_split(root, "s", 16, 5)) as f:
        coco = json.load(f)
    return coco, _detections(coco)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_on_every_image_is_cocoevals(small_split, iou_type):
    coco, detections = small_split
    matches = ap_bootstrap.match_per_image(coco, detections, iou_type)
    ap = ap_bootstrap.average_precision(matches)
    assert 20 < ap < 95  # neither trivial nor hopeless
    assert ap == _cocoeval_ap(coco, detections, iou_type)  # bit for bit


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_a_resample_counts_an_image_drawn_twice_twice(small_split, iou_type):
    """AP over a resample with repeats is COCOeval's AP on a dataset holding those images that
    many times (each copy an image of its own, ids in the resample's sorted order)."""
    coco, detections = small_split
    ids = [im["id"] for im in coco["images"]]
    drawn = np.array([0, 0, 0, 2, 3, 3, 5, 7, 7, 8, 9, 11, 12, 12, 13, 15])  # indices into ids, repeats
    copies = {"images": [], "annotations": [], "categories": coco["categories"]}
    copied = []
    for new_id, index in enumerate(np.sort(drawn), start=1):
        old = ids[index]
        copies["images"].append(dict(next(im for im in coco["images"] if im["id"] == old), id=new_id))
        copies["annotations"] += [dict(a, image_id=new_id, id=len(copies["annotations"]) + i + 1)
                                  for i, a in enumerate(a for a in coco["annotations"] if a["image_id"] == old)]
        copied += [dict(d, image_id=new_id) for d in detections if d["image_id"] == old]
    matches = ap_bootstrap.match_per_image(coco, detections, iou_type)
    assert ap_bootstrap.average_precision(matches, drawn) == pytest.approx(_cocoeval_ap(copies, copied, iou_type),
                                                                            abs=1e-12)
    assert ap_bootstrap.average_precision(matches, drawn) != ap_bootstrap.average_precision(matches)


def test_the_bootstrap_standard_error(small_split):
    coco, detections = small_split
    matches = ap_bootstrap.match_per_image(coco, detections, "bbox")
    first = ap_bootstrap.bootstrap_ap(matches, resamples=50, seed=3)
    assert first == ap_bootstrap.bootstrap_ap(matches, resamples=50, seed=3)  # the seed fixes it
    assert first["AP"] == ap_bootstrap.average_precision(matches)
    assert 0.5 < first["se"] < 15 and first["se"] != ap_bootstrap.bootstrap_ap(matches, resamples=50, seed=4)["se"]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in coco["annotations"]]
    exact = ap_bootstrap.bootstrap_ap(ap_bootstrap.match_per_image(coco, perfect, "bbox"), resamples=20)
    assert exact == {"AP": 100.0, "se": 0.0}  # every resample finds everything
    assert ap_bootstrap.match_per_image(coco, [], "bbox") is None  # no detections: NaN, as detectron2
    assert all(np.isnan(v) for v in ap_bootstrap.bootstrap_ap(None).values())


def test_results_with_se_reads_the_files_detectron2_writes(small_split, tmp_path):
    coco, detections = small_split
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    (tmp_path / "coco_instances_results.json").write_text(json.dumps(detections))
    found = ap_bootstrap.results_with_se(str(tmp_path / "gt.json"), str(tmp_path / "coco_instances_results.json"),
                                         resamples=30, seed=1)
    assert found["images"] == 16 and found["bootstrap"] == {"resamples": 30, "seed": 1}
    assert found["box_AP"] == _cocoeval_ap(coco, detections, "bbox")
    assert found["mask_AP"] == _cocoeval_ap(coco, detections, "segm")
    assert found["box_AP_se"] > 0 and found["mask_AP_se"] > 0


def test_import_gn_det_does_not_load_the_bootstrap():
    import subprocess
    import sys

    code = "import sys, gn_det; print('gn_det.train.ap_bootstrap' in sys.modules, 'gn_det.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- MODEL.RESNETS.CONV_BIAS ---

def _resnet_convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("backbone.bottom_up")}


def test_the_key_is_declared_once_off_by_default_and_documented():
    cfg = gn_det.get_config(DEMO)
    assert cfg.MODEL.RESNETS.CONV_BIAS is False and ResNetSettings.from_cfg(cfg) == ResNetSettings()
    with open(os.path.join(ROOT, "docs", "USAGE.md")) as f:
        assert ResNetSettings.keys_markdown() in f.read()


@pytest.mark.parametrize("opts,biases", [(NO_NORM + CONV_BIAS, True), (NO_NORM, False),
                                         (NO_NORM + CONV_BIAS[2:], False)],
                         ids=["on", "off (detectron2's builder)", "off (gn_det's builder)"])
def test_resnet_convolutions_have_biases_iff_the_option_is_on(opts, biases):
    model = gn_det.build_model(gn_det.get_config(DEMO, opts))
    convs = _resnet_convs(model)
    assert len(convs) == 21  # R18: stem, 16 in the blocks, 4 projection shortcuts
    assert all((m.bias is not None) == biases for m in convs.values())
    heads = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("backbone.fpn")]
    assert heads and all(m.bias is not None for m in heads)  # the FPN has its own without a norm anyway
    if biases:
        assert all(torch.equal(m.bias, torch.zeros(m.out_channels)) and m.bias.requires_grad for m in convs.values())
        assert "backbone.bottom_up.stem.conv1.bias" in model.state_dict()


def test_the_biases_are_trained():
    cfg = gn_det.get_config(DEMO, NO_NORM + CONV_BIAS + ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", 128])
    model = gn_det.build_model(cfg)
    model.train()
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    from detectron2.structures import BitMasks, Boxes, Instances

    target = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[20.0, 20.0, 70.0, 60.0]])),
                       gt_classes=torch.tensor([1]))
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    mask[:, 20:60, 20:70] = True
    target.gt_masks = BitMasks(mask)
    from detectron2.utils.events import EventStorage

    with EventStorage():  # (detectron2's training forward logs to one)
        sum(model([{"image": image, "instances": target}]).values()).backward()
    convs = _resnet_convs(model)
    assert all(m.bias.grad is not None for m in convs.values())
    assert convs["backbone.bottom_up.stem.conv1"].bias.grad.abs().sum() > 0


def test_a_frozen_stage_keeps_its_biases_frozen():
    model = gn_det.build_model(gn_det.get_config(DEMO, NO_NORM + CONV_BIAS + ["MODEL.BACKBONE.FREEZE_AT", 2]))
    convs = _resnet_convs(model)
    frozen = [n for n in convs if ".stem." in n or ".res2." in n]
    assert frozen and all(not convs[n].bias.requires_grad and not convs[n].weight.requires_grad for n in frozen)
    assert all(m.bias.requires_grad for n, m in convs.items() if n not in frozen)


@pytest.mark.parametrize("opts,words", [
    (CONV_BIAS, ["MODEL.RESNETS.CONV_BIAS=True with MODEL.RESNETS.NORM='FastGN'", "set MODEL.RESNETS.NORM \"\""]),
    (NO_NORM + CONV_BIAS[:2], ["MODEL.BACKBONE.NAME='build_resnet_fpn_backbone'",
                               "set MODEL.BACKBONE.NAME build_fastgn_resnet_fpn_backbone"]),
    (NO_NORM + CONV_BIAS + ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, False, False]"],
     ["MODEL.RESNETS.CONV_BIAS=True with MODEL.RESNETS.DEFORM_ON_PER_STAGE"]),
], ids=["a norm", "detectron2's builder", "deformable"])
def test_a_conv_bias_that_cannot_apply_is_refused_naming_the_key(opts, words):
    """Never built without the biases it asks for: refused when the config is checked
    (train_net: before anything is built) and when a build function builds from it."""
    from detectron2.modeling import build_backbone

    cfg = gn_det.get_config(DEMO, opts)
    for attempt in (gn_det.validate_gn_config, build_backbone, gn_det.build_model):
        with pytest.raises(ConfigError) as info:
            attempt(cfg)
        assert all(w in str(info.value) for w in words), (attempt, str(info.value))


def test_a_conv_bias_that_is_not_a_bool_is_refused():
    with pytest.raises(ConfigError, match=r"MODEL.RESNETS.CONV_BIAS=1: expected a bool"):
        gn_det.get_config(DEMO, ["MODEL.RESNETS.CONV_BIAS", "1"])
    cfg = gn_det.get_config(DEMO)
    cfg.MODEL.RESNETS.CONV_BIAS = 1  # set in code, past yacs' type check
    with pytest.raises(ConfigError, match=r"^MODEL.RESNETS.CONV_BIAS=1: expected a bool$"):
        gn_det.validate_gn_config(cfg)
