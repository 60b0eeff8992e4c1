"""The study tools' bookkeeping, on small fake records (nothing is trained): the one rule that
decides whether a difference is inside the noise, the per-cell tables (mean, std, n, PARTIAL),
resuming from run records, the sections' separate files and full commands, and the detection
study's control rows (built, not trained)."""
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


bss = _load("batch_size_study")


# --- the rule ---

def test_a_difference_larger_than_two_standard_errors_counts():
    c = bss.noise_compare([10.0, 11.0, 12.0], [5.0, 6.0, 7.0])
    # s = 1 on both sides, n = 3: 2 SE = 2 sqrt(1/3 + 1/3)
    assert c["diff"] == pytest.approx(5.0) and c["two_se"] == pytest.approx(2 * math.sqrt(2 / 3))
    assert c["verdict"] == "a higher"
    assert bss.noise_compare([5.0, 6.0, 7.0], [10.0, 11.0, 12.0])["verdict"] == "b higher"


def test_a_difference_inside_two_standard_errors_claims_nothing():
    c = bss.noise_compare([7.15, 14.80, 11.05], [5.80, 3.10, 9.0])
    assert abs(c["diff"]) <= c["two_se"] and c["verdict"] == "inside the noise"
    # exactly at the bound: still inside (the rule asks for larger)
    at = bss.noise_compare([0.0, 2.0], [0.0, 0.0])  # diff 1, 2 SE = 2 sqrt(2/2 + 0) = 2
    assert at["verdict"] == "inside the noise"


def test_one_seed_on_either_side_judges_nothing():
    for a, b in (([1.0], [5.0, 6.0]), ([1.0, 2.0], [9.0]), ([], [1.0, 2.0])):
        c = bss.noise_compare(a, b)
        assert c["verdict"] == "too few seeds" and math.isnan(c["two_se"])
    assert "too few seeds" in bss.diff_text(bss.noise_compare([1.0], [50.0]), ("BN", "GN"))


def test_the_words_of_a_verdict():
    assert bss.diff_text(bss.noise_compare([10.0, 11.0, 12.0], [5.0, 6.0, 7.0]), ("BN", "GN")).endswith(": BN higher")
    assert bss.diff_text(bss.noise_compare([1.0, 3.0], [2.0, 2.0]), ("BN", "GN")) == "+0.00 ± 2.00: inside the noise"
    assert bss.cell_text(bss.stats([1.0, 3.0])) == "2.00 ± 1.41 (n=2)"
    assert bss.cell_text(bss.stats([4.0])) == "4.00 (n=1)" and bss.cell_text(bss.stats([])) == "–"


# --- records, resume and tables ---

def _record(args, cell, seed, error):
    return {**cell, "epochs": args.epochs, "seed": seed, "data_seed": bss.data_seed_of(args, seed), "lr": args.lr,
            "width": args.width, "train_images": args.train_images, "val_images": args.val_images,
            "val_error": error, "seconds": 10.0, "commit": "abc", "threads": 1}


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_a_batch_table_from_fake_records_is_partial_until_every_cell_has_its_seeds(tmp_path):
    args = bss.parse_args(["--out-dir", str(tmp_path), "--seeds", "0", "1", "2", "--batch-sizes", "32", "2"])
    errors = {("BN", 32): [5.0, 6.0, 7.0], ("GN", 32): [7.0, 17.0, 9.0], ("BN", 2): [20.0, 21.0, 22.0],
              ("GN", 2): [3.0, 4.0]}
    records = [_record(args, c, s, e) for c in bss.cells(args) for s, e in enumerate(errors[(c["norm"], c["batch_size"])])]
    _write(tmp_path / "batch_study_runs.jsonl", records)
    bss.main(["--out-dir", str(tmp_path), "--seeds", "0", "1", "2", "--batch-sizes", "32", "2", "--tables-only"])
    text = (tmp_path / "batch_study.md").read_text()
    assert "**PARTIAL**" in text and "GN batch 2: seeds [0, 1]" in text and "BN batch 32" not in text.split("Command")[0]
    assert "| BN | 6.00 ± 1.00 (n=3) | 21.00 ± 1.00 (n=3) |" in text
    assert "-5.00 ± " in text and ": inside the noise" in text  # batch 32: GN's spread swallows it
    assert "+17.50 ± " in text and ": BN higher" in text  # batch 2
    summary = json.load(open(tmp_path / "batch_study.json"))
    assert summary["meta"]["rule"] == bss.NOISE_RULE and summary["meta"]["partial"]
    assert (tmp_path / "batch_study.png").stat().st_size > 1000
    records.append(_record(args, bss.cells(args)[3], 2, 5.0))  # the missing seed
    records.append(_record(args, bss.cells(args)[0], 5, 90.0))  # a seed the command does not name: not in its table
    _write(tmp_path / "batch_study_runs.jsonl", records)
    bss.main(["--out-dir", str(tmp_path), "--seeds", "0", "1", "2", "--batch-sizes", "32", "2", "--tables-only"])
    text = (tmp_path / "batch_study.md").read_text()
    assert "PARTIAL" not in text and "90.00" not in text and "| BN | 6.00 ± 1.00 (n=3) |" in text


