"""GN's defining properties, stated exactly: no dependence on the batch, no train/eval
difference, and its two limits (G = 1: layer norm; G = C: instance norm)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gn_det
from gn_cases import make_affine, make_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_net(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), norm(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), norm(32))


def gn(channels):
    return gn_det.GroupNorm(8, channels, activation=None)


def test_gn_output_of_a_sample_does_not_depend_on_its_batch():
    net = conv_net(gn).train()
    sample = make_input((1, 3, 12, 12), seed=1)
    alone = net(sample)
    for seed in (2, 3):
        companions = make_input((3, 3, 12, 12), seed=seed) * seed
        in_batch = net(torch.cat([companions[:1], sample, companions[1:]]))[1:2]
        torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


def test_batchnorm_output_does_depend_on_its_batch():
    net = conv_net(nn.BatchNorm2d).train()
    sample = make_input((1, 3, 12, 12), seed=1)
    with_a = net(torch.cat([sample, make_input((3, 3, 12, 12), seed=2)]))[:1]
    with_b = net(torch.cat([sample, make_input((3, 3, 12, 12), seed=3) * 3]))[:1]
    assert (with_a - with_b).abs().max() > 0.1  # the contrast GN removes


def test_gn_train_and_eval_modes_agree():
    net = conv_net(gn)
    x = make_input((2, 3, 12, 12))
    train_out = net.train()(x)
    eval_out = net.eval()(x)
    torch.testing.assert_close(train_out, eval_out, atol=0, rtol=0)
    assert not any(True for _ in net[1].buffers())  # no running statistics
    bn = conv_net(nn.BatchNorm2d)
    assert (bn.train()(x) - bn.eval()(x)).abs().max() > 0.1


def test_one_group_is_layer_norm_and_c_groups_instance_norm():
    x = make_input((3, 12, 5, 7))
    weight, bias = make_affine(12)
    layer = F.layer_norm(x, x.shape[1:]) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    one_group = gn_det.GroupNorm(1, 12)
    one_group.load_state_dict({"weight": weight, "bias": bias})
    torch.testing.assert_close(one_group(x), layer, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gn_det.group_norm(x, 12, weight, bias), F.instance_norm(x, weight=weight, bias=bias),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # two studies' quick runs: trainings of their own (make test-slow)
def test_batch_size_study_tool_quick(tmp_path):
    for study in ("batch", "groups"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "batch_size_study.py"), "--quick",
                               "--study", study, "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    batch = json.load(open(tmp_path / "batch_study_quick.json"))
    assert {(r["norm"], r["batch_size"]) for r in batch["rows"]} == {("BN", 8), ("GN", 8), ("BN", 2), ("GN", 2)}
    assert all(0 <= r["val_error"] <= 100 for r in batch["rows"])
    assert (tmp_path / "batch_study_quick.png").stat().st_size > 1000
    assert "| BN - GN |" in (tmp_path / "batch_study_quick.md").read_text()
    groups = json.load(open(tmp_path / "groups_study_quick.json"))
    assert [(r["setting"], r["value"]) for r in groups["rows"]] == [("groups", 8), ("groups", 1), ("channels_per_group", 4)]
    assert groups["meta"]["command"] == ("python tools/batch_size_study.py --study groups --name groups_study_quick "
                                         f"--seeds 0 --quick --threads 1 --min-seeds 3 --resume --out-dir {tmp_path}")


@pytest.mark.slow  # two train_net runs with evaluation (make test-slow)
def test_detection_norm_study_quick(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "detection_norm_study.py"), "--quick",
                           "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "detection_study_quick.json"))["rows"]
    assert [(r["norm_name"], r["images_per_batch"]) for r in rows] == [("FastGN", 2), ("BN", 1)]
    assert all("error" not in r and "box_AP" in r and "mask_AP" in r for r in rows), rows
