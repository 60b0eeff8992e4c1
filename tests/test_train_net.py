"""tools/train_net.py end to end on the embedded dataset, as users run it (subprocesses):
train a few iterations with checkpoints, --resume, --eval-only, a 2-process GLOO run, and what
a user's mistake gives (a bad config key or value, a missing config, dataset or weights file,
refused or corrupt weights, an unknown norm): the message and exit status 2, no traceback,
before training starts, in one process or two; while an unexpected error keeps its traceback."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
# Tiny and quick, but the real pipeline: loader, augmentation, trainer, COCOEvaluator.
QUICK = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still gives detections to compare
    # 10 detections per image, not the config's 50: the mask head, mask pasting and COCOeval of
    # each evaluation (60 images) do a fifth of the work; still 600 detections to compare.
    "TEST.DETECTIONS_PER_IMAGE", "10",
]


def run_train_net(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, **(env or {})),
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def ap_lines(log: str):
    """The COCO AP values detectron2 prints (the 'copypaste' lines), per task."""
    return re.findall(r"copypaste: ([\d.,\-nan]+)$", log, flags=re.M)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    proc = run_train_net("--config", DEMO_CONFIG, *QUICK, "SOLVER.MAX_ITER", "6",
                         "SOLVER.CHECKPOINT_PERIOD", "3", "OUTPUT_DIR", out)
    return out, proc.stdout + proc.stderr


def test_training_writes_what_detectron2_users_expect(trained):
    out, log = trained
    for name in ("config.yaml", "metrics.json", "model_0000002.pth", "model_final.pth", "last_checkpoint"):
        assert os.path.exists(os.path.join(out, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert re.search(r"eta: .* iter: 5 .*total_loss: [\d.]+ .*lr: ", log), "no progress line"
    entries = metrics(out)
    assert [e["iteration"] for e in entries if "total_loss" in e][-1] == 5
    final = [e for e in entries if "bbox/AP" in e][-1]
    assert "segm/AP" in final  # box and mask AP from COCOEvaluator
    assert len(ap_lines(log)) == 2  # bbox and segm tables


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    out, _ = trained
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    for name in ("model_final.pth", "last_checkpoint"):
        with open(os.path.join(out, name), "rb") as src, open(os.path.join(resumed, name), "wb") as dst:
            dst.write(src.read())
    proc = run_train_net("--config", DEMO_CONFIG, "--resume", *QUICK, "SOLVER.MAX_ITER", "9",
                         "DATASETS.TEST", "()", "OUTPUT_DIR", resumed)
    log = proc.stdout + proc.stderr
    assert "Starting training from iteration 6" in log
    iterations = [e["iteration"] for e in metrics(resumed) if "total_loss" in e]
    assert iterations[0] >= 6 and iterations[-1] == 8


def test_eval_only_gives_the_same_ap_as_the_end_of_training(trained, tmp_path):
    out, train_log = trained
    proc = run_train_net("--config", DEMO_CONFIG, "--eval-only", *QUICK,
                         "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", str(tmp_path))
    assert ap_lines(proc.stdout + proc.stderr) == ap_lines(train_log)
    with open(os.path.join(out, "inference", "gn_det_shapes_val", "coco_instances_results.json")) as f:
        at_training = json.load(f)
    with open(os.path.join(str(tmp_path), "inference", "gn_det_shapes_val", "coco_instances_results.json")) as f:
        at_eval_only = json.load(f)
    assert len(at_eval_only) == len(at_training) > 0
    flat = lambda dets: [v for d in dets for v in d["bbox"] + [d["score"], d["category_id"]]]  # noqa: E731
    assert flat(at_eval_only) == pytest.approx(flat(at_training), abs=1e-3)


def test_two_processes_through_launch_gloo_train_checkpoint_and_evaluate_at_the_same_step(tmp_path):
    """Step 2 (iteration 1) saves a checkpoint (ExactResume gathers every process's data
    position to the main one) and evaluates (COCOEvaluator gathers the predictions): each
    process must run them in the same order, or the main one waits in one collective and the
    other in another, for ever (it did before the fix)."""
    proc = run_train_net("--config", DEMO_CONFIG, "--num-gpus", "2", "--dist-url", "auto", *QUICK,
                         "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2",
                         "OUTPUT_DIR", str(tmp_path))
    log = proc.stdout + proc.stderr
    assert "World size: 2" in log
    assert [e["iteration"] for e in metrics(str(tmp_path)) if "total_loss" in e][-1] == 2
    assert len(ap_lines(log)) == 4 and os.path.isfile(tmp_path / "model_0000001.pth")  # box and mask AP, twice


# ----------------------------------------------------------------------------- a user's mistakes


def assert_user_error(proc, *fragments):
    """train_net ended with its one-line error naming each fragment, status 2, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-4000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-4000:]
    assert "train_net: error: " in err, err[-4000:]
    message = err[err.index("train_net: error: "):]
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_config_file_is_named(tmp_path):
    proc = run_train_net("--config", str(tmp_path / "nope.yaml"), check=False)
    assert_user_error(proc, "config file not found", "nope.yaml")


