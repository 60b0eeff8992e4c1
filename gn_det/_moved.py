"""Old module paths that keep working after a move: ``import gn_det.engine`` gives the module
now at ``gn_det.train.engine`` (the same module object, not a copy), and ``python -m
gn_det.check`` runs ``gn_det.diagnostics.check``. ``MOVED`` is the one table; a finder on
``sys.meta_path`` (installed by ``import gn_det``) serves its names and nothing else."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Dict, Optional

__all__ = ["MOVED", "install_moved_finder"]

# old dotted name -> new dotted name (a package's entry covers its submodules)
MOVED: Dict[str, str] = {
    "gn_det.check": "gn_det.diagnostics.check",  # `python -m gn_det.check`: the documented command
    "gn_det.env": "gn_det.diagnostics.env",  # `python -m gn_det.env`: the documented command
    "gn_det.bench": "gn_det.diagnostics.bench",
    "gn_det.engine": "gn_det.train.engine",
    "gn_det.checkpoint": "gn_det.train.checkpoint",
    "gn_det.stopping": "gn_det.train.stopping",
    "gn_det.evaluation": "gn_det.train.evaluation",
    "gn_det.mmdet_weights": "gn_det.train.mmdet_weights",
    "gn_det.data": "gn_det.train.data",
    # gn_det.kernels split into the operations (gn_det.ops) and the policy that picks them (gn_det.policy)
    "gn_det.kernels": "gn_det.policy",
    "gn_det.kernels.group_norm_triton": "gn_det.ops.triton_launch",
    "gn_det.kernels.group_norm_torch": "gn_det.ops.torch_path",
    "gn_det.kernels.group_norm_op": "gn_det.ops.functional",
    "gn_det.kernels.autograd": "gn_det.ops.autograd",
    "gn_det.kernels.activation": "gn_det.ops.activation",
    "gn_det.kernels.layout": "gn_det.ops.layout",
    "gn_det.kernels.occupancy": "gn_det.ops.occupancy",
    "gn_det.kernels.dispatch": "gn_det.policy.paths",
}


def new_name(name: str) -> Optional[str]:
    """Where the module once called ``name`` lives now, or None when it did not move."""
    for old, new in sorted(MOVED.items(), key=lambda item: -len(item[0])):  # the longest old name first
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)  # the module itself: one object under both names

    def exec_module(self, module) -> None:
        pass  # (executed under its own name already)

    def get_code(self, fullname: str):  # what `python -m OLD` runs (runpy asks the loader for code)
        return importlib.util.find_spec(self.target).loader.get_code(self.target)


class _AliasSpec(importlib.machinery.ModuleSpec):
    """The old name's spec; its ``parent`` is the new module's package, which ``python -m OLD``
    gives the code it runs as ``__package__`` (its relative imports resolve there)."""

    def __init__(self, name: str, target: importlib.machinery.ModuleSpec) -> None:
        super().__init__(name, _AliasLoader(target.name), origin=target.origin,
                         is_package=target.submodule_search_locations is not None)
        self._target_parent = target.parent

    @property
    def parent(self) -> str:
        return self._target_parent


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        real = None if new is None else importlib.util.find_spec(new)
        return None if real is None else _AliasSpec(fullname, real)


def install_moved_finder() -> None:
    """Put the finder first on ``sys.meta_path``, once. First: the submodules of a moved
    package (``gn_det.data.checks``) would otherwise be found by the regular finder in the
    package's real folder and loaded a second time under the old name."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
