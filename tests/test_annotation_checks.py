"""COCO annotations that are wrong, not malformed, found before step 0 and named by file and
entry (gn_det.train.data.checks.annotation_problems, through check_datasets_exist as
tools/train_net.py calls it); DATALOADER.CHECK_ANNOTATIONS warn / none to downgrade. Real JSON
files and images on disk; one real train_net process."""
import json
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

import gn_det
from gn_det.errors import ConfigError, DatasetError
from gn_det.train.data import check_datasets_exist
from gn_det.train.data.checks import DataSettings, annotation_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
SQUARE = [[10.0, 10.0, 50.0, 10.0, 50.0, 50.0, 10.0, 50.0]]


def ann(id, image_id, bbox=(10, 10, 40, 40), segmentation=SQUARE, **extra):
    return {"id": id, "image_id": image_id, "category_id": 1, "bbox": list(bbox), "area": 1600.0, "iscrowd": 0,
            "segmentation": segmentation, **extra}


def write_dataset(root, name, images, annotations):
    os.makedirs(root / "images", exist_ok=True)
    for img in images:
        path = root / "images" / img["file_name"]
        if not path.exists():
            cv2.imwrite(str(path), np.full((img["height"], img["width"], 3), 90, np.uint8))
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "circle"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(root / "ann.json"), str(root / "images"))
    return str(root / "ann.json")


def images(n=2):
    return [{"id": i, "file_name": f"{i}.jpg", "height": 96, "width": 128} for i in range(1, n + 1)]


@pytest.mark.parametrize("case,annotations,imgs,message", [
    ("negative width", [ann(1, 1), ann(2, 1, bbox=(109, 20, -40, 30), segmentation=[[109, 20, 148, 20, 148, 50]])], None,
     r"1 box of non-positive width or height \(annotation id 2 \(image id 1, 1.jpg\): bbox \[109, 20, -40, 30\] has width "
     r"-40 and height 30\)"),
    ("zero height", [ann(1, 2, bbox=(5, 5, 20, 0), segmentation=[])], None,
     r"annotation id 1 \(image id 2, 2.jpg\): bbox \[5, 5, 20, 0\] has width 20 and height 0"),
    ("outside", [ann(1, 1, bbox=(100, 10, 60, 20), segmentation=[])], None,
     r"1 box outside its image \(annotation id 1 \(image id 1, 1.jpg\): bbox \[100, 10, 60, 20\] \(x 100 to 160, y 10 to "
     r"30\) is outside the 128x96 image\)"),
    ("duplicate image id", [ann(1, 1)], [*images(2), {"id": 1, "file_name": "3.jpg", "height": 96, "width": 128}],
     r"1 duplicate image id \(image id 1 \(3.jpg\) is also the id of 1.jpg\)"),
    ("duplicate annotation id", [ann(1, 1), ann(1, 2)], None, r"1 duplicate annotation id \(annotation id 1 \(image id 2"),
    ("short polygon", [ann(1, 1, segmentation=[[40.0, 40.0, 70.0, 40.0]])], None,
     r"1 polygon of fewer than 3 points .*annotation id 1 \(image id 1, 1.jpg\): polygon 0 has 4 numbers \(3 points are 6\)"),
    ("polygon far from its box", [ann(1, 1, bbox=(69, 20, 40, 30), segmentation=[[109, 20, 148, 20, 148, 50, 109, 50]])],
     None, r"1 segmentation far from its box \(annotation id 1 .*: its polygons span x 109 to 148, y 20 to 50, its bbox "
           r"x 69 to 109"),
    ("RLE of another size", [ann(1, 1, segmentation={"size": [64, 64], "counts": "abc"}, iscrowd=1)], None,
     r"RLE mask of another size than its image \(annotation id 1 .*RLE size \[64, 64\] \(height, width\), the image is "
     r"128x96"),
    ("box not numbers", [ann(1, 1, bbox=(1, 2, "3", 4))], None, r"1 bbox that is not 4 finite numbers"),
])
def test_wrong_annotations_are_named_before_training(tmp_path, case, annotations, imgs, message):
    name = f"ann_{case.replace(' ', '_')}"
    json_file = write_dataset(tmp_path, name, imgs or images(), annotations)
    with pytest.raises(DatasetError, match=rf"^dataset '{name}': \d+ annotation problem\(s\) in {json_file} that cannot "
                                           rf"be right: .*{message}.*; fix them, or set DATALOADER.CHECK_ANNOTATIONS warn"):
        check_datasets_exist([name], images="none")


