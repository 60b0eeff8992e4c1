"""The LazyConfig training loop: ``lazy_train`` trains as detectron2's
``tools/lazyconfig_train_net.py`` does, with gn_det's model building (``gn_det.lazy``), safe
checkpoints, exact resume, held stop signals and the output folder's lock; ``lazy_test``
evaluates."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import OmegaConf
from torch import nn

from ..errors import ConfigError
from ..lazy import build_lazy_model
from .checkpoint import SafeCheckpointer, hold_output_dir
from .data.loader import ResumableTrainLoader, resumable_train_loader
from .engine import (AutotuneSync, ExactResume, _drop_logged_user_errors, keeping_random_state, not_after_a_failure,
                     save_final_if_nothing_left)
from .stopping import StopAtStepEnd

__all__ = ["lazy_test", "lazy_train"]

logger = logging.getLogger(__name__)


def lazy_test(cfg, model: nn.Module) -> Optional[Dict[str, Any]]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def _resumable_lazy_train_loader(cfg):
    """``cfg.dataloader.train``; when it is detectron2's ``build_detection_train_loader`` without a
    ``collate_fn`` (its configs' loader), the same arguments build a ``ResumableTrainLoader``,
    whose position a checkpoint holds (exact resume; the stream's seed ``train.seed``, when the
    config sets one >= 0). Any other loader is built as written."""
    from detectron2.data import build_detection_train_loader

    node = cfg.dataloader.train
    target = node.get("_target_")
    target = locate(target) if isinstance(target, str) else target
    if target is not build_detection_train_loader or node.get("collate_fn") is not None:
        return instantiate(node)
    args = OmegaConf.to_container(node, resolve=True)  # (resolved where it stands: its ${..} interpolations)
    args.pop("collate_fn", None)
    return instantiate({**args, "_target_": resumable_train_loader, "seed": int(cfg.train.get("seed", -1))})


def lazy_train(cfg, resume: bool = False) -> Dict[str, Any]:
    """Train as detectron2's lazyconfig_train_net does (hooks, periodic checkpoints and
    evaluation, metrics.json), with gn_det's model building, safe checkpoints, exact resume
    (each checkpoint holds the data position and random state, restored on resume, as in
    tools/train_net.py's Trainer; see ``_resumable_lazy_train_loader``), and DDP for CPU
    models too; it holds the output folder's lock (``hold_output_dir``) and evaluates nothing
    after a failed save. Returns the last evaluation's results ({} when none ran), as
    ``DefaultTrainer.train`` does."""
    with hold_output_dir(cfg.train.output_dir):  # (re-entrant: train_net holds it already)
        return _lazy_train(cfg, resume)


def _lazy_train(cfg, resume: bool) -> Dict[str, Any]:
    if cfg.train.amp.enabled and not str(cfg.train.get("device", "cuda")).startswith("cuda"):
        raise ConfigError(f"train.amp.enabled=True on train.device={cfg.train.device!r}: detectron2's AMPTrainer needs "
                          "CUDA; set train.amp.enabled=False")
    model = build_lazy_model(cfg)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = _resumable_lazy_train_loader(cfg)
    ddp = dict(cfg.train.get("ddp") or {})
    if next(model.parameters()).device.type != "cuda":
        ddp["device_ids"] = None  # detectron2 would pass the local rank, which DDP refuses for CPU modules
    model = create_ddp_model(model, **ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=trainer, weights_key="train.init_checkpoint")
    if comm.is_main_process():
        checkpointer.remove_stale_temporaries()  # a killed save's *.tmp
    train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
    if _drop_logged_user_errors not in train_loop_logger.filters:
        train_loop_logger.addFilter(_drop_logged_user_errors)  # a UserError (a failed save) is one line, no traceback
    last_results: Dict[str, Any] = {}

    def evaluate() -> Dict[str, Any]:
        last_results.clear()
        last_results.update(lazy_test(cfg, model) or {})
        return dict(last_results)

    # The data position and random state, for exact resume (as tools/train_net.py's Trainer):
    # gathered on every process before the checkpoint it goes into.
    exact_resume = (ExactResume(train_loader, cfg.train.checkpointer.period)
                    if isinstance(train_loader, ResumableTrainLoader) else None)
    trainer.register_hooks([
        StopAtStepEnd(),  # first: a SIGINT/SIGTERM during a step stops training when the step ends
        hooks.IterationTimer(),
        AutotuneSync(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        exact_resume,
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        # not moving training's random state, not after training failed
        hooks.EvalHook(cfg.train.eval_period, not_after_a_failure(keeping_random_state(evaluate))),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if start_iter:
        if exact_resume is not None:
            exact_resume.restore(trainer.iter)
        elif comm.is_main_process():
            logger.warning("Resume is not exact: dataloader.train is not detectron2's build_detection_train_loader "
                           "(without a collate_fn), whose data position a checkpoint can hold")
    save_final_if_nothing_left(checkpointer, start_iter, cfg.train.max_iter, "train.max_iter")
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results
