"""How gn_det hooks into detectron2, so that ``MODEL.GN.*`` applies however a model is built
from a config: by detectron2's ``build_model``, ``DefaultTrainer`` and its subclasses, a
project's own trainer, meta-architecture, backbone or heads.

``install()`` (run by ``import gn_det``) re-binds, in every loaded module that holds them by
name (detectron2's, and a project's own modules imported before gn_det):

- ``get_norm`` -> ``gn_det.modeling.norm.get_norm`` (gn_det's norm names);
- detectron2's build functions (``build_model``, ``build_backbone``, the heads' builders,
  the list in ``BUILD_FUNCTIONS``) -> the same function run inside ``building_from(cfg)``.
  The outermost one then fuses ReLUs into GN (``MODEL.GN.FUSE_ACTIVATION``), and
  ``build_model`` puts the model in channels_last (``MODEL.CHANNELS_LAST``). A ``ConfigError``
  raised inside (a group count that does not divide a layer's channels, an unknown norm)
  gets the config's gn_det norm keys added;
- ``detectron2.config.config._get_args_from_config`` (what every ``@configurable``
  constructor called with a config runs): the config's scope is open while its
  ``from_config`` runs, and the gn_det norm names among the arguments it returns become
  factories bound to the config's settings, so ``FastRCNNConvFCHead(cfg, shape)`` built
  directly gets them too.

A module built without a config (Python, LazyConfig) uses ``gn_settings(...)``'s settings,
or ``GroupNorm.factory(...)`` as its ``norm=``; by default GNSettings()'s.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict

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
from .norm import NORM_REGISTRY, building_from, config_norm_names, get_norm, gn_settings, resolve_norm_name
from .weight_std import standardize_weights

__all__ = ["BUILD_FUNCTIONS", "build_model", "finish_model", "install"]

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
    (``recompute_output``) and, for a whole model, channels_last (``channels_last``).
    Returns the module."""
    if settings.fuse_activation:
        fuse_norm_activation(module)
    standardize_weights(module, settings.weight_standardization)  # after fusing: it matches Conv2d exactly
    if settings.recompute_output:
        set_recompute_output(module, True)
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
            if outermost:
                install()  # modules imported since the last build may hold detectron2's originals
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


_original = lambda fn: getattr(fn, "__wrapped__", fn)  # noqa: E731  (detectron2's function behind a wrapper)

# detectron2's function -> gn_det's replacement; made once, so install() is idempotent.
_REPLACEMENTS: Dict[Callable, Callable] = {_original(batch_norm.get_norm): get_norm}
get_norm.__wrapped__ = _original(batch_norm.get_norm)
for _name in BUILD_FUNCTIONS:
    _build = _original(getattr(detectron2.modeling, _name))
    _REPLACEMENTS[_build] = _under_config(_build)
_get_args = _original(d2_config._get_args_from_config)
_REPLACEMENTS[_get_args] = _args_from_config_under(_get_args)

build_model = _REPLACEMENTS[_original(detectron2.modeling.build_model)]
build_model.__doc__ = (
    "detectron2's ``build_model`` with ``cfg``'s ``MODEL.GN`` settings, ReLUs fused into GN, and the model in "
    "channels_last with ``MODEL.CHANNELS_LAST`` (what detectron2's own ``build_model`` does too after "
    "``import gn_det``).")


def install() -> int:
    """Re-bind detectron2's ``get_norm``, build functions and ``_get_args_from_config`` to
    gn_det's in every loaded module that holds them; idempotent. Returns how many module
    attributes it re-bound (0 when all were already)."""
    rebound = 0
    for module in list(sys.modules.values()):
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
                rebound += 1
    return rebound
