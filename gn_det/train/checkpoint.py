"""``SafeCheckpointer``: detectron2's DetectionCheckpointer that never runs code from a file it
reads, and never leaves a half-written checkpoint where ``--resume`` would pick it up.

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
- ``save`` writes ``<name>.pth.tmp``, flushes it to disk, then renames it over ``<name>.pth``
  (an atomic step); ``last_checkpoint`` is replaced the same way, after the checkpoint. A
  SIGINT/SIGTERM during a save (with ``gn_det.train.stopping.stop_on_signals()``) is held until both
  are written. A crash at any point leaves the previous checkpoint and the pointer to it
  intact; an exception (a second signal) during the write removes the ``.tmp``, and
  ``remove_stale_temporaries`` removes those a SIGKILL left (the Trainer calls it at start).
- A corrupt checkpoint named by ``last_checkpoint`` is reported with the newest readable
  checkpoint before it, and how to resume from that one.
"""
from __future__ import annotations

import glob
import io
import os
import pickle
import re
import zipfile
from typing import Any, Dict, List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from torch.nn.parallel import DistributedDataParallel

from ..errors import MissingFileError, UntrustedWeightsError, WeightsError
from .stopping import signals_held

__all__ = ["SafeCheckpointer", "check_weights_exist", "previous_checkpoints", "safe_load_pickle"]

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
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._parsed_url_during_load = None  # detectron2 resets it on success only: a later load would assert

    def _load_file(self, filename: str) -> Dict[str, Any]:
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
        """For a checkpoint named by last_checkpoint: how to resume from the newest readable one
        before it ("" for a file named otherwise)."""
        if self._source == self.weights_key or not self.save_dir:
            return ""
        pointer = os.path.join(self.save_dir, "last_checkpoint")
        previous = previous_checkpoints(self.save_dir, before=filename)
        if not previous:
            return f" No readable checkpoint precedes it in {self.save_dir}: delete {pointer} to start over."
        name = os.path.basename(previous[0])
        return (f" The previous checkpoint, {name}, is readable: resume from it with `echo {name} > {pointer}` "
                "and --resume again (the iterations since it are trained again).")

    def remove_stale_temporaries(self) -> List[str]:
        """Remove the ``*.tmp`` files a killed save left in the save folder (a SIGKILL during
        ``save``); returns their paths, each logged."""
        removed = []
        for path in glob.glob(os.path.join(glob.escape(self.save_dir or "."), "*.tmp")) if self.save_dir else []:
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
            _atomic_write(path, lambda f: torch.save(data, f))
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.save_to_disk:
            return
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))


_ITERATION = re.compile(r"_(\d+)\.pth$")


def previous_checkpoints(save_dir: str, before: str = "") -> List[str]:
    """The readable periodic checkpoints (``model_XXXXXXX.pth``: a complete zip) in
    ``save_dir``, newest first; with ``before``, only those of earlier iterations than it."""
    limit = _ITERATION.search(before) if before else None
    found = []
    for path in glob.glob(os.path.join(glob.escape(save_dir), "*.pth")):
        match = _ITERATION.search(path)
        if match and (limit is None or int(match.group(1)) < int(limit.group(1))) and zipfile.is_zipfile(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def _atomic_write(path: str, write) -> None:
    """Write to ``path + '.tmp'``, sync it to disk, then rename it over ``path``. An exception
    (KeyboardInterrupt included) during the write removes the ``.tmp``."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
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
