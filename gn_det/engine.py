"""Training and evaluation of YAML configs: detectron2's DefaultTrainer (which, after
``import gn_det``, builds models with the config's ``MODEL.GN`` settings); LazyConfig (.py)
configs are trained by ``gn_det.lazy``.

``Trainer`` is ``DefaultTrainer`` (hooks, periodic checkpoints, metrics.json, TensorBoard
events, ``--resume``) except that:
- data-parallel training works on CPU too: DDP gets no ``device_ids`` for a CPU model
  (DefaultTrainer always passes them, which DDP refuses for CPU modules);
- evaluation is COCOEvaluator (box and mask AP), run with a compiled COCOeval wherever one is
  installed (``gn_det.evaluation.FastCOCOEvaluator``: detectron2's C++ one, else faster-coco-eval's);
- the training mapper drops annotations that have no mask when masks are trained
  (``gn_det.data.mapper.MaskSafeDatasetMapper``) instead of crashing the mask loss;
- checkpoints are written atomically and read safely (``gn_det.checkpoint.SafeCheckpointer``).
- a diverged step (a NaN/Inf loss, or NaN/Inf boxes detectron2 catches earlier) stops the run
  with a ``FloatingPointError`` that names the iteration and the last recorded losses;
- in a distributed run, every process holds the same GN tuning decisions after each step
  (``AutotuneSync``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.data import build_detection_train_loader
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import SafeCheckpointer
from .data.mapper import MaskSafeDatasetMapper
from .evaluation import FastCOCOEvaluator
from .kernels.tuning import synchronize_decisions

__all__ = ["AutotuneSync", "Trainer", "final_ap"]


class AutotuneSync(HookBase):
    """After each step of a distributed run, every process adopts the same GN tuning
    decisions and kernel verifications (``gn_det.synchronize_decisions``: per bucket, the
    lowest rank's measurement; a verification that failed on any rank).
    The exchange happens where every rank arrives, between steps, never inside a forward, so
    ranks that met different shapes cannot deadlock; it travels over gloo (no CUDA sync).
    For a trainer of one's own: ``trainer.register_hooks([AutotuneSync()])``."""

    def after_step(self) -> None:
        if comm.get_world_size() > 1:
            synchronize_decisions()


class Trainer(DefaultTrainer):
    def __init__(self, cfg: CfgNode) -> None:  # DefaultTrainer.__init__'s steps, DDP made CPU-aware
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = next(model.parameters()).device.type == "cuda"
        model = create_ddp_model(
            model, broadcast_buffers=False, device_ids=[comm.get_local_rank()] if on_gpu else None
        )
        trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_class(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        hooks = super().build_hooks()
        return hooks[:1] + [AutotuneSync()] + hooks[1:]  # after the IterationTimer, before the writers

    def run_step(self) -> None:
        try:
            super().run_step()
        except FloatingPointError as exc:
            histories = self.storage.histories()
            losses = {k: round(h.latest(), 5) for k, h in histories.items() if "loss" in k and len(h.values())}
            raise FloatingPointError(
                f"training diverged at iteration {self.iter}: {exc}\n"
                f"last recorded losses: {losses or 'none recorded yet'}; lower SOLVER.BASE_LR, raise "
                "SOLVER.WARMUP_ITERS, or check the inputs (MODEL.PIXEL_MEAN/PIXEL_STD, annotations)"
            ) from exc

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=MaskSafeDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return FastCOCOEvaluator(dataset_name, output_dir=output_folder)


def final_ap(output_dir: str) -> dict:
    """The last evaluation's box and mask AP recorded in ``<output_dir>/metrics.json``
    ({"box_AP": .., "mask_AP": ..}; NaN where the run recorded none)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    found = {}
    for name, key in (("box_AP", "bbox/AP"), ("mask_AP", "segm/AP")):
        values = [e[key] for e in entries if key in e]
        found[name] = values[-1] if values else math.nan
    return found
