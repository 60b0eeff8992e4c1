"""Checkpoints that prove themselves, saves that fail cleanly, weights that are not a checkpoint
(gn_det.train.checkpoint.SafeCheckpointer). Real files damaged in place, a real full file system
(a 1-4 MiB tmpfs, where this test may mount one: root), an injected ENOSPC elsewhere, real
train_net processes for what the user sees."""
import contextlib
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import gn_det
from gn_det.errors import CheckpointWriteError, UserError, WeightsError
from gn_det.train.checkpoint import SafeCheckpointer, checkpoint_problem, previous_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
QUICK = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(128,)",
         "DATALOADER.NUM_WORKERS", "0"]


def train_net(*args, timeout=600):
    return subprocess.run([sys.executable, TRAIN_NET, "--config", DEMO, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def damage(path, at=0.5, size=4096):
    """Overwrite ``size`` bytes in the middle of the file, in place (a bad disk, a partial copy)."""
    length = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(int(length * at))
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 4)


def saved(tmp_path, *iterations):
    model = Net()
    checkpointer = SafeCheckpointer(model, save_dir=str(tmp_path))
    for it in iterations:
        checkpointer.save(f"model_{it:07d}", iteration=it)
    return model


# ----------------------------------------------------------------------------- damaged checkpoints


def test_a_checkpoint_damaged_mid_file_is_named_damaged_and_not_loaded(tmp_path):
    model = saved(tmp_path, 4, 7, 9)
    newest = tmp_path / "model_0000009.pth"
    damage(newest)
    # torch itself loads it: the damage hits tensor data, which its reader does not check
    assert torch.load(newest, weights_only=True)["iteration"] == 9
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"model_0000009.pth', named in .*last_checkpoint \(read for --resume\): damaged: "
                                           r"its member archive/data/\d+ fails its CRC-32 check .*it is not loaded.* The "
                                           r"newest checkpoint before it that passes the integrity check is "
                                           r"model_0000007.pth: resume from it with `echo model_0000007.pth > "):
        SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded
    damage(tmp_path / "model_0000007.pth", at=0.7)
    with pytest.raises(WeightsError, match=r"passes the integrity check is model_0000004.pth \(model_0000007.pth fails "
                                           r"it too\)"):
        SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert [os.path.basename(p) for p in previous_checkpoints(str(tmp_path))] == ["model_0000004.pth"]
    with pytest.raises(WeightsError, match=rf"^MODEL.WEIGHTS='{newest}': damaged: its member"):  # named by the key
        SafeCheckpointer(model).resume_or_load(str(newest), resume=False)
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")  # the fix the message gives works
    assert SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 4


@pytest.mark.parametrize("record", [b"PK\x03\x04", b"PK\x01\x02"], ids=["a member header", "the central directory"])
def test_damage_to_the_zip_records_is_named_too(tmp_path, record):
    saved(tmp_path, 1)
    path = tmp_path / "model_0000001.pth"
    data = bytearray(path.read_bytes())
    at = data.rfind(record)
    data[at + 14:at + 34] = bytes(20)  # its CRC, sizes and name length
    path.write_bytes(bytes(data))
    assert checkpoint_problem(str(path)) is not None


@pytest.mark.parametrize("fmt", ["legacy torch", "pkl"])
def test_files_without_a_checksum_load_and_must_hold_finite_weights(tmp_path, fmt):
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / ("w.pth" if fmt == "legacy torch" else "w.pkl")

    def write(weights):
        if fmt == "legacy torch":
            torch.save({"model": weights}, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in weights.items()}, "__author__": "test"}))

    write(state)
    assert checkpoint_problem(str(path)) is None  # no checksum to check
    SafeCheckpointer(model).load(str(path))
    state["body.weight"][3, 5] = float("nan")
    write(state)
    with pytest.raises(WeightsError, match=r"1 of its 4 tensors hold NaN or Inf \(body.weight\): damaged, or saved from a "
                                           r"diverged run; it is not loaded"):
        SafeCheckpointer(model).load(str(path))
    assert torch.isfinite(model.body.weight).all()


