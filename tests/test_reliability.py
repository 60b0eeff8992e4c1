"""Reliability and safety: bad configs fail early with the key, value and fix; untrusted files
run no code; checkpoints survive crashes and SIGKILL; bad data is named; NaN losses stop the
run; a 2048x2048 image trains and infers on CPU."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.events import EventStorage

import gn_det
from gn_det.train.checkpoint import SafeCheckpointer, check_weights_exist, safe_load_pickle
from gn_det.errors import (ConfigError, DatasetError, MissingFileError, UnknownDatasetError, UntrustedWeightsError, UserError,
                           WeightsError, exit_on_user_error)
from gn_det.config import groups_for
from gn_det.modeling import validate_gn_config
from gn_det.train.data import check_datasets_exist, synthetic_batch
from gn_det.train.engine import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml")
DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
QUICK = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(128,)",
         "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()"]


# ----------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize("opts,message", [
    (["MODEL.GN.NUM_GROUPS", 24], r"MODEL.GN.NUM_GROUPS=24 does not divide the 64 channels of a GN layer; .* \(in BasicStem\)"
                                  r"\n\(raised in build_backbone\(cfg\); the config's gn_det norms: "
                                  r".*MODEL.RESNETS.NORM='FastGN'"),
    (["MODEL.GN.NUM_GROUPS", 16, "MODEL.GN.CHANNELS_PER_GROUP", 8], r"NUM_GROUPS=16 and MODEL.GN.CHANNELS_PER_GROUP=8 disagree"),
    (["MODEL.GN.CHANNELS_PER_GROUP", 48], r"MODEL.GN.CHANNELS_PER_GROUP=48 does not divide the 64 channels of a GN layer"),
    (["MODEL.FPN.NORM", "FastGNN"], r"MODEL.FPN.NORM='FastGNN' is not a registered norm; registered: FastGN, .*FrozenBN"),
    (["MODEL.GN.EPS", 0.0], r"MODEL.GN.EPS=0.0: eps must be > 0"),
    (["MODEL.GN.EPS", -1e-5], r"MODEL.GN.EPS=-1e-05: eps must be > 0"),
    (["MODEL.GN.NUM_GROUPS", -2], r"MODEL.GN.NUM_GROUPS=-2: may not be negative"),
    (["MODEL.ROI_BOX_HEAD.CONV_DIM", 100], r"NUM_GROUPS=32 does not divide the 100 channels of a GN layer; "
                                           r".*\(in FastRCNNConvFCHead\)"
                                           r"\n\(raised in build_box_head"),
])
def test_bad_config_fails_the_build_naming_key_and_value(opts, message):
    cfg = gn_det.get_config(MAIN, opts)
    with pytest.raises(ConfigError, match=message):
        gn_det.build_model(cfg)


@pytest.mark.parametrize("opts", [["MODEL.GN.EPS", 0.0], ["MODEL.FPN.NORM", "FastGNN"], ["MODEL.GN.NUM_GROUPS", 0]])
def test_bad_settings_are_caught_before_building(opts):
    with pytest.raises(ConfigError, match=opts[0]):
        validate_gn_config(gn_det.get_config(MAIN, opts))


def test_consistent_channels_per_group_is_accepted():
    assert validate_gn_config(gn_det.get_config(MAIN, ["MODEL.GN.NUM_GROUPS", 0, "MODEL.GN.CHANNELS_PER_GROUP", 16]))
    settings = validate_gn_config(gn_det.get_config(MAIN, ["MODEL.GN.CHANNELS_PER_GROUP", 16]))  # NUM_GROUPS at its default
    assert groups_for(64, settings.num_groups, settings.channels_per_group) == 4


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found: 'configs/nope.yaml'") as info:
        gn_det.get_config("configs/nope.yaml")
    assert isinstance(info.value, MissingFileError)


@pytest.mark.parametrize("opts,message", [
    (["MODEL.GN.NUM_GROUPZ", "8"], r"^config override: unknown config key MODEL.GN.NUM_GROUPZ; did you mean MODEL.GN.NUM_GROUPS"),
    (["MODEL.NUM_GROUPS", "8"], r"unknown config key MODEL.NUM_GROUPS; did you mean MODEL.GN.NUM_GROUPS"),  # wrong section
    (["MODEL.GN.NUM_GROUPS", "eight"], r"MODEL.GN.NUM_GROUPS=eight: expected an int \(its value so far: 16\), got a str"),
    (["MODEL.GN.EPS", "1"], r"MODEL.GN.EPS=1: expected a float .*got an int; write a float, e.g. 1.0 rather than 1"),
    (["INPUT.MIN_SIZE_TRAIN", "(128,"], r"INPUT.MIN_SIZE_TRAIN=\(128,: expected a tuple .*got a str; write a list as"),
    (["MODEL.GN", "8"], r"MODEL.GN is a section of keys, not a key; set one of them, e.g. MODEL.GN.NUM_GROUPS"),
    (["SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR"], r"KEY VALUE pairs; 'SOLVER.BASE_LR' has no value"),
])
def test_bad_override_names_key_value_and_fix(opts, message):
    with pytest.raises(ConfigError, match=message):
        gn_det.get_config(DEMO, opts)


@pytest.mark.parametrize("text,error,message", [
    ("SOLVER:\n  BASE_LRR: 0.01\n", ConfigError, r"mine.yaml': unknown config key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR"),
    ("SOLVER:\n  STEPS: 500\n", ConfigError, r"mine.yaml': SOLVER.STEPS=500: expected a tuple .*got an int"),
    ("SOLVER: [\n", ConfigError, r"mine.yaml' is not valid YAML"),
    ("_BASE_: Base-Nope.yaml\n", MissingFileError, r"mine.yaml': .*Base-Nope.yaml \(named by _BASE_\) not found"),
])
def test_bad_config_file_names_the_file_key_and_fix(tmp_path, text, error, message):
    config = tmp_path / "mine.yaml"
    config.write_text(f"_BASE_: {DEMO}\n" + text if "_BASE_" not in text else text)
    with pytest.raises(error, match=message) as info:
        gn_det.get_config(str(config))
    assert isinstance(info.value, UserError)


def test_train_net_reports_bad_config_before_training(tmp_path):
    proc = subprocess.run([sys.executable, TRAIN_NET, "--config", DEMO, "MODEL.GN.NUM_GROUPS", "12", "OUTPUT_DIR", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "MODEL.GN.NUM_GROUPS=12 does not divide the 32 channels of a GN layer" in proc.stderr
    assert not os.path.exists(tmp_path / "metrics.json")


def test_exit_on_user_error(capsys):
    from torch.multiprocessing import ProcessExitedException

    with pytest.raises(SystemExit) as info, exit_on_user_error("tool"):
        raise ConfigError("MODEL.X=1: wrong; write 2")
    assert info.value.code == 2 and capsys.readouterr().err == "tool: error: MODEL.X=1: wrong; write 2\n"
    with pytest.raises(SystemExit) as info, exit_on_user_error("tool"):  # a worker exited 2: it said why
        raise ProcessExitedException("process 1 terminated with exit code 2", 1, 123, exit_code=2)
    assert info.value.code == 2 and capsys.readouterr().err == ""
    with pytest.raises(ProcessExitedException), exit_on_user_error("tool"):  # a worker that crashed
        raise ProcessExitedException("process 1 terminated with exit code 1", 1, 123, exit_code=1)
    with pytest.raises(ZeroDivisionError), exit_on_user_error("tool"):  # not the user's: its traceback stays
        _ = 1 / 0


# ----------------------------------------------------------------------------- untrusted files


class RunsCode:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_yaml_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f'MODEL:\n  WEIGHTS: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ValueError, match="YAML tag that would construct Python objects.*safe loader.*--allow-unsafe-yaml"):
        gn_det.get_config(str(config))
    assert not marker.exists()
    harmless = tmp_path / "tuple.yaml"  # a python tag, opted in explicitly
    harmless.write_text("SOLVER:\n  STEPS: !!python/tuple [10, 20]\n")
    with pytest.raises(ValueError):
        gn_det.get_config(str(harmless))
    assert gn_det.get_config(str(harmless), allow_unsafe=True).SOLVER.STEPS == (10, 20)


def test_pkl_weights_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "R-50-GN.pkl"
    path.write_bytes(pickle.dumps({"conv1_w": np.zeros(3, np.float32), "evil": RunsCode(marker)}))
    model = gn_det.build_model(gn_det.get_config(DEMO))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load '(posix|os)\.system'"):
        SafeCheckpointer(model).load(str(path))
    assert not marker.exists()
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.ones((2, 2), np.float32), "conv1_momentum": np.zeros(2)}}))
    assert list(safe_load_pickle(str(good))["blobs"]) == ["conv1_w", "conv1_momentum"]


def test_pth_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model_final.pth"
    torch.save({"model": {}, "evil": RunsCode(marker)}, str(path))
    model = gn_det.build_model(gn_det.get_config(DEMO))
    with pytest.raises(pickle.UnpicklingError, match="weights_only=True") as info:
        SafeCheckpointer(model).load(str(path))
    assert isinstance(info.value, UntrustedWeightsError)
    assert not marker.exists()
    with pytest.raises(UntrustedWeightsError, match=f"^MODEL.WEIGHTS='{path}': not loaded: .*GLOBAL posix.system"):
        SafeCheckpointer(model).resume_or_load(str(path), resume=False)  # the key that named the file


def _corrupt_weights(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.{'pkl' if 'pkl' in kind else 'pth'}"
    if kind == "truncated pth":
        torch.save({"model": {"w": torch.zeros(1000)}}, str(path))
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "empty pth":
        path.write_bytes(b"")
    elif kind == "text pth":
        path.write_text("model_0000009.pth\n")  # last_checkpoint's content, say
    elif kind == "truncated pkl":
        path.write_bytes(pickle.dumps({"conv1_w": np.zeros(30, np.float32)})[:40])
    elif kind == "list pkl":
        path.write_bytes(pickle.dumps([1, 2]))
    return str(path)


@pytest.mark.parametrize("kind,message", [
    ("truncated pth", r"not a readable checkpoint \(RuntimeError: PytorchStreamReader .*\); is it truncated or corrupt"),
    ("empty pth", r"not a readable checkpoint \(EOFError: empty file\)"),
    ("text pth", r"not a readable checkpoint \(Unsupported operand .*\); is it a .pth written by torch.save"),
    ("truncated pkl", r"not a readable .pkl weights file \(UnpicklingError: pickle data was truncated\)"),
    ("list pkl", r"expected a dict of weights, found list"),
])
def test_corrupt_weights_are_named_with_their_key(tmp_path, kind, message):
    path = _corrupt_weights(tmp_path, kind)
    checkpointer = SafeCheckpointer(torch.nn.Linear(2, 2))
    with pytest.raises(WeightsError, match=f"^MODEL.WEIGHTS='{path}': {message}"):
        checkpointer.resume_or_load(path, resume=False)
    checkpointer.resume_or_load("", resume=False)  # usable after a failed load


def test_missing_weights_are_named_with_what_set_them(tmp_path):
    cfg = gn_det.get_config(DEMO, ["MODEL.WEIGHTS", str(tmp_path / "nope.pth"), "OUTPUT_DIR", str(tmp_path)])
    message = rf"^MODEL.WEIGHTS='{tmp_path}/nope.pth': no such file .*or MODEL.WEIGHTS \"\" to start from random weights"
    with pytest.raises(FileNotFoundError, match=message):
        check_weights_exist(cfg)  # before loading anything (train_net, before launch)
    with pytest.raises(MissingFileError, match=message):
        SafeCheckpointer(torch.nn.Linear(2, 2)).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    # a URL: the loader's to fetch (with network), not a missing file
    check_weights_exist(gn_det.get_config(DEMO, ["MODEL.WEIGHTS", "detectron2://ImageNetPretrained/x.pkl"]))
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")  # --resume reads the file it names instead
    message = rf"model_0000009.pth', named in {tmp_path}/last_checkpoint \(read for --resume\): no such file"
    with pytest.raises(MissingFileError, match=message):
        check_weights_exist(cfg, resume=True)
    with pytest.raises(MissingFileError, match=message):
        SafeCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path)).resume_or_load(cfg.MODEL.WEIGHTS, resume=True)


# ----------------------------------------------------------------------------- checkpoints


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    checkpointer = SafeCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    good = (tmp_path / "model_0000009.pth").read_bytes()

    def crash(data, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000019", iteration=19)
    monkeypatch.undo()
    assert not (tmp_path / "model_0000019.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert (tmp_path / "model_0000009.pth").read_bytes() == good
    resumed = SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert resumed["iteration"] == 9


def test_sigkill_then_resume(tmp_path):
    out = str(tmp_path)
    args = [sys.executable, TRAIN_NET, "--config", DEMO]
    opts = [*QUICK, "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out]
    proc = subprocess.Popen(args + opts + ["SOLVER.MAX_ITER", "400"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while not os.path.exists(os.path.join(out, "model_0000005.pth")):
            assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the kill"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    checkpoint_iter = int(last[len("model_"):-len(".pth")])
    assert checkpoint_iter >= 5
    resumed = subprocess.run(args + ["--resume"] + opts + ["SOLVER.MAX_ITER", str(checkpoint_iter + 4)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Starting training from iteration {checkpoint_iter + 1}" in resumed.stdout + resumed.stderr
    assert os.path.exists(os.path.join(out, "model_final.pth"))


def test_divergence_stops_with_iteration_and_losses(tmp_path):
    proc = subprocess.run([sys.executable, TRAIN_NET, "--config", DEMO, *QUICK, "SOLVER.MAX_ITER", "5",
                           "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]", "OUTPUT_DIR", str(tmp_path)],  # x / 0: inf inputs
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # (was a ~95-line chained traceback)
    [line] = [line for line in proc.stderr.splitlines() if "training diverged" in line]
    assert line.startswith("train_net: error: training diverged at iteration 0: ") and "last recorded losses" in line


# ----------------------------------------------------------------------------- bad data


def write_coco(root, images, annotations):
    os.makedirs(root / "images", exist_ok=True)
    for img in images:
        cv2.imwrite(str(root / "images" / img["file_name"]), np.full((img["height"], img["width"], 3), 90, np.uint8))
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}, {"id": 3, "name": "triangle"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return str(root / "ann.json"), str(root / "images")


def register(name, json_file, image_root):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)


def test_missing_image_and_corrupt_json_are_named(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in (1, 2, 3)]
    json_file, image_root = write_coco(tmp_path, images, [])
    register("rel_missing", json_file, image_root)
    check_datasets_exist(["rel_missing"])
    os.remove(os.path.join(image_root, "2.jpg"))
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images listed in .*ann.json are missing under .*: 2.jpg"):
        check_datasets_exist(["rel_missing"])
    with open(json_file, "r+") as f:  # truncate the JSON
        f.truncate(len(f.read()) // 2)
    with pytest.raises(ValueError, match=r"annotation file .*ann.json is not valid JSON .*truncated"):
        check_datasets_exist(["rel_missing"])
    with open(json_file, "w") as f:
        json.dump({"images": []}, f)
    with pytest.raises(ValueError, match="has no 'annotations' list") as info:
        check_datasets_exist(["rel_missing"])
    assert isinstance(info.value, DatasetError)


def test_unregistered_dataset_is_named_with_close_names():
    with pytest.raises(KeyError, match=r"dataset 'coco_2017_trian' .* is not registered; did you mean coco_2017_train") as info:
        check_datasets_exist(["coco_2017_trian"])
    assert isinstance(info.value, UnknownDatasetError) and str(info.value).startswith("dataset")  # not KeyError's quotes


def test_empty_images_degenerate_boxes_and_empty_polygons_train(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 96, "width": 128} for i in range(1, 5)]
    square = [[10.0, 10.0, 50.0, 10.0, 50.0, 50.0, 10.0, 50.0]]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0, "segmentation": square},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 20, 0, 30], "area": 0, "iscrowd": 0,  # zero width
         "segmentation": [[60.0, 20.0, 60.0, 50.0, 60.0, 35.0]]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 0, "segmentation": []},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [40, 40, 30, 20], "area": 600, "iscrowd": 0,
         "segmentation": [[40.0, 40.0, 70.0]]},  # a polygon of 1.5 points
        {"id": 5, "image_id": 4, "category_id": 2, "bbox": [20, 20, 50, 40], "area": 2000, "iscrowd": 0,
         "segmentation": [[20.0, 20.0, 70.0, 20.0, 70.0, 60.0, 20.0, 60.0]]},
    ]  # image 3 has no annotations
    json_file, image_root = write_coco(tmp_path, images, annotations)
    register("rel_bad_data", json_file, image_root)
    # The zero-width box and the 1.5-point polygon cannot be right: an error before training
    # (tests/test_annotation_checks.py), unless the user says to train with them as detectron2 takes them
    with pytest.raises(DatasetError, match=r"2 annotation problem\(s\) .*DATALOADER.CHECK_ANNOTATIONS warn"):
        check_datasets_exist(["rel_bad_data"])
    check_datasets_exist(["rel_bad_data"], annotations="warn")
    cfg = gn_det.get_config(DEMO, QUICK + ["DATASETS.TRAIN", "('rel_bad_data',)", "SOLVER.MAX_ITER", "3",
                                           "OUTPUT_DIR", str(tmp_path / "out")])
    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.iter == 3  # all iterations ran (detectron2 leaves iter at max_iter)


# ----------------------------------------------------------------------------- load


def test_2048_image_trains_and_infers_on_cpu():
    model = gn_det.build_model(gn_det.get_config(DEMO))
    batch = synthetic_batch(1, 2048, 2048, num_classes=3)
    model.train()
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 2048, "width": 2048}])[0]["instances"]
    assert out.image_size == (2048, 2048)


def run_memory_check(tmp_path, iters, warmup, every=5):
    path = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "memory_check.py"), "--iters", str(iters),
                           "--every", str(every), "--warmup", str(warmup), "--output", str(tmp_path / "out"),
                           "--json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text())


def test_memory_check_tool(tmp_path):
    # The slow test below at the smallest scale that still has samples before and after warm-up
    # (6 demo steps: a third of the 15 this took before).
    result = run_memory_check(tmp_path, iters=6, warmup=2, every=2)
    assert [s["iteration"] for s in result["samples"]] == [2, 4, 6]
    assert result["rss_at_end_mib"] > 100 and "slope_mib_per_100_iters" in result


@pytest.mark.slow
def test_no_memory_growth_over_300_iterations(tmp_path):
    result = run_memory_check(tmp_path, iters=300, warmup=150)
    # After warm-up RSS moves within tens of MiB with no trend; a leak of even 0.5 MiB per
    # iteration would be a slope of 50 MiB per 100 iterations.
    assert result["slope_mib_per_100_iters"] < 15 and result["growth_after_warmup_mib"] < 64, result


# ----------------------------------------------------------------------------- exact resume, signals, the final save
# One uninterrupted run and one stopped by SIGTERM then resumed, shared by the tests below.
# WARMUP_ITERS 0 and no STEPS: the learning rate does not depend on MAX_ITER, so a run started
# with a long MAX_ITER and resumed with MAX_ITER 4 follows the 4-iteration run's schedule.
EXACT = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(96,)",
         "INPUT.MAX_SIZE_TRAIN", "160", "DATALOADER.NUM_WORKERS", "2", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "2"]


def train_net(*args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, TRAIN_NET, "--config", DEMO, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def wait_for(path, proc, timeout=600):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the signal"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = train_net(*EXACT, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def stopped_by(sig, out, checkpoint, *opts):
    """A long train_net run (EXACT, then ``opts``) in ``out`` sent ``sig`` once ``checkpoint``
    exists: (exit status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, TRAIN_NET, "--config", DEMO, *EXACT, *opts, "SOLVER.MAX_ITER", "1000",
                             "OUTPUT_DIR", out], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(os.path.join(out, checkpoint), proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def stopped_by_sigterm(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stopped"))
    code, stdout, stderr = stopped_by(signal.SIGTERM, out, "model_0000001.pth")
    return out, code, stdout + stderr


def test_sigterm_stops_with_one_line_naming_the_last_checkpoint(stopped_by_sigterm):
    out, code, log = stopped_by_sigterm
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    assert f"train_net: stopped by SIGTERM; the last checkpoint is {os.path.join(out, last)}; continue with --resume" in log
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_resume_after_sigterm_is_bit_identical_to_the_uninterrupted_run(uninterrupted, stopped_by_sigterm):
    out, _, _ = stopped_by_sigterm
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    assert last == "model_0000001.pth", last  # (the signal came during iteration 2 or 3)
    proc = train_net("--resume", *EXACT, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "Starting training from iteration 2" in log and "Resume is not exact" not in log
    resumed, reference = weights(os.path.join(out, "model_final.pth")), weights(os.path.join(uninterrupted, "model_final.pth"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "the resumed run's weights differ"


def test_resume_with_another_batch_size_says_it_is_not_exact(uninterrupted, tmp_path):
    # The checkpoint of iteration 1; resumed with 1 image per step instead of 2.
    for name in ("model_0000001.pth",):
        (tmp_path / name).write_bytes(open(os.path.join(uninterrupted, name), "rb").read())
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    proc = train_net("--resume", *EXACT, "SOLVER.IMS_PER_BATCH", "1", "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Resume is not exact" in line]
    assert len(lines) == 1 and "batch_size 2 -> 1" in lines[0], lines


def test_resumed_run_with_nothing_left_writes_the_final_checkpoint(uninterrupted, tmp_path):
    # What a kill during the final save leaves: last_checkpoint names the checkpoint of
    # iteration MAX_ITER - 1, model_final.pth is missing, its .tmp half-written.
    (tmp_path / "model_0000003.pth").write_bytes(open(os.path.join(uninterrupted, "model_0000003.pth"), "rb").read())
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    (tmp_path / "model_final.pth.tmp").write_bytes(b"half a checkpoint")
    proc = train_net("--resume", *EXACT, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "Nothing left to train (the checkpoint is of iteration 3, SOLVER.MAX_ITER is 4): wrote" in log
    assert not (tmp_path / "model_final.pth.tmp").exists() and "model_final.pth.tmp, left by a save" in log
    final, reference = weights(tmp_path / "model_final.pth"), weights(os.path.join(uninterrupted, "model_final.pth"))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_sigint_stops_cleanly(tmp_path):
    out = str(tmp_path)
    code, stdout, stderr = stopped_by(signal.SIGINT, out, "model_0000000.pth", "SOLVER.CHECKPOINT_PERIOD", "1",
                                      "DATALOADER.NUM_WORKERS", "0")
    assert code == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "train_net: stopped by SIGINT; the last checkpoint is " in stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.slow
def test_resume_is_bit_identical_in_two_processes_over_gloo(tmp_path):
    ddp = ["--num-gpus", "2", "--dist-url", "auto", *EXACT, "SOLVER.IMS_PER_BATCH", "4"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    for args in ([*ddp, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", whole], [*ddp, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", part]):
        proc = train_net(*args)
        assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(part, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    os.remove(os.path.join(part, "model_final.pth"))
    proc = train_net("--resume", *ddp, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", part)
    assert proc.returncode == 0 and "Resume is not exact" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    resumed, reference = weights(os.path.join(part, "model_final.pth")), weights(os.path.join(whole, "model_final.pth"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


# ----------------------------------------------------------------------------- loaders that run code, whatever the environment


@pytest.mark.parametrize("extension", ["pth", "pt", "pyth", "bin"])
def test_weights_that_run_code_are_refused_even_with_torch_force_no_weights_only_load(tmp_path, monkeypatch, extension):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # set by some environments for other libraries
    marker = tmp_path / "ran"
    path = tmp_path / f"model.{extension}"
    torch.save({"model_state": {}, "model": {}, "evil": RunsCode(marker)}, str(path))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UntrustedWeightsError, match="GLOBAL posix.system"):
        SafeCheckpointer(model).resume_or_load(str(path), resume=False)  # MODEL.WEIGHTS
    (tmp_path / "last_checkpoint").write_text(path.name)
    with pytest.raises(UntrustedWeightsError, match="read for --resume"):
        SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)  # --resume
    assert not marker.exists()


def test_pycls_pyth_weights_load(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "pycls.pyth"
    torch.save({"model_state": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}}, str(path))
    SafeCheckpointer(model).load(str(path))
    assert torch.equal(model.weight, torch.ones(2, 2))


def test_corrupt_last_checkpoint_points_to_the_previous_good_one(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = SafeCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)
    checkpointer.save("model_0000009", iteration=9)
    path = tmp_path / "model_0000009.pth"
    path.write_bytes(path.read_bytes()[:300])  # the disk lost its end
    message = (r"not a readable checkpoint .* The newest checkpoint before it that passes the integrity check is "
               rf"model_0000004.pth: resume from it with `echo model_0000004.pth > {tmp_path}/last_checkpoint` and "
               "--resume again")
    with pytest.raises(WeightsError, match=message):
        SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")  # the fix it gives works
    assert SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 4


def test_interrupted_save_leaves_no_temporary(tmp_path, monkeypatch):
    checkpointer = SafeCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))

    def interrupted(data, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # what SIGINT / SIGTERM raise in train_net

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000009", iteration=9)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- numbers near the float32 limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("activation", ["relu", None])
def test_values_near_1e30_are_accurate_or_non_finite(dtype, layout, activation):
    # The squared deviations overflow float32: rsqrt(inf) = 0 made the output beta, finite
    # and wrong. Now remeasured, scaled, on the CPU path (plain NCHW GN too, which is ATen's
    # native GroupNorm unless its rstd says the variance overflowed).
    torch.manual_seed(0)
    x = (torch.randn(2, 8, 5, 5) * 1e30).to(dtype).contiguous(memory_format=layout).requires_grad_()
    y = gn_det.group_norm(x, 4, torch.ones(8), torch.zeros(8), activation=activation)
    reference = torch.nn.functional.group_norm(x.detach().double(), 4)
    reference = reference.relu() if activation else reference
    assert torch.isfinite(y).all()
    assert (y.double() - reference).abs().max() < (1e-5 if dtype is torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fraction", [1e-8, 0.5, 0.99])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("activation", ["relu", None])
def test_values_at_the_dtype_limit_are_accurate_or_non_finite_on_cpu(dtype, fraction, layout, activation):
    # Values up to fraction * the dtype's largest finite value (fp16's and bf16's in float32
    # arithmetic): each output and gradient element is accurate or not finite, never finite
    # and wrong. (Where a group's sum itself overflows, the result is non-finite.)
    torch.manual_seed(0)
    scale = torch.finfo(dtype).max * fraction
    x = ((torch.rand(2, 8, 5, 5, dtype=torch.float64) * 2 - 1) * scale).to(dtype).contiguous(memory_format=layout)
    x.requires_grad_()
    params = torch.float64 if dtype is torch.float64 else torch.float32
    gamma, beta = torch.linspace(0.5, 2, 8, dtype=params), torch.linspace(-1, 1, 8, dtype=params)
    y = gn_det.group_norm(x, 4, gamma, beta, activation=activation)
    dy = torch.randn(x.shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, dy.to(y.dtype))
    # The reference: float64 on x / scale (eps scaled with it), so nothing overflows.
    xs = (x.detach().double() / scale).requires_grad_()
    reference = torch.nn.functional.group_norm(xs, 4, gamma.double(), beta.double(), 1e-5 / scale / scale)
    reference = reference.relu() if activation else reference
    (dx_reference,) = torch.autograd.grad(reference, xs, dy)
    tolerance = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    finite = torch.isfinite(y)
    assert ((y.double() - reference).abs()[finite] <= tolerance * (1 + reference.abs()[finite])).all()
    grad_finite = torch.isfinite(dx)  # dx * scale: the gradient of GN(x / scale), in ranges float64 holds
    assert ((dx.double() * scale - dx_reference).abs()[grad_finite] <= tolerance * dx_reference.abs().max()).all()
    if fraction == 1e-8 or dtype is torch.float16:  # only squares overflow (fp16's fit float32): accurate, all finite
        assert finite.all() and grad_finite.all()


# ----------------------------------------------------------------------------- bad images and category ids


def write_real_coco(root, n=4):
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 96} for i in range(1, n + 1)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0,
                    "segmentation": [[10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]]} for i in range(1, n + 1)]
    os.makedirs(root / "images", exist_ok=True)
    rng = np.random.default_rng(0)
    for img in images:  # noise: a JPEG whose truncation PIL notices
        cv2.imwrite(str(root / "images" / img["file_name"]), rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    return write_coco_json(root, images, annotations)


def write_coco_json(root, images, annotations):
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}, {"id": 3, "name": "triangle"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return str(root / "ann.json"), str(root / "images")


def test_bad_images_and_category_ids_are_found_before_training(tmp_path):
    json_file, image_root = write_real_coco(tmp_path)
    register("rel_images", json_file, image_root)
    check_datasets_exist(["rel_images"])
    truncated = os.path.join(image_root, "2.jpg")
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    open(os.path.join(image_root, "3.jpg"), "w").write("<html>not an image</html>")
    cv2.imwrite(os.path.join(image_root, "4.jpg"), np.zeros((50, 96, 3), np.uint8))  # not the annotated 96x64
    with pytest.raises(DatasetError) as info:
        check_datasets_exist(["rel_images"])
    message = str(info.value)
    assert message.startswith("dataset 'rel_images': 3 of 4 images listed in ") and "cannot be used" in message
    assert "2.jpg: truncated (no JPEG end-of-image marker)" in message
    assert "3.jpg: not an image file PIL can read" in message
    assert "4.jpg: is 96x50, the annotations say 96x64" in message and "DATALOADER.BAD_IMAGES skip" in message
    check_datasets_exist(["rel_images"], skip_bad=["rel_images"])  # said, not raised: training leaves them out
    with pytest.raises(DatasetError, match="2.jpg: unreadable .*truncated"):
        check_datasets_exist(["rel_images"], images="decode")
    coco = json.loads(open(json_file).read())
    coco["annotations"][0]["category_id"] = 7
    open(json_file, "w").write(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"1 annotation\(s\) .* have a category_id that is not among its 'categories' "
                                           r"\(ids \[1, 2, 3\]\): annotation id 1 of image 1 has category_id 7"):
        check_datasets_exist(["rel_images"], images="none")


@pytest.mark.parametrize("bad_images", ["error", "skip"])
def test_image_corrupted_during_training_is_named_or_skipped(tmp_path, bad_images, caplog):
    from gn_det.train.data.mapper import MaskSafeDatasetMapper

    json_file, image_root = write_real_coco(tmp_path, n=2)
    register("rel_late", json_file, image_root)
    cfg = gn_det.get_config(DEMO, ["DATASETS.TRAIN", "('rel_late',)", "DATALOADER.BAD_IMAGES", bad_images])
    mapper = MaskSafeDatasetMapper(cfg, is_train=True)
    record = DatasetCatalog.get("rel_late")[0]
    assert mapper(dict(record))["image"].shape[0] == 3
    data = open(record["file_name"], "rb").read()
    open(record["file_name"], "wb").write(data[: len(data) // 2])  # corrupted after the check
    if bad_images == "error":
        with pytest.raises(DatasetError, match=rf"^dataset 'rel_late': image {record['file_name']} cannot be used "
                                               r"\(OSError: image file is truncated.*DATALOADER.BAD_IMAGES skip"):
            mapper(dict(record))
    else:
        assert mapper(dict(record)) is None
        assert f"dataset 'rel_late': skipped image {record['file_name']}" in caplog.text


def test_check_images_setting_is_checked():
    with pytest.raises(ConfigError, match=r"DATALOADER.CHECK_IMAGES='all': expected one of headers, decode, none"):
        from gn_det.train.data.checks import DataSettings
        DataSettings.from_cfg(gn_det.get_config(DEMO, ["DATALOADER.CHECK_IMAGES", "all"]))


def test_header_check_passes_a_few_hundred_real_jpegs(tmp_path):
    # What it costs on COCO's 118,287 images is measured by tools/benchmark_image_checks.py (real
    # files on disk, cold and warm page cache; docs/RELIABILITY.md); here only that it works on
    # a few hundred real JPEGs.
    from gn_det.train.data.checks import check_images

    rng = np.random.default_rng(0)
    records = []
    for i in range(200):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        records.append({"file_name": f"{i}.jpg", "width": 64, "height": 48})
    assert check_images(records, str(tmp_path)) == []
