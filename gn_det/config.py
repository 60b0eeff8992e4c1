"""gn_det's config keys, detectron2's ``add_<thing>_config`` way."""
from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

from detectron2.config import CfgNode as CN

__all__ = ["GNSettings", "add_gn_config", "get_config", "gn_settings_from_cfg", "validate_gn_config"]


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
    And ``MODEL.CHANNELS_LAST`` (False): ``gn_det.build_model`` puts the whole model in
    channels_last (NHWC), so convolutions and GN run NHWC (fastest with mixed precision on GPU).
    Returns cfg. Adding twice is harmless.
    """
    if "GN" in cfg.MODEL:
        return cfg
    cfg.MODEL.CHANNELS_LAST = False
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


def get_config(config_file: str = "", opts=None, allow_unsafe: bool = False) -> CN:
    """detectron2's default config with gn_det's keys, merged with ``config_file`` (a YAML
    file, ``_BASE_`` inheritance resolved) and ``opts`` (``["KEY", value, ...]``).

    YAML is read with a safe loader: a file with tags that would construct Python objects is
    refused, unless ``allow_unsafe`` (detectron2's own default is to allow them)."""
    import yaml
    from detectron2.config import get_cfg

    cfg = add_gn_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file!r} (e.g. configs/mask_rcnn_gn.yaml)")
        try:
            cfg.merge_from_file(config_file, allow_unsafe=allow_unsafe)
        except yaml.constructor.ConstructorError as exc:
            raise ValueError(
                f"config file {config_file!r} uses a YAML tag that would construct Python objects "
                f"({exc.problem}); gn_det reads configs with a safe loader. If you trust the file, pass "
                "--allow-unsafe-yaml (tools/train_net.py) or allow_unsafe=True."
            ) from None
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


_NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD", "SEM_SEG_HEAD")


def _gn_layers(cfg: CN) -> List[Tuple[str, str, int, int, int, str]]:
    """(norm key, layer, channels, num_groups, channels_per_group, where the group count comes
    from) of the GN layers the config asks for, where their channels can be read from it."""
    from .modeling.norm import NORM_NAME

    gn = cfg.MODEL.GN
    layers = []

    def add(section: str, layer: str, channels: int) -> None:
        norm = cfg.MODEL[section].NORM
        if norm == NORM_NAME or (norm == "GN" and gn.REPLACE_GN):
            layers.append((f"MODEL.{section}.NORM", layer, int(channels), int(gn.NUM_GROUPS), int(gn.CHANNELS_PER_GROUP),
                           "MODEL.GN.NUM_GROUPS"))
        elif norm == "GN":  # detectron2's own GN: always 32 groups
            layers.append((f"MODEL.{section}.NORM", layer, int(channels), 32, 0, "detectron2's GN (always 32 groups)"))

    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        r = cfg.MODEL.RESNETS
        add("RESNETS", "the ResNet stem (MODEL.RESNETS.STEM_OUT_CHANNELS)", r.STEM_OUT_CHANNELS)
        for stage in range(2, 6):
            scale = 2 ** (stage - 2)
            add("RESNETS", f"res{stage}'s outputs (MODEL.RESNETS.RES2_OUT_CHANNELS x {scale})", r.RES2_OUT_CHANNELS * scale)
            if r.DEPTH >= 50:
                add("RESNETS", f"res{stage}'s bottleneck (RESNETS.NUM_GROUPS x WIDTH_PER_GROUP x {scale})",
                    r.NUM_GROUPS * r.WIDTH_PER_GROUP * scale)
        if "fpn" in cfg.MODEL.BACKBONE.NAME:
            add("FPN", "the FPN convs (MODEL.FPN.OUT_CHANNELS)", cfg.MODEL.FPN.OUT_CHANNELS)
    if cfg.MODEL.ROI_BOX_HEAD.NUM_CONV > 0:
        add("ROI_BOX_HEAD", "the box head convs (MODEL.ROI_BOX_HEAD.CONV_DIM)", cfg.MODEL.ROI_BOX_HEAD.CONV_DIM)
    if cfg.MODEL.MASK_ON:
        add("ROI_MASK_HEAD", "the mask head convs (MODEL.ROI_MASK_HEAD.CONV_DIM)", cfg.MODEL.ROI_MASK_HEAD.CONV_DIM)
    return layers


def validate_gn_config(cfg: CN) -> None:
    """Check what would otherwise fail (or silently differ) while building or training, and
    raise ``ValueError`` naming the key, the value and the fix."""
    from .modeling.norm import NORM_REGISTRY

    gn = cfg.MODEL.GN if "GN" in cfg.MODEL else None
    if gn is not None:
        if not float(gn.EPS) > 0:
            raise ValueError(f"MODEL.GN.EPS={gn.EPS}: eps must be > 0 (e.g. 1e-5), or a constant group divides by zero")
        if gn.NUM_GROUPS < 0 or gn.CHANNELS_PER_GROUP < 0:
            raise ValueError(f"MODEL.GN.NUM_GROUPS={gn.NUM_GROUPS}, MODEL.GN.CHANNELS_PER_GROUP={gn.CHANNELS_PER_GROUP}: "
                             "neither may be negative")
        if gn.NUM_GROUPS == 0 and gn.CHANNELS_PER_GROUP == 0:
            raise ValueError("MODEL.GN.NUM_GROUPS=0 and MODEL.GN.CHANNELS_PER_GROUP=0: set one of them (e.g. NUM_GROUPS 32)")
    registered = NORM_REGISTRY.names()
    for section in _NORM_KEYS:
        if section in cfg.MODEL and "NORM" in cfg.MODEL[section]:
            norm = cfg.MODEL[section].NORM
            if isinstance(norm, str) and norm and norm not in registered:
                raise ValueError(f"MODEL.{section}.NORM={norm!r} is not a registered norm; registered: {', '.join(registered)}")
    if gn is None:
        return
    default_groups = GNSettings().num_groups
    for key, layer, channels, groups, per_group, source in _gn_layers(cfg):
        if per_group:
            if channels % per_group:
                raise ValueError(f"MODEL.GN.CHANNELS_PER_GROUP={per_group} does not divide the {channels} channels of "
                                 f"{layer} ({key}); choose a divisor of {channels}")
            if groups not in (0, default_groups) and channels // per_group != groups:
                raise ValueError(
                    f"MODEL.GN.NUM_GROUPS={groups} and MODEL.GN.CHANNELS_PER_GROUP={per_group} disagree for the "
                    f"{channels} channels of {layer} ({channels // per_group} groups); set only one of them "
                    "(NUM_GROUPS 0 to use CHANNELS_PER_GROUP)"
                )
        elif channels % groups:
            raise ValueError(f"{source}={groups} does not divide the {channels} channels of {layer} ({key}); "
                             f"choose a group count that divides {channels}, or set MODEL.GN.CHANNELS_PER_GROUP")
