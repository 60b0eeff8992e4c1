"""gn_det.train.pretrain and tools/pretrain_backbone.py: a ResNet pretrained on the embedded
classification images loads, every tensor of it, into the detection model it was made for (a
BN-pretrained one into FrozenBN with its statistics), and the tool keeps finished runs and
overwrites nothing."""
import importlib.util
import json
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d

import gn_det
from detectron2.modeling import build_backbone

from gn_det.train.pretrain import (PretrainSettings, _detection_input, backbone_prefix, pretrain_backbone,
                                   pretraining_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
TOOL = os.path.join(ROOT, "tools", "pretrain_backbone.py")
TINY = PretrainSettings(epochs=1, batch_size=16, train_images=32, val_images=16, image_size=32)
# (the tool imports batch_size_study from its own directory, as a script run there does)
_helper = importlib.util.spec_from_file_location("batch_size_study", os.path.join(ROOT, "tools", "batch_size_study.py"))
if "batch_size_study" not in sys.modules:
    _helper.loader.exec_module(sys.modules.setdefault("batch_size_study", importlib.util.module_from_spec(_helper)))
_spec = importlib.util.spec_from_file_location("pretrain_backbone", TOOL)
tool = sys.modules["pretrain_backbone"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)
TINY_FLAGS = ["--epochs", "1", "--batch-size", "16", "--train-images", "32", "--val-images", "16", "--image-size", "32"]


@pytest.mark.parametrize("pretrain_norm, detection_norms", [
    ("BN", ("FrozenBN", "")),  # the paper's BN*: frozen with its statistics, FPN and heads without norm
    ("FastGN", ("FastGN", "FastGN")),
])
def test_pretrained_weights_load_whole_into_the_detection_model(tmp_path, pretrain_norm, detection_norms):
    cfg = gn_det.get_config(CONFIG, ["MODEL.RESNETS.NORM", pretrain_norm])
    path = str(tmp_path / "backbone.pth")
    record = pretrain_backbone(cfg, TINY, path, log=lambda *_: None)
    assert 0 <= record["val_error"] <= 100 and record["steps"] == 2 and record["norm"] == pretrain_norm
    saved = torch.load(path, map_location="cpu")["model"]
    assert saved and all(k.startswith("backbone.bottom_up.") for k in saved)
    assert not any(k.endswith("num_batches_tracked") for k in saved)

    torch.manual_seed(TINY.seed)  # the ResNet pretraining starts from
    initial = backbone_prefix(build_backbone(pretraining_config(cfg)))[0].state_dict()
    assert any(not torch.equal(initial[k[len("backbone.bottom_up."):]], v) for k, v in saved.items()
               if k.endswith("conv1.weight"))  # trained: not its initialisation

    backbone_norm, head_norm = detection_norms
    detection = gn_det.get_config(CONFIG, ["MODEL.RESNETS.NORM", backbone_norm, "MODEL.FPN.NORM", head_norm,
                                           "MODEL.ROI_BOX_HEAD.NORM", head_norm, "MODEL.ROI_MASK_HEAD.NORM", head_norm])
    model = gn_det.build_model(detection)
    DetectionCheckpointer(model).load(path)
    state = model.state_dict()
    bottom_up = {k for k in state if k.startswith("backbone.bottom_up.")}
    assert set(saved) == bottom_up  # every tensor of the ResNet, nothing else
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    if pretrain_norm == "BN":
        frozen = [m for m in model.backbone.bottom_up.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert frozen and all(hasattr(m, "running_mean") for m in frozen)
        # the statistics are the pretraining's, not FrozenBN's identity (mean 0, var 1)
        assert any(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in frozen)
        assert all(not isinstance(m, gn_det.GroupNorm) for m in model.backbone.modules())
        assert all(conv.bias is not None for conv in model.backbone.fpn_lateral2.modules()
                   if isinstance(conv, torch.nn.Conv2d))  # no norm: the FPN's convolutions have biases
    else:
        assert any(isinstance(m, gn_det.GroupNorm) for m in model.backbone.bottom_up.modules())


def test_pretraining_sees_images_as_the_detector_does():
    cfg = gn_det.get_config(CONFIG)
    model = gn_det.build_model(cfg)
    images = torch.rand(2, 3, 32, 32)  # RGB in [0, 1], as the classification set's
    ours = _detection_input(images, cfg, 32)
    # GeneralizedRCNN's own: a BGR (INPUT.FORMAT) 0-255 image, pixel-normalized
    theirs = model.preprocess_image([{"image": (img * 255).flip(0)} for img in images]).tensor
    assert cfg.INPUT.FORMAT == "BGR" and torch.allclose(ours, theirs[:, :, :32, :32], atol=1e-5)


def test_pretraining_trains_every_stage_from_scratch():
    cfg = gn_det.get_config(CONFIG, ["MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.RESNETS.NORM", "BN"])
    resnet = backbone_prefix(build_backbone(pretraining_config(cfg)))[0]
    assert all(p.requires_grad for p in resnet.parameters())  # not the config's frozen stem and res2
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in resnet.modules())
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is 'x.pth'.*starts from scratch"):
        pretraining_config(gn_det.get_config(CONFIG, ["MODEL.WEIGHTS", "x.pth"]))


def test_pretrain_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        PretrainSettings(epochs=0)
    with pytest.raises(ValueError, match=r"train_images \(8\) < batch_size \(16\)"):
        PretrainSettings(batch_size=16, train_images=8)


def _tool(capsys, *args):
    """The tool's main in this process (as its command line runs it): (status, stdout, stderr)."""
    try:
        status = tool.main(["--config", CONFIG, *TINY_FLAGS, *args])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_the_tool_writes_once_keeps_a_finished_run_and_refuses_to_overwrite(tmp_path, capsys):
    out = str(tmp_path / "pre")
    status, _, err = _tool(capsys, "--out-dir", out, "--seed", "3", "MODEL.RESNETS.NORM", "BN")
    assert status == 0, err[-2000:]
    record = json.load(open(os.path.join(out, "pretrain.json")))
    assert record["settings"]["seed"] == 3 and record["opts"] == ["MODEL.RESNETS.NORM", "BN"]
    assert record["norm"] == "BN" and "commit" in record and os.path.isfile(os.path.join(out, "backbone.pth"))
    written = os.path.getmtime(os.path.join(out, "backbone.pth"))

    status, _, err = _tool(capsys, "--out-dir", out, "--seed", "3", "MODEL.RESNETS.NORM", "BN")
    assert status == 2 and "add --resume" in err
    status, kept, _ = _tool(capsys, "--out-dir", out, "--seed", "3", "--resume", "MODEL.RESNETS.NORM", "BN")
    assert status == 0 and "kept" in kept
    status, _, err = _tool(capsys, "--out-dir", out, "--seed", "4", "--resume", "MODEL.RESNETS.NORM", "BN")
    assert status == 2 and "records another pretraining" in err
    assert os.path.getmtime(os.path.join(out, "backbone.pth")) == written  # nothing overwritten
    assert record["tool_blob"]["gn_det/train/pretrain.py"] and len(record["config_sha256"]) == 64

    os.remove(os.path.join(out, "backbone.pth"))  # weights lost: --resume makes them again, and says so
    status, _, err = _tool(capsys, "--out-dir", out, "--seed", "3", "--resume", "MODEL.RESNETS.NORM", "BN")
    assert status == 0 and "weights" in err and "are gone" in err and os.path.isfile(os.path.join(out, "backbone.pth"))
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_the_tool_names_a_bad_override_without_a_traceback(tmp_path, capsys):
    status, _, err = _tool(capsys, "--out-dir", str(tmp_path / "x"), "MODEL.RESNETS.NORMM", "BN")
    assert status == 2 and "pretrain_backbone: error:" in err and "NORMM" in err
    assert not (tmp_path / "x").exists()
