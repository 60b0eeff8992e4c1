"""gn_det's detectron2 glue: the norm registry, builders, activation fusion, conversion."""
from .builders import build_model, building_from
from .convert import ConversionReport, convert_to_group_norm
from .fuse import fuse_norm_activation
from .norm import NORM_NAME, NORM_REGISTRY, GNSettings, current_gn_settings, get_norm, gn_settings, install, register_norm

__all__ = [
    "NORM_NAME", "NORM_REGISTRY", "GNSettings", "ConversionReport", "build_model", "building_from",
    "convert_to_group_norm", "current_gn_settings", "fuse_norm_activation", "get_norm", "gn_settings",
    "install", "register_norm",
]
