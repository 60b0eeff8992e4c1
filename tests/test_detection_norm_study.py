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


def _run(row, seed, box, mask, val300=None):
    run = {"row": row, "seed": seed, "iterations": 1000, "images_per_batch": study.ROWS_BY_NAME[row].ims,
           "box_AP": box, "mask_AP": mask}
    if val300:  # (box AP, mask AP, their SEs)
        run["val300"] = {"dataset": "gn_det_shapes_val300", "images": 300, "box_AP": val300[0], "mask_AP": val300[1],
                         "box_AP_se": val300[2], "mask_AP_se": val300[3], "bootstrap": {"resamples": 200, "seed": 0}}
    return run


def test_summary_tables_and_plot(tmp_path):
    runs = [_run("FastGN@2", 7, 56.0, 55.0), _run("FastGN@2", 8, 58.0, 54.0), _run("BN@1", 7, 30.0, 29.0),
            dict(_run("BN@1", 8, 0, 0), error="diverged"), _run("G8@2", 7, 50.0, 49.0), _run("G8@2", 8, 52.0, 47.0),
            _run("FastGNWS@1", 7, 57.5, 56.0), _run("FastGN@4-halflr", 7, 40.0, 37.0)]
    for r in runs:
        if "error" in r:
            del r["box_AP"], r["mask_AP"]
    summary = study.summarize(runs)
    assert [e["row"] for e in summary] == ["FastGN@2", "FastGNWS@1", "BN@1", "G8@2", "FastGN@4-halflr"]  # ROWS' order
    gn = summary[0]
    assert gn["box_AP"]["mean"] == 57.0 and gn["box_AP"]["std"] == pytest.approx(math.sqrt(2))
    assert summary[2]["seeds"] == [7] and summary[2]["failed"] == [8] and math.isnan(summary[2]["box_AP"]["std"])
    meta = {"machine": "CPU test", "date": "today", "command": "python tools/detection_norm_study.py",
            "total_seconds": 60, "run_seconds": 5400, "run_seconds_min": 540, "run_seconds_max": 1260}
    text = study.markdown(summary, meta)
    assert "took 1.5 h in all (9–21 min a run;" in text and "PARTIAL" not in text
    assert "**PARTIAL**: 2 of the command's runs are not here yet (not finished): BN@2 seed 7, BN@2 seed 8." in \
        study.markdown(summary, dict(meta, missing=["BN@2 seed 7", "BN@2 seed 8"]))
    assert "| FastGN@2 | gn_det GN | 2 | 1000 | 7, 8 | 57.0 ± 1.4 (56.0–58.0) | 54.5 ± 0.7 (54.0–55.0) |" in text
    assert "| BN@1 | detectron2 \"BN\" (batch statistics) | 1 | 1000 | 7; failed: [8] | 30.0 (1 seed) |" in text
    sweep = text.split("## Group sweep")[1]
    assert "| FastGN@2 | G = 16 (the demo's) |" in sweep and "| G8@2 | G = 8 |" in sweep
    assert sweep.index("| G8@2 |") < sweep.index("| FastGN@2 |")  # by group count
    controls = text.split("## Controls")[1].split("##")[0]
    assert "| FastGN@4-halflr | gn_det GN, half the linear-scaled lr | 4 |" in controls  # its own label, not a G
    path = study.plot(summary, runs, str(tmp_path / "study.png"))
    assert path and os.path.getsize(path) > 1000


def test_the_no_norm_row_with_resnet_biases_is_a_control_judged_against_the_others():
    row = study.ROWS_BY_NAME["NoNormBiasAll@2"]
    assert row in study.CONTROLS and row not in study.ROWS and row.norm == "" and row.ims == 2
    assert row.opts == study.RESNET_CONV_BIAS
    assert {(a, b) for a, b, _ in study.COMPARISONS if a == row.name} == {
        ("NoNormBiasAll@2", "NoNormBias@2"), ("NoNormBiasAll@2", "FrozenBN@2"), ("NoNormBiasAll@2", "BN@2")}
    cfg = gn_det.get_config(study.CONFIG, study.config_overrides(row, 7, "out")[0])
    assert cfg.MODEL.RESNETS.CONV_BIAS is True and gn_det.validate_gn_config(cfg)  # a config that can apply it


