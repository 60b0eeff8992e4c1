"""LazyConfig (Python) configs with gn_det: build, train and evaluate them.

A LazyConfig holds the same settings as YAML's ``MODEL.GN.*`` in a top-level ``gn`` dict
(the fields of ``GNSettings``: ``num_groups``, ``channels_per_group``, ``eps``,
``fuse_activation``, ``replace_gn``, ``channels_last``). Every ``norm="FastGN"`` in the
model builds with them; a layer that wants its own settings takes
``norm=L(gn_det.GroupNorm.factory)(num_groups=16)``. The rest follows detectron2's
``tools/lazyconfig_train_net.py`` conventions: ``model``, ``dataloader`` (``train``,
``test``, ``evaluator``), ``optimizer``, ``lr_multiplier`` and ``train``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import OmegaConf
from torch import nn

from .checkpoint import SafeCheckpointer
from .config import GNSettings
from .engine import AutotuneSync
from .errors import ConfigError, MissingFileError, close_matches
from .modeling import finish_model, gn_settings

__all__ = ["build_lazy_model", "lazy_dataset_names", "lazy_gn_settings", "lazy_test", "lazy_train", "load_lazy_config"]

logger = logging.getLogger(__name__)


def lazy_gn_settings(cfg) -> GNSettings:
    """The ``GNSettings`` of a LazyConfig's ``gn`` dict (defaults where it has none)."""
    given = dict(cfg.get("gn") or {})
    known = [f.name for f in dataclasses.fields(GNSettings)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"gn.{unknown[0]} is not a gn_det setting; the gn dict takes: {', '.join(known)}")
    try:
        return GNSettings(**given)
    except ConfigError as exc:  # its message names MODEL.GN.<KEY>; here the key is gn.<key>
        message = str(exc)
        for name in known:
            message = message.replace(GNSettings.key(name), f"gn.{name}")
        raise ConfigError(message) from None


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
    """``instantiate(cfg.model)`` with the config's ``gn`` settings, then finished by them
    (fused ReLUs, channels_last), on ``cfg.train.device``."""
    settings = lazy_gn_settings(cfg)
    device = cfg.train.get("device", "cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device!r}, but CUDA is not available here; set train.device=cpu")
    with gn_settings(settings):
        model = instantiate(cfg.model)
    return finish_model(model, settings).to(device)


def lazy_test(cfg, model: nn.Module) -> Optional[Dict[str, Any]]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def lazy_train(cfg, resume: bool = False) -> Dict[str, Any]:
    """Train as detectron2's lazyconfig_train_net does (hooks, periodic checkpoints and
    evaluation, metrics.json), with gn_det's model building, safe checkpoints, and DDP for
    CPU models too. Returns the last evaluation's results ({} when none ran), as
    ``DefaultTrainer.train`` does."""
    if cfg.train.amp.enabled and not str(cfg.train.get("device", "cuda")).startswith("cuda"):
        raise ConfigError(f"train.amp.enabled=True on train.device={cfg.train.device!r}: detectron2's AMPTrainer needs "
                          "CUDA; set train.amp.enabled=False")
    model = build_lazy_model(cfg)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    ddp = dict(cfg.train.get("ddp") or {})
    if next(model.parameters()).device.type != "cuda":
        ddp["device_ids"] = None  # detectron2 would pass the local rank, which DDP refuses for CPU modules
    model = create_ddp_model(model, **ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=trainer, weights_key="train.init_checkpoint")
    last_results: Dict[str, Any] = {}

    def evaluate() -> Dict[str, Any]:
        last_results.clear()
        last_results.update(lazy_test(cfg, model) or {})
        return dict(last_results)

    trainer.register_hooks([
        hooks.IterationTimer(),
        AutotuneSync(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, evaluate),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results
