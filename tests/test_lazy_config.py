"""LazyConfig (Python) configs with gn_det: the ``gn`` settings dict and the norm factory in
``norm=`` arguments, the ``gn`` settings applied when detectron2's own way builds the model
(``lazyconfig_train_net.py``: load, apply_overrides, ``instantiate(cfg.model)``) for
detectron2's own configs and ours, and each config under configs/lazy/ instantiated and
trained for a few steps on the embedded dataset (CPU-sized by overrides; the architecture as
written)."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from omegaconf import OmegaConf
from detectron2.modeling.backbone import BasicStem, BottleneckBlock

import gn_det
from gn_det.train.data import register_shapes_dataset
from gn_det.errors import ConfigError
from gn_det.lazy import build_lazy_model, fast_gn, gn_model, lazy_gn_settings, load_lazy_config
from gn_det.train.lazy_loop import lazy_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "lazy", "*.py")))
R50 = os.path.join(ROOT, "configs", "lazy", "mask_rcnn_gn_R_50_FPN_3x.py")


def gn_layers(module):
    return [m for m in module.modules() if isinstance(m, gn_det.GroupNorm)]


def test_group_norm_factory_as_a_lazy_norm_argument():
    factory = L(gn_det.GroupNorm.factory)(num_groups=16, eps=1e-6)
    stem = instantiate(L(BasicStem)(in_channels=3, out_channels=64, norm=factory))
    assert (stem.conv1.norm.num_groups, stem.conv1.norm.eps) == (16, 1e-6)
    block = instantiate(L(BottleneckBlock)(in_channels=64, out_channels=256, bottleneck_channels=64,
                                           norm=L(gn_det.GroupNorm.factory)(channels_per_group=16)))
    assert sorted(m.num_groups for m in gn_layers(block)) == [4, 4, 16, 16]  # 64, 64, 256 and the 256 shortcut
    with pytest.raises(ValueError, match=r"^num_groups=0 and channels_per_group=0: set one of them"):
        gn_det.GroupNorm.factory(num_groups=0)


def test_gn_dict_sets_every_fastgn_norm_and_is_checked():
    cfg = LazyConfig.load(R50)
    cfg = LazyConfig.apply_overrides(cfg, ["train.device=cpu", "gn.num_groups=16", "gn.eps=1e-4"])
    model = build_lazy_model(cfg)
    layers = gn_layers(model)
    assert len(layers) == 69 and {(m.num_groups, m.eps) for m in layers} == {(16, 1e-4)}
    assert model.backbone.bottom_up.stem.conv1.norm.activation == "relu"  # fuse_activation
    with pytest.raises(ConfigError, match=r"gn.group_count is not a gn_det setting; the gn dict takes: num_groups, "):
        lazy_gn_settings(LazyConfig.apply_overrides(LazyConfig.load(R50), ["+gn.group_count=4"]))
    with pytest.raises(ConfigError, match=r"gn.eps=0.0: eps must be > 0"):
        lazy_gn_settings(LazyConfig.apply_overrides(LazyConfig.load(R50), ["gn.eps=0.0"]))


@pytest.mark.parametrize("name,yaml", [("mask_rcnn_gn_R_50_FPN_3x.py", "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml")])
def test_lazy_schedule_is_the_one_its_name_says(name, yaml):
    # detectron2's own YAML of that schedule: its SOLVER.MAX_ITER and STEPS at SOLVER.IMS_PER_BATCH,
    # here scaled to the config's batch; the LR evaluated as detectron2's LRMultiplier does
    # (multiplier(iteration / max_iter)), so a max_iter left at common/train.py's 90000 fails.
    cfg, solver = LazyConfig.load(os.path.join(ROOT, "configs", "lazy", name)), model_zoo.get_config(yaml).SOLVER
    scale = solver.IMS_PER_BATCH / cfg.dataloader.train.total_batch_size
    max_iter, steps = round(solver.MAX_ITER * scale), [round(step * scale) for step in solver.STEPS]
    assert cfg.train.max_iter == max_iter
    multiplier = instantiate(cfg.lr_multiplier)
    lr = lambda iteration: multiplier(iteration / cfg.train.max_iter)  # noqa: E731
    assert lr(steps[0] - 1) == pytest.approx(1.0)  # (warm-up long over)
    for step in steps:
        assert lr(step) == pytest.approx(0.1 * lr(step - 1)), step
    assert lr(max_iter - 1) == pytest.approx(solver.GAMMA ** len(steps))


# ------------------------------------------------ gn applied however the model is built


def d2_lazyconfig_train_net_model(path, opts):
    """The model as detectron2's tools/lazyconfig_train_net.py builds it (main -> do_train)."""
    cfg = LazyConfig.load(path)
    cfg = LazyConfig.apply_overrides(cfg, opts)
    return instantiate(cfg.model)