def test_train_net_resume_from_a_damaged_checkpoint_names_it_and_the_one_to_use(tmp_path):
    cfg = gn_det.get_config(DEMO)
    model = gn_det.build_model(cfg)
    checkpointer = SafeCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)
    checkpointer.save("model_0000009", iteration=9)
    damage(tmp_path / "model_0000009.pth")
    proc = train_net("--resume", *QUICK, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "20", "OUTPUT_DIR", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("train_net: error:")]
    assert "model_0000009.pth" in line and ": damaged: its member archive/data/" in line
    assert "training diverged" not in proc.stderr  # (before: loaded as NaN weights, then "diverged")
    assert "passes the integrity check is model_0000004.pth" in line


def test_checking_cost_is_small(tmp_path):
    # ~8 MB here; the 300 MB figure is in docs/RELIABILITY.md (measured the same way)
    path = tmp_path / "big.pth"
    torch.save({"model": {"w": torch.randn(2 * 1024 * 1024)}}, path)
    assert checkpoint_problem(str(path)) is None


# ----------------------------------------------------------------------------- write errors, a full disk


@contextlib.contextmanager
def small_filesystem(size):
    """A tmpfs of ``size`` mounted on a new folder (root only); skips the test where it cannot be."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    where = tempfile.mkdtemp(prefix="gn_det_full_")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], capture_output=True, text=True)
    if proc.returncode:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)
        os.rmdir(where)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path):
    with small_filesystem("2m") as where:
        model = torch.nn.Linear(256, 256)  # 257 KiB of weights: fits, twice
        checkpointer = SafeCheckpointer(model, save_dir=where)
        checkpointer.save("model_0000004", iteration=4)
        good = open(os.path.join(where, "model_0000004.pth"), "rb").read()
        checkpointer.model = torch.nn.Linear(1024, 1024)  # 4 MiB: does not
        with pytest.raises(CheckpointWriteError, match=rf"^cannot write checkpoint {where}/model_0000009.pth: No space left "
                                                       r"on device \(1\.\d MiB free, 4\.\d MiB needed\); the previous "
                                                       "checkpoint and last_checkpoint are kept$") as info:
            checkpointer.save("model_0000009", iteration=9)
        assert isinstance(info.value, UserError) and isinstance(info.value, OSError)
        assert checkpointer.write_failed is not None
        assert sorted(os.listdir(where)) == ["last_checkpoint", "model_0000004.pth"]  # no temporary
        assert open(os.path.join(where, "last_checkpoint")).read() == "model_0000004.pth"
        assert open(os.path.join(where, "model_0000004.pth"), "rb").read() == good


def test_an_injected_enospc_at_the_write_is_reported_the_same_way(tmp_path, monkeypatch):
    # Where no small file system can be mounted: the OSError torch's zip writer meets, under the
    # RuntimeError it raises for it ("unexpected pos ...", with ENOSPC in the chain).
    checkpointer = SafeCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)

    def full(data, f):
        f.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 54946752 vs 54946640")  # noqa: B904 (as torch: the OSError its context)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*model_0000009.pth: No space left on device "
                                                   r"\(.* free, 64\.\d KiB needed\)"):
        checkpointer.save("model_0000009", iteration=9)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]


def test_train_net_on_a_full_disk_stops_with_one_line_and_evaluates_nothing(tmp_path):
    # The demo's checkpoint (weights and optimizer state) is ~100 MB: the first fits in 150 MiB,
    # model_final (written at the same, last iteration) does not. The final evaluation must not run.
    with small_filesystem("150m") as where:
        proc = train_net(*QUICK, "SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", where)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("train_net: error:")]
        assert line.startswith(f"train_net: error: cannot write checkpoint {where}/model_final.pth: No space left on "
                               "device (") and " MiB free, " in line and " MiB needed)" in line
        files = sorted(os.listdir(where))
        assert "model_0000000.pth" in files and "model_final.pth" not in files
        assert not [f for f in files if f.endswith(".tmp")] and "gn_det_run.lock" not in files
        assert open(os.path.join(where, "last_checkpoint")).read() == "model_0000000.pth"
        assert torch.load(os.path.join(where, "model_0000000.pth"), weights_only=True)["iteration"] == 0
        assert not os.path.exists(os.path.join(where, "inference"))  # no evaluation of the unsaved model
        log = proc.stdout + proc.stderr
        assert "Not evaluating: training ended with CheckpointWriteError" in log and "Evaluation results" not in log
        rows = [json.loads(x) for x in open(os.path.join(where, "metrics.json")) if x.strip()]
        assert rows and rows[-1]["iteration"] == 0  # metrics so far, readable


# ----------------------------------------------------------------------------- weights that are not a checkpoint


def demo_model():
    return gn_det.build_model(gn_det.get_config(DEMO))


@pytest.mark.parametrize("content,message", [
    ([1, 2, 3], r"holds a list of 3 items, not a checkpoint"),
    (torch.zeros(3, 4), r"holds a single tensor of shape \(3, 4\), not a checkpoint"),
    ({"epoch": 3, "note": "hello"}, r"holds a dict of 2 entries \(keys 'epoch', 'note'\) with no tensors or arrays"),
    ({"state_dict": {"w": torch.zeros(2)}, "meta": {}}, r"holds a dict of 2 entries \(keys 'state_dict', 'meta'\) with "
                                                        r"no tensors or arrays"),
    ({"model": {"w": torch.zeros(2), "step": 3}}, r"1 of its 2 weights are not tensors or arrays \('step' holds an? int"),
])
def test_weights_that_are_not_a_checkpoint_are_named(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    with pytest.raises(WeightsError, match=rf"^MODEL.WEIGHTS='{path}': {message}"):
        SafeCheckpointer(Net()).resume_or_load(str(path), resume=False)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
    model = demo_model()
    with pytest.raises(WeightsError, match=rf"^MODEL.WEIGHTS='{path}': matches none of the model's \d+ parameters: it "
                                           r"holds 2 tensors named e.g. 'conv1.weight', 'fc.weight', the model's are named "
                                           r"e.g. 'backbone.*another architecture"):
        SafeCheckpointer(model).resume_or_load(str(path), resume=False)


def test_a_partial_match_is_reported_per_module_and_refused_for_evaluation(tmp_path, caplog):
    model = demo_model()
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    path = tmp_path / "backbone.pth"
    torch.save({"model": backbone}, path)
    SafeCheckpointer(model).resume_or_load(str(path), resume=False)  # training from a pretrained backbone: allowed
    assert "loaded" in caplog.text and "backbone.bottom_up" in caplog.text and "roi_heads.box_predictor 0/" in caplog.text
    checkpointer = SafeCheckpointer(model)
    checkpointer.require_all_parameters = True  # --eval-only
    with pytest.raises(WeightsError, match=r"leaves \d+ of the model's \d+ trainable parameters at their initial \(random\) "
                                           r"values \(.*roi_heads.box_predictor 0/4.*\); .*--allow-partial-weights"):
        checkpointer.resume_or_load(str(path), resume=False)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    whole = tmp_path / "whole.pth"
    torch.save({"model": model.state_dict()}, whole)
    checkpointer.resume_or_load(str(whole), resume=False)  # everything loaded: fine


@pytest.mark.parametrize("case", ["list as MODEL.WEIGHTS", "partial weights with --eval-only"])
def test_train_net_names_weights_that_are_not_a_whole_checkpoint(tmp_path, case):
    path = tmp_path / "weights.pth"
    if case == "list as MODEL.WEIGHTS":
        torch.save([1, 2, 3], path)
        args = [*QUICK, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1"]
        expected = f"train_net: error: MODEL.WEIGHTS='{path}': holds a list of 3 items, not a checkpoint"
    else:
        model = demo_model()
        torch.save({"model": {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}}, path)
        args = ["--eval-only"]
        expected = f"train_net: error: MODEL.WEIGHTS='{path}': leaves "
    proc = train_net(*args, "MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr[-3000:]
