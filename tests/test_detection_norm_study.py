"""tools/detection_norm_study.py, cheaply: every row's overrides build the demo model with the
norm and settings the row names; the per-row summary (mean, sample std, range over seeds), its
tables and plot from run records; and (slow) one tiny real row with two seeds."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import gn_det
from gn_det.modeling.weight_std import WSConv2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "detection_norm_study.py")
# (the tool imports batch_size_study from its own directory, as a script run there does)
_helper = importlib.util.spec_from_file_location("batch_size_study", os.path.join(ROOT, "tools", "batch_size_study.py"))
_helper.loader.exec_module(sys.modules.setdefault("batch_size_study", importlib.util.module_from_spec(_helper)))
_spec = importlib.util.spec_from_file_location("detection_norm_study", TOOL)
study = sys.modules["detection_norm_study"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(study)


def test_the_rows_the_issue_asks_for():
    names = [row.name for row in study.ROWS]
    assert names == ["FastGN@1", "FastGN@2", "FastGN@4", "FastGNWS@1", "FastGNWS@2", "BN@1", "BN@2", "FrozenBN@2",
                     "G1@2", "G8@2", "G32@2", "CPG1@2", "CPG16@2"]
    assert all(row.ims == 2 for row in study.ROWS if row.table == "groups")


@pytest.mark.parametrize("row", study.ROWS, ids=lambda row: row.name)
def test_every_row_builds_the_demo_model_it_names(row, tmp_path):
    opts, iters = study.config_overrides(row, seed=8, out_dir=str(tmp_path))
    assert iters == 500 * 4 // row.ims  # the same epochs at every batch size
    cfg = gn_det.get_config(study.CONFIG, opts)
    assert cfg.SEED == 8 and cfg.SOLVER.IMS_PER_BATCH == row.ims and cfg.SOLVER.BASE_LR == pytest.approx(0.005 * row.ims)
    model = gn_det.build_model(cfg)
    gns = [m for m in model.modules() if isinstance(m, gn_det.GroupNorm)]
    if row.norm == "FastGN":
        assert len(gns) > 20
        ws = [m for m in model.modules() if isinstance(m, WSConv2d)]
        assert bool(ws) == ("WEIGHT_STANDARDIZATION" in " ".join(row.opts))
        groups = {(m.num_groups, m.num_channels) for m in gns}
        expected = {"G1@2": lambda c: 1, "G8@2": lambda c: 8, "G32@2": lambda c: 32, "CPG1@2": lambda c: c,
                    "CPG16@2": lambda c: c // 16}.get(row.name, lambda c: study.DEMO_GROUPS)
        assert all(g == expected(c) for g, c in groups), sorted(groups)
    else:
        assert not gns
        kind = FrozenBatchNorm2d if row.norm == "FrozenBN" else nn.BatchNorm2d
        assert any(type(m) is kind for m in model.modules())


def test_a_run_stopped_part_way_continues_from_its_checkpoint(tmp_path):
    row = study.ROWS_BY_NAME["FastGN@1"]
    command, iters = study.train_command(row, 7, str(tmp_path), 1.0, [], resume=True)
    assert "--resume" not in command  # nothing to continue from: a fresh run
    period = command[command.index("SOLVER.CHECKPOINT_PERIOD") + 1]
    assert int(period) * study.CHECKPOINTS_PER_RUN == iters  # at most a fifth of a run is lost to a kill
    (tmp_path / "last_checkpoint").write_text("model_0000399.pth")
    command, _ = study.train_command(row, 7, str(tmp_path), 1.0, [], resume=True)
    assert command.index("--resume") < command.index("SOLVER.CHECKPOINT_PERIOD")  # train_net wants flags first
    assert "--resume" not in study.train_command(row, 7, str(tmp_path), 1.0, [], resume=False)[0]


def _run(row, seed, box, mask):
    return {"row": row, "seed": seed, "iterations": 1000, "images_per_batch": study.ROWS_BY_NAME[row].ims,
            "box_AP": box, "mask_AP": mask}


def test_summary_tables_and_plot(tmp_path):
    runs = [_run("FastGN@2", 7, 56.0, 55.0), _run("FastGN@2", 8, 58.0, 54.0), _run("BN@1", 7, 30.0, 29.0),
            dict(_run("BN@1", 8, 0, 0), error="diverged"), _run("G8@2", 7, 50.0, 49.0), _run("G8@2", 8, 52.0, 47.0),
            _run("FastGNWS@1", 7, 57.5, 56.0)]
    for r in runs:
        if "error" in r:
            del r["box_AP"], r["mask_AP"]
    summary = study.summarize(runs)
    assert [e["row"] for e in summary] == ["FastGN@2", "FastGNWS@1", "BN@1", "G8@2"]  # ROWS' order
    gn = summary[0]
    assert gn["box_AP"]["mean"] == 57.0 and gn["box_AP"]["std"] == pytest.approx(math.sqrt(2))
    assert summary[2]["seeds"] == [7] and summary[2]["failed"] == [8] and math.isnan(summary[2]["box_AP"]["std"])
    meta = {"machine": "CPU test", "date": "today", "command": "python tools/detection_norm_study.py",
            "total_seconds": 60, "run_seconds": 5400, "run_seconds_min": 540, "run_seconds_max": 1260}
    text = study.markdown(summary, meta)
    assert "took 1.5 h in all (9–21 min a run;" in text
    assert "| FastGN@2 | gn_det GN | 2 | 1000 | 7, 8 | 57.0 ± 1.4 (56.0–58.0) | 54.5 ± 0.7 (54.0–55.0) |" in text
    assert "| BN@1 | detectron2 \"BN\" (batch statistics) | 1 | 1000 | 7; failed: [8] | 30.0 (1 seed) |" in text
    sweep = text.split("## Group sweep")[1]
    assert "| FastGN@2 | G = 16 (the demo's) |" in sweep and "| G8@2 | G = 8 |" in sweep
    assert sweep.index("| G8@2 |") < sweep.index("| FastGN@2 |")  # by group count
    path = study.plot(summary, runs, str(tmp_path / "study.png"))
    assert path and os.path.getsize(path) > 1000


@pytest.mark.slow  # two train_net runs with evaluation (make test-slow)
def test_one_tiny_row_with_two_seeds(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--rows", "FastGNWS@1", "--seeds", "7,8",
                           "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "detection_study_quick.json"))
    assert [(r["row"], r["seed"]) for r in result["rows"]] == [("FastGNWS@1", 7), ("FastGNWS@1", 8)]
    assert all("error" not in r and "box_AP" in r and "mask_AP" in r for r in result["rows"]), result["rows"]
    assert result["summary"][0]["seeds"] == [7, 8]
    assert (tmp_path / "detection_study_quick.png").stat().st_size > 1000
