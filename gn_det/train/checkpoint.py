"""``SafeCheckpointer``: detectron2's DetectionCheckpointer that never runs code from a file it
reads, never loads a damaged file or one that is not a checkpoint, and never leaves a
half-written checkpoint where ``--resume`` would pick it up; ``OutputDirLock``: one run per
output folder.

- ``.pkl`` (Detectron / Caffe2 model-zoo weights, e.g. ``R-50-GN.pkl``) is read with an
  unpickler that admits only what such files hold: numpy arrays, dtypes and scalars, inside
  dicts, lists and tuples (which pickle builds without naming a class). Anything else (a
  function, a class) is refused with an ``UntrustedWeightsError`` (an ``UnpicklingError``)
  naming it.
- Every other file (``.pth``, ``.pt``, pycls' ``.pyth``, any extension) is read with
  ``torch.load(weights_only=True)``, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn off
  (it overrides only calls that leave ``weights_only`` unset, as detectron2's ``.pyth`` loader
  does); what it refuses is an ``UntrustedWeightsError`` too.
- A weights file that is missing (``MissingFileError``), refused, truncated or corrupt
  (``WeightsError``) is a ``UserError`` whose message names the file and what set it:
  ``MODEL.WEIGHTS``, or ``OUTPUT_DIR/last_checkpoint`` with ``--resume``.
  ``check_weights_exist`` checks the first cheaply, before worker processes start.
- Integrity (``checkpoint_problem``): torch's zip format stores a CRC-32 of every member; each
  member of a zip checkpoint is read and checked against it before ``torch.load`` (a damaged
  file is named as damaged, never loaded). Files without a checksum (torch's legacy non-zip
  format, Detectron ``.pkl`` weights, zip members whose stored CRC is 0) are loaded and then
  checked as every file is: the model's floating-point tensors must all be finite (a NaN/Inf
  weight is refused, naming the tensors).
- What it holds: a list, a tensor, a dict without tensors or arrays is refused, naming the
  file and what it holds; a checkpoint whose tensors match none of the model's parameters is
  refused; a partial match (ImageNet backbone weights) is reported per module; with
  ``require_all_parameters`` (``--eval-only``) any trainable parameter left unloaded is an error.
- ``save`` writes ``<name>.pth.<pid>.<random>.tmp`` (unique per writer), flushes it to disk,
  then renames it over ``<name>.pth`` (an atomic step); ``last_checkpoint`` is replaced the same
  way, after the checkpoint. A SIGINT/SIGTERM during a save (with
  ``gn_det.train.stopping.stop_on_signals()``) is held until both are written. A crash at any
  point leaves the previous checkpoint and the pointer to it intact; an exception during the
  write removes the temporary; a write error (disk full, quota, I/O error) is a
  ``CheckpointWriteError`` naming the file, the reason, the free space and the size needed.
  ``remove_stale_temporaries`` removes the temporaries of writers that are gone (a SIGKILL
  during a save), never a live writer's (the Trainer calls it at start).
- A damaged or unreadable checkpoint named by ``last_checkpoint`` is reported with the newest
  checkpoint before it that passes the integrity check, and how to resume from that one.
- ``OutputDirLock`` / ``hold_output_dir``: a run holds ``OUTPUT_DIR/gn_det_run.lock`` (created
  with ``O_EXCL``, which works on NFS, unlike ``flock``) for its whole life; see
  ``OutputDirLock``.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import socket
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from torch.nn.parallel import DistributedDataParallel

from ..errors import (CheckpointWriteError, MissingFileError, OutputDirInUseError, UntrustedWeightsError, UserError,
                      WeightsError)
from .stopping import signals_held

__all__ = ["HEARTBEAT_S", "LOCK_NAME", "STALE_AFTER_S", "OutputDirLock", "SafeCheckpointer", "atomic_write",
           "check_output_dir_free", "check_weights_exist", "checkpoint_problem", "hold_output_dir",
           "previous_checkpoints", "safe_load_pickle"]

logger = logging.getLogger(__name__)

# (module, name) pairs a Detectron weights pickle may name: numpy's array rebuild machinery.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"),
}


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UntrustedWeightsError(
            f"refusing to load '{module}.{name}': a weights .pkl file holds only numpy arrays, dicts and "
            "scalars, and this file names other code (it may run code when unpickled)"
        )


def safe_load_pickle(path: str, what: str = "") -> Any:
    """Unpickle a Detectron/Caffe2 weights file, admitting only numpy arrays, dicts and scalars.
    ``what`` names the file in messages (default: its path). Raises ``UntrustedWeightsError``
    for a file that names other code, ``WeightsError`` for one that is not a pickle."""
    what = what or path
    with PathManager.open(path, "rb") as f:
        data = f.read()
    try:
        return _WeightsUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UntrustedWeightsError as exc:
        raise UntrustedWeightsError(f"{what}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:  # what a malformed pickle stream raises
        raise WeightsError(f"{what}: not a readable .pkl weights file ({type(exc).__name__}: {exc}); "
                           "is it truncated or corrupt?") from None


def check_weights_exist(cfg, resume: bool = False) -> None:
    """Check that the weights file the run would load exists (``MODEL.WEIGHTS``, a
    LazyConfig's ``train.init_checkpoint``, or with ``resume`` the checkpoint named in the
    output folder's ``last_checkpoint`` when there is one), without reading it: cheap, for a
    check before worker processes start. Raises ``MissingFileError`` naming the file and what
    set it. URLs (``detectron2://...``) are left to the loader."""
    if isinstance(cfg, CfgNode):
        checkpointer = SafeCheckpointer(torch.nn.Module(), save_dir=cfg.OUTPUT_DIR)
        weights = cfg.MODEL.WEIGHTS
    else:  # a LazyConfig
        checkpointer = SafeCheckpointer(torch.nn.Module(), save_dir=cfg.train.output_dir,
                                        weights_key="train.init_checkpoint")
        weights = cfg.train.init_checkpoint
    checkpointer.check_exists(weights, resume=resume)


class SafeCheckpointer(DetectionCheckpointer):
    def __init__(self, *args: Any, weights_key: str = "MODEL.WEIGHTS", **kwargs: Any) -> None:
        """``weights_key``: the config key that names the weights, for messages
        (``train.init_checkpoint`` in a LazyConfig)."""
        super().__init__(*args, **kwargs)
        self.weights_key = weights_key
        self._source = ""  # what named the file being loaded, for messages (set by resume_or_load)
        self._loading = ""  # the file being loaded, for messages from _load_model
        # --eval-only: a checkpoint that leaves a trainable parameter at its initial value is an error
        self.require_all_parameters = False
        self.write_failed: Optional[BaseException] = None  # the error of a save that failed (no evaluation after it)

    def _source_of(self, resume: bool) -> str:
        """What names the file ``resume_or_load(path, resume=resume)`` loads."""
        if resume and self.has_checkpoint():
            return f"{os.path.join(self.save_dir, 'last_checkpoint')} (read for --resume)"
        return self.weights_key

    def _describe(self, path: str) -> str:
        """The file and what named it: ``MODEL.WEIGHTS='x.pth'``."""
        if self._source == self.weights_key:
            return f"{self.weights_key}={path!r}"
        return f"weights file {path!r}" + (f", named in {self._source}" if self._source else "")

    def _check_exists(self, path: str) -> None:
        if not path or "://" in path or os.path.isfile(path):
            return  # nothing to load, a URL for the loader to fetch, or there
        fix = (f"give the path of a .pth or .pkl weights file, or {self.weights_key} \"\" to start from random weights"
               if self._source == self.weights_key else "restore it, or delete last_checkpoint to start over")
        raise MissingFileError(f"{self._describe(path)}: no such file ({os.path.abspath(path)}); {fix}")

    def check_exists(self, path: str, *, resume: bool = False) -> None:
        """Raise ``MissingFileError`` if the file ``resume_or_load(path, resume=resume)`` would
        load is not there (reading nothing)."""
        self._source = self._source_of(resume)
        try:
            self._check_exists(self.get_checkpoint_file() if resume and self.has_checkpoint() else path)
        finally:
            self._source = ""

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        self._source = self._source_of(resume)
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._source = ""

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        # (For a DDP model, detectron2 lets workers without the file take the main worker's
        # weights: only the main worker must have it.)
        if not isinstance(self.model, DistributedDataParallel) or comm.is_main_process():
            self._check_exists(path)
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._parsed_url_during_load = None  # detectron2 resets it on success only: a later load would assert
            self._loading = ""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        data = self._read_file(filename)
        self._check_contents(filename, data)
        return data

    def _read_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pyth"):  # pycls; detectron2 reads these with a plain torch.load
            data = self._torch_load(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise WeightsError(f"{self._describe(filename)}: a .pyth file is read as a pycls checkpoint, which "
                                   "holds 'model_state'; this one does not")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # .pth and the rest go through _torch_load below
        data = safe_load_pickle(filename, what=self._describe(filename))
        if not isinstance(data, dict):
            raise WeightsError(f"{self._describe(filename)}: expected a dict of weights, found {type(data).__name__}")
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format
            return data
        data = data.get("blobs", data)  # Detectron detection models keep weights under "blobs"
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, filename: str) -> Dict[str, Any]:
        problem = checkpoint_problem(filename)
        if problem:
            raise WeightsError(f"{self._describe(filename)}: damaged: {problem}; it is not loaded (a bad disk, or an "
                               f"incomplete copy?){self._previous_hint(filename)}")
        loaded = self._torch_load_unchecked(filename)
        if not isinstance(loaded, Mapping):
            raise WeightsError(f"{self._describe(filename)}: holds {_what(loaded)}, not a checkpoint (a dict of named "
                               "tensors, or a dict with one under 'model', as torch.save(model.state_dict()) or "
                               "detectron2 write)")
        return loaded

    def _check_contents(self, filename: str, data: Dict[str, Any]) -> None:
        """The weights under ``data['model']`` are a dict of named tensors/arrays, all finite."""
        state = data.get("model")
        if not isinstance(state, Mapping):
            raise WeightsError(f"{self._describe(filename)}: its 'model' entry holds {_what(state)}, not a dict of "
                               "named tensors")
        arrays = {k: v for k, v in state.items() if isinstance(v, (torch.Tensor, np.ndarray))}
        if not arrays:
            raise WeightsError(f"{self._describe(filename)}: holds {_what(state)} with no tensors or arrays, not model "
                               "weights")
        others = [k for k in state if k not in arrays]
        if others:
            raise WeightsError(f"{self._describe(filename)}: {len(others)} of its {len(state)} weights are not tensors or "
                               f"arrays ({others[0]!r} holds {_what(state[others[0]])}); is it a checkpoint of another "
                               "library, with its weights in a nested dict?")
        bad = [k for k, v in arrays.items() if _floating(v) and not _all_finite(v)]
        if bad:
            raise WeightsError(f"{self._describe(filename)}: {len(bad)} of its {len(arrays)} tensors hold NaN or Inf "
                               f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): damaged, or saved from a "
                               f"diverged run; it is not loaded{self._previous_hint(filename)}")

    def _load_model(self, checkpoint: Dict[str, Any]):
        """detectron2's loading, then: no parameter matched is an error; a partial match is
        reported per module; with ``require_all_parameters``, a trainable parameter left
        unloaded is an error."""
        held = list(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        unloaded = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
        params = dict(self.model.named_parameters())
        if not params:
            return incompatible
        loaded = [k for k in params if k not in unloaded]
        what = self._describe(self._loading) if self._loading else "the checkpoint"
        if not loaded:
            shapes = f"; {len(incompatible.incorrect_shapes)} share a name but not a shape" \
                if incompatible.incorrect_shapes else ""
            raise WeightsError(f"{what}: matches none of the model's {len(params)} parameters: it holds {len(held)} "
                               f"tensors named e.g. {', '.join(map(repr, held[:3]))}, the model's are named e.g. "
                               f"{', '.join(map(repr, list(params)[:3]))}{shapes}; is it a checkpoint of another "
                               "architecture?")
        missing = [k for k in params if k in unloaded]
        if missing:
            per_module = _per_module(params, missing)
            logger.warning("%s: loaded %d of the model's %d parameters; per module (loaded/all): %s", what,
                           len(loaded), len(params), per_module)
            trainable = [k for k in missing if params[k].requires_grad]
            if self.require_all_parameters and trainable:
                raise WeightsError(
                    f"{what}: leaves {len(trainable)} of the model's {len(params)} trainable parameters at their "
                    f"initial (random) values ({_per_module(params, trainable, only_missing=True)}); evaluating "
                    "them is not evaluating a trained model. Give a checkpoint of the whole model, or "
                    "--allow-partial-weights to evaluate anyway")
        return incompatible

    def _torch_load_unchecked(self, filename: str) -> Any:
        with PathManager.open(filename, "rb") as f:
            try:
                return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
            except pickle.UnpicklingError as exc:
                # torch's message: a paragraph about weights_only, then what it refused.
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                detail = next((line for line in lines if "GLOBAL" in line), None)
                if detail is None:  # refused an opcode, not a class: not a checkpoint at all
                    reason = lines[-2] if len(lines) > 2 else str(exc)
                    raise WeightsError(f"{self._describe(filename)}: not a readable checkpoint ({reason}); is it a "
                                       f".pth written by torch.save, and complete?{self._previous_hint(filename)}") from None
                raise UntrustedWeightsError(
                    f"{self._describe(filename)}: not loaded: it holds objects beyond tensors and plain containers, "
                    f"and torch.load(weights_only=True) refuses to run them ({detail}). Load only checkpoints from "
                    "sources you trust; one saved by detectron2 or gn_det holds none."
                ) from None
            except (EOFError, KeyError, RuntimeError) as exc:
                # EOFError: an empty file; KeyError: a non-zip, non-pickle file; RuntimeError: a
                # truncated zip ("PytorchStreamReader failed ..."). Others are not the file's doing.
                if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
                    raise
                raise WeightsError(f"{self._describe(filename)}: not a readable checkpoint ({type(exc).__name__}: "
                                   f"{str(exc).split('. ')[0] if str(exc) else 'empty file'}); is it truncated or "
                                   f"corrupt?{self._previous_hint(filename)}") from None

    def _previous_hint(self, filename: str) -> str:
        """For a checkpoint named by last_checkpoint: how to resume from the newest one before it
        that passes the integrity check ("" for a file named otherwise)."""
        if self._source == self.weights_key or not self.save_dir:
            return ""
        pointer = os.path.join(self.save_dir, "last_checkpoint")
        failing: List[str] = []
        for path in _candidates(self.save_dir, before=filename):
            problem = checkpoint_problem(path, require_checksum=True)
            if problem:
                failing.append(os.path.basename(path))
                continue
            name = os.path.basename(path)
            also = f" ({', '.join(failing)} fail{'s' if len(failing) == 1 else ''} it too)" if failing else ""
            return (f" The newest checkpoint before it that passes the integrity check is {name}{also}: resume from it "
                    f"with `echo {name} > {pointer}` and --resume again (the iterations since it are trained again).")
        also = f" ({', '.join(failing)} fail{'s' if len(failing) == 1 else ''} the integrity check too)" if failing else ""
        return f" No checkpoint before it in {self.save_dir} passes the integrity check{also}: delete {pointer} to start over."

    def remove_stale_temporaries(self) -> List[str]:
        """Remove the temporaries (``*.tmp``) that writers which are gone left in the save
        folder (a SIGKILL during ``save``); a live writer's (``<name>.<pid>.<random>.tmp`` of a
        process running on this host) is kept. Returns the removed paths, each logged."""
        removed = []
        for path in glob.glob(os.path.join(glob.escape(self.save_dir or "."), "*.tmp")) if self.save_dir else []:
            writer = _temporary_writer(path)
            if writer is not None and _pid_alive(writer):
                continue  # a save under way in another process (a run sharing the folder would be refused its lock)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
            self.logger.warning("Removed %s, left by a save that was interrupted", path)
        return removed

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        with signals_held():  # a SIGINT/SIGTERM now stops training once the file and its pointer are written
            with self._write_errors(path, data):
                atomic_write(path, lambda f: torch.save(data, f))
            self.tag_last_checkpoint(basename)

    @contextlib.contextmanager
    def _write_errors(self, path: str, data: Any = None) -> Iterator[None]:
        """An OSError in the block (directly, or under the RuntimeError torch's zip writer raises
        for it) becomes a ``CheckpointWriteError`` naming ``path``, the reason, the free space
        and the size needed; ``write_failed`` remembers it."""
        try:
            yield
        except KeyboardInterrupt:
            raise
        except (OSError, RuntimeError) as exc:
            cause = _os_error_in(exc)
            if cause is None:
                raise
            self.write_failed = exc
            reason = cause.strerror or str(cause) or type(cause).__name__
            try:
                free = _size(shutil.disk_usage(os.path.dirname(path) or ".").free)
            except OSError:
                free = "unknown"
            needed = _size(_bytes_needed(data)) if data is not None else "a few bytes"
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason} ({free} free, {needed} needed); the "
                                       "previous checkpoint and last_checkpoint are kept") from None

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.save_to_disk:
            return
        path = os.path.join(self.save_dir, "last_checkpoint")
        with self._write_errors(path):
            atomic_write(path, lambda f: f.write(last_filename_basename.encode()))