def test_resume_runs_only_the_missing_cells_and_survives_a_cut_line(tmp_path, monkeypatch):
    argv = ["--out-dir", str(tmp_path), "--study", "groups", "--groups", "32", "1", "--channels-per-group", "1",
            "--seeds", "0", "1", "--train-images", "20", "--val-images", "10", "--resume"]
    args = bss.parse_args(argv)
    g32, g1, cpg1 = bss.cells(args)
    # G = 64 and 1 channel per group build the same network at width 16: one run serves both
    assert cpg1["layer_groups"] == [16, 32, 64] and g32["layer_groups"] == [16, 32, 32]
    _write(tmp_path / "other_section_runs.jsonl", [_record(args, g32, 0, 7.0), _record(args, g1, 0, 40.0)])
    with open(tmp_path / "other_section_runs.jsonl", "a") as f:
        f.write('{"norm": "GN", "cut sh')  # a kill in the middle of a write
    calls = []
    monkeypatch.setattr(bss, "make_shapes_classification", lambda n, seed: (bss.torch.zeros(n, 3, 32, 32),
                                                                           bss.torch.zeros(n, dtype=bss.torch.long)))
    monkeypatch.setattr(bss, "train_and_evaluate", lambda norm, b, data, e, lr, w, seed: calls.append(seed) or 50.0)
    bss.main(argv)
    assert sorted(calls) == [0, 1, 1, 1]  # cpg1 seed 0, then all three seed 1; nothing recorded runs again
    mine = [json.loads(line) for line in open(tmp_path / "groups_study_runs.jsonl")]
    assert len(mine) == 4 and all(r["threads"] == 1 and "commit" in r and "tool_blob" in r for r in mine)
    assert all(r["command"] == args.command for r in mine)
    calls.clear()
    bss.main(argv)
    assert calls == []  # everything recorded
    summary = json.load(open(tmp_path / "groups_study.json"))["summary"]
    assert [e["seeds"] for e in summary] == [[0, 1], [0, 1], [0, 1]]


def test_without_resume_an_existing_section_is_not_overwritten(tmp_path):
    (tmp_path / "batch_study_runs.jsonl").write_text("")
    with pytest.raises(SystemExit, match="--resume"):
        bss.main(["--out-dir", str(tmp_path)])


def test_every_section_has_its_own_files_and_a_full_command():
    names = {bss.parse_args(a).name for a in ([], ["--study", "groups"], ["--study", "groups", "--epochs", "20"],
                                              ["--quick"], ["--study", "groups", "--name", "groups_seed3"])}
    assert names == {"batch_study", "groups_study", "groups_study_20ep", "batch_study_quick", "groups_seed3"}
    cmd = bss.parse_args(["--study", "groups", "--epochs", "20", "--seeds", "0", "1", "--threads", "2"]).command
    for flag in ("--study groups", "--name groups_study_20ep", "--seeds 0 1", "--epochs 20", "--threads 2",
                 "--resume", "--groups 64 32 16 8 4 2 1", "--channels-per-group 64", "--fixed-batch 32"):
        assert flag in cmd, flag
    assert "--seeds 4" in bss.parse_args(["--seed", "4"]).command


