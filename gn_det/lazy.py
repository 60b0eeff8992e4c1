"""LazyConfig (Python) configs with gn_det: build, train and evaluate them.

A LazyConfig holds the same settings as YAML's ``MODEL.GN.*`` in a top-level ``gn`` dict
(the fields of ``GNSettings``: ``num_groups``, ``channels_per_group``, ``eps``,
``fuse_activation``, ``replace_gn``, ``recompute_output``, ``ignore_padding``, ``channels_last``). The config
itself carries them to the model, so they apply however it is built (detectron2's
``tools/lazyconfig_train_net.py``: ``instantiate(cfg.model)`` after ``LazyConfig.load`` and
``apply_overrides``; a project's own loop; ``build_lazy_model`` here):

- ``norm=fast_gn()``: a node ``L(lazy_norm)(gn="${gn}")``, a factory ``channels -> GN``
  with the settings of the config's ``gn`` (read when the model is built, so a command-line
  ``gn.num_groups=16`` counts; a wrong or unknown setting fails then, naming ``gn.<key>``);
- ``model = gn_model(model)``: the same model node (its keys, so ``model.*`` overrides, are
  unchanged) built by ``build_gn_model``, which finishes the model with ``gn``: fused ReLUs,
  output recomputation, channels_last.

A plain ``norm="FastGN"`` string cannot see ``gn`` when detectron2's ``instantiate`` builds
it: there, in a config with a ``gn`` dict, building it raises saying to use ``fast_gn()``
(``build_lazy_model`` applies ``gn`` to such strings too).

Why these are not one mechanism: every one of them ends in the same scope
(``gn_det.modeling.gn_settings(settings, lazy_key)``: ``_LazyNorm`` per norm,
``_build_with_gn`` for ``build_gn_model`` and ``build_lazy_model``), which is what gives a layer
its settings and an error its ``gn.<key>``; they differ in what the scope can cover.
detectron2's ``instantiate`` builds a node's arguments before calling its target, so the
``gn_model`` node's scope opens after the backbone and heads are built: nested norms get ``gn``
only from their own ``fast_gn()`` node (interpolating ``${gn}``, which keeps ``model.*``
override paths, as wrapping the children would not). Only a builder gn_det calls,
``build_lazy_model``, can open the scope before ``instantiate`` starts, which is how a plain
string gets ``gn`` there; a plain string under detectron2's own ``instantiate`` has no gn_det
code above it, so ``gn_det.modeling.norm._check_no_config_bypassed`` finds the config on the
stack and refuses (it cannot apply ``gn`` without patching ``instantiate``). Dropping any of the
three breaks a tested path (``tests/test_lazy_config.py``: d2's ``instantiate`` with nested
``fast_gn()`` nodes, ``build_lazy_model`` with plain strings, the refusal).

A layer that wants its own settings takes ``norm=L(gn_det.GroupNorm.factory)(num_groups=16)``.
The rest follows ``lazyconfig_train_net.py``'s conventions: ``model``, ``dataloader``
(``train``, ``test``, ``evaluator``), ``optimizer``, ``lr_multiplier`` and ``train``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence

import torch
from detectron2.config import LazyCall, LazyConfig, instantiate
from detectron2.utils.registry import _convert_target_to_string, locate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .config import GNSettings, SettingError, lazy_key
from .errors import ConfigError, MissingFileError, close_matches
from .modeling import NORM_NAME, finish_model, gn_settings
from .modeling.norm import NORM_REGISTRY, get_norm

__all__ = ["build_gn_model", "build_lazy_model", "fast_gn", "gn_model", "lazy_dataset_names", "lazy_gn_settings",
           "lazy_norm", "load_lazy_config", "settings_from_gn"]

logger = logging.getLogger(__name__)


_GN_FIELDS = [f.name for f in dataclasses.fields(GNSettings)]


def settings_from_gn(gn: Optional[Mapping]) -> GNSettings:
    """The ``GNSettings`` of a LazyConfig's ``gn`` dict (defaults where it has none); a
    ``ConfigError`` naming ``gn.<key>`` for an unknown key or a wrong value."""
    if isinstance(gn, str):  # "${gn}" that nothing resolved: the node left its config
        raise ConfigError(f"gn={gn!r} was not resolved: this node was built apart from the LazyConfig whose `gn` dict "
                          "it refers to; instantiate it as part of the loaded config (instantiate(cfg.model))")
    if gn is not None and not isinstance(gn, Mapping):
        raise ConfigError(f"gn={gn!r}: expected a dict of gn_det settings ({', '.join(_GN_FIELDS)})")
    given = dict(gn or {})
    unknown = sorted(set(given) - set(_GN_FIELDS))
    if unknown:
        hint = close_matches(f"gn.{unknown[0]}", [f"gn.{name}" for name in _GN_FIELDS])
        raise ConfigError(f"gn.{unknown[0]} is not a gn_det setting{hint}; "
                          f"the gn dict takes: {', '.join(_GN_FIELDS)}")
    try:
        return GNSettings(**given)
    except SettingError as exc:  # named in YAML's terms (MODEL.GN.<KEY>); here the key is gn.<key>
        raise exc.in_terms(lazy_key) from None


def lazy_gn_settings(cfg) -> GNSettings:
    """The ``GNSettings`` of a LazyConfig's ``gn`` dict (defaults where it has none)."""
    return settings_from_gn(cfg.get("gn"))


