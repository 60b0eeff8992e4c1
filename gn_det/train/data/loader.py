"""A training data loader that a checkpoint can put back exactly where it was.

detectron2's training loader is an endless stream: a sampler draws dataset indices from a
generator seeded once, data workers map them with whatever state their random generators
reached, and ``AspectRatioGroupedDataset`` keeps partly filled batches (one per aspect
ratio) between steps. None of that is in a checkpoint, so a resumed run sees other images,
other augmentations and other batches than the run it resumes.

``ResumableTrainLoader`` holds the same pieces, in a form that can be saved:

- **positions**: each rank's sampler stream (detectron2's own ``TrainingSampler`` /
  ``RepeatFactorTrainingSampler`` / ..., with its seed) is numbered 0, 1, 2, ...; an item is
  known by its position;
- **per-item random state**: an item is mapped (read, augmented) with Python's, NumPy's and
  torch's CPU generators seeded from ``(seed, rank, position)``, and the caller's generator
  states are put back afterwards. An item's result depends on nothing else: not on which
  worker maps it, nor on what was mapped before; and mapping in the main process
  (``NUM_WORKERS 0``) leaves the model's random state untouched;
- **batches in the making**: items are pulled in position order (worker ``w`` of ``n`` maps
  every ``n``-th one and the DataLoader reads workers in turn), and grouped by aspect ratio
  as detectron2 does. ``state_dict()`` is the next position to pull and the positions
  waiting in the groups. Resumed, the loader maps the waiting positions again (the same
  results: per-item random state), then pulls on from the next position.

The state is what the trainer has consumed, not what workers have prefetched: workers run
ahead, the grouping (in the main process) does not.

An item the mapper returns None for (an unreadable image, with ``DATALOADER.BAD_IMAGES skip``)
takes its position and is left out of every batch; an error the mapper raises as a
``UserError`` (an unreadable image with ``error``) is raised again in the main process with
its own message (not the DataLoader's wrapped worker traceback).
"""
from __future__ import annotations

import itertools
import logging
import operator
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...errors import UserError

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader", "resumable_train_loader"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def item_seed(seed: int, rank: int, position: int) -> int:
    """The seed an item's mapping runs with: a 32-bit hash of (seed, rank, position)."""
    return int(np.random.SeedSequence([seed % 2**63, rank, position]).generate_state(1)[0])


class _Failed:
    """What a worker sends instead of an item the mapper refused with a ``UserError``."""

    def __init__(self, error: UserError) -> None:
        self.type, self.message = type(error), str(error)