@pytest.mark.parametrize("opts,fragments", [
    (["MODEL.GN.NUM_GROUPZ", "8"], ["unknown config key MODEL.GN.NUM_GROUPZ", "did you mean MODEL.GN.NUM_GROUPS"]),
    (["MODEL.GN.NUM_GROUPS", "eight"], ["MODEL.GN.NUM_GROUPS=eight", "expected an int", "got a str"]),
])
def test_bad_config_override_exits_2_naming_key_and_value(tmp_path, opts, fragments):
    proc = run_train_net("--config", DEMO_CONFIG, "OUTPUT_DIR", str(tmp_path), *opts, check=False)
    assert_user_error(proc, *fragments)
    assert not os.path.exists(tmp_path / "metrics.json")


def test_unregistered_dataset_exits_2(tmp_path):
    proc = run_train_net("--config", DEMO_CONFIG, "DATASETS.TRAIN", "('gn_det_shapes_trian',)", "OUTPUT_DIR", str(tmp_path),
                         check=False)
    assert_user_error(proc, "dataset 'gn_det_shapes_trian'", "is not registered", "did you mean gn_det_shapes_train")


def test_unknown_norm_exits_2(tmp_path):
    proc = run_train_net("--config", DEMO_CONFIG, "MODEL.FPN.NORM", "NoSuchNorm", "OUTPUT_DIR", str(tmp_path), check=False)
    assert_user_error(proc, "MODEL.FPN.NORM", "NoSuchNorm")


class RunsCode:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_weights(tmp_path, kind: str) -> str:
    """A weights file a user might point MODEL.WEIGHTS at: one that runs code when unpickled
    ("untrusted"), or none at all. (test_reliability.py checks corrupt ones, in-process.)"""
    path = tmp_path / f"{kind}.pth"
    if kind == "untrusted":
        torch.save({"model": {}, "evil": RunsCode(tmp_path / "ran")}, str(path))
    return str(path)


@pytest.mark.parametrize("kind,fragments", [
    ("untrusted", ["torch.load(weights_only=True) refuses", "GLOBAL posix.system"]),  # found by the loading process
    ("missing", ["no such file", 'MODEL.WEIGHTS ""']),  # found before launch
])
def test_bad_weights_file_exits_2_naming_the_key_and_path(tmp_path, kind, fragments):
    weights = write_weights(tmp_path, kind)
    proc = run_train_net("--config", DEMO_CONFIG, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "out"),
                         check=False)
    assert_user_error(proc, f"MODEL.WEIGHTS={weights!r}", *fragments)
    assert not (tmp_path / "ran").exists()