class _LazyNorm:
    """What a ``fast_gn()`` node builds: ``channels -> norm`` with fixed settings."""

    def __init__(self, name: str, settings: GNSettings) -> None:
        self.name, self.settings = name, settings

    def __call__(self, channels: int) -> nn.Module:
        with gn_settings(self.settings, lazy_key):
            return get_norm(self.name, channels)

    def __repr__(self) -> str:
        return f"{self.name}({self.settings})"


def lazy_norm(gn: Optional[Mapping], name: str = NORM_NAME) -> Callable[[int], nn.Module]:
    """The target of ``fast_gn()``'s nodes: a norm factory ``channels -> module`` building
    gn_det's norm ``name`` (or detectron2's "GN", which ``gn.replace_gn`` makes gn_det's)
    with ``gn``'s settings, checked now: a wrong or unknown one raises ``ConfigError``
    naming ``gn.<key>``."""
    settings = settings_from_gn(gn)
    if not isinstance(name, str) or (name != "GN" and name not in NORM_REGISTRY):
        raise ConfigError(f"lazy_norm(name={name!r}): not a gn_det norm; registered: "
                          f"{', '.join(NORM_REGISTRY.names())}")
    return _LazyNorm(name, settings)


def fast_gn(name: str = NORM_NAME) -> DictConfig:
    """For a LazyConfig's ``norm`` arguments: ``L(lazy_norm)(gn="${gn}", name=name)``, gn_det's
    GN with the settings of the config's top-level ``gn`` dict (which the config must have;
    ``gn = {}`` for the defaults)."""
    return LazyCall(lazy_norm)(gn="${gn}", name=name)


def build_gn_model(_gn_target_: Any, _gn_: Optional[Mapping], **kwargs) -> nn.Module:
    """The target of ``gn_model``'s node: ``_gn_target_(**kwargs)`` (the model's own target
    and arguments; gn_det's norm names among the arguments build with ``_gn_``), finished
    with ``_gn_``'s settings (fused ReLUs, output recomputation, channels_last)."""
    settings = settings_from_gn(_gn_)
    target = locate(_gn_target_) if isinstance(_gn_target_, str) else _gn_target_
    if not callable(target):
        raise ConfigError(f"model._gn_target_={_gn_target_!r} does not name a callable (the model class)")
    return _build_with_gn(settings, lambda: target(**kwargs))


