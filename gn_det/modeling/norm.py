"""gn_det's norm registry, hooked into detectron2's ``get_norm``.

detectron2 resolves norm names (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``,
``MODEL.ROI_BOX_HEAD.NORM``, ``MODEL.ROI_MASK_HEAD.NORM``, ``MODEL.SEM_SEG_HEAD.NORM``, and
the ``norm=`` arguments of LazyConfig configs) with ``detectron2.layers.get_norm``, whose
table of names is a literal inside the function. ``install()`` wraps it: a name registered
here builds from gn_det's registry, and any other name (or a callable) goes to detectron2's
own ``get_norm`` unchanged, so "BN", "FrozenBN", "SyncBN", "GN", ... keep their meaning.
The wrapper is re-bound in every loaded module that imported ``get_norm`` by name
(detectron2's, and a project's own modules imported before gn_det).

The GN layers' settings (group count, eps, ...) come from the innermost ``gn_settings``
scope, a context variable: a model built from a config under ``gn_settings(from_cfg(cfg))``
gets that config's settings, and nothing leaks to the next model built.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Callable, Dict, Iterator, List, Optional

from torch import nn

from ..config import GNSettings
from ..layers.group_norm import GroupNorm

__all__ = [
    "NORM_NAME", "NORM_REGISTRY", "GNSettings", "gn_settings", "current_gn_settings",
    "register_norm", "get_norm", "install",
]

NORM_NAME = "FastGN"
# Names detectron2's get_norm knows itself: they are not ours to redefine.
DETECTRON2_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")

NormFactory = Callable[[int], nn.Module]


_SETTINGS: contextvars.ContextVar[GNSettings] = contextvars.ContextVar("gn_det_gn_settings", default=GNSettings())


def current_gn_settings() -> GNSettings:
    return _SETTINGS.get()


@contextlib.contextmanager
def gn_settings(settings: GNSettings) -> Iterator[GNSettings]:
    """Within this scope, gn_det's norms build with ``settings``."""
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)


class NormRegistry:
    """Norm names -> factories ``channels -> nn.Module``."""

    def __init__(self) -> None:
        self._factories: Dict[str, NormFactory] = {}

    def register(self, name: str, factory: Optional[NormFactory] = None):
        """``register(name, factory)``, or ``@register(name)`` on a factory."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a norm name must be a non-empty string, got {name!r}")
        if name in DETECTRON2_NORMS:
            raise ValueError(f"norm name {name!r} is detectron2's own; choose another name")

        def add(fn: NormFactory) -> NormFactory:
            if not callable(fn):
                raise TypeError(f"the factory for norm {name!r} must be callable (channels -> nn.Module)")
            if name in self._factories and self._factories[name] is not fn:
                raise KeyError(f"norm name {name!r} is already registered")
            self._factories[name] = fn
            return fn

        return add if factory is None else add(factory)

    def unregister(self, name: str) -> None:
        """Remove a name registered with ``register`` (KeyError if it is not)."""
        del self._factories[name]

    def get(self, name: str) -> NormFactory:
        if name not in self._factories:
            raise KeyError(f"unknown norm {name!r}; registered: {', '.join(self.names())}")
        return self._factories[name]

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def names(self) -> List[str]:
        """gn_det's registered names and detectron2's own."""
        return sorted(self._factories) + list(DETECTRON2_NORMS)


NORM_REGISTRY = NormRegistry()
register_norm = NORM_REGISTRY.register


@register_norm(NORM_NAME)
def fast_group_norm(channels: int) -> GroupNorm:
    """gn_det's GroupNorm over ``channels``, with the current scope's settings."""
    s = current_gn_settings()
    return GroupNorm.from_channels(channels, num_groups=s.num_groups, channels_per_group=s.channels_per_group, eps=s.eps)


def _detectron2_get_norm():
    from detectron2.layers import batch_norm

    return getattr(batch_norm.get_norm, "__wrapped__", batch_norm.get_norm)


def get_norm(norm, out_channels: int) -> Optional[nn.Module]:
    """detectron2's ``get_norm`` extended with gn_det's registry (see the module docstring)."""
    if isinstance(norm, str):
        if norm == "GN" and current_gn_settings().replace_gn:
            norm = NORM_NAME
        if norm in NORM_REGISTRY:
            return NORM_REGISTRY.get(norm)(out_channels)
        if norm and norm not in DETECTRON2_NORMS:
            raise ValueError(f"unknown norm {norm!r}; registered norms: {', '.join(NORM_REGISTRY.names())}")
    return _detectron2_get_norm()(norm, out_channels)


def install() -> int:
    """Point every loaded module's ``get_norm`` at gn_det's; idempotent. Returns
    how many module attributes it re-bound (0 when all were already)."""
    import detectron2.modeling  # noqa: F401  (load the modules that import get_norm)

    original = _detectron2_get_norm()
    get_norm.__wrapped__ = original
    rebound = 0
    for module in list(sys.modules.values()):
        # Any module that imported get_norm by name: detectron2's, and a project's own heads
        # imported before gn_det. vars() avoids lazy modules' __getattr__.
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("get_norm") is original:
            module.get_norm = get_norm
            rebound += 1
    return rebound
