"""gn_det's config keys, declared once: the fields of ``GNSettings``.

Each field is one key (``MODEL.GN.<FIELD>`` unless it names another) with its default, type
and meaning. ``add_gn_config`` declares the keys from it (detectron2's ``add_<thing>_config``
way), ``GNSettings.from_cfg`` reads and checks them, and README's key list is
``GNSettings.keys_markdown()``. Adding a key is one field here.
"""
from __future__ import annotations

import dataclasses
import os
import typing

from detectron2.config import CfgNode as CN

from .errors import ConfigError
from .layers.group_norm import GroupNorm, resolve_num_groups
from .layers.weight_std import WEIGHT_STANDARDIZATIONS, request_weight_standardization

__all__ = ["GNSettings", "add_gn_config", "get_config"]


def _key(default, meaning: str, key: str = "", choices: tuple = ()):
    """A settings field: its config key (``MODEL.GN.<FIELD>`` when not given), meaning and,
    for a field with a fixed set of values, those values."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "key": key, "choices": choices})


@dataclasses.dataclass(frozen=True)
class GNSettings:
    """How gn_det builds GN layers from a config. Values are checked when constructed
    (``ConfigError`` naming the key, the value and the fix)."""

    num_groups: int = _key(32, "groups per GN layer.")
    channels_per_group: int = _key(
        0, "when > 0, each layer's group count is its channels divided by this, instead of NUM_GROUPS "
           "(the GN paper's other way to set its one hyperparameter).")
    eps: float = _key(1e-5, "added to the variance.")
    fuse_activation: bool = _key(
        True, "a ReLU that follows a GN runs inside the GN kernels, and so does a residual block's end "
              "(GN, shortcut add, ReLU).")
    replace_gn: bool = _key(False, "detectron2's own \"GN\" norm name builds gn_det's GN too.")
    recompute_output: bool = _key(
        False, "a GN output is not kept for the next layer's backward: it is recomputed then from what GN "
               "keeps anyway (x, gamma, beta; a fused block end's shortcut, itself recomputed), one GN forward "
               "more per such use; nor is a GN input made by a 1x1 projection (block shortcuts, FPN laterals): "
               "the convolution runs again; gradients unchanged (`gn_det.set_recompute_output`).")
    weight_standardization: str = _key(
        "", "\"mmcv\" or \"timm\": every convolution whose output feeds a gn_det GN (ResNet stem and blocks, FPN, "
            "box and mask head convs, a project's own `Conv2d(norm=...)`) uses its weight standardized per output "
            "channel: mmcv's `ConvWS2d` `(w - mean) / (std_unbiased + 1e-5)` (mmdetection's GN+WS weights) or timm's "
            "`StdConv2d` `(w - mean) / sqrt(var_population + 1e-6)`; \"\" is off. State_dict keys unchanged.",
        choices=("", *WEIGHT_STANDARDIZATIONS))
    channels_last: bool = _key(
        False, "the built model is put in channels_last (NHWC) memory format, so convolutions and GN "
               "run NHWC (fastest with mixed precision on GPU).", key="MODEL.CHANNELS_LAST")

    @staticmethod
    def key(name: str) -> str:
        """The config key of field ``name`` (e.g. ``"MODEL.GN.NUM_GROUPS"``)."""
        field = next(f for f in dataclasses.fields(GNSettings) if f.name == name)
        return field.metadata["key"] or f"MODEL.GN.{name.upper()}"

    def __post_init__(self) -> None:
        types = typing.get_type_hints(GNSettings)
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), types[field.name]
            if kind is float and type(value) is int:  # YAML's 1 for 1.0
                object.__setattr__(self, field.name, float(value))
            elif field.metadata["choices"] and (type(value) is not kind or value not in field.metadata["choices"]):
                choices = ", ".join(repr(c) for c in field.metadata["choices"])
                raise ConfigError(f"{self.key(field.name)}={value!r}: expected one of {choices}")
            elif type(value) is not kind:
                raise ConfigError(f"{self.key(field.name)}={value!r}: expected a {kind.__name__}")
        if not self.eps > 0:
            raise ConfigError(f"{self.key('eps')}={self.eps}: eps must be > 0 (e.g. 1e-5), or a constant group "
                              "divides by zero")
        if self.num_groups < 0 or self.channels_per_group < 0:
            raise ConfigError(f"{self.key('num_groups')}={self.num_groups}, {self.key('channels_per_group')}="
                              f"{self.channels_per_group}: neither may be negative")
        if not (self.num_groups or self.channels_per_group):
            raise ConfigError(f"{self.key('num_groups')}=0 and {self.key('channels_per_group')}=0: set one of them "
                              "(e.g. NUM_GROUPS 32)")
        default_groups = GNSettings.__dataclass_fields__["num_groups"].default
        if self.channels_per_group and self.num_groups not in (0, default_groups):
            raise ConfigError(
                f"{self.key('num_groups')}={self.num_groups} and {self.key('channels_per_group')}="
                f"{self.channels_per_group} disagree: CHANNELS_PER_GROUP sets every layer's group count, so "
                "NUM_GROUPS would be ignored; set only one of them (NUM_GROUPS 0 to use CHANNELS_PER_GROUP)")

    @classmethod
    def from_cfg(cls, cfg: CN) -> "GNSettings":
        """The settings a config asks for (a key the config lacks keeps its default)."""
        values = {}
        for field in dataclasses.fields(cls):
            node, *path = cls.key(field.name).split(".")
            value = cfg.get(node)
            for part in path:
                value = value.get(part) if isinstance(value, CN) else None
            if value is not None:
                values[field.name] = value
        return cls(**values)

    def groups_for(self, channels: int) -> int:
        """The group count of a GN layer over ``channels``; ``ConfigError`` naming the key
        whose value does not divide them."""
        name = "channels_per_group" if self.channels_per_group else "num_groups"
        try:
            return resolve_num_groups(channels, self.num_groups, self.channels_per_group)
        except ValueError:
            divisor = getattr(self, name)
            other = self.key("num_groups" if self.channels_per_group else "channels_per_group")
            raise ConfigError(f"{self.key(name)}={divisor} does not divide the {channels} channels of a GN layer; "
                              f"choose a divisor of {channels}, or set {other} instead") from None

    def norm(self, channels: int, **kwargs) -> GroupNorm:
        """A gn_det GroupNorm over ``channels`` with these settings (asking the convolution
        before it to standardize its weight, with ``weight_standardization``)."""
        norm = GroupNorm(self.groups_for(channels), channels, eps=self.eps, **kwargs)
        return request_weight_standardization(norm, self.weight_standardization)

    @classmethod
    def keys_markdown(cls) -> str:
        """README's list of the keys: one line each, key, default and meaning."""
        lines = []
        for field in dataclasses.fields(cls):
            lines.append(f"  - `{cls.key(field.name)}` ({field.default!r}): {field.metadata['meaning']}")
        return "\n".join(lines)