def _build_with_gn(settings: GNSettings, build: Callable[[], nn.Module], finish: bool = True) -> nn.Module:
    """``build()`` with gn_det's norms built with ``settings`` (errors naming ``gn.<key>``),
    then finished by them (unless not ``finish``): what ``build_gn_model`` (a node's target) and
    ``build_lazy_model`` (a builder) both do, so the two differ only in what the scope covers."""
    with gn_settings(settings, lazy_key):
        model = build()
    return finish_model(model, settings) if finish else model


def gn_model(model: DictConfig) -> DictConfig:
    """For a LazyConfig: ``model = gn_model(model)`` makes the model node build with the
    config's ``gn`` settings applied to the whole model (``build_gn_model``). The node keeps
    its keys (``model.backbone...``: overrides keep their paths); its ``_target_`` moves to
    ``model._gn_target_``, and ``model._gn_`` is ``"${gn}"``. In place; returns the node."""
    if not isinstance(model, DictConfig) or "_target_" not in model:
        raise ConfigError("gn_model(model): expected a LazyCall node (L(GeneralizedRCNN)(...)), got "
                          f"{type(model).__name__}")
    if _builds_itself(model):
        return model
    target = model._target_
    model._gn_target_ = target if isinstance(target, str) else _convert_target_to_string(target)
    model._gn_ = "${gn}"
    model._target_ = build_gn_model
    return model


def _builds_itself(model) -> bool:
    target = model.get("_target_") if isinstance(model, Mapping) else None
    return target is build_gn_model or target == "gn_det.lazy.build_gn_model"


_MISSING = object()


def load_lazy_config(path: str, overrides: Sequence[str] = ()):
    """A LazyConfig file with ``key=value`` overrides (detectron2's syntax; ``+key=value``
    adds a key), its ``gn`` settings checked. An override of a key the config does not have
    is a ``ConfigError`` (OmegaConf would add it silently), naming close keys."""
    if not os.path.isfile(path):
        raise MissingFileError(f"config file not found: {path!r} (e.g. configs/lazy/mask_rcnn_gn_R_50_FPN_3x.py)")
    cfg = LazyConfig.load(path)
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if "=" not in override:
            raise ConfigError(f"override {override!r}: write key=value (e.g. train.max_iter=1000)")
        if not key.startswith(("+", "~")) and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"unknown config key {key} in {path}{close_matches(key, _keys(cfg))} "
                              "(+key=value adds a new key)")
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    lazy_gn_settings(cfg)
    return cfg


def _keys(node, prefix: str = "") -> Iterator[str]:
    for name in node.keys():
        value = OmegaConf.select(node, str(name), throw_on_resolution_failure=False)
        if OmegaConf.is_dict(value):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def lazy_dataset_names(cfg, eval_only: bool = False) -> List[str]:
    """The dataset names a LazyConfig's data loaders read (test, and train unless
    ``eval_only``)."""
    loaders = [cfg.dataloader.get("test")] + ([] if eval_only else [cfg.dataloader.get("train")])
    names: List[str] = []
    for loader in loaders:
        value = OmegaConf.select(loader, "dataset.names", default=None) if loader is not None else None
        names += [value] if isinstance(value, str) else list(value or [])
    return names


def build_lazy_model(cfg) -> nn.Module:
    """``instantiate(cfg.model)`` with the config's ``gn`` settings (plain ``"FastGN"`` norm
    names included), then finished by them (fused ReLUs, channels_last) unless its node
    does that itself (``gn_model``), on ``cfg.train.device``."""
    settings = lazy_gn_settings(cfg)
    device = cfg.train.get("device", "cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device!r}, but CUDA is not available here; set train.device=cpu")
    # (a gn_model node finishes the model itself)
    model = _build_with_gn(settings, lambda: instantiate(cfg.model), finish=not _builds_itself(cfg.model))
    return model.to(device)
