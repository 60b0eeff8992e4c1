"""How gn_det hooks into detectron2, so that ``MODEL.GN.*`` applies however a model is built
from a config: by detectron2's ``build_model``, ``DefaultTrainer`` and its subclasses, a
project's own trainer, meta-architecture, backbone or heads.

What is patched, and why (the one list; ``tests/test_hooks.py`` checks that it names exactly
the functions ``install()`` replaces, and that each detectron2 function still has the
signature written here):

- ``detectron2.layers.batch_norm.get_norm(norm, out_channels)``
  -> ``gn_det.modeling.norm.get_norm``: detectron2's table of norm names is a literal inside
  the function, so "FastGN" (and "GN" with ``MODEL.GN.REPLACE_GN``) can only become a norm
  name wherever detectron2 takes one (``MODEL.*.NORM``, a project's keys, LazyConfig
  ``norm=``) by replacing the function. Other names and callables go to detectron2's.
- ``detectron2.config.config._get_args_from_config(from_config_func, *args, **kwargs)``
  -> runs inside ``building_from(cfg)``; the gn_det norm names among the arguments it
  returns become factories bound to the config's settings: a ``@configurable`` module built
  directly from a config (``FastRCNNConvFCHead(cfg, shape)``) gets them. Every
  ``@configurable`` constructor called with a config runs it, by this global name.
- ``detectron2.modeling.meta_arch.build.build_model(cfg)``
- ``detectron2.modeling.backbone.build.build_backbone(cfg, input_shape=None)``
- ``detectron2.modeling.proposal_generator.build.build_proposal_generator(cfg, input_shape)``
- ``detectron2.modeling.proposal_generator.rpn.build_rpn_head(cfg, input_shape)``
- ``detectron2.modeling.roi_heads.roi_heads.build_roi_heads(cfg, input_shape)``
- ``detectron2.modeling.roi_heads.box_head.build_box_head(cfg, input_shape)``
- ``detectron2.modeling.roi_heads.mask_head.build_mask_head(cfg, input_shape)``
- ``detectron2.modeling.roi_heads.keypoint_head.build_keypoint_head(cfg, input_shape)``
- ``detectron2.modeling.meta_arch.semantic_seg.build_sem_seg_head(cfg, input_shape)``
  -> the same function run inside ``building_from(cfg)`` (``BUILD_FUNCTIONS``): a
  project's registered backbone or head that is not ``@configurable`` (``__init__(cfg,
  ...)``, a builder function) calls ``get_norm`` with no config in reach, so the scope
  carries its settings. The outermost call finishes the module with what the settings ask
  of a built module (``finish_model``: ReLUs fused into GN with
  ``MODEL.GN.FUSE_ACTIVATION``, ...; for ``build_model``, channels_last with
  ``MODEL.CHANNELS_LAST``), and a ``ConfigError`` raised inside gets the config's gn_det
  norm keys added.

Where: ``install()``, run once by ``import gn_det``, re-binds every attribute, in every module
then loaded, whose value is one of these functions (with detectron2 0.7.2 and gn_det's own
imports: 51 attributes in 28 detectron2 modules, e.g. ``detectron2.modeling.build_model`` and
the ``get_norm`` that ``resnet.py`` imported), and any module of a project imported before
gn_det that holds one (``from detectron2.layers import get_norm``); ``rebound_attributes()``
lists them. A module imported later takes gn_det's functions from those re-bound modules, so
nothing is rescanned at build time (importing all 313 further detectron2 modules after
gn_det leaves ``install()`` nothing to re-bind). No class or method of detectron2 is patched
(``builders.py`` adds four names to detectron2's registries; ``fuse.py`` and, with
``MODEL.GN.IGNORE_PADDING``, ``padding.py`` change the class of built instances, not
detectron2's classes).

Per built model, with ``MODEL.GN.IGNORE_PADDING`` (``gn_det.modeling.padding.ignore_padding``,
which ``finish_model`` runs; instances only, never detectron2's classes or functions;
``tests/test_padding_detectron2.py`` checks the signatures relied on):

- the class of the model's RPN (``proposal_generator``) and of a RetinaNet model
  -> ``PaddingRPN`` / ``PaddingRetinaNet`` (for a project's subclass that overrides none of
  the methods involved, a gn_det subclass of it, pickled as its class): their
  ``label_and_sample_anchors(self, anchors, gt_instances)``, ``predict_proposals(self,
  anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)``, ``label_anchors(self,
  anchors, gt_instances)`` and ``inference_single_image(self, anchors, box_cls, box_delta,
  image_size)`` call detectron2's one image at a time with only the anchors whose centre lies
  inside the image, so anchors in an image's padding take no part in its matching, sampling
  (label -1), proposals or detections.
- the class of a ``GeneralizedRCNN`` model (PanopticFPN and a project's subclass included)
  -> ``PaddingGeneralizedRCNN`` (a gn_det subclass of its class, pickled as its class): its
  ``inference(self, batched_inputs, ...)`` calls the class's own with the images' sizes
  recorded, as the forward's pre-hook does, when test-time augmentation calls it without the
  forward.
- module hooks (no method replaced): forward pre-hook and ``always_call`` forward hook on the
  meta-architecture (the images' sizes from ``batched_inputs[i]["image"]``; the regions
  closed), forward pre-hook on ``model.backbone`` (``gn_det.image_regions`` opened over its
  input), forward hooks on ResNet's ``BasicStem`` and on ``LastLevelP6P7.p6``/``p7`` (0
  outside each image's region: a max pool and convolutions without a norm spread an image's
  edge one position into the padding), forward pre-hooks on the ``ROIPooler`` modules under
  ``roi_heads`` (each map's region edge repeated beyond it: ROIAlign clamps at a map's end but
  interpolates into a batch's padding), and on ``SemSegFPNHead``'s bilinear ``nn.Upsample``
  modules (edge repeated before, 0 after) and ``predictor`` (edge repeated after).

Rebound for a while, by the training application only (``import gn_det`` does not load it;
``tests/test_hooks.py`` checks that these are the only attributes of detectron2's modules that
change while it runs):

- ``detectron2.evaluation.coco_evaluation.COCOeval_opt``
  -> the compiled COCOeval that ``gn_det.train.evaluation.FastCOCOEvaluator`` found
  (detectron2's C++ one, else faster-coco-eval's), during each of its evaluations, restored
  after: detectron2's ``COCOEvaluator`` reads that module-level name when ``use_fast_impl``
  is set, and a detectron2 without compiled ops has none.

Checked against: detectron2 v0.6 (2021-11, upstream tag), PyPI's sal-detectron2 0.7.2 (the
installed one: an upstream snapshot of 2024) and upstream 02b5c4e (2026-06). The signatures
above are those of all three; the bodies of these functions are identical in 0.7.2 and
02b5c4e (v0.6's ``get_norm`` lacks "LN", a detectron2 name either way).

Not patched, so looked up on the stack: a project's plain builder called directly with a
config (``build_my_backbone(cfg, shape)`` outside every build function) reaches ``get_norm``
with no scope open and no config passed; gn_det's code is nowhere on that path, so nothing
can set a flag there. ``gn_det.modeling.norm._check_no_config_bypassed`` therefore looks up
the callers' frames for a local ``cfg`` (only then: a gn_det norm built outside every scope)
and refuses to build with the defaults when that config has other ``MODEL.GN`` settings,
naming the fix (``with gn_det.building_from(cfg):``). (The other stack lookup,
``norm._module_being_built``, only names the layer being built in an error.)

A module built without a config (Python, LazyConfig) uses ``gn_settings(...)``'s settings,
or ``GroupNorm.factory(...)`` as its ``norm=``; by default GNSettings()'s.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict, List

import detectron2.modeling
import torch
from detectron2.config import CfgNode
from detectron2.config import config as d2_config
from detectron2.layers import batch_norm
from torch import nn

from ..config import GNSettings
from ..errors import ConfigError
from ..recompute import set_recompute_output
from .fuse import fuse_norm_activation
from .padding import ignore_padding
from .norm import NORM_REGISTRY, building_from, config_norm_names, get_norm, gn_settings, resolve_norm_name
from .weight_std import standardize_weights

__all__ = ["BUILD_FUNCTIONS", "build_model", "finish_model", "install", "rebound_attributes"]

# detectron2.modeling's functions that build modules from a config (their first argument).
BUILD_FUNCTIONS = (
    "build_model", "build_backbone", "build_proposal_generator", "build_rpn_head", "build_roi_heads",
    "build_box_head", "build_mask_head", "build_keypoint_head", "build_sem_seg_head",
)


def _gn_norm_keys(cfg: CfgNode, settings: GNSettings) -> str:
    keys = [f"{key}={norm!r}" for key, norm in config_norm_names(cfg) if resolve_norm_name(norm, settings)]
    return ", ".join(keys) or "none"


def finish_model(module: nn.Module, settings: GNSettings, whole_model: bool = True) -> nn.Module:
    """What ``settings`` ask of a built module, in place: ReLUs fused into the GN layers before
    them (``fuse_activation``), weights standardized in the convolutions before its GN layers
    (``weight_standardization``, and wherever a norm asks for it), GN outputs recomputed in backward in its forwards
    (``recompute_output``) and, for a whole model, channels_last (``channels_last``) and GN over
    each image's own region (``ignore_padding``: ``gn_det.modeling.padding.ignore_padding``).
    Returns the module."""
    if settings.fuse_activation:
        fuse_norm_activation(module)
    standardize_weights(module, settings.weight_standardization)  # after fusing: it matches Conv2d exactly
    if settings.recompute_output:
        set_recompute_output(module, True)
    if settings.ignore_padding and whole_model:
        ignore_padding(module)  # (the meta-architecture's hooks: a whole model only)
    if whole_model and settings.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def _under_config(build: Callable) -> Callable:
    """``build(cfg, ...)`` inside ``building_from(cfg)``; the outermost call finishes the
    module (fused ReLUs; channels_last for a whole model)."""
    whole_model = build.__name__ == "build_model"

    @functools.wraps(build)
    def build_under_config(cfg, *args, **kwargs):
        if not isinstance(cfg, CfgNode):
            return build(cfg, *args, **kwargs)
        with building_from(cfg) as (settings, outermost):
            try:
                module = build(cfg, *args, **kwargs)
            except ConfigError as exc:
                if getattr(exc, "build_point", None):
                    raise
                error = ConfigError(f"{exc}\n(raised in {build.__name__}(cfg); the config's gn_det norms: "
                                    f"{_gn_norm_keys(cfg, settings)})")
                error.build_point = build.__name__
                raise error from None
        if outermost and isinstance(module, nn.Module):
            finish_model(module, settings, whole_model)
        return module

    return build_under_config


def _norm_under(name: str, settings: GNSettings, channels: int) -> nn.Module:
    with gn_settings(settings):
        return NORM_REGISTRY.get(name)(channels)


def _args_from_config_under(get_args: Callable) -> Callable:
    """detectron2's ``_get_args_from_config`` with the config's settings applied."""

    @functools.wraps(get_args)
    def get_args_under_config(from_config, *args, **kwargs):
        cfg = args[0] if args else kwargs.get("cfg")
        if not isinstance(cfg, CfgNode) or "MODEL" not in cfg:
            return get_args(from_config, *args, **kwargs)
        with building_from(cfg) as (settings, _):
            explicit = get_args(from_config, *args, **kwargs)
        for key, value in explicit.items():  # e.g. a head's conv_norm="FastGN"
            name = resolve_norm_name(value, settings) if isinstance(value, str) else None
            if name is not None:
                explicit[key] = functools.partial(_norm_under, name, settings)
        return explicit

    return get_args_under_config


def _original(fn: Callable) -> Callable:
    """detectron2's function behind gn_det's replacement (``__wrapped__``), or ``fn``."""
    return getattr(fn, "__wrapped__", fn)


def _replacements() -> Dict[Callable, Callable]:
    """detectron2's function -> gn_det's replacement (the module docstring's list), made once
    so that ``install()`` is idempotent."""
    replacements: Dict[Callable, Callable] = {_original(batch_norm.get_norm): get_norm}
    get_norm.__wrapped__ = _original(batch_norm.get_norm)
    for name in BUILD_FUNCTIONS:
        build = _original(getattr(detectron2.modeling, name))
        replacements[build] = _under_config(build)
    get_args = _original(d2_config._get_args_from_config)
    replacements[get_args] = _args_from_config_under(get_args)
    return replacements


_REPLACEMENTS = _replacements()
_REBOUND: List[str] = []  # "module.attribute" re-bound by install(), in order

build_model = _REPLACEMENTS[_original(detectron2.modeling.build_model)]
build_model.__doc__ = (
    "detectron2's ``build_model`` with ``cfg``'s ``MODEL.GN`` settings, ReLUs fused into GN, and the model in "
    "channels_last with ``MODEL.CHANNELS_LAST`` (what detectron2's own ``build_model`` does too after "
    "``import gn_det``).")


def install() -> int:
    """Re-bind detectron2's ``get_norm``, build functions and ``_get_args_from_config`` to
    gn_det's in every loaded module that holds them (the module docstring's list); run by
    ``import gn_det``; idempotent. Returns how many module attributes it re-bound (0 when all
    were already). Needed again only for a module that got one of detectron2's originals
    other than by import (a copy kept from before ``import gn_det``)."""
    rebound = 0
    for name, module in list(sys.modules.items()):
        # vars() avoids lazy modules' __getattr__; any attribute name (``import ... as``) counts.
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            try:
                replacement = _REPLACEMENTS.get(value)
            except TypeError:  # unhashable values
                continue
            if replacement is not None:
                namespace[attr] = replacement
                _REBOUND.append(f"{name}.{attr}")
                rebound += 1
    return rebound


def rebound_attributes() -> List[str]:
    """Every ``module.attribute`` that ``install()`` has re-bound to gn_det's function."""
    return list(_REBOUND)