def add_gn_config(cfg: CN) -> CN:
    """Add gn_det's keys (``GNSettings``' fields, with their defaults, and the data checks'
    ``gn_det.data.checks.DataSettings`` fields) to ``cfg``, in place. Returns cfg. Adding
    twice is harmless."""
    from .data.checks import add_data_config

    add_data_config(cfg)
    for field in dataclasses.fields(GNSettings):
        node = cfg
        *parents, leaf = GNSettings.key(field.name).split(".")
        for part in parents:
            if part not in node:
                node[part] = CN()
            node = node[part]
        if leaf not in node:
            node[leaf] = field.default
    return cfg


def get_config(config_file: str = "", opts=None, allow_unsafe: bool = False) -> CN:
    """detectron2's default config with gn_det's keys, merged with ``config_file`` (a YAML
    file, ``_BASE_`` inheritance resolved) and ``opts`` (``["KEY", value, ...]``).

    YAML is read with a safe loader: a file with tags that would construct Python objects is
    refused, unless ``allow_unsafe`` (detectron2's own default is to allow them).

    What the user got wrong raises a ``UserError`` naming the file or key, the value and the
    fix: ``MissingFileError`` for a config (or ``_BASE_``) file that is not there,
    ``ConfigError`` for YAML that does not parse or has refused tags, an unknown key (with
    the closest known ones) or a value of the wrong type (with the key's value so far)."""
    import yaml
    from detectron2.config import get_cfg

    from .errors import MissingFileError, config_merge_error

    cfg = add_gn_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise MissingFileError(f"config file not found: {config_file!r} (e.g. configs/mask_rcnn_gn.yaml)")
        try:
            cfg.merge_from_file(config_file, allow_unsafe=allow_unsafe)
        except yaml.constructor.ConstructorError as exc:
            raise ConfigError(
                f"config file {config_file!r} uses a YAML tag that would construct Python objects "
                f"({exc.problem}); gn_det reads configs with a safe loader. If you trust the file, pass "
                "--allow-unsafe-yaml (tools/train_net.py) or allow_unsafe=True."
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_file!r} is not valid YAML: {exc}") from None
        except FileNotFoundError as exc:  # a _BASE_ file that is not there
            raise MissingFileError(f"config file {config_file!r}: {exc.filename or exc} (named by _BASE_) "
                                   "not found; _BASE_ paths are relative to the file naming them") from None
        except (KeyError, ValueError, AssertionError) as exc:  # yacs: unknown key, value of another type
            raise config_merge_error(exc, cfg, f"config file {config_file!r}") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"config overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
    for key, value in zip(opts[0::2], opts[1::2]):
        try:  # one pair at a time, so an error names the pair as the user wrote it
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError) as exc:
            raise config_merge_error(exc, cfg, "config override", value=value) from None
    return cfg
