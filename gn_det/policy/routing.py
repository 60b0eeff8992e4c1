"""Routes: the shapes where gn_det's Triton kernels were measured slower than PyTorch's own
GroupNorm on a GPU model, so that gn_det runs PyTorch's there instead.

A route names a GPU model (``torch.cuda.get_device_name``), a dtype, a memory format, the
fused activation, and a bucket of shapes: ``group_elements_log2 = floor(log2(C / G * S))``
(the size of one group, which picks the kernel set and its work per program) and
``batch_groups_log2 = floor(log2(N * G))`` (how many groups there are to spread over the GPU).
``tools/benchmark_norm.py --write-routes`` measures the kernels against the path a route takes
(``group_norm_op.aten_group_norm``) and writes a route for every bucket where the kernels lost in
forward+backward time; it removes the routes of buckets where they won. Routes are data, in
``routes.json`` beside this file, or in a file of the user's own (``set_routes``,
``GN_DET_ROUTES``). Where a route is followed (with tuning off, or as a seed decision where
tuning holds none): ``paths.decide``. The route key is also the start of tuning's and
verification's buckets (``tuning.TuneKey``).

``set_routes(path)`` picks another routes file, ``set_routes(None)`` runs the Triton kernels
everywhere (how the benchmark measures them); ``GN_DET_ROUTES`` (a path, or ``none``) is read
once, at import, into the first call.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Tuple, Union

import torch

from ..ops.activation import ACTIVATION_NAMES, ACTIVATION_TABLE
from ..ops.layout import memory_format_of
from .switches import CALLS

__all__ = [
    "ROUTES_FILE", "ROUTE_FIELDS", "RouteKey", "aten_route", "check_route", "load_routes", "read_routes_file",
    "route_key", "route_key_of", "routes_file", "routes_file_from_environment", "set_routes",
]

ROUTES_FILE = Path(__file__).with_name("routes.json")

# (device, dtype, format, activation, group_elements_log2, batch_groups_log2)
RouteKey = Tuple[str, str, str, str, int, int]
ROUTE_FIELDS = ("device", "dtype", "format", "activation", "group_elements_log2", "batch_groups_log2")
_DTYPES = ("float32", "bfloat16", "float16")
_FORMATS = ("nchw", "channels_last", "channels_last_3d")
_ACTIVATIONS = tuple(a.name or "none" for a in ACTIVATION_TABLE)
_FORMAT_NAMES = {torch.contiguous_format: "nchw", torch.channels_last: "channels_last",
                 torch.channels_last_3d: "channels_last_3d"}


def route_key(device: str, dtype: str, fmt: str, activation: str, n: int, c: int, s: int, num_groups: int) -> RouteKey:
    """The route key of an (N, C, S) input with num_groups groups (N, C / G * S >= 1)."""
    group_elements = c // num_groups * s
    return (device, dtype, fmt, activation, int(math.log2(group_elements)), int(math.log2(n * num_groups)))


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def route_key_of(x: torch.Tensor, num_groups: int, activation: int) -> RouteKey:
    """The route key of a non-empty input x ``(N, C, *)`` (dense) with its fused activation code."""
    n, c = x.shape[0], x.shape[1]
    return route_key(_device_name(x.device), str(x.dtype).replace("torch.", ""), _FORMAT_NAMES[memory_format_of(x)],
                     ACTIVATION_NAMES[activation] or "none", n, c, x.numel() // (n * c), num_groups)


def routes_file_from_environment() -> Optional[Path]:
    """The routes file ``GN_DET_ROUTES`` names (the package's when unset), None for ``none``."""
    value = os.environ.get("GN_DET_ROUTES", "").strip()
    if value.lower() == "none":
        return None
    return Path(value) if value else ROUTES_FILE


def check_route(route: object, where: str) -> RouteKey:
    if not isinstance(route, dict):
        raise ValueError(f"{where}: a route must be an object with {', '.join(ROUTE_FIELDS)}; got {route!r}")
    missing = [field for field in ROUTE_FIELDS if field not in route]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (a route needs {', '.join(ROUTE_FIELDS)})")
    for field, allowed in (("dtype", _DTYPES), ("format", _FORMATS), ("activation", _ACTIVATIONS)):
        if route[field] not in allowed:
            raise ValueError(f"{where}: {field} {route[field]!r} is not one of {', '.join(allowed)}")
    for field in ("group_elements_log2", "batch_groups_log2"):
        if not isinstance(route[field], int) or isinstance(route[field], bool) or not 0 <= route[field] < 64:
            raise ValueError(f"{where}: {field} must be an integer from 0 to 63, got {route[field]!r}")
    if not isinstance(route["device"], str) or not route["device"]:
        raise ValueError(f"{where}: device must be a GPU name as torch.cuda.get_device_name gives it, got {route['device']!r}")
    return _key(route)


def _key(route: dict) -> RouteKey:
    return tuple(route[field] for field in ROUTE_FIELDS)


def read_routes_file(path: Path) -> dict:
    """A routes file's contents, every route checked (a clear ValueError naming the file,
    the route's index and the field otherwise)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"gn_det routes file {path} does not exist (GN_DET_ROUTES names it?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"gn_det routes file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
        raise ValueError(f"gn_det routes file {path}: expected an object with a list under \"routes\"")
    for i, route in enumerate(data["routes"]):
        check_route(route, f"gn_det routes file {path}, routes[{i}]")
    return data


# The routes in use: (their file or None, route key -> measurement, the GPU names they name).
# Set by set_routes only: at import from GN_DET_ROUTES, later by an explicit call.
_IN_USE: Tuple[Optional[Path], Dict[RouteKey, str], FrozenSet[str]] = (None, {}, frozenset())


def set_routes(path: Union[str, Path, None]) -> Optional[Path]:
    """Use the routes in ``path`` (every route checked: a clear ValueError naming the file,
    the route's index and the field), or none with ``None`` (the kernels everywhere).
    Returns the file in use before, to restore it with. ``GN_DET_ROUTES`` is read once, at
    import, into the first call."""
    global _IN_USE
    previous = _IN_USE[0]
    path = None if path is None else Path(path)
    routes = {} if path is None else {
        _key(route): str(route.get("measured") or "no measurement recorded") for route in read_routes_file(path)["routes"]}
    _IN_USE = (path, routes, frozenset(key[0] for key in routes))
    CALLS.clear()
    return previous


def routes_file() -> Optional[Path]:
    """The routes file in use (None: no routes)."""
    return _IN_USE[0]


def load_routes() -> Dict[RouteKey, str]:
    """Route key -> the measurement behind it, for the routes in use."""
    return _IN_USE[1]


def aten_route(x: torch.Tensor, num_groups: int, activation: int) -> Optional[str]:
    """The measurement that routes x to PyTorch's GroupNorm, or None (the Triton kernels)."""
    _, routes, devices = _IN_USE
    if not routes or x.numel() == 0 or _device_name(x.device) not in devices:  # the common case, cheaply
        return None
    return routes.get(route_key_of(x, num_groups, activation))


set_routes(routes_file_from_environment())  # a malformed routes file fails here, at import, naming the route
