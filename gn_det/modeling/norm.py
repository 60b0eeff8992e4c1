"""gn_det's norm registry, detectron2's ``get_norm`` extended with it, and the config scope
that gives gn_det's norms a config's ``MODEL.GN`` settings.

detectron2 resolves norm names (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, the heads'
``NORM`` keys, a project's own keys, and the ``norm=`` arguments of LazyConfig configs) with
``detectron2.layers.get_norm``, whose table of names is a literal inside the function.
``get_norm`` here builds a name registered in ``NORM_REGISTRY`` from gn_det's registry and
hands any other name (or a callable) to detectron2's unchanged, so "BN", "FrozenBN",
"SyncBN", "GN", ... keep their meaning. ``gn_det.modeling.hooks`` puts it in place.

gn_det registers ``"FastGN"`` (``NORM_NAME``: its GN with the scope's settings) and
``"FastGNWS"`` (``WS_NORM_NAME``: the same GN, asking the detectron2 ``Conv2d`` it is the norm
of to standardize its weight; ``gn_det.modeling.weight_std``).

Settings travel in one context variable: ``building_from(cfg)`` (entered by every detectron2
build function, see ``hooks``) holds the config's ``GNSettings``, checked once per model;
``gn_settings(settings)`` does the same for Python code without a config. Outside both,
gn_det's norms use ``GNSettings()``'s defaults, except where that would silently ignore a
config up the stack (a YAML ``cfg`` with other ``MODEL.GN`` settings, a LazyConfig with a
``gn`` dict built by detectron2's ``instantiate``: ``gn_det.lazy.fast_gn`` is the way there),
which raises.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from detectron2.config import CfgNode
from detectron2.config.instantiate import instantiate as _d2_instantiate
from omegaconf import DictConfig
from torch import nn

from ..config import GNSettings, SettingError, Terms, yaml_key
from ..errors import ConfigError
from ..layers.group_norm import GroupNorm
from ..layers.weight_std import request_weight_standardization

__all__ = [
    "NORM_NAME", "NORM_REGISTRY", "WS_NORM_NAME", "building_from", "current_gn_settings", "get_norm", "gn_settings",
    "register_norm", "validate_gn_config",
]

NORM_NAME = "FastGN"
# gn_det's GN whose convolution standardizes its weight (one layer's way to Weight Standardization)
WS_NORM_NAME = "FastGNWS"
# Names detectron2's get_norm knows itself: they are not ours to redefine.
DETECTRON2_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")

NormFactory = Callable[[int], nn.Module]
_D2_INSTANTIATE_CODE = _d2_instantiate.__code__  # frames of detectron2's LazyConfig instantiate()


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
            raise ConfigError(f"unknown norm {name!r}; registered norms: {', '.join(self.names())}")
        return self._factories[name]

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def names(self) -> List[str]:
        """gn_det's registered names and detectron2's own."""
        return sorted(self._factories) + list(DETECTRON2_NORMS)


NORM_REGISTRY = NormRegistry()
register_norm = NORM_REGISTRY.register

# (the config being built or None, its settings, how errors name them: the input's terms)
_Scope = Tuple[Optional[CfgNode], GNSettings, Terms]
_NO_SCOPE: _Scope = (None, GNSettings(), yaml_key)
_SCOPE: contextvars.ContextVar[_Scope] = contextvars.ContextVar("gn_det_settings", default=_NO_SCOPE)


def current_gn_settings() -> GNSettings:
    """The settings gn_det's norms build with here (the innermost scope's, else defaults)."""
    return _SCOPE.get()[1]


@contextlib.contextmanager
def gn_settings(settings: GNSettings, terms: Terms = yaml_key) -> Iterator[GNSettings]:
    """Within this scope, gn_det's norms build with ``settings`` (for code without a config);
    a layer's broken rule names the setting by ``terms`` (YAML's keys unless given:
    ``gn_det.config.lazy_key`` for a LazyConfig's ``gn``)."""
    token = _SCOPE.set((None, settings, terms))
    try:
        yield settings
    finally:
        _SCOPE.reset(token)


def config_norm_names(cfg: CfgNode) -> Iterator[Tuple[str, str]]:
    """``(key, name)`` of every non-empty ``MODEL.<SECTION>.NORM`` name in a config, a
    project's own sections included."""
    for section, node in cfg.get("MODEL", {}).items():
        norm = node.get("NORM") if isinstance(node, CfgNode) else None
        if isinstance(norm, str) and norm:
            yield f"MODEL.{section}.NORM", norm


def validate_gn_config(cfg: CfgNode) -> GNSettings:
    """Check a config's gn_det settings and norm names; return its ``GNSettings``. Raises
    ``ConfigError`` naming the key, the value and the fix. Every ``MODEL.<SECTION>.NORM``
    is checked, a project's own sections included."""
    settings = GNSettings.from_cfg(cfg)
    for key, norm in config_norm_names(cfg):
        if norm not in NORM_REGISTRY and norm not in DETECTRON2_NORMS:
            raise ConfigError(f"{key}={norm!r} is not a registered norm; registered: {', '.join(NORM_REGISTRY.names())}")
    return settings


@contextlib.contextmanager
def building_from(cfg: CfgNode) -> Iterator[Tuple[GNSettings, bool]]:
    """Scope in which gn_det's norms build with ``cfg``'s settings. Yields ``(settings,
    outermost)``: the config is checked when its outermost scope opens; a scope nested in
    one for the same config reuses it (one check per model, however many builders)."""
    scope_cfg, settings, _ = _SCOPE.get()
    if scope_cfg is cfg:
        yield settings, False
        return
    settings = validate_gn_config(cfg)
    token = _SCOPE.set((cfg, settings, yaml_key))
    try:
        yield settings, True
    finally:
        _SCOPE.reset(token)