# A project's config on detectron2's new_baselines (SyncBN there), GN by gn_det's nodes.
NEW_BASELINES_GN = """
from detectron2 import model_zoo
from gn_det.lazy import fast_gn, gn_model

_base = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, optimizer, train, lr_multiplier = _base.dataloader, _base.optimizer, _base.train, _base.lr_multiplier
gn = dict(num_groups=16, eps=1e-6, recompute_output=True)
model = gn_model(_base.model)
model.backbone.bottom_up.stem.norm = model.backbone.bottom_up.stages.norm = model.backbone.norm = {norm}
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = {norm}
"""


def project_config(tmp_path, norm="fast_gn()"):
    path = tmp_path / "project_config.py"
    path.write_text(NEW_BASELINES_GN.format(norm=norm))
    return str(path)


def test_lazyconfig_train_net_builds_new_baselines_with_gn_and_its_overrides(tmp_path):
    """detectron2's way of building, on its new_baselines Mask R-CNN: every GN with the config's
    gn and the command line's gn.* (16 groups -> 8, eps), ReLUs fused, output recomputation
    and channels_last on; the config saves as YAML (default_setup does) and builds the same."""
    model = d2_lazyconfig_train_net_model(project_config(tmp_path), ["gn.num_groups=8", "gn.channels_last=True"])
    layers = gn_layers(model)
    assert len(layers) == 69 and {(m.num_groups, m.eps) for m in layers} == {(8, 1e-6)}
    assert model.backbone.bottom_up.stem.conv1.norm.activation == "relu"  # fused
    assert gn_det.recompute_output_enabled(model)
    assert model.backbone.fpn_output2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(m.ignore_padding for m in layers)  # off unless gn.ignore_padding says so
    padded = d2_lazyconfig_train_net_model(project_config(tmp_path), ["gn.ignore_padding=True"])
    marked = {n for n, m in padded.named_modules() if isinstance(m, gn_det.GroupNorm) and m.ignore_padding}
    assert marked and all(n.startswith("backbone.") for n in marked)  # the dense maps', never the ROI heads'
    assert {n for n, m in padded.named_modules() if isinstance(m, gn_det.GroupNorm) and n.startswith("backbone.")} == marked
    cfg = LazyConfig.load(project_config(tmp_path))
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    saved = LazyConfig.apply_overrides(LazyConfig.load(str(tmp_path / "config.yaml")), ["gn.eps=1e-3"])
    assert {(m.num_groups, m.eps) for m in gn_layers(instantiate(saved.model))} == {(16, 1e-3)}


class Project:
    """A project's own object that takes the model (a node referring to cfg.model)."""

    def __init__(self, model):
        self.model = model


def test_common_mask_rcnn_in_a_projects_own_loop_and_nested_nodes():
    """detectron2's common/models Mask R-CNN edited in Python (not a file), built by
    instantiate(cfg.model) and as part of a larger node that refers to it."""
    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    cfg.gn = dict(channels_per_group=16, num_groups=0)
    cfg.model = gn_model(cfg.model)
    cfg.model.backbone.norm = cfg.model.roi_heads.mask_head.conv_norm = fast_gn()
    cfg.project = L(Project)(model="${model}")
    for model in (instantiate(cfg.model), instantiate(cfg.project).model):
        groups = {(m.num_channels, m.num_groups) for m in gn_layers(model)}
        assert groups == {(256, 16)} and len(gn_layers(model)) == 8 + 4  # FPN lateral + output, 4 mask convs


def test_gn_dict_errors_name_gn_keys_at_build_time(tmp_path):
    path = project_config(tmp_path)
    with pytest.raises(ConfigError, match=r"^gn.num_groups=7 does not divide the 64 channels .* \(in BasicStem\)"):
        d2_lazyconfig_train_net_model(path, ["gn.num_groups=7"])
    with pytest.raises(ConfigError, match=r"^gn.num_group is not a gn_det setting; did you mean gn.num_groups\?"):
        d2_lazyconfig_train_net_model(path, ["gn.num_group=8"])  # apply_overrides adds it silently
    with pytest.raises(ConfigError, match=r"^gn.eps=-1.0: eps must be > 0"):
        d2_lazyconfig_train_net_model(path, ["gn.eps=-1.0"])


