"""gn_det's detectron2 glue: the norm registry and config scope, the hooks that apply a
config's settings on every build path, activation fusion, conversion of built models, the
projection convolutions output recomputation reruns, GN over each image's own region
(``ignore_padding``)."""
from . import builders  # noqa: F401  (registers gn_det's builder names)
from .convert import ConversionReport, convert_to_group_norm
from .fuse import fuse_norm_activation
from .hooks import build_model, finish_model, install
from .padding import ignore_padding
from .norm import (NORM_NAME, NORM_REGISTRY, WS_NORM_NAME, building_from, current_gn_settings, get_norm,
                   gn_settings, register_norm, validate_gn_config)
from .projections import projection_convs  # registers detectron2's projections for output recomputation
from .weight_std import WSConv2d, standardize_weights, ws_norm

__all__ = [
    "NORM_NAME", "NORM_REGISTRY", "ConversionReport", "build_model", "building_from", "convert_to_group_norm",
    "current_gn_settings", "finish_model", "fuse_norm_activation", "get_norm", "gn_settings", "ignore_padding", "install",
    "projection_convs", "register_norm", "validate_gn_config", "WS_NORM_NAME", "WSConv2d", "standardize_weights",
    "ws_norm",
]
