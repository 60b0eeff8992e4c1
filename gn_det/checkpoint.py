"""``SafeCheckpointer``: detectron2's DetectionCheckpointer that never runs code from a file it
reads, and never leaves a half-written checkpoint where ``--resume`` would pick it up.

- ``.pkl`` (Detectron / Caffe2 model-zoo weights, e.g. ``R-50-GN.pkl``) is read with an
  unpickler that admits only what such files hold: numpy arrays, dtypes and scalars, inside
  dicts, lists and tuples (which pickle builds without naming a class). Anything else (a
  function, a class) is refused with an ``UnpicklingError`` naming it.
- ``.pth``/``.pt`` checkpoints are read with ``torch.load(weights_only=True)``.
- ``save`` writes ``<name>.pth.tmp``, flushes it to disk, then renames it over ``<name>.pth``
  (an atomic step); ``last_checkpoint`` is replaced the same way, after the checkpoint. A
  crash at any point leaves the previous checkpoint and the pointer to it intact.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = ["SafeCheckpointer", "safe_load_pickle"]

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
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}': a weights .pkl file holds only numpy arrays, dicts and "
            "scalars, and this file names other code (it may run code when unpickled)"
        )


def safe_load_pickle(path: str) -> Any:
    """Unpickle a Detectron/Caffe2 weights file, admitting only numpy arrays, dicts and scalars."""
    with PathManager.open(path, "rb") as f:
        data = f.read()
    try:
        return _WeightsUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from None


class SafeCheckpointer(DetectionCheckpointer):
    def _load_file(self, filename: str) -> Dict[str, Any]:
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # .pth goes through _torch_load below
        data = safe_load_pickle(filename)
        if not isinstance(data, dict):
            raise ValueError(f"{filename}: expected a dict of weights, found {type(data).__name__}")
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
                raise pickle.UnpicklingError(
                    f"{filename}: not loaded: it holds objects beyond tensors and plain containers, and "
                    f"torch.load(weights_only=True) refuses to run them. ({str(exc).splitlines()[0]})"
                ) from None

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
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.save_to_disk:
            return
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))


def _atomic_write(path: str, write) -> None:
    """Write to ``path + '.tmp'``, sync it to disk, then rename it over ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