def test_the_earlier_single_seed_files_become_records(tmp_path):
    seed1 = bss.legacy_records(os.path.join(ROOT, "docs", "reproduction", "groups_seed1", "groups_study.json"))
    assert len(seed1) == 14 and {r["seed"] for r in seed1} == {1} and {r["threads"] for r in seed1} == {2}
    g32 = next(r for r in seed1 if r["setting"] == "groups" and r["value"] == 32)
    assert g32["val_error"] == pytest.approx(14.80) and g32["layer_groups"] == [16, 32, 32]
    setup = ("SmallResNet width 16/32/64 (GN: 32 groups), 10 classes, 4000 train / 2000 val images, 5 epochs, "
             "SGD lr 0.05 x batch/32, cosine; seed 1; run time 9 s")
    (tmp_path / "batch.json").write_text(json.dumps({
        "meta": {"machine": "CPU x86_64 x2", "date": "d", "command": "python tools/batch_size_study.py --seed 1",
                 "setup": setup},
        "rows": [{"norm": "GN", "batch_size": 32, "val_error": 14.8, "seconds": 9.0}]}))
    (gn32,) = bss.legacy_records(str(tmp_path / "batch.json"))
    assert bss.run_key(g32) == bss.run_key(gn32)  # the same run in both studies
    assert gn32["threads"] == 2 and gn32["commit"] is None


# --- the detection study's controls ---

dns = _load("detection_norm_study")


def test_the_control_rows_change_only_what_they_name(tmp_path):
    gn1, gn4 = dns.ROWS_BY_NAME["FastGN@1"], dns.ROWS_BY_NAME["FastGN@4"]
    opts = {r: dict(zip(*[iter(dns.config_overrides(dns.ROWS_BY_NAME[r], 7, str(tmp_path))[0])] * 2))
            for r in ("FastGN@1", "FastGN@4", "FastGN@1-steps4", "FastGN@4-halflr", "BN@4", "NoNormBias@2",
                      "NoNormBiasAll@2")}
    assert opts["FastGN@1-steps4"]["SOLVER.MAX_ITER"] == opts["FastGN@4"]["SOLVER.MAX_ITER"] == "500"
    assert opts["FastGN@1-steps4"]["SOLVER.BASE_LR"] == opts["FastGN@1"]["SOLVER.BASE_LR"]
    assert opts["FastGN@1-steps4"]["SOLVER.STEPS"] == opts["FastGN@4"]["SOLVER.STEPS"]
    assert float(opts["FastGN@4-halflr"]["SOLVER.BASE_LR"]) == pytest.approx(float(opts["FastGN@4"]["SOLVER.BASE_LR"]) / 2)
    assert opts["FastGN@4-halflr"]["SOLVER.MAX_ITER"] == "500"
    assert opts["BN@4"]["MODEL.RESNETS.NORM"] == "BN" and opts["BN@4"]["SOLVER.IMS_PER_BATCH"] == "4"
    assert all(opts["NoNormBias@2"][k] == "" for k in dns.NORM_KEYS)
    assert "MODEL.RESNETS.CONV_BIAS" not in opts["NoNormBias@2"]  # as recorded: no ResNet biases
    # NoNormBias@2 and the ResNet's biases, nothing else
    assert {k: v for k, v in opts["NoNormBiasAll@2"].items() if opts["NoNormBias@2"].get(k) != v} == {
        "MODEL.RESNETS.CONV_BIAS": "True", "MODEL.BACKBONE.NAME": "build_fastgn_resnet_fpn_backbone"}
    assert gn1.ims == 1 and gn4.ims == 4


