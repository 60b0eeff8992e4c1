"""gn_det inside an existing detectron2 project, as a user adds it: a project package with its
own registered backbone and box head that call ``get_norm`` by name, imported before gn_det,
trained by detectron2's own ``DefaultTrainer`` (not gn_det's). ``MODEL.GN.*`` must reach every
GN layer; a path that would bypass it must fail loudly. Run in a subprocess: the project is
imported before gn_det there, as in a user's train_net."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROJECT = '''
"""A detectron2 project that knows nothing of gn_det: its norms come from a config key."""
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, ROI_BOX_HEAD_REGISTRY, Backbone
from torch import nn


def add_myproj_config(cfg):
    cfg.MODEL.MYPROJ = CN()
    cfg.MODEL.MYPROJ.NORM = "GN"
    cfg.MODEL.MYPROJ.WIDTH = 48


class TinyBackbone(Backbone):
    def __init__(self, norm, width):
        super().__init__()
        self.conv1 = Conv2d(3, width, 3, stride=2, padding=1, bias=False, norm=get_norm(norm, width), activation=F.relu)
        self.conv2 = Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False, norm=get_norm(norm, 2 * width))
        self.width = width

    def forward(self, x):
        return {"p2": F.relu(self.conv2(self.conv1(x)))}

    def output_shape(self):
        return {"p2": ShapeSpec(channels=2 * self.width, stride=4)}


@BACKBONE_REGISTRY.register()
def build_myproj_backbone(cfg, input_shape):
    return TinyBackbone(cfg.MODEL.MYPROJ.NORM, cfg.MODEL.MYPROJ.WIDTH)


@ROI_BOX_HEAD_REGISTRY.register()
class MyProjBoxHead(nn.Module):
    def __init__(self, cfg, input_shape):
        super().__init__()
        width = cfg.MODEL.MYPROJ.WIDTH
        self.conv = Conv2d(input_shape.channels, width, 3, padding=1, bias=False,
                           norm=get_norm(cfg.MODEL.MYPROJ.NORM, width), activation=F.relu)
        self.fc = nn.Linear(width * input_shape.height * input_shape.width, 64)
        self.output_shape = ShapeSpec(channels=64)

    def forward(self, x):
        return F.relu(self.fc(self.conv(x).flatten(1)))
'''

TRAIN = '''
import json, sys
import myproj  # the project first, as in its own train_net
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from detectron2.layers import get_norm as project_view_of_get_norm
import gn_det
from gn_det.train.data import register_shapes_dataset

assert myproj.get_norm is gn_det.modeling.get_norm, "the project's get_norm was not re-bound"
register_shapes_dataset()
results = {}
for name, opts in {"groups": ["MODEL.GN.NUM_GROUPS", 8, "MODEL.GN.EPS", 1e-3],
                   "per_group": ["MODEL.GN.NUM_GROUPS", 0, "MODEL.GN.CHANNELS_PER_GROUP", 12, "MODEL.GN.EPS", 1e-4]}.items():
    cfg = get_cfg()
    myproj.add_myproj_config(cfg)
    gn_det.add_gn_config(cfg)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.MASK_ON", False, "MODEL.MYPROJ.NORM", "FastGN",
        "MODEL.BACKBONE.NAME", "build_myproj_backbone", "MODEL.RPN.IN_FEATURES", ["p2"],
        "MODEL.ANCHOR_GENERATOR.SIZES", [[32, 64]], "MODEL.ROI_HEADS.IN_FEATURES", ["p2"],
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_BOX_HEAD.NAME", "MyProjBoxHead",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 5, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "DATASETS.TRAIN", ["gn_det_shapes_train"], "DATASETS.TEST", [],
        "INPUT.MIN_SIZE_TRAIN", [128], "INPUT.MAX_SIZE_TRAIN", 256, "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.BASE_LR", 0.001, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", [], "SOLVER.WARMUP_ITERS", 1,
        "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", sys.argv[1] + "/" + name] + opts)
    trainer = DefaultTrainer(cfg)  # detectron2's trainer and build_model, untouched
    trainer.train()
    layers = [m for m in trainer.model.modules() if isinstance(m, gn_det.GroupNorm)]
    results[name] = {
        "layers": len(layers), "channels_groups": sorted({(m.num_channels, m.num_groups) for m in layers}),
        "eps": sorted({m.eps for m in layers}), "fused": sorted({str(m.activation) for m in layers}),
        "iterations": trainer.iter,  # after train(): the number of iterations run
    }
print("RESULTS " + json.dumps(results))
'''


def run_project(tmp_path, script: str) -> subprocess.CompletedProcess:
    (tmp_path / "myproj.py").write_text(textwrap.dedent(PROJECT))
    (tmp_path / "main.py").write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    return subprocess.run([sys.executable, str(tmp_path / "main.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_model_gn_settings_reach_a_projects_own_modules_through_default_trainer(tmp_path):
    proc = run_project(tmp_path, TRAIN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    groups, per_group = results["groups"], results["per_group"]
    # backbone conv1 (48), conv2 (96), the box head's conv (48): 3 GN layers each
    assert groups["layers"] == per_group["layers"] == 3
    assert groups["channels_groups"] == [[48, 8], [96, 8]] and groups["eps"] == [1e-3]
    assert per_group["channels_groups"] == [[48, 4], [96, 8]] and per_group["eps"] == [1e-4]
    # MODEL.GN.FUSE_ACTIVATION (default True): the ReLUs of Conv2d(norm, activation=relu) moved into GN
    assert groups["fused"] == ["None", "relu"]
    assert groups["iterations"] == per_group["iterations"] == 2  # SOLVER.MAX_ITER


BYPASS = '''
import sys
import myproj
from detectron2.config import get_cfg
import gn_det

cfg = get_cfg()
myproj.add_myproj_config(cfg)
gn_det.add_gn_config(cfg)
cfg.merge_from_list(["MODEL.MYPROJ.NORM", "FastGN", "MODEL.GN.NUM_GROUPS", 8])
try:
    myproj.build_myproj_backbone(cfg, None)  # a plain builder called directly: no build function applies MODEL.GN
except gn_det.errors.ConfigError as exc:
    print("REFUSED", exc)
with gn_det.building_from(cfg):  # what the message suggests
    backbone = myproj.build_myproj_backbone(cfg, None)
print("GROUPS", sorted({m.num_groups for m in backbone.modules() if isinstance(m, gn_det.GroupNorm)}))
'''


def test_a_build_path_that_would_skip_the_settings_fails_loudly(tmp_path):
    proc = run_project(tmp_path, BYPASS)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "REFUSED build_myproj_backbone() builds a gn_det norm from a config with MODEL.GN settings" in proc.stdout
    assert "gn_det.building_from(cfg)" in proc.stdout
    assert "GROUPS [8]" in proc.stdout
