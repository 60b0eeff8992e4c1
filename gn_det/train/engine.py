"""Training and evaluation of YAML configs: detectron2's DefaultTrainer (which, after
``import gn_det``, builds models with the config's ``MODEL.GN`` settings); LazyConfig (.py)
configs are trained by ``gn_det.lazy``.

``Trainer`` is ``DefaultTrainer`` (hooks, periodic checkpoints, metrics.json, TensorBoard
events, ``--resume``) except that:
- data-parallel training works on CPU too: DDP gets no ``device_ids`` for a CPU model
  (DefaultTrainer always passes them, which DDP refuses for CPU modules);
- evaluation is COCOEvaluator (box and mask AP), run with a compiled COCOeval wherever one is
  installed (``gn_det.train.evaluation.FastCOCOEvaluator``: detectron2's C++ one, else faster-coco-eval's);
- the training mapper drops annotations that have no mask when masks are trained
  (``gn_det.train.data.mapper.MaskSafeDatasetMapper``) instead of crashing the mask loss;
- checkpoints are written atomically and read safely (``gn_det.train.checkpoint.SafeCheckpointer``);
  temporaries a killed save left are removed at start (a live writer's are kept); a save that
  fails (a full disk) stops the run with a one-line ``CheckpointWriteError``, and no evaluation
  runs after it (``not_after_a_failure``: nor after any other error that ends training);
- ``train`` holds the output folder's lock (``gn_det.train.checkpoint.hold_output_dir``): a
  second run into the same OUTPUT_DIR is refused;
- resume is exact (``ExactResume``): the training loader is ``gn_det.train.data.ResumableTrainLoader``
  and each checkpoint holds, per process, its data position and the Python, NumPy, torch CPU
  and CUDA random states (the AMP grad scaler is in detectron2's AMPTrainer state already);
  evaluation leaves the random state as it found it. A resumed run reaches the uninterrupted
  run's weights bit for bit on CPU; one that cannot (other batch size, world size or dataset,
  a checkpoint from an older gn_det) says so in one line and goes on;
- a resumed run with nothing left to train writes ``model_final.pth`` if it is missing (a kill
  during the final save), and says so;
- a diverged step (a NaN/Inf loss, or NaN/Inf boxes detectron2 catches earlier) stops the run
  with a one-line ``DivergenceError`` (a ``UserError`` and a ``FloatingPointError``) that names
  the iteration and the last recorded losses, without detectron2's logged traceback;
- in a distributed run, every process holds the same GN tuning decisions after each step
  (``AutotuneSync``);
- a SIGINT/SIGTERM during a step (with ``gn_det.train.stopping.stop_on_signals()``, as in
  tools/train_net.py) stops training when the step ends (``StopAtStepEnd``), on every process.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import weakref
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import SafeCheckpointer, hold_output_dir
from .data.loader import ResumableTrainLoader, build_resumable_train_loader
from .data.mapper import MaskSafeDatasetMapper
from ..errors import ConfigError, DivergenceError, UserError
from .evaluation import FastCOCOEvaluator
from ..policy.tuning import synchronize_decisions
from .stopping import StopAtStepEnd

__all__ = ["AutotuneSync", "ExactResume", "Trainer", "check_batch_split",
           "final_ap", "random_state", "set_random_state", "keeping_random_state", "not_after_a_failure",
           "save_final_if_nothing_left"]

logger = logging.getLogger(__name__)


def random_state() -> Dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA random states, in types
    ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": [version, list(internal), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
            has_gauss, cached], "torch": torch.random.get_rng_state(), "cuda": list(cuda)}


def set_random_state(state: Dict[str, Any]) -> None:
    """Put back what ``random_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keeping_random_state(func: Callable) -> Callable:
    """``func`` run so that the random state afterwards is the one before (evaluation inside a
    training run: its data loader draws a seed from torch's generator)."""
    def wrapped(*args, **kwargs):
        state = random_state()
        try:
            return func(*args, **kwargs)
        finally:
            set_random_state(state)
    return wrapped