def _lazy_config_gn(frame) -> Optional[DictConfig]:
    """The top-level ``gn`` dict of the LazyConfig that detectron2's ``instantiate`` is
    building in ``frame`` (None if it is not such a frame, or the config has none)."""
    if frame.f_code is not _D2_INSTANTIATE_CODE:
        return None
    node = frame.f_locals.get("cfg")  # the node whose arguments are being built
    if not isinstance(node, DictConfig):
        return None
    root = node._get_root()
    return root.get("gn") if isinstance(root, DictConfig) and "gn" in root else None


def _check_no_config_bypassed(norm: str) -> None:
    """Outside every scope, gn_det's norms use the default settings: right for code without
    a config, silently wrong for a module built from a config by a path detectron2's build
    functions don't cover (a plain builder function called directly), or from a LazyConfig
    with a ``gn`` dict by detectron2's ``instantiate`` (a plain name cannot see ``gn``).
    Such a config, found up the stack, with other settings is refused.

    Why a stack search, and why it stays beside the scopes that carry settings (``fast_gn()``
    nodes, ``gn_model``, ``build_lazy_model``, the build functions): on both paths it guards,
    no gn_det code runs between the config and ``get_norm`` (detectron2's ``instantiate``
    calling a block with ``norm="FastGN"``; a project's builder called directly), so nothing
    can open a scope or set a flag there; the config is only reachable as a caller's local.
    Making it apply the settings instead of refusing would make a frame search the way settings
    travel; replacing it would take patching ``instantiate`` and every project builder. It runs
    only for a gn_det norm built outside every scope, and only decides whether to refuse."""
    if _SCOPE.get() is not _NO_SCOPE:
        return
    frame = inspect.currentframe()
    while frame is not None:
        gn = _lazy_config_gn(frame)
        if gn is not None and (norm != "GN" or gn.get("replace_gn", False)):
            raise ConfigError(
                f"norm={norm!r} is built by detectron2's instantiate() from a LazyConfig with a `gn` dict, which a "
                f"plain norm name cannot see (it would build with GNSettings' defaults, not gn); in the config write "
                f"norm=gn_det.lazy.fast_gn() for it and model = gn_det.lazy.gn_model(model), or build with "
                f"gn_det.lazy.build_lazy_model(cfg)")
        cfg = frame.f_locals.get("cfg")
        if isinstance(cfg, CfgNode) and "MODEL" in cfg and GNSettings.from_cfg(cfg) != _NO_SCOPE[1]:
            raise ConfigError(
                f"{frame.f_code.co_name}() builds a gn_det norm from a config with MODEL.GN settings, outside "
                "detectron2's build functions, which apply them; build through build_model / build_backbone / "
                "the heads' build functions, or inside `with gn_det.building_from(cfg):`")
        frame = frame.f_back


def _module_being_built() -> str:
    """The class of the nn.Module whose ``__init__`` is running up the stack ('' if none):
    read only to name a layer in an error."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if isinstance(owner, nn.Module):
            return type(owner).__name__
        frame = frame.f_back
    return ""


@register_norm(NORM_NAME)
def fast_group_norm(channels: int) -> nn.Module:
    """gn_det's GroupNorm over ``channels``, with the current scope's settings (asking the
    convolution before it to standardize its weight, with ``weight_standardization``). The
    layer checks them (``gn_det.config``'s rules); a broken one is named in the scope's terms,
    with the module being built."""
    _, settings, terms = _SCOPE.get()
    try:
        norm = GroupNorm.from_channels(channels, settings.num_groups, settings.channels_per_group, eps=settings.eps)
    except SettingError as exc:
        where = _module_being_built()
        raise exc.in_terms(terms, f"in {where}" if where else "") from None
    return request_weight_standardization(norm, settings.weight_standardization)


@register_norm(WS_NORM_NAME)
def fast_group_norm_ws(channels: int) -> nn.Module:
    """``"FastGN"``, asking the detectron2 ``Conv2d`` it is the ``norm=`` of to standardize its
    weight: with the scope's ``weight_standardization``, or mmcv's definition when that is off
    (``gn_det.modeling.weight_std``)."""
    norm = fast_group_norm(channels)
    return request_weight_standardization(norm, current_gn_settings().weight_standardization or "mmcv")


def _detectron2_get_norm():
    from detectron2.layers import batch_norm

    return getattr(batch_norm.get_norm, "__wrapped__", batch_norm.get_norm)


def resolve_norm_name(norm: str, settings: GNSettings) -> Optional[str]:
    """The gn_det registry name that ``norm`` builds under ``settings``, or None when it
    is not gn_det's ("GN" is, with ``replace_gn``)."""
    if norm == "GN" and settings.replace_gn:
        return NORM_NAME
    return norm if norm in NORM_REGISTRY else None


def get_norm(norm, out_channels: int) -> Optional[nn.Module]:
    """detectron2's ``get_norm`` extended with gn_det's registry (see the module docstring)."""
    if isinstance(norm, str):
        if norm in NORM_REGISTRY or norm == "GN":
            _check_no_config_bypassed(norm)
        name = resolve_norm_name(norm, current_gn_settings())
        if name is not None:
            return NORM_REGISTRY.get(name)(out_channels)
        if norm and norm not in DETECTRON2_NORMS:
            raise ConfigError(f"unknown norm {norm!r}; registered norms: {', '.join(NORM_REGISTRY.names())}")
    return _detectron2_get_norm()(norm, out_channels)