@pytest.mark.parametrize("name, backbone, heads, pretrain", [
    ("FrozenBN@2-pre", FrozenBatchNorm2d, None, "BN"),
    ("FrozenBN@2-pre-gnheads", FrozenBatchNorm2d, gn_det.GroupNorm, "BN"),
    ("FastGN@2-pre", gn_det.GroupNorm, gn_det.GroupNorm, "FastGN"),
])
def test_the_pretrained_rows_build_the_papers_models_from_their_own_pretraining(name, backbone, heads, pretrain,
                                                                                 tmp_path):
    row = study.ROWS_BY_NAME[name]
    assert row in study.CONTROLS and row.table == "pretrained" and row.pretrain == pretrain and row.ims == 2
    out = tmp_path / "work" / name.replace("@", "_") / "seed8"
    opts, _ = study.config_overrides(row, 8, str(out))
    cfg = gn_det.get_config(study.CONFIG, opts)
    # each seed's own pretraining of the row's norm, shared by the rows that pretrain with it
    assert cfg.MODEL.WEIGHTS == str(tmp_path / "work" / "pretrained" / f"{pretrain}_seed8" / study.PRETRAINED_WEIGHTS)
    model = gn_det.build_model(cfg)
    assert {type(m) for m in model.backbone.bottom_up.modules()} & {FrozenBatchNorm2d, gn_det.GroupNorm} == {backbone}
    head_norms = {type(m) for part in (model.backbone.fpn_output2, model.roi_heads.box_head, model.roi_heads.mask_head)
                  for m in part.modules()} & {FrozenBatchNorm2d, gn_det.GroupNorm, nn.BatchNorm2d}
    assert head_norms == ({heads} if heads else set())
    assert ("FastGN@2-pre", "FrozenBN@2-pre") in {(a, b) for a, b, _ in study.COMPARISONS}


def test_the_val300_evaluation_command_evaluates_the_runs_own_model(tmp_path):
    row = study.ROWS_BY_NAME["FastGN@4-nopad"]
    command = study.val300_command(row, 8, str(tmp_path), ["INPUT.MIN_SIZE_TEST", "128"])
    assert command[1].endswith(os.path.join("tools", "train_net.py")) and "--eval-only" in command
    assert command.index("--eval-only") < command.index("MODEL.RESNETS.NORM")  # train_net wants flags first
    opts = command[command.index("--eval-only") + 1:]
    cfg = gn_det.get_config(study.CONFIG, opts)
    assert cfg.MODEL.WEIGHTS == str(tmp_path / "model_final.pth")
    assert cfg.DATASETS.TEST == ("gn_det_shapes_val300",) and cfg.OUTPUT_DIR == str(tmp_path / "val300")
    assert cfg.MODEL.GN.IGNORE_PADDING and cfg.MODEL.RESNETS.NORM == "FastGN" and cfg.SEED == 8  # as trained
    assert cfg.INPUT.MIN_SIZE_TEST == 128  # as its 60-image evaluation (--quick)
    assert study.val300_results(str(tmp_path)) == str(
        tmp_path / "val300" / "inference" / "gn_det_shapes_val300" / "coco_instances_results.json")


def _perfect_detections(gt_json):
    """What a model that finds every shape exactly would write (COCO results, RLE masks)."""
    from pycocotools import mask as mask_utils

    with open(gt_json) as f:
        coco = json.load(f)
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    out = []
    for a in coco["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], *sizes[a["image_id"]]))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
                    "segmentation": dict(rle, counts=rle["counts"].decode())})
    return out