def test_plain_norm_names_fail_loudly_where_they_cannot_see_gn(tmp_path):
    """norm="FastGN" strings with a gn dict: detectron2's instantiate cannot give them gn, so
    building raises saying what to write; build_lazy_model gives them gn; and a node taken
    out of its config (its "${gn}" unresolved) says so."""
    path = project_config(tmp_path, norm='"FastGN"')
    with pytest.raises(ConfigError, match=r"norm='FastGN' is built by detectron2's instantiate\(\) from a LazyConfig "
                                          r"with a `gn` dict.*norm=gn_det.lazy.fast_gn\(\)"):
        d2_lazyconfig_train_net_model(path, [])
    cfg = LazyConfig.apply_overrides(LazyConfig.load(path), ["gn.num_groups=8", "+train.device=cpu"])
    assert {(m.num_groups, m.eps) for m in gn_layers(build_lazy_model(cfg))} == {(8, 1e-6)}
    detached = OmegaConf.to_container(LazyConfig.load(project_config(tmp_path)).model.backbone.bottom_up.stem)
    with pytest.raises(ConfigError, match=r"gn='\$\{gn\}' was not resolved: this node was built apart"):
        instantiate(detached)


@pytest.mark.parametrize("path", LAZY_CONFIGS, ids=lambda p: os.path.basename(p))
def test_our_lazy_configs_build_with_gn_the_d2_way(path):
    overrides = ["gn.num_groups=16", "gn.eps=1e-4"]
    layers = gn_layers(d2_lazyconfig_train_net_model(path, overrides))
    assert len(layers) == 69 and {(m.num_groups, m.eps) for m in layers} == {(16, 1e-4)}


# Overrides that keep each config's architecture and make it CPU-sized on the embedded dataset.
SMALL = [
    "train.device=cpu", "train.max_iter=2", "train.init_checkpoint=", "train.log_period=1",
    "dataloader.train.dataset.names=gn_det_shapes_train", "dataloader.test.dataset.names=gn_det_shapes_val",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    "dataloader.test.mapper.augmentations.0.short_edge_length=128", "dataloader.test.mapper.augmentations.0.max_size=192",
    "model.roi_heads.num_classes=3", "model.proposal_generator.post_nms_topk=[64,64]",
    "model.roi_heads.batch_size_per_image=32",
    # an untrained model still gives detections, so COCOEvaluator has something to score; 5 per
    # image (R50's 256-channel mask head runs once per detection: 20 were most of the evaluation)
    "model.roi_heads.box_predictor.test_score_thresh=0.0", "+model.roi_heads.box_predictor.test_topk_per_image=5",
]
TRAIN_SIZE = {  # the first augmentation's size keys, per config
    "mask_rcnn_gn_R_50_FPN_3x.py": ["dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
                                    "dataloader.train.mapper.augmentations.0.max_size=192"],
    "mask_rcnn_gn_ws_R_50_FPN_2x.py": ["dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
                                       "dataloader.train.mapper.augmentations.0.max_size=192"],
    "mask_rcnn_gn_R_50_FPN_50ep_LSJ_1024.py": ["train.amp.enabled=False",  # AMPTrainer needs CUDA
                                               "dataloader.train.mapper.augmentations.0.target_height=128",
                                               "dataloader.train.mapper.augmentations.0.target_width=128",
                                               "dataloader.train.mapper.augmentations.1.crop_size=[128,128]"],
}


def small_overrides(path, output_dir):
    name = os.path.basename(path)
    assert name in TRAIN_SIZE, f"add {name}'s size overrides to TRAIN_SIZE"
    return SMALL + TRAIN_SIZE[name] + [f"train.output_dir={output_dir}"]


