"""The installed stack is sound: detectron2's stock GN Mask R-CNN builds on CPU, trains a
step and runs inference, with the detectron2 that make setup installed."""
import os
import subprocess
import sys

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import gn_det
from gn_det.train.data import synthetic_batch


def small_cpu_cfg(config_file: str):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    return cfg


def test_import_gn_det():
    assert callable(gn_det.GroupNorm) and callable(gn_det.group_norm)


def test_env_report_names_the_stack():
    out = subprocess.run([sys.executable, "-m", "gn_det.diagnostics.env"], capture_output=True, text=True, check=True).stdout
    for key in ("torch", "torchvision", "triton", "detectron2", "CUDA available", "GPU"):
        assert key in out, out
    assert "compiled ops" in out  # says whether detectron2's _C is there
    # tuning's state and where its decisions go (tests/conftest.py points them to a folder of the run)
    (line,) = [line for line in out.splitlines() if line.startswith("GN tuning ")]
    assert line.endswith(f" on (CUDA inputs); decisions kept in {os.environ['GN_DET_CACHE_DIR']}"), out


def test_stock_gn_mask_rcnn_trains_and_infers_on_cpu():
    torch.manual_seed(0)
    cfg = small_cpu_cfg("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml")
    model = build_model(cfg)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    batch = synthetic_batch(num_images=2, height=160, width=192, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    total.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": batch[0]["image"], "height": 160, "width": 192}])
    assert outputs[0]["instances"].image_size == (160, 192)