def test_a_finished_run_gets_its_val300_field_once(tmp_path):
    """add_val300 on a finished run's record: evaluated (here: detections already written after
    the weights, so train_net is not run again), AP and SE computed against val300's own
    annotations, the record rewritten; a second call changes nothing."""
    row = study.ROWS_BY_NAME["FastGN@2"]
    record = _run("FastGN@2", 7, 57.0, 55.0)
    (tmp_path / "model_final.pth").write_bytes(b"weights")
    results = study.val300_results(str(tmp_path))
    os.makedirs(os.path.dirname(results))
    with open(results, "w") as f:
        json.dump(_perfect_detections(study.val300_annotations()), f)
    study.add_val300(record, row, 7, str(tmp_path), [])
    field = record["val300"]
    assert field["dataset"] == "gn_det_shapes_val300" and field["images"] == 300
    assert field["box_AP"] == field["mask_AP"] == 100.0 and field["box_AP_se"] == field["mask_AP_se"] == 0.0
    assert field["bootstrap"] == {"resamples": 200, "seed": 0}
    assert json.load(open(tmp_path / "study_run.json")) == record  # kept with the run
    os.remove(results)  # done once: not evaluated again
    assert study.add_val300(dict(record), row, 7, str(tmp_path), [])["val300"] == field
    failed = dict(_run("FastGN@2", 8, 0, 0), error="diverged")
    assert "val300" not in study.add_val300(failed, row, 8, str(tmp_path / "none"), [])


def test_a_run_without_final_weights_records_why_and_is_tried_again(tmp_path):
    row = study.ROWS_BY_NAME["BN@2"]
    record = study.add_val300(_run("BN@2", 7, 33.0, 31.0), row, 7, str(tmp_path), [])
    assert record["val300"]["error"].startswith("no final weights")
    assert "val300" not in study.summarize([record])[0]  # not in the tables


def test_val300_in_the_tables_and_the_judged_differences():
    runs = [_run("FastGN@2", 7, 56.0, 55.0, (55.0, 53.0, 1.2, 1.0)), _run("FastGN@2", 8, 58.0, 54.0, (57.0, 54.0, 1.0, 1.2)),
            _run("BN@2", 7, 33.0, 31.0, (32.0, 30.0, 1.5, 1.5)), _run("BN@2", 8, 35.0, 30.0, (33.0, 31.0, 1.7, 1.3)),
            _run("BN@1", 7, 30.0, 29.0)]
    summary = study.summarize(runs)
    by = {e["row"]: e for e in summary}
    gn = by["FastGN@2"]
    assert gn["val300"]["box_AP"]["values"] == [55.0, 57.0] and gn["val300"]["box_AP_se"] == pytest.approx(1.1)
    assert gn["box_AP"]["values"] == [56.0, 58.0]  # the 60-image AP keeps its meaning
    assert "val300" not in by["BN@1"] and by["BN@2"]["val300"]["seeds"] == [7, 8]
    meta = {"machine": "CPU test", "date": "today", "command": "python tools/detection_norm_study.py",
            "total_seconds": 60, "run_seconds": 5400, "run_seconds_min": 540, "run_seconds_max": 1260}
    text = study.markdown(summary, meta)
    assert "| box AP | mask AP | box AP, 300 images | mask AP, 300 images |" in text
    assert ("| FastGN@2 | gn_det GN | 2 | 1000 | 7, 8 | 57.0 ± 1.4 (56.0–58.0) | 54.5 ± 0.7 (54.0–55.0) "
            "| 56.0 ± 1.4 (55.0–57.0); SE 1.1 | 53.5 ± 0.7 (53.0–54.0); SE 1.1 |") in text
    assert "| BN@1 | detectron2 \"BN\" (batch statistics) | 1 | 1000 | 7 | 30.0 (1 seed) | 29.0 (1 seed) | n/a | n/a |" in text
    assert "200 resamples of the images, seed 0" in text
    (c,) = [c for c in study.comparisons(summary) if (c["a"], c["b"]) == ("FastGN@2", "BN@2")]
    assert c["val300"]["box_AP"]["diff"] == pytest.approx(23.5) and c["box_AP"]["diff"] == pytest.approx(23.0)
    assert "| FastGN@2 | BN@2 | GN vs BN at 2 images | +23.0 ± 2.8: a higher | +24.0 ± 1.4: a higher " \
           "| +23.5 ± 2.2: a higher | +23.0 ± 1.4: a higher |" in text
    assert "| FastGN@1 |" not in text and "| BN@1 | BN@2 | BN: 1 vs 2 images | -4.0 (too few seeds) " \
           "| -1.5 (too few seeds) | n/a | n/a |" in text
    plain = study.markdown(study.summarize([{k: v for k, v in r.items() if k != "val300"} for r in runs]), meta)
    assert "300 images" not in plain  # tables of runs without val300: as before


