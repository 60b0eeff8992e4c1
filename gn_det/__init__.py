"""gn_det: Group Normalization for detectron2.

- ``gn_det.GroupNorm`` / ``gn_det.group_norm``: GN with fused Triton kernels on CUDA and
  PyTorch operations on CPU, a drop-in for ``torch.nn.GroupNorm``.
- ``gn_det.image_regions``: inside it, GN layers that ignore padding normalize each image of a
  padded batch over its own region (``MODEL.GN.IGNORE_PADDING``; ``gn_det.padding``).
- With detectron2 installed, ``import gn_det`` registers gn_det's norm ``"FastGN"``
  (``gn_det.NORM_NAME``) for every detectron2 norm config key and makes detectron2's build
  functions apply a config's ``MODEL.GN.*`` keys (``gn_det.add_gn_config(cfg)`` adds them).
"""
import importlib.util

from ._moved import install_moved_finder
from .requirements import check_torch

check_torch()  # first: an older torch fails here in one line, not inside torch
install_moved_finder()  # old module paths (gn_det.engine, python -m gn_det.check, ...) keep working

# (imported after the check)
from .policy import autotune_decisions, decisions, group_norm, set_autotune, set_tuning_cache, synchronize_decisions  # noqa: E402
from .layers import GroupNorm, resolve_num_groups  # noqa: E402
from .recompute import recompute_output_enabled, recompute_outputs, set_recompute_output  # noqa: E402
from .padding import image_regions  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GroupNorm", "autotune_decisions", "decisions", "group_norm", "image_regions", "recompute_output_enabled",
           "recompute_outputs", "resolve_num_groups", "set_autotune", "set_recompute_output", "set_tuning_cache",
           "synchronize_decisions", "__version__"]

if importlib.util.find_spec("detectron2") is not None:
    from .config import GNSettings, add_gn_config, get_config
    from .modeling import (NORM_NAME, ConversionReport, build_model, building_from, convert_to_group_norm,
                           fuse_norm_activation, gn_settings, install, register_norm, standardize_weights,
                           validate_gn_config, ws_norm)

    install()
    __all__ += [
        "NORM_NAME", "ConversionReport", "GNSettings", "add_gn_config", "build_model", "building_from", "get_config",
        "convert_to_group_norm", "fuse_norm_activation", "gn_settings", "register_norm", "standardize_weights",
        "validate_gn_config", "ws_norm",
    ]