@pytest.mark.parametrize("name", ["BN@4", "FastGN@1-steps4", "FastGN@4-halflr", "NoNormBias@2", "NoNormBiasAll@2",
                                  "FrozenBN@2", "FastGN@4-nopad", "FastGN@1-nopad"])
def test_every_control_row_builds_the_model_it_names(name, tmp_path):
    import gn_det
    from detectron2.layers import FrozenBatchNorm2d
    from torch import nn

    row = dns.ROWS_BY_NAME[name]
    opts, _ = dns.config_overrides(row, seed=7, out_dir=str(tmp_path))
    model = gn_det.build_model(gn_det.get_config(dns.CONFIG, opts))
    modules = list(model.modules())
    norms = [m for m in modules if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d, gn_det.GroupNorm))]
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if name in ("NoNormBias@2", "NoNormBiasAll@2"):
        assert not norms
        backbone = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("backbone.bottom_up")]
        heads = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith(("backbone.fpn",
                 "roi_heads.box_head", "roi_heads.mask_head"))]
        assert heads and all(m.bias is not None for m in heads)
        # detectron2's ResNet builds its convolutions without biases whatever the norm (NoNormBias@2, as
        # recorded); gn_det's option MODEL.RESNETS.CONV_BIAS (RESNET_CONV_BIAS) gives every one a bias
        with_biases = name == "NoNormBiasAll@2"
        assert (" ".join(dns.RESNET_CONV_BIAS) in " ".join(row.opts)) == with_biases
        assert backbone and all((m.bias is not None) == with_biases for m in backbone)
    elif name == "FrozenBN@2":
        # no normalization, no affine, no bias: identity statistics, nothing learned in the norms
        frozen = [m for m in modules if isinstance(m, FrozenBatchNorm2d)]
        assert frozen and all(not list(m.parameters()) for m in frozen)
        assert all(m.bias is None for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
                   and n.startswith("backbone"))
    elif name == "BN@4":
        assert any(type(m) is nn.BatchNorm2d for m in norms)
    elif name.endswith("-nopad"):  # padding excluded in the dense maps' GNs, never the ROI heads'
        marked = {n for n, m in model.named_modules() if getattr(m, "ignore_padding", False)}
        assert marked and all(n.startswith("backbone") for n in marked)
        assert any(isinstance(m, gn_det.GroupNorm) and not m.ignore_padding for m in norms)
    else:
        assert any(isinstance(m, gn_det.GroupNorm) for m in norms)
    assert convs


def test_a_group_table_judges_each_setting_against_the_best_it_can_judge(tmp_path):
    argv = ["--out-dir", str(tmp_path), "--study", "groups", "--groups", "32", "8", "1", "--channels-per-group", "1",
            "--seeds", "0", "1", "2"]
    args = bss.parse_args(argv)
    g32, g8, g1, cpg1 = bss.cells(args)
    errors = {"GN G=32": [10.0, 11.0, 12.0], "GN G=8": [5.0], "GN G=1": [40.0, 60.0, 50.0], "GN C/G=1": [10.5, 11.5, 11.0]}
    _write(tmp_path / "groups_study_runs.jsonl",
           [_record(args, c, s, e) for c in (g32, g8, g1, cpg1) for s, e in enumerate(errors[c["label"]])])
    bss.main(argv + ["--tables-only"])
    text = (tmp_path / "groups_study.md").read_text()
    # G = 8's one seed has the lowest mean, but the rule cannot judge it: the best is G = 32
    assert "vs the best (groups G = 32)" in text
    assert "| 8 | 8/8/8 | 5.00 (n=1) | 0 | -6.00 (too few seeds) |" in text
    assert "| 1 | 1/1/1 | 50.00 ± 10.00 (n=3) | 0, 1, 2 | +39.00 ± 11.60: worse |" in text
    assert "**PARTIAL**: 1 of 4 cells have fewer than 3 seeds (GN G=8: seeds [0])" in text