# ----------------------------------------------------------------------------- helpers: contents, integrity, writes


def _what(obj: Any) -> str:
    """What ``obj`` is, for messages: ``a list of 3 items``, ``a tensor of shape (2, 3)``."""
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, np.ndarray):
        return f"a single array of shape {obj.shape}"
    if isinstance(obj, Mapping):
        keys = list(obj)
        return f"a dict of {len(keys)} entries" + (f" (keys {', '.join(map(repr, keys[:5]))}"
                                                   f"{' ...' if len(keys) > 5 else ''})" if keys else "")
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__} ({obj!r:.40})" if obj is not None else "nothing (None)"


def _floating(value: Any) -> bool:
    return value.is_floating_point() if isinstance(value, torch.Tensor) else np.issubdtype(value.dtype, np.floating)


def _all_finite(value: Any) -> bool:
    return bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else bool(np.isfinite(value).all())


def _per_module(params: Mapping[str, Any], missing: List[str], only_missing: bool = False) -> str:
    """``backbone.bottom_up 40/40, roi_heads.box_predictor 0/4``: loaded/all parameters per
    module (two levels of names)."""
    totals: Dict[str, List[int]] = OrderedDict()
    missing_set = set(missing)
    for name in params:
        module = ".".join(name.split(".")[:-1][:2]) or name
        counts = totals.setdefault(module, [0, 0])
        counts[0] += name not in missing_set
        counts[1] += 1
    return ", ".join(f"{m} {c[0]}/{c[1]}" for m, c in totals.items() if not only_missing or c[0] < c[1])