def not_after_a_failure(func: Callable) -> Callable:
    """``func`` (an evaluation) that does nothing, returning ``{}``, while an exception that ends
    training propagates: detectron2 runs its hooks' ``after_train`` (the final evaluation among
    them) in a ``finally``, so a save that failed at the last iteration (a full disk) would
    otherwise be followed by an evaluation of the unsaved model."""
    def wrapped(*args, **kwargs):
        failure = sys.exc_info()[1]
        if failure is not None:
            logger.warning("Not evaluating: training ended with %s (reported below)", type(failure).__name__)
            return {}
        return func(*args, **kwargs)
    return wrapped


class ExactResume(HookBase):
    """What a checkpoint needs beyond model, optimizer, scheduler and iteration for a resumed
    run to continue as the uninterrupted one: each process's data position
    (``ResumableTrainLoader.state_dict``) and random state, gathered on the main process at
    the iterations a checkpoint is written (every process takes part: place it before the
    ``PeriodicCheckpointer``, which runs on the main process only). Saved as this hook's state
    in the trainer's checkpoint; ``restore`` puts it back after loading."""

    def __init__(self, loader: ResumableTrainLoader, period: int) -> None:
        self.loader, self.period = loader, period
        self._state: Dict[str, Any] = {}
        self._loaded: Optional[Dict[str, Any]] = None

    def after_step(self) -> None:
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it >= self.trainer.max_iter - 1:
            local = {"data": self.loader.state_dict(), "random": random_state()}
            gathered = comm.gather(local, dst=0)
            self._state = {"world_size": comm.get_world_size(), "ranks": gathered} if comm.is_main_process() else {}

    def state_dict(self) -> Dict[str, Any]:
        return self._state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._loaded = self._state = state

    def restore(self, iteration: int) -> None:
        """After a checkpoint of ``iteration`` is loaded: continue the data and the random
        state where it left them, or say in one line why that cannot be exact."""
        rank, state = comm.get_rank(), self._loaded
        reason, restored_random = None, False
        if not state:
            reason = "the checkpoint holds no data position or random state (written by an older gn_det)"
        elif rank >= len(state["ranks"]):
            reason = f"it was written by {state['world_size']} processes, and this is process {rank}"
        if reason is None:
            mine = state["ranks"][rank]
            set_random_state(mine["random"])
            restored_random = True
            changed = self.loader.load_state_dict(mine["data"])
            if changed or state["world_size"] != comm.get_world_size():
                reason = f"the data differs from the checkpoint's ({changed or 'world size changed'})"
        if reason is not None:
            position = (iteration + 1) * self.loader.batch_size
            self.loader.load_state_dict({**self.loader.state_dict(), "next_position": position, "pending": []})
            if comm.is_main_process():
                logger.warning("Resume is not exact: %s; continuing with the data stream at image %d of each process, "
                               "%s", reason, position,
                               "the checkpoint's random state" if restored_random else "fresh random state")


def _drop_logged_user_errors(record: logging.LogRecord) -> bool:
    """detectron2's training loop logs every exception with its traceback before raising it;
    a ``UserError`` is reported once, as one line, by whoever catches it."""
    return not (record.exc_info and isinstance(record.exc_info[1], UserError))


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


def save_final_if_nothing_left(checkpointer: SafeCheckpointer, start_iter: int, max_iter: int, max_iter_key: str) -> None:
    """A resumed run with nothing left to train (``start_iter >= max_iter``: it was stopped during
    its final save) writes ``model_final.pth`` if it is missing, and says so (main process)."""
    if start_iter < max_iter or not comm.is_main_process():
        return
    final = os.path.join(checkpointer.save_dir, "model_final.pth")
    if not os.path.exists(final):
        checkpointer.save("model_final", iteration=start_iter - 1)
        logger.warning("Nothing left to train (the checkpoint is of iteration %d, %s is %d): wrote %s, which the run "
                       "had not", start_iter - 1, max_iter_key, max_iter, final)
    else:
        logger.info("Nothing left to train: %s exists", final)