def test_user_error_in_two_worker_processes_exits_2(tmp_path):
    # Refused weights are found only when a worker loads them: each worker says so, no
    # traceback, and train_net still exits 2 (launch's parent sees a worker's exit status).
    weights = write_weights(tmp_path, "untrusted")
    proc = run_train_net("--config", DEMO_CONFIG, "--num-gpus", "2", "--dist-url", "auto", "--eval-only",
                         "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "out"), check=False)
    assert_user_error(proc, f"MODEL.WEIGHTS={weights!r}", "torch.load(weights_only=True) refuses")
    assert not (tmp_path / "ran").exists()


def test_unexpected_error_keeps_its_traceback(tmp_path):
    # Not a user's config mistake: the datasets root is a file, so the embedded dataset cannot
    # be written under it. An OSError like any other, reported with its traceback, status 1.
    not_a_folder = tmp_path / "datasets"
    not_a_folder.write_text("a file\n")
    proc = run_train_net("--config", DEMO_CONFIG, "OUTPUT_DIR", str(tmp_path / "out"),
                         env={"DETECTRON2_DATASETS": str(not_a_folder)}, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "NotADirectoryError" in proc.stderr
    assert "train_net: error: " not in proc.stderr


def test_missing_coco_says_where_and_what_to_do(tmp_path):
    proc = run_train_net("--config", os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"),
                         "OUTPUT_DIR", str(tmp_path / "out"), env={"DETECTRON2_DATASETS": str(tmp_path)}, check=False)
    assert_user_error(proc)
    err = proc.stderr
    assert "dataset 'coco_2017_train'" in err or "dataset 'coco_2017_val'" in err, err[-3000:]
    assert str(tmp_path) in err and "cocodataset.org" in err
    assert "configs/demo/mask_rcnn_gn_shapes.yaml" in err


# ----------------------------------------------------------------------------- flags, paths and variables


@pytest.mark.parametrize("args,env,fragments", [
    (["--num-gpus", "0", "OUTPUT_DIR", "{out}"], {}, ["--num-gpus 0: give the number of processes per machine, 1 or more"]),
    (["OUTPUT_DIR", "{out}", "--resume"], {}, ["--resume comes after the config's KEY VALUE pairs", "put the flags first"]),
    (["SOLVER.IMS_PER_BATCH", "0", "OUTPUT_DIR", "{out}"], {}, ["SOLVER.IMS_PER_BATCH=0: the images per step",
                                                                "must be 1 or more"]),
    (["--num-gpus", "3", "SOLVER.IMS_PER_BATCH", "4", "OUTPUT_DIR", "{out}"], {},
     ["SOLVER.IMS_PER_BATCH=4: the images per step, over all 3 process(es), must be a multiple"]),
    (["OUTPUT_DIR", "/proc/gn_det_cannot_be_here"], {}, ["OUTPUT_DIR='/proc/gn_det_cannot_be_here' cannot be created"]),
    (["OUTPUT_DIR", "{out}"], {"GN_DET_BACKEND": "fast"}, ["GN_DET_BACKEND='fast' is not a gn_det backend"]),
    (["OUTPUT_DIR", "{out}"], {"GN_DET_BAKEND": "torch"}, ["environment variable GN_DET_BAKEND='torch' is not one gn_det "
                                                           "reads", "did you mean GN_DET_BACKEND"]),
])
def test_bad_flag_path_or_variable_exits_2(tmp_path, args, env, fragments):
    # (--num-gpus -1 takes the branch of 0: `< 1`.)
    proc = run_train_net("--config", DEMO_CONFIG, *[a.format(out=tmp_path) for a in args], env=env, check=False)
    assert_user_error(proc, *fragments)
    assert not os.path.exists(tmp_path / "metrics.json")


# ----------------------------------------------------------------------------- the batch over the processes


YAML_CONFIGS = sorted(os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "configs"))
                      for f in files if f.endswith(".yaml") and not f.startswith("Base-"))


@pytest.mark.parametrize("path", YAML_CONFIGS)
def test_batch_check_accepts_exactly_the_process_counts_detectron2_can_split(path):
    """check_batch_split (train_net's check before any process starts) against what detectron2
    does: the batch it rescales to with SOLVER.REFERENCE_WORLD_SIZE (auto_scale_workers) splits
    evenly over the processes exactly where the check passes. The large-image configs serve 1
    to 64 GPUs, as their header says."""
    from detectron2.engine import DefaultTrainer

    import gn_det
    from gn_det.train.engine import check_batch_split
    from gn_det.errors import ConfigError

    cfg = gn_det.get_config(os.path.join(ROOT, path))
    for world in (1, 2, 3, 4, 8, 12, 16, 32, 64):
        try:
            batch = DefaultTrainer.auto_scale_workers(cfg, world).SOLVER.IMS_PER_BATCH
            splits = batch % world == 0
        except AssertionError:  # "Invalid REFERENCE_WORLD_SIZE in config!"
            splits = False
        try:
            check_batch_split(cfg, world)
            accepted = True
        except ConfigError as exc:
            accepted = False
            assert "SOLVER.IMS_PER_BATCH=" in str(exc)
        assert accepted == splits, (path, world)
        if "large_image" in path:
            assert accepted, world


def test_batch_check_names_the_reference_world_size_it_scales_by():
    import gn_det
    from gn_det.train.engine import check_batch_split
    from gn_det.errors import ConfigError

    cfg = gn_det.get_config(DEMO_CONFIG, ["SOLVER.IMS_PER_BATCH", "6", "SOLVER.REFERENCE_WORLD_SIZE", "4"])
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH=6 with SOLVER.REFERENCE_WORLD_SIZE=4: .* a multiple of 4"):
        check_batch_split(cfg, 2)
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH=6: .* over all 4 process\(es\), must be a multiple"):
        check_batch_split(cfg, 4)  # at the reference size nothing is rescaled