def losses(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [e["total_loss"] for e in map(json.loads, filter(str.strip, f)) if "total_loss" in e]


def test_train_net_trains_and_evaluates_a_lazy_config(tmp_path):
    """The R50 LazyConfig through tools/train_net.py, as users run it: 2 steps, then
    COCOEvaluator's box and mask AP on the embedded validation set."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", R50,
                           *small_overrides(R50, tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert len(losses(tmp_path)) == 2 and os.path.exists(tmp_path / "model_final.pth")
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    # --eval-only --resume evaluates the output folder's last checkpoint (here model_final.pth),
    # (not a last_checkpoint in the working directory): the same AP as at the end of training
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", R50, "--eval-only",
                           "--resume", *small_overrides(R50, tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    again = proc.stdout + proc.stderr
    assert f"Loading from {tmp_path / 'model_final.pth'}" in again, again[-3000:]
    copypaste = lambda text: re.findall(r"copypaste: ([\d.,\-nan]+)$", text, flags=re.M)  # noqa: E731
    assert len(copypaste(log)) == 2 and copypaste(again) == copypaste(log)  # box and mask AP


def test_train_net_names_a_mistyped_lazy_override(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config", R50,
                           "train.max_iters=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown config key train.max_iters" in proc.stderr and "did you mean train.max_iter?" in proc.stderr


# The GN+WS config is the R50 one with weight standardization and RGB input: its two steps are slow
# (tests/test_weight_std.py builds it and checks what it adds, in the default suite).
SLOW_TO_TRAIN = ("mask_rcnn_gn_ws_R_50_FPN_2x.py",)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_TO_TRAIN else p
                                  for p in LAZY_CONFIGS if p != R50], ids=lambda p: os.path.basename(p))
def test_every_other_lazy_config_trains_on_the_embedded_dataset(path, tmp_path):
    """In process, without the evaluation (the test above covers it): every config steps."""
    register_shapes_dataset()
    if "LSJ" in path:
        with pytest.raises(ConfigError, match=r"train.amp.enabled=True on train.device='cpu': .* needs CUDA"):
            lazy_train(load_lazy_config(path, ["train.device=cpu"]))
    cfg = load_lazy_config(path, small_overrides(path, tmp_path))
    del cfg.dataloader.evaluator
    assert lazy_train(cfg) == {}  # no evaluation ran
    steps = losses(tmp_path)
    assert len(steps) == 2 and all(loss == loss and loss < 1e4 for loss in steps)  # two finite steps
    assert os.path.exists(tmp_path / "model_final.pth")


def final_weights(output_dir):
    return torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_lazy_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path, workers, caplog):
    """lazy_train saves the data position and random state with each checkpoint (ExactResume,
    ResumableTrainLoader) and puts them back on resume: 2 steps uninterrupted, and the same run
    resumed from its checkpoint of iteration 0 (in a fresh output folder, after the random state
    has moved on), end with the same weights, bit for bit on CPU. A run stopped during its final
    save writes model_final.pth when resumed."""
    register_shapes_dataset()
    exact = ["train.max_iter=2", "train.checkpointer.period=1", f"dataloader.train.num_workers={workers}"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    cfg = load_lazy_config(R50, small_overrides(R50, whole) + exact)
    del cfg.dataloader.evaluator
    lazy_train(cfg)
    part.mkdir()
    (part / "model_0000000.pth").write_bytes((whole / "model_0000000.pth").read_bytes())
    (part / "last_checkpoint").write_text("model_0000000.pth")
    torch.manual_seed(12345)  # what a fresh process would not have: the resumed run must set its own
    cfg = load_lazy_config(R50, small_overrides(R50, part) + exact)
    del cfg.dataloader.evaluator
    lazy_train(cfg, resume=True)
    assert "Resume is not exact" not in caplog.text
    resumed, reference = final_weights(part), final_weights(whole)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "the resumed run's weights differ"
    # Stopped during its final save: last_checkpoint names iteration max_iter - 1, model_final.pth
    # is missing and its .tmp left. Resumed, the run writes model_final.pth and removes the .tmp.
    done = tmp_path / "done"
    done.mkdir()
    (done / "model_0000001.pth").write_bytes((whole / "model_0000001.pth").read_bytes())
    (done / "last_checkpoint").write_text("model_0000001.pth")
    (done / "model_final.pth.tmp").write_bytes(b"half a checkpoint")
    cfg = load_lazy_config(R50, small_overrides(R50, done) + exact)
    del cfg.dataloader.evaluator
    lazy_train(cfg, resume=True)
    assert not (done / "model_final.pth.tmp").exists()
    final = final_weights(done)
    assert all(torch.equal(final[k], reference[k]) for k in reference)
