"""tools/convert_mmdet_backbone.py (gn_det.train.mmdet_weights) on a synthetic mmdetection GN+WS
ResNet-50 checkpoint (mmcv's layout; nothing downloads): run as a real process, the result
loads into detectron2's GN ResNet with no missing or unexpected keys, and that ResNet with
mmcv's weight standardization gives the outputs of a float64 reference forward of
mmdetection's ResNet written here."""
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gn_det
from gn_det.train.checkpoint import SafeCheckpointer, safe_load_pickle
from gn_det.errors import ConfigError, MissingFileError
from gn_det.train.mmdet_weights import convert_mmdet_resnet, load_mmdet_checkpoint, save_detectron2_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_mmdet_backbone.py")
WS_CONFIG = os.path.join(ROOT, "configs", "mask_rcnn_gn_ws.yaml")
STAGES = (3, 4, 6, 3)  # ResNet-50


def mmdet_resnet50_state_dict(seed=0):
    """Random weights under mmdetection's ResNet-50 GN names (torchvision layout, gnK norms,
    downsample.0/1), plus the ImageNet classifier."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, out, inp, k):
        sd[f"{name}.weight"] = torch.randn(out, inp, k, k, generator=gen) * 0.05 + 0.01

    def gn(name, channels):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(channels, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(channels, generator=gen)

    conv("conv1", 64, 3, 7)
    gn("gn1", 64)
    inp = 64
    for stage, blocks in enumerate(STAGES, start=1):
        mid = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            conv(f"{p}.conv1", mid, inp, 1), gn(f"{p}.gn1", mid)
            conv(f"{p}.conv2", mid, mid, 3), gn(f"{p}.gn2", mid)
            conv(f"{p}.conv3", 4 * mid, mid, 1), gn(f"{p}.gn3", 4 * mid)
            if b == 0:
                conv(f"{p}.downsample.0", 4 * mid, inp, 1), gn(f"{p}.downsample.1", 4 * mid)
            inp = 4 * mid
    sd["fc.weight"] = torch.randn(1000, 2048, generator=gen) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def mmdet_forward_float64(sd, x):
    """mmdetection's ResNet (style='pytorch': stride in the 3x3) with ConvWS (mmcv's
    definition) and GN(32), in float64: res2..res5 outputs."""
    sd = {k: v.double() for k, v in sd.items()}

    def conv_ws(x, name, stride=1, padding=0):
        w = sd[f"{name}.weight"]
        flat = w.reshape(w.shape[0], -1)
        w = (w - flat.mean(1).view(-1, 1, 1, 1)) / (flat.std(1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, None, stride, padding)

    def gn(x, name):
        return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    x = F.relu(gn(conv_ws(x.double(), "conv1", 2, 3), "gn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = {}
    for stage, blocks in enumerate(STAGES, start=1):
        for b in range(blocks):
            p, stride = f"layer{stage}.{b}", (2 if b == 0 and stage > 1 else 1)
            out = F.relu(gn(conv_ws(x, f"{p}.conv1"), f"{p}.gn1"))
            out = F.relu(gn(conv_ws(out, f"{p}.conv2", stride, 1), f"{p}.gn2"))
            out = gn(conv_ws(out, f"{p}.conv3"), f"{p}.gn3")
            shortcut = gn(conv_ws(x, f"{p}.downsample.0", stride), f"{p}.downsample.1") if b == 0 else x
            x = F.relu(out + shortcut)
        outs[f"res{stage + 1}"] = x
    return outs


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_converted_checkpoint_loads_with_no_missing_or_unexpected_keys_and_same_outputs(tmp_path):
    sd = mmdet_resnet50_state_dict()
    source = tmp_path / "resnet50_gn_ws.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "meta": {"epoch": 100}}, source)
    out = tmp_path / "R-50-GN-WS.pkl"
    proc = run_tool(source, out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 159 arrays" in proc.stdout and "left out fc.bias, fc.weight" in proc.stdout
    data = safe_load_pickle(str(out))  # what SafeCheckpointer admits: numpy arrays in dicts
    assert data["matching_heuristics"] is True and "res2.0.shortcut.norm.weight" in data["model"]

    model = gn_det.build_model(gn_det.get_config(WS_CONFIG, ["MODEL.DEVICE", "cpu"]))
    resnet = model.backbone.bottom_up.eval()
    incompatible = resnet.load_state_dict({k: torch.from_numpy(v) for k, v in data["model"].items()}, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = resnet(x)
    expected = mmdet_forward_float64(sd, x)
    for name in ("res2", "res3", "res4", "res5"):
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-3, atol=1e-3)

    # as MODEL.WEIGHTS of the whole detector: every backbone weight found by detectron2's name matching
    with torch.no_grad():
        for p in resnet.parameters():
            p.zero_()
    checkpointer = SafeCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(out)))
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    torch.testing.assert_close(model.backbone.bottom_up.res4[5].conv2.norm.bias, sd["layer3.5.gn2.bias"])


def test_whole_detector_checkpoint_and_names_that_do_not_fit():
    sd = mmdet_resnet50_state_dict()
    detector = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    detector["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    weights, dropped = convert_mmdet_resnet(detector)
    assert len(weights) == 159 and dropped == []
    bn = {k.replace(".gn", ".bn").replace("gn1", "bn1"): v for k, v in sd.items()}
    bn["bn1.running_mean"] = torch.zeros(64)
    with pytest.raises(ConfigError, match="not those of mmdetection's GN ResNet: .*convert-torchvision-to-d2.py"):
        convert_mmdet_resnet(bn)


def test_tool_errors_exit_2_with_the_reason(tmp_path, monkeypatch, capsys):
    source = tmp_path / "bn.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64)}, source)
    monkeypatch.setattr(sys, "argv", [TOOL, str(source), str(tmp_path / "out.pkl")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(TOOL, run_name="__main__")
    assert exit_info.value.code == 2
    assert ("convert_mmdet_backbone: error: 1 names are not those of mmdetection's GN ResNet: bn1.weight"
            in capsys.readouterr().err)
    with pytest.raises(MissingFileError, match="checkpoint not found"):
        load_mmdet_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match=r"write a .pkl"):
        save_detectron2_weights({}, str(tmp_path / "out.pth"))
