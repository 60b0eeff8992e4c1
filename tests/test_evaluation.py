"""gn_det.train.evaluation.FastCOCOEvaluator: detectron2's COCOEvaluator pipeline (process ->
instances_to_coco_json -> COCO.loadRes -> COCOeval -> its results dict and tables), run with
faster-coco-eval's COCOeval where detectron2 has no C++ COCOeval, gives pycocotools' APs."""
import json
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import coco_evaluation
from detectron2.structures import Boxes, BoxMode, Instances

from gn_det.diagnostics.bench.cocoeval import synthetic_coco
from gn_det.train.evaluation import FastCOCOEvaluator, cocoeval_class

try:
    from detectron2.evaluation.fast_eval_api import COCOeval_opt  # noqa: F401
    HAS_D2_FAST = True
except ImportError:
    HAS_D2_FAST = False
D2_COCOEVAL_OPT = coco_evaluation.COCOeval_opt  # the name FastCOCOEvaluator rebinds while it evaluates


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """A registered COCO-format dataset (12 images, 4 classes, polygon masks) and detections
    for it (25 per image, RLE masks), from the benchmark's generator."""
    dataset, detections = synthetic_coco(num_images=12, dets_per_image=25, num_classes=4, seed=3)
    json_file = tmp_path_factory.mktemp("coco") / "instances.json"
    json_file.write_text(json.dumps(dataset))
    name = "gn_det_test_eval_synthetic"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(json_file.parent))
    DatasetCatalog.get(name)  # sets the class names and the COCO id -> contiguous id map, as a loader does
    return name, dataset, detections


def _model_outputs(dataset, detections):
    """(inputs, outputs) pairs as a detectron2 model gives them to an evaluator, per image."""
    by_image = {}
    for det in detections:
        by_image.setdefault(det["image_id"], []).append(det)
    for image in dataset["images"]:
        dets = by_image[image["id"]]
        inst = Instances((image["height"], image["width"]))
        boxes = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32)
        inst.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        inst.scores = torch.tensor([d["score"] for d in dets])
        inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in dets])  # contiguous ids
        masks = mask_util.decode([dict(d["segmentation"], counts=d["segmentation"]["counts"].encode()) for d in dets])
        inst.pred_masks = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).bool()
        yield [{"image_id": image["id"]}], [{"instances": inst}]


def _evaluate(name, dataset, detections, implementation):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("detectron2.evaluation.coco_evaluation")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        evaluator = FastCOCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, implementation=implementation)
        evaluator.reset()
        for inputs, outputs in _model_outputs(dataset, detections):
            evaluator.process(inputs, outputs)
        results = evaluator.evaluate()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return evaluator, results, [r.getMessage() for r in records]


def test_faster_coco_eval_gives_pycocotools_aps(coco_set):
    name, dataset, detections = coco_set
    fast, fast_results, fast_log = _evaluate(name, dataset, detections, "faster-coco-eval")
    ref, ref_results, ref_log = _evaluate(name, dataset, detections, "pycocotools")
    assert fast.cocoeval_name.startswith("faster-coco-eval ") and fast.cocoeval_cls is not None
    assert ref.cocoeval_name.startswith("pycocotools") and ref.cocoeval_cls is None
    assert any(m.startswith("COCOeval implementation: faster-coco-eval") for m in fast_log), fast_log
    assert any(m.startswith("COCOeval implementation: pycocotools") for m in ref_log), ref_log
    for task in ("bbox", "segm"):
        # COCOEvaluator's own results dict: the standard metrics and per-class APs, in points.
        assert set(ref_results[task]) == set(fast_results[task]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl",
                                                                      "AP-class_1"}
        for key, value in ref_results[task].items():
            assert fast_results[task][key] == pytest.approx(value, abs=0.05, nan_ok=True), (task, key)
        assert 5 < ref_results[task]["AP"] < 95  # a set that tells right from wrong
        assert any(m.startswith(f"Evaluation results for {task}") for m in fast_log)
    assert coco_evaluation.COCOeval_opt is D2_COCOEVAL_OPT  # restored afterwards


def test_auto_picks_detectron2s_cpp_cocoeval_else_faster_coco_eval(coco_set):
    name = coco_set[0]
    cls, label = cocoeval_class("auto")
    evaluator = FastCOCOEvaluator(name, distributed=False)
    assert evaluator.cocoeval_cls is cls and evaluator.cocoeval_name == label
    if HAS_D2_FAST:
        assert label.startswith("detectron2 COCOeval_opt")
    else:
        assert label.startswith("faster-coco-eval ")
        with pytest.raises(ImportError, match="COCOeval_opt is not importable"):
            cocoeval_class("detectron2")
    # use_fast_impl=False keeps COCOEvaluator's meaning: pycocotools' official COCOeval.
    assert FastCOCOEvaluator(name, distributed=False, use_fast_impl=False).cocoeval_cls is None
    # detectron2 evaluates a custom max_dets_per_image with its pycocotools subclass, and says so.
    custom = FastCOCOEvaluator(name, distributed=False, max_dets_per_image=50)
    assert custom.cocoeval_cls is None and "COCOevalMaxDets" in custom.cocoeval_name
    with pytest.raises(ValueError, match="unknown COCOeval implementation 'fast'"):
        cocoeval_class("fast")


def test_trainer_builds_the_fast_evaluator(coco_set, tmp_path):
    from detectron2.config import get_cfg

    from gn_det.train.engine import Trainer

    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = Trainer.build_evaluator(cfg, coco_set[0])
    assert isinstance(evaluator, FastCOCOEvaluator) and evaluator.cocoeval_name == cocoeval_class()[1]