class _PositionedItems(IterableDataset):
    """This rank's items in position order, mapped, as ``(position, index, dict or None)``;
    worker ``w`` of ``n`` maps items ``w, w + n, ...`` of: the pending ``(position, index)``
    pairs, then the sampler's stream from position ``start`` on."""

    def __init__(self, dataset, sampler, mapper, rank: int) -> None:
        self.dataset, self.sampler, self.mapper, self.rank = dataset, sampler, mapper, rank
        self.seed = 0
        self.start = 0
        self.pending: List[Tuple[int, int]] = []

    def _numbered(self) -> Iterator[Tuple[int, int]]:
        yield from self.pending
        yield from enumerate(itertools.islice(iter(self.sampler), self.start, None), self.start)

    def _map(self, position: int, index: int) -> Any:
        saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        seed = item_seed(self.seed, self.rank, position)
        random.seed(seed)
        np.random.seed(seed)
        torch.random.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's is the model's
        try:
            return self.mapper(self.dataset[index])
        except UserError as exc:
            return _Failed(exc)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])

    def __iter__(self) -> Iterator[Tuple[int, int, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, index in itertools.islice(self._numbered(), worker, None, workers):
            yield position, int(index), self._map(position, int(index))


class ResumableTrainLoader:
    """Batches (lists of ``batch_size`` mapped dicts) from a ``_PositionedItems``, grouped by
    aspect ratio (width > height or not) when ``aspect_ratio_grouping``; with
    ``state_dict``/``load_state_dict`` (see the module docstring). Iterating starts the
    workers (not before: a state loaded first is where it starts)."""

    def __init__(self, items: _PositionedItems, batch_size: int, num_workers: int, aspect_ratio_grouping: bool,
                 seed: int, world_size: int) -> None:
        self.items, self.batch_size, self.num_workers = items, batch_size, num_workers
        self.aspect_ratio_grouping, self.world_size = aspect_ratio_grouping, world_size
        self.items.seed = seed
        self._next = 0  # the position after the last one pulled
        self._groups: List[List[Tuple[int, int, Any]]] = [[], []]

    @property
    def dataset_size(self) -> int:
        return len(self.items.dataset)

    def state_dict(self) -> Dict[str, Any]:
        pending = sorted((p, i) for group in self._groups for p, i, _ in group)
        return {"version": STATE_VERSION, "seed": self.items.seed, "next_position": self._next,
                "pending": [list(pair) for pair in pending], "batch_size": self.batch_size,
                "world_size": self.world_size, "dataset_size": self.dataset_size}

    def load_state_dict(self, state: Dict[str, Any]) -> Optional[str]:
        """Continue from ``state``. Returns why the continuation cannot be exact (a changed batch
        size, world size or dataset: then the stream goes on from the saved position, without
        the saved partial batches), or None when it is exact."""
        self.items.seed = int(state["seed"])
        if hasattr(self.items.sampler, "_seed"):  # detectron2's samplers: their stream's seed
            self.items.sampler._seed = int(state["seed"])
        self._next = self.items.start = int(state["next_position"])
        changed = [f"{key} {state.get(key)} -> {now}" for key, now in (
            ("batch_size", self.batch_size), ("world_size", self.world_size), ("dataset_size", self.dataset_size))
            if state.get(key) != now]
        if changed:
            self.items.pending = []
            return ", ".join(changed)
        self.items.pending = [(int(p), int(i)) for p, i in state["pending"]]
        return None

    def __len__(self) -> int:
        raise TypeError("a training loader is endless")

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        self._groups = [[], []]
        generator = torch.Generator()  # the DataLoader's base seed: not drawn from the model's generator
        generator.manual_seed(self.items.seed)
        loader = DataLoader(self.items, batch_size=1, num_workers=self.num_workers, collate_fn=operator.itemgetter(0),
                            generator=generator, pin_memory=False)
        for position, index, item in loader:
            self._next = max(self._next, position + 1)
            if isinstance(item, _Failed):
                raise item.type(item.message)
            if item is None:  # refused by the mapper (a bad image skipped): its position is used
                continue
            group = self._groups[int(item["width"] <= item["height"]) if self.aspect_ratio_grouping else 0]
            group.append((position, index, item))
            if len(group) == self.batch_size:
                batch = [entry[2] for entry in group]
                del group[:]
                yield batch


def build_resumable_train_loader(cfg, mapper) -> ResumableTrainLoader:
    """detectron2's training data (``DATASETS.TRAIN``, ``DATALOADER.*``, ``SOLVER.IMS_PER_BATCH``,
    the sampler ``DATALOADER.SAMPLER_TRAIN``) as a ``ResumableTrainLoader`` for this process.
    The stream's seed: ``cfg.SEED`` when >= 0, else one shared by all processes."""
    from detectron2.data.build import _train_loader_from_config

    parts = _train_loader_from_config(cfg, mapper=mapper)
    return resumable_train_loader(parts["dataset"], mapper=parts["mapper"], sampler=parts["sampler"],
                                  total_batch_size=parts["total_batch_size"],
                                  aspect_ratio_grouping=parts["aspect_ratio_grouping"],
                                  num_workers=parts["num_workers"], seed=cfg.SEED)


def resumable_train_loader(dataset, *, mapper, sampler=None, total_batch_size: int, aspect_ratio_grouping: bool = True,
                           num_workers: int = 0, seed: int = -1) -> ResumableTrainLoader:
    """``detectron2.data.build_detection_train_loader``'s arguments (a LazyConfig's
    ``dataloader.train``; no ``collate_fn``: batches are lists, as detectron2's default) as a
    ``ResumableTrainLoader`` for this process. ``dataset``: a list of dataset dicts or a
    map-style dataset; ``sampler``: None for detectron2's ``TrainingSampler``. The stream's
    seed: ``seed`` when >= 0, else one shared by all processes."""
    from detectron2.data.common import DatasetFromList
    from detectron2.data.samplers import TrainingSampler
    from detectron2.utils import comm

    world_size = comm.get_world_size()
    seed = seed if seed >= 0 else comm.shared_random_seed()
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    sampler = TrainingSampler(len(dataset)) if sampler is None else sampler
    if hasattr(sampler, "_seed"):
        sampler._seed = int(seed)
    items = _PositionedItems(dataset, sampler, mapper, comm.get_rank())
    return ResumableTrainLoader(items, total_batch_size // world_size, num_workers, aspect_ratio_grouping, int(seed),
                                world_size)
