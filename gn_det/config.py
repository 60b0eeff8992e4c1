"""gn_det's config keys, detectron2's ``add_<thing>_config`` way."""
from __future__ import annotations

import dataclasses

from detectron2.config import CfgNode as CN

__all__ = ["GNSettings", "add_gn_config", "get_config", "gn_settings_from_cfg"]


@dataclasses.dataclass(frozen=True)
class GNSettings:
    """How gn_det builds GN layers. ``channels_per_group > 0`` takes precedence over
    ``num_groups``. ``replace_gn``: detectron2's own "GN" name builds gn_det's GN as well.
    ``fuse_activation``: the builders move a ReLU that follows a GN into its kernels."""

    num_groups: int = 32
    channels_per_group: int = 0
    eps: float = 1e-5
    fuse_activation: bool = True
    replace_gn: bool = False


def add_gn_config(cfg: CN) -> CN:
    """Add ``MODEL.GN.*`` (the GN layers built from this config) to ``cfg``, in place.

    - ``NUM_GROUPS`` (32): groups per GN layer.
    - ``CHANNELS_PER_GROUP`` (0): when > 0, each layer's group count is its channels divided
      by this, instead of NUM_GROUPS (the GN paper's other way to set the hyperparameter).
    - ``EPS`` (1e-5): added to the variance.
    - ``FUSE_ACTIVATION`` (True): a ReLU that follows a GN runs inside the GN kernels.
    - ``REPLACE_GN`` (False): detectron2's own "GN" norm name builds gn_det's GN too.
    Returns cfg. Adding twice is harmless.
    """
    if "GN" in cfg.MODEL:
        return cfg
    defaults = GNSettings()
    cfg.MODEL.GN = CN()
    cfg.MODEL.GN.NUM_GROUPS = defaults.num_groups
    cfg.MODEL.GN.CHANNELS_PER_GROUP = defaults.channels_per_group
    cfg.MODEL.GN.EPS = defaults.eps
    cfg.MODEL.GN.FUSE_ACTIVATION = defaults.fuse_activation
    cfg.MODEL.GN.REPLACE_GN = defaults.replace_gn
    return cfg


def gn_settings_from_cfg(cfg: CN) -> GNSettings:
    """The GN settings of a config (defaults where it has no ``MODEL.GN``)."""
    if "GN" not in cfg.MODEL:
        return GNSettings()
    gn = cfg.MODEL.GN
    return GNSettings(
        num_groups=int(gn.NUM_GROUPS),
        channels_per_group=int(gn.CHANNELS_PER_GROUP),
        eps=float(gn.EPS),
        fuse_activation=bool(gn.FUSE_ACTIVATION),
        replace_gn=bool(gn.REPLACE_GN),
    )


def get_config(config_file: str = "", opts=None) -> CN:
    """detectron2's default config with gn_det's keys, merged with ``config_file`` (a YAML
    file, ``_BASE_`` inheritance resolved) and ``opts`` (``["KEY", value, ...]``)."""
    from detectron2.config import get_cfg

    cfg = add_gn_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