def check_batch_split(cfg: CfgNode, world: int) -> None:
    """The images of a step split evenly over the ``world`` processes: ``SOLVER.IMS_PER_BATCH``
    itself, or, where ``SOLVER.REFERENCE_WORLD_SIZE`` is set and differs from ``world``, the
    batch detectron2 rescales it to (``DefaultTrainer.auto_scale_workers``: the same images per
    process, on ``world`` processes)."""
    batch, reference = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE
    if batch < 1:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH={batch}: the images per step, over all processes, must be 1 or more")
    if reference and reference != world:
        if batch % reference:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH={batch} with SOLVER.REFERENCE_WORLD_SIZE={reference}: detectron2 "
                              f"keeps the images per process (IMS_PER_BATCH / REFERENCE_WORLD_SIZE) when it rescales "
                              f"the config to {world} process(es), so IMS_PER_BATCH must be a multiple of "
                              f"{reference} (e.g. {2 * reference}), or set REFERENCE_WORLD_SIZE 0 to keep the batch")
    elif batch % world:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH={batch}: the images per step, over all {world} process(es), must "
                          f"be a multiple of the number of processes (e.g. {2 * world})"
                          + ("" if reference else "; or set SOLVER.REFERENCE_WORLD_SIZE to the processes the config "
                             "was written for, and detectron2 rescales batch, learning rate and schedule"))


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
        if comm.is_main_process():
            self.checkpointer.remove_stale_temporaries()
        train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
        if _drop_logged_user_errors not in train_loop_logger.filters:
            train_loop_logger.addFilter(_drop_logged_user_errors)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        from detectron2.engine import hooks as d2_hooks

        hooks = super().build_hooks()
        for hook in hooks:
            if isinstance(hook, d2_hooks.EvalHook):
                # evaluation must not move training's random state, nor run after training failed
                hook._func = not_after_a_failure(keeping_random_state(hook._func))
        self.exact_resume = ExactResume(self.data_loader, self.cfg.SOLVER.CHECKPOINT_PERIOD)
        # Before the checkpoint it feeds, and at the same place among the hooks that talk to the
        # other processes on every process: its gather must not meet an evaluation's barrier. The
        # checkpointer and writers exist on the main process only, the evaluation on all.
        firsts = (d2_hooks.PeriodicCheckpointer, d2_hooks.EvalHook, d2_hooks.PeriodicWriter)
        at = next((i for i, h in enumerate(hooks) if isinstance(h, firsts)), len(hooks))
        hooks.insert(at, self.exact_resume)
        # StopAtStepEnd first (a signal stops the run after a step, before its checkpoint); AutotuneSync after the
        # IterationTimer, before the writers
        return [StopAtStepEnd()] + hooks[:1] + [AutotuneSync()] + hooks[1:]

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.exact_resume.restore(self.iter)

    def train(self):
        with hold_output_dir(self.cfg.OUTPUT_DIR):  # (re-entrant: train_net holds it already)
            save_final_if_nothing_left(self.checkpointer, self.start_iter, self.max_iter, "SOLVER.MAX_ITER")
            return super().train()

    def run_step(self) -> None:
        try:
            super().run_step()
        except FloatingPointError as exc:
            histories = self.storage.histories()
            losses = {k: round(h.latest(), 5) for k, h in histories.items() if "loss" in k and len(h.values())}
            cause = " ".join(str(exc).split())
            raise DivergenceError(
                f"training diverged at iteration {self.iter}: {cause}; last recorded losses: "
                f"{losses or 'none recorded yet'}; lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS, or check the inputs "
                "(MODEL.PIXEL_MEAN/PIXEL_STD, annotations)"
            ) from None

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> ResumableTrainLoader:
        return build_resumable_train_loader(cfg, MaskSafeDatasetMapper(cfg, is_train=True))

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