def test_boxes_within_the_tolerance_and_good_data_pass(tmp_path):
    good = [ann(1, 1), ann(2, 1, bbox=(-1.5, 0, 129.5, 96), segmentation=[[0, 0, 128, 0, 128, 96]]),
            ann(3, 2, bbox=(0, 0, 128, 96), segmentation={"size": [96, 128], "counts": "x"}, iscrowd=1)]
    assert annotation_problems({"images": images(), "annotations": good}) == ([], [])
    write_dataset(tmp_path, "ann_good", images(), good)
    check_datasets_exist(["ann_good"], images="none")


def test_downgraded_to_one_warning_or_skipped(tmp_path, caplog):
    bad = [ann(1, 1, bbox=(60, 20, 0, 30)), ann(2, 1, segmentation=[[1.0, 2.0, 3.0]]), ann(3, 7)]  # image 7: not listed
    write_dataset(tmp_path, "ann_warn", images(), bad)
    with caplog.at_level(logging.WARNING):
        check_datasets_exist(["ann_warn"], images="none", annotations="warn")
    warnings = [r.getMessage() for r in caplog.records if "annotation problem" in r.getMessage()]
    assert len(warnings) == 1 and "2 annotation problem(s)" in warnings[0] and "DATALOADER.CHECK_ANNOTATIONS warn" in warnings[0]
    left_out = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert len(left_out) == 1 and "detectron2 leaves out 1 annotation(s)" in left_out[0]
    assert "annotation id 3 (image id 7): image_id is not among the file's images" in left_out[0]
    caplog.clear()
    check_datasets_exist(["ann_warn"], images="none", annotations="none")
    assert "annotation problem" not in caplog.text


def test_the_setting_is_a_config_key_that_is_checked():
    cfg = gn_det.get_config(DEMO, ["DATALOADER.CHECK_ANNOTATIONS", "warn"])
    assert DataSettings.from_cfg(cfg).check_annotations == "warn"
    assert DataSettings.from_cfg(gn_det.get_config(DEMO)).check_annotations == "error"
    with pytest.raises(ConfigError, match=r"DATALOADER.CHECK_ANNOTATIONS='off': expected one of error, warn, none"):
        DataSettings.from_cfg(gn_det.get_config(DEMO, ["DATALOADER.CHECK_ANNOTATIONS", "off"]))


def test_train_net_refuses_a_negative_width_box_before_step_0(tmp_path):
    # The case: box x 69-109 written as x 109 with width -40 (trained silently before, mirrored)
    json_file = write_dataset(tmp_path, "unused", images(), [ann(1, 1, bbox=(109, 20, -40, 30),
                                                                 segmentation=[[69, 20, 109, 20, 109, 50, 69, 50]])])
    register = (f"from detectron2.data.datasets import register_coco_instances; register_coco_instances('ann_cli', {{}}, "
                f"{json_file!r}, {str(tmp_path / 'images')!r})")
    # train_net registers only its own datasets: run it with this one registered first (as a user's wrapper would)
    code = (f"import runpy, sys; {register}; sys.argv = sys.argv[1:]; "
            f"runpy.run_path({os.path.join(ROOT, 'tools', 'train_net.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "train_net.py", "--config", DEMO, "DATASETS.TRAIN", "('ann_cli',)",
                           "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"train_net: error: dataset 'ann_cli': 1 annotation problem(s) in {json_file} that cannot be right: 1 box of "
            "non-positive width or height (annotation id 1 (image id 1, 1.jpg): bbox [109, 20, -40, 30]") in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


def test_a_lazyconfig_takes_the_setting_as_train_check_annotations(tmp_path):
    lazy = os.path.join(ROOT, "configs", "lazy", "mask_rcnn_gn_R_50_FPN_3x.py")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", lazy,
                           "+train.check_annotations=off", f"train.output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "CHECK_ANNOTATIONS='off': expected one of error, warn, none" in proc.stderr