def test_val300_only_evaluates_finished_runs_and_trains_nothing(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    for row, seed, val300 in (("FastGN@2", 7, (55.0, 53.0, 1.2, 1.0)), ("FastGN@2", 8, None)):
        folder = work / row.replace("@", "_") / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "study_run.json").write_text(json.dumps(dict(_run(row, seed, 56.0, 55.0, val300), seconds=600.0)))
    study.main(["--rows", "FastGN@2,BN@2", "--seeds", "7,8", "--work-dir", str(work), "--out-dir", str(out),
                "--name", "v", "--val300-only"])
    err = capsys.readouterr().err
    assert "BN@2 seed 7: no finished run" in err and "BN@2 seed 8: no finished run" in err  # nothing trained
    assert not (work / "BN_2").exists()
    result = json.load(open(out / "v.json"))
    by_seed = {r["seed"]: r for r in result["rows"]}
    assert by_seed[7]["val300"]["box_AP"] == 55.0  # kept
    assert by_seed[8]["val300"]["error"].startswith("no final weights")  # tried, recorded why
    assert result["meta"]["missing"] == ["BN@2 seed 7", "BN@2 seed 8"]  # the table says it is partial
    assert "**PARTIAL**: 2 of the command's runs" in (out / "v.md").read_text()
    assert result["meta"]["command"].endswith("--val300-only") is False and "--resume" in result["meta"]["command"]
    assert "| FastGN@2 | gn_det GN | 2 | 1000 | 7, 8 | 56.0 ± 0.0 (56.0–56.0) | 55.0 ± 0.0 (55.0–55.0) " \
           "| 55.0 ± 1.2 SE (1 seed) | 53.0 ± 1.0 SE (1 seed) |" in (out / "v.md").read_text()
    with pytest.raises(SystemExit):
        study.main(["--val300-only", "--no-val300", "--work-dir", str(work), "--out-dir", str(out)])


@pytest.mark.slow  # two train_net runs with evaluation (make test-slow)
def test_one_tiny_row_with_two_seeds(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--rows", "FastGNWS@1", "--seeds", "7,8",
                           "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "detection_study_quick.json"))
    assert [(r["row"], r["seed"]) for r in result["rows"]] == [("FastGNWS@1", 7), ("FastGNWS@1", 8)]
    assert all("error" not in r and "box_AP" in r and "mask_AP" in r for r in result["rows"]), result["rows"]
    assert all(r["val300"]["images"] == 300 and "error" not in r["val300"] for r in result["rows"]), result["rows"]
    assert result["summary"][0]["seeds"] == [7, 8]
    assert (tmp_path / "detection_study_quick.png").stat().st_size > 1000


@pytest.mark.slow  # a tiny pretraining, a train_net run and its evaluations (make test-slow)
def test_a_pretrained_row_pretrains_once_and_trains_from_it(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--rows", "FrozenBN@2-pre", "--seeds", "7", "--no-val300",
                           "--work-dir", str(work), "--out-dir", str(tmp_path), "--name", "pre"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.load(open(tmp_path / "pre.json"))["rows"]
    assert "error" not in run and run["pretrained"]["norm"] == "BN", run
    pretrained = work / "pretrained" / "BN_seed7_quick"
    assert run["pretrained"]["weights"] == str(pretrained / study.PRETRAINED_WEIGHTS)
    assert run["pretrained"]["settings"]["epochs"] == 1  # PRETRAIN_FLAGS_QUICK
    log = (work / "FrozenBN_2-pre_quick" / "seed7" / "log.txt").read_text()
    assert str(pretrained / study.PRETRAINED_WEIGHTS) in log  # train_net loaded it