def checkpoint_problem(path: str, require_checksum: bool = False) -> Optional[str]:
    """What is wrong with the checkpoint file at ``path``, or None. A zip checkpoint (torch's
    format since 1.6) has every member read and checked against the CRC-32 its zip records hold
    (a member stored with CRC 0, as written without checksums, is not checked). A file that
    is not a zip has no checksum: None, unless ``require_checksum`` (then what it is)."""
    try:
        if not zipfile.is_zipfile(path):
            return "not a zip checkpoint, so nothing checks it" if require_checksum else None
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                try:
                    with archive.open(info) as member:
                        while member.read(1 << 22):
                            pass
                except zipfile.BadZipFile as exc:
                    if info.CRC == 0 and "CRC" in str(exc):
                        continue  # written without a checksum
                    return f"its member {info.filename} fails its CRC-32 check ({exc})"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        return f"its zip structure is broken ({type(exc).__name__}: {exc})"
    return None


_ITERATION = re.compile(r"_(\d+)\.pth$")


def _candidates(save_dir: str, before: str = "") -> List[str]:
    """The periodic checkpoints (``model_XXXXXXX.pth``) in ``save_dir``, newest first; with
    ``before``, only those of earlier iterations than it."""
    limit = _ITERATION.search(before) if before else None
    found = []
    for path in glob.glob(os.path.join(glob.escape(save_dir), "*.pth")):
        match = _ITERATION.search(path)
        if match and (limit is None or int(match.group(1)) < int(limit.group(1))):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def previous_checkpoints(save_dir: str, before: str = "") -> List[str]:
    """The periodic checkpoints (``model_XXXXXXX.pth``) in ``save_dir`` that pass the integrity
    check (``checkpoint_problem``: a zip whose every member matches its CRC-32), newest first;
    with ``before``, only those of earlier iterations than it."""
    return [path for path in _candidates(save_dir, before) if checkpoint_problem(path, require_checksum=True) is None]


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """``exc`` if an OSError, else the first OSError among its causes and contexts."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _bytes_needed(data: Any) -> int:
    """About what ``torch.save(data)`` writes: the bytes of the storages it holds, once each,
    plus 64 KiB for the zip records and the pickled structure."""
    storages: Dict[Any, int] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[(storage.device.type, storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(data)
    return sum(storages.values()) + (64 << 10)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_TEMPORARY = re.compile(r"\.(\d+)\.[0-9a-f]+\.tmp$")


def _temporary_path(path: str) -> str:
    """``<path>.<pid>.<random>.tmp``: unique per writer, and naming it."""
    return f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _temporary_writer(path: str) -> Optional[int]:
    """The pid in a temporary's name (None for an older gn_det's ``<path>.tmp``)."""
    match = _TEMPORARY.search(path)
    return int(match.group(1)) if match else None


def atomic_write(path: str, write) -> None:
    """Write to a temporary beside ``path`` (``_temporary_path``), sync it to disk, then rename
    it over ``path``. An exception (KeyboardInterrupt included) during the write removes the
    temporary."""
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if not isinstance(exc, KeyboardInterrupt) and isinstance(exc.__context__, KeyboardInterrupt):
            # torch's zip writer, interrupted (a second signal), fails in its __exit__: the
            # interruption is what happened
            raise exc.__context__ from None
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


# ----------------------------------------------------------------------------- one run per output folder


LOCK_NAME = "gn_det_run.lock"
HEARTBEAT_S = 30.0  # the holder touches its lock file this often (its heartbeat)
STALE_AFTER_S = 300.0  # a lock of another host whose heartbeat is older than this is taken over


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), to tell a
    reused pid from the holder; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: Optional[str] = None) -> bool:
    """A process ``pid`` runs on this host (and, with ``start``, it is the one that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, another user's
    except OverflowError:
        return False
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused
    return True


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class OutputDirLock:
    """One run per output folder: ``<directory>/gn_det_run.lock``, created with
    ``os.open(O_CREAT | O_EXCL)`` (atomic on local file systems and on NFS v3+, where ``flock``
    may not be), holding the holder's host, pid, process start, start time and command. Its
    heartbeat is the file's modification time, which a thread refreshes every ``HEARTBEAT_S``
    seconds through the descriptor kept open since creating it: it touches only the file this
    run created, never the path, so a lock that another run took meanwhile is never written over
    (a rewrite of the path would race with that run's own lock).

    A lock is stale, and taken over with a warning, when its holder is gone: on this host, its
    pid is not running (or is another process now); on another host, its heartbeat is older
    than ``STALE_AFTER_S`` (clocks assumed within a minute of each other). Taking over renames
    the stale file away first (one of two runs that race for it wins). Otherwise ``acquire``
    raises ``OutputDirInUseError`` naming the folder and the holder. To take over a lock by
    hand (a holder on another host that you know is gone, before its heartbeat goes stale):
    delete the lock file."""

    def __init__(self, directory: str, purpose: str = "training") -> None:
        self.directory, self.purpose = directory, purpose
        self.path = os.path.join(directory, LOCK_NAME)
        self.token = secrets.token_hex(8)
        self._record: Dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._fd: Optional[int] = None  # the lock file this run created, open while held

    # reading and judging a lock

    def read(self) -> Optional[Dict[str, Any]]:
        """The lock's record; ``{}`` for a file that is not one yet (being written) or not at all;
        None when there is no lock."""
        for _ in range(20):  # a holder between creating the file and writing it: wait for its record
            try:
                with open(self.path) as f:
                    text = f.read()
            except FileNotFoundError:
                return None
            try:
                record = json.loads(text)
                if isinstance(record, dict) and "pid" in record:
                    return record
            except ValueError:
                pass
            time.sleep(0.05)
        return {}

    def stale_reason(self, record: Optional[Dict[str, Any]]) -> Optional[str]:
        """Why the lock ``record`` is stale (its holder is gone), or None if it is held."""
        if record is None:
            return "no lock"
        if not record:
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                return "no lock"
            return f"an unreadable lock file, {age:.0f} s old" if age > STALE_AFTER_S else None
        if record.get("host") == socket.gethostname():
            if not _pid_alive(int(record.get("pid", -1)), record.get("pid_start")):
                return f"pid {record.get('pid')} is not running on this host"
            return None
        age = time.time() - self.heartbeat(record)
        if age > STALE_AFTER_S:
            return f"its last heartbeat is {age:.0f} s old (over {STALE_AFTER_S:.0f} s)"
        return None

    def heartbeat(self, record: Dict[str, Any]) -> float:
        """When the holder of ``record`` last showed it is alive: the lock file's modification time
        (refreshed by the holder), or the record's own time if later (a lock not yet touched)."""
        try:
            touched = os.stat(self.path).st_mtime
        except FileNotFoundError:
            touched = 0.0
        return max(float(record.get("heartbeat", 0)), touched)

    def describe(self, record: Optional[Dict[str, Any]]) -> str:
        if not record:
            return f"an unreadable lock file {self.path}"
        age = time.time() - self.heartbeat(record)
        return (f"pid {record.get('pid')} on host {record.get('host')} ({record.get('purpose', 'a run')}, started "
                f"{_when(float(record.get('started', 0)))}, last heartbeat {age:.0f} s ago; command: "
                f"{record.get('command', '?')})")

    def refusal(self, record: Optional[Dict[str, Any]]) -> OutputDirInUseError:
        return OutputDirInUseError(
            f"OUTPUT_DIR {self.directory} is in use by another run: {self.describe(record)}. Two runs in one folder "
            f"overwrite each other's checkpoints and metrics: wait for it to end, or give this run another OUTPUT_DIR. "
            f"If that run is gone (its node lost), delete {self.path} (a lock of another host is taken over "
            f"automatically once its heartbeat is {STALE_AFTER_S:.0f} s old)")

    # holding one

    def acquire(self) -> "OutputDirLock":
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                        "started": now, "heartbeat": now, "purpose": self.purpose, "token": self.token,
                        "command": " ".join(sys.argv)[:400]}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                record = self.read()
                reason = self.stale_reason(record)
                if reason is None:
                    raise self.refusal(record) from None
                if reason != "no lock" and self._take_over(record):
                    logger.warning("Took over the lock of %s: %s (%s)", self.directory, self.describe(record), reason)
                continue
            os.write(fd, json.dumps(self._record).encode())
            os.fsync(fd)
            self._fd = fd
            self._thread = threading.Thread(target=self._beat, name="gn_det-output-lock", daemon=True)
            self._thread.start()
            return self
        raise self.refusal(self.read())

    def _take_over(self, record: Optional[Dict[str, Any]]) -> bool:
        """Move the stale lock ``record`` away; False if what was moved turned out to be another
        run's new lock (put back)."""
        moved = f"{self.path}.stale.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return True
        try:
            with open(moved) as f:
                text = f.read()
            try:
                same = not record or json.loads(text).get("token") == record.get("token")
            except ValueError:
                same = not record
            if not same:
                with contextlib.suppress(FileExistsError):
                    os.link(moved, self.path)  # another run's fresh lock: back where it was, never over a third
            return same
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(moved)

    def _ours(self) -> bool:
        """The path still names the file this run created, with this run's record."""
        current = self.read()
        if not current or current.get("token") != self.token or self._fd is None:
            return False
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._ours():
                logger.error("The lock of %s is no longer this run's (%s): another run may write there",
                             self.directory, self.describe(self.read()))
                return
            try:
                os.utime(self._fd)  # this run's own file: if the path was taken meanwhile, not the new lock
            except OSError as exc:
                logger.warning("Could not refresh the lock %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            if self._ours():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_output_dir_free(directory: str) -> None:
    """``OutputDirInUseError`` if a live run holds ``directory``'s lock (reading only: for a
    check before worker processes start; the run takes the lock in ``hold_output_dir``)."""
    lock = OutputDirLock(directory)
    record = lock.read()
    if record is not None and lock.stale_reason(record) is None:
        raise lock.refusal(record)


_HELD: Dict[str, int] = {}  # realpath -> how many hold_output_dir blocks of this process hold it


@contextlib.contextmanager
def hold_output_dir(directory: str, purpose: str = "training") -> Iterator[None]:
    """Hold ``directory``'s ``OutputDirLock`` for the block. In a distributed run every process
    enters it: process 0 takes the lock and its outcome reaches every process (one all-gather),
    so a refusal raises ``OutputDirInUseError`` on all of them and none waits for the others.
    Re-entrant within a process (train_net holds it around a Trainer that holds it too)."""
    key = os.path.realpath(directory)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock, failure = None, None
    if comm.is_main_process():
        try:
            os.makedirs(directory, exist_ok=True)
            lock = OutputDirLock(directory, purpose).acquire()
        except Exception as exc:  # reaches the other processes, then raised here
            failure = exc
    if comm.get_world_size() > 1:
        message = None if failure is None else (str(failure), isinstance(failure, UserError))
        message = comm.all_gather(message)[0]
        if message is not None and failure is None:
            text, is_user = message
            if is_user:
                raise OutputDirInUseError(text)
            raise RuntimeError(f"process 0 could not lock OUTPUT_DIR {directory}: {text}")
    if failure is not None:
        raise failure
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        if lock is not None:
            lock.release()
