"""gn_det's config keys, declared once: the fields of ``GNSettings``, each with its rule (and
``ResNetSettings``' one field, ``MODEL.RESNETS.CONV_BIAS``, which gn_det's ResNet builders apply
and ``ResNetSettings.from_cfg`` checks against the rest of the config).

Each field is one key (``MODEL.GN.<FIELD>`` unless it names another) with its default, type,
meaning and rule. ``add_gn_config`` declares the keys from it (detectron2's ``add_<thing>_config``
way), ``GNSettings.from_cfg`` reads them, ``GNSettings`` checks them, and docs/USAGE.md's key list is
``GNSettings.keys_markdown()``. Adding a key is one field here.

One validation, one rule per setting. A field's ``rule`` (and, across fields, ``__post_init__``)
is the only place a value is judged; ``groups_for`` is the only rule that needs a layer's
channels. Every input that carries these settings checks them with these functions and reports
a broken rule as a ``SettingError``, whose message names the setting in the terms of that input
(``Terms``): ``MODEL.GN.EPS`` for YAML (``yaml_key``), ``gn.eps`` for a LazyConfig's ``gn`` dict
(``lazy_key``), ``eps`` for a Python argument (``argument_key``: ``GroupNorm(...)``,
``GroupNorm.factory(...)``, ``gn_det.group_norm(...)``). So eps=0 gets the same decision on every
path (refused: a group of equal values would divide by zero), and a group count that does not
divide a layer's channels one error, naming the key and the layer.

When each rule runs: the settings' rules once per model (``GNSettings(...)``, when the outermost
build scope opens or a LazyConfig's ``gn`` is read) and once per ``GroupNorm.factory``; the
layer's rules (``groups_for``: the group count divides the channels; eps) once per GN layer
built, in ``GroupNorm.__init__`` (``from_channels`` first resolves ``channels_per_group`` by its
rule). ``gn_det.group_norm`` checks its own arguments per call (eps by the same rule; its input
tensor's channels against ``num_groups``: a check of the tensor, which a layer built right can
still be given wrong).

How ``MODEL.GN.NUM_GROUPS`` and ``MODEL.GN.RECOMPUTE_OUTPUT`` travel from a YAML file to the
kernels, hop by hop: docs/KERNELS.md, "From a config key to a kernel argument".

This module imports nothing of gn_det but ``errors`` (and detectron2 only inside the functions
that take a ``CfgNode``), so the layer and the op can use its rules.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    from detectron2.config import CfgNode as CN

__all__ = ["GNSettings", "RESNET_BUILDERS", "ResNetSettings", "SettingError", "Terms", "add_gn_config",
           "argument_key", "check_setting", "get_config", "groups_for", "lazy_key", "yaml_key"]

# How an input names a setting (a GNSettings field name -> the key as the user wrote it).
Terms = Callable[[str], str]


def yaml_key(name: str) -> str:
    """YAML's key of setting ``name``: ``MODEL.GN.NUM_GROUPS``."""
    return GNSettings.key(name)


def lazy_key(name: str) -> str:
    """A LazyConfig's key of setting ``name``: ``gn.num_groups``."""
    return f"gn.{name}"


def argument_key(name: str) -> str:
    """A Python argument's name for setting ``name``: ``num_groups``."""
    return name


def _v(value: Any) -> str:
    """``repr(value)`` safe inside a ``SettingError`` template (braces doubled)."""
    return repr(value).replace("{", "{{").replace("}", "}}")


class SettingError(ConfigError):
    """A setting that breaks its rule. ``template`` names settings as ``{field}`` (filled in by
    ``terms``: ``MODEL.GN.EPS``, ``gn.eps`` or ``eps``); ``where`` (a layer, a function) is added
    in parentheses. ``in_terms`` gives the same error for another input's terms."""

    def __init__(self, template: str, terms: Terms = argument_key, where: str = "") -> None:
        self.template, self.terms, self.where = template, terms, where
        text = template.format_map({f.name: terms(f.name) for f in dataclasses.fields(GNSettings)})
        super().__init__(f"{text} ({where})" if where else text)

    def in_terms(self, terms: Terms, where: Optional[str] = None) -> "SettingError":
        """This error with its settings named by ``terms`` (and ``where``, if given)."""
        return SettingError(self.template, terms, self.where if where is None else where)


def _no_groups(num_groups: Any, channels_per_group: Any) -> str:
    """The rule across the two group settings: one of them says how many groups."""
    return (f"{{num_groups}}={_v(num_groups)} and {{channels_per_group}}={_v(channels_per_group)}: set one of them "
            "(e.g. {num_groups}=32)")


def _key(default, meaning: str, key: str = "", choices: tuple = (), rule: Optional[tuple] = None):
    """A settings field: its config key (``MODEL.GN.<FIELD>`` when not given), meaning, for a
    field with a fixed set of values those values, and its rule: ``(test, why)``, a value passes
    when ``test(value)``; ``why`` says what is wrong otherwise (``{field}`` names a setting)."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "key": key, "choices": choices,
                                                        "rule": rule})


def _weight_standardizations() -> tuple:
    # (read when checked: gn_det.layers imports this module, so this module cannot import it first)
    from .layers.weight_std import WEIGHT_STANDARDIZATIONS

    return ("", *WEIGHT_STANDARDIZATIONS)


@dataclasses.dataclass(frozen=True)
class GNSettings:
    """How gn_det builds GN layers from a config. Values are checked when constructed, by each
    field's ``rule`` and the rules across fields (``SettingError``, a ``ConfigError``, naming the
    key, the value and the fix)."""

    num_groups: int = _key(32, "groups per GN layer.",
                           rule=(lambda v: v >= 0, "may not be negative (0: {channels_per_group} sets the groups)"))
    channels_per_group: int = _key(
        0, "when > 0, each layer's group count is its channels divided by this, instead of NUM_GROUPS "
           "(the GN paper's other way to set its one hyperparameter).",
        rule=(lambda v: v >= 0, "may not be negative (0: {num_groups} sets the groups)"))
    eps: float = _key(1e-5, "added to the variance.",
                      rule=(lambda v: v > 0, "eps must be > 0 (e.g. 1e-5), or a constant group divides by zero"))
    fuse_activation: bool = _key(
        True, "a ReLU that follows a GN runs inside the GN kernels, and so does a residual block's end "
              "(GN, shortcut add, ReLU).")
    replace_gn: bool = _key(False, "detectron2's own \"GN\" norm name builds gn_det's GN too.")
    recompute_output: bool = _key(
        False, "a GN output is not kept for the next layer's backward: it is recomputed then from what GN "
               "keeps anyway (x, gamma, beta; a fused block end's shortcut, itself recomputed), one GN forward "
               "more per such use; nor is a GN input made by a 1x1 projection (block shortcuts, FPN laterals): "
               "the convolution runs again; gradients unchanged (`gn_det.set_recompute_output`).")
    ignore_padding: bool = _key(
        False, "each image's GN statistics over its own region of the zero-padded batch, 0 written in the padding, "
               "in every gn_det GN over a dense feature map (backbone, FPN, RPN and RetinaNet heads, semantic "
               "segmentation head; never ROI heads), and anchors whose centre lies in an image's padding excluded "
               "from the RPN's and RetinaNet's selection and training labels: an image's outputs then do not depend "
               "on the images batched with it. Off: detectron2's behaviour (padding in the statistics), bit-equal "
               "to its GN (`gn_det.image_regions`, `gn_det.modeling.padding`).")
    weight_standardization: str = _key(
        "", "\"mmcv\" or \"timm\": every convolution whose output feeds a gn_det GN (ResNet stem and blocks, FPN, "
            "box and mask head convs, RetinaNet's head, a project's own `Conv2d(norm=...)` or `nn.Conv2d` followed by "
            "its norm in an `nn.Sequential`) uses its weight standardized per output "
            "channel: mmcv's `ConvWS2d` `(w - mean) / (std_unbiased + 1e-5)` (mmdetection's GN+WS weights) or timm's "
            "`StdConv2d` `(w - mean) / sqrt(var_population + 1e-6)`; \"\" is off. State_dict keys unchanged.",
        choices=_weight_standardizations)
    channels_last: bool = _key(
        False, "the built model is put in channels_last (NHWC) memory format, so convolutions and GN "
               "run NHWC (fastest with mixed precision on GPU).", key="MODEL.CHANNELS_LAST")

    @staticmethod
    def key(name: str) -> str:
        """The config key of field ``name`` (e.g. ``"MODEL.GN.NUM_GROUPS"``)."""
        field = next(f for f in dataclasses.fields(GNSettings) if f.name == name)
        return field.metadata["key"] or f"MODEL.GN.{name.upper()}"

    def __post_init__(self) -> None:
        """The settings' rules: each field's type and rule, then the rules across fields.
        ``SettingError`` in YAML's terms (``in_terms`` for another input's)."""
        types = typing.get_type_hints(GNSettings)
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), types[field.name]
            choices = field.metadata["choices"]
            choices = choices() if callable(choices) else choices
            if kind is float and type(value) is int:  # YAML's 1 for 1.0
                value = float(value)
                object.__setattr__(self, field.name, value)
            if choices and (type(value) is not kind or value not in choices):
                raise SettingError(f"{{{field.name}}}={_v(value)}: expected one of {', '.join(map(_v, choices))}",
                                   yaml_key)
            if type(value) is not kind:
                raise SettingError(f"{{{field.name}}}={_v(value)}: expected a {kind.__name__}", yaml_key)
            check_setting(field.name, value, yaml_key)
        if not (self.num_groups or self.channels_per_group):
            raise SettingError(_no_groups(self.num_groups, self.channels_per_group), yaml_key)
        default_groups = GNSettings.__dataclass_fields__["num_groups"].default
        if self.channels_per_group and self.num_groups not in (0, default_groups):
            raise SettingError(
                f"{{num_groups}}={self.num_groups} and {{channels_per_group}}={self.channels_per_group} disagree: "
                "{channels_per_group} sets every layer's group count, so {num_groups} would be ignored; set only one "
                "of them ({num_groups}=0 to use {channels_per_group})", yaml_key)

    @classmethod
    def from_cfg(cls, cfg: "CN") -> "GNSettings":
        """The settings a config asks for (a key the config lacks keeps its default). The
        config's ``ResNetSettings`` are checked here too: every build from a config reads its
        settings here first, so a ResNet setting that cannot apply is refused whatever builds it."""
        ResNetSettings.from_cfg(cfg)
        values = {}
        for field in dataclasses.fields(cls):
            node, *path = cls.key(field.name).split(".")
            value = cfg.get(node)
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None  # (a CfgNode is a dict)
            if value is not None:
                values[field.name] = value
        return cls(**values)

    @classmethod
    def keys_markdown(cls) -> str:
        """docs/USAGE.md's list of the keys: one line each, key, default and meaning."""
        lines = []
        for field in dataclasses.fields(cls):
            lines.append(f"  - `{cls.key(field.name)}` ({field.default!r}): {field.metadata['meaning']}")
        return "\n".join(lines)


# gn_det's backbone builders that build detectron2's ResNet (gn_det.modeling.builders) and apply
# ResNetSettings; detectron2's own builders (build_resnet_backbone, ...) cannot.
RESNET_BUILDERS = ("build_fastgn_resnet_backbone", "build_fastgn_resnet_fpn_backbone")


def _cfg_value(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg``'s value at the dotted ``key`` (``default`` where the config lacks it)."""
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None  # (a CfgNode is a dict)
        if value is None:
            return default
    return value


@dataclasses.dataclass(frozen=True)
class ResNetSettings:
    """What gn_det's ResNet builders (``MODEL.BACKBONE.NAME`` one of ``RESNET_BUILDERS``)
    change in detectron2's ResNet; YAML configs only (a LazyConfig names its ResNet's modules
    and their arguments itself). ``from_cfg`` checks them against the rest of the config: a
    setting that cannot apply is a ``ConfigError`` naming the keys, never ignored."""

    conv_bias: bool = _key(
        False, "every convolution of detectron2's ResNet (stem and blocks, projection shortcuts included) gets a "
               "bias, initialised to 0 (trainable where its weight is), as the FPN and heads have theirs without a "
               "norm; detectron2 builds the ResNet's without, whatever the norm. Only without a norm "
               "(`MODEL.RESNETS.NORM` \"\": a norm right after a convolution cancels its bias), with gn_det's "
               "builders, which add them (`MODEL.BACKBONE.NAME` `build_fastgn_resnet_fpn_backbone` or "
               "`build_fastgn_resnet_backbone`: detectron2's ResNet(-FPN) otherwise unchanged), and no deformable "
               "stages; any other config is refused.", key="MODEL.RESNETS.CONV_BIAS")

    @classmethod
    def from_cfg(cls, cfg: "CN") -> "ResNetSettings":
        """The settings a config asks for (defaults where it lacks a key), checked against the
        config's ResNet norm, backbone builder and deformable stages (``ConfigError``)."""
        values = {}
        for field in dataclasses.fields(cls):
            key = field.metadata["key"]
            value = _cfg_value(cfg, key, field.default)
            if type(value) is not type(field.default):
                raise ConfigError(f"{key}={value!r}: expected a {type(field.default).__name__}")
            values[field.name] = value
        settings = cls(**values)
        if settings.conv_bias:
            _check_conv_bias(cfg)
        return settings

    @classmethod
    def keys_markdown(cls) -> str:
        """docs/USAGE.md's lines for these keys: key, default and meaning."""
        return "\n".join(f"  - `{f.metadata['key']}` ({f.default!r}): {f.metadata['meaning']}"
                         for f in dataclasses.fields(cls))


def _check_conv_bias(cfg: "CN") -> None:
    """``MODEL.RESNETS.CONV_BIAS`` True can apply to ``cfg``'s ResNet, or ``ConfigError`` says why not."""
    key = ResNetSettings.__dataclass_fields__["conv_bias"].metadata["key"]
    norm = _cfg_value(cfg, "MODEL.RESNETS.NORM", "")
    if norm != "":
        raise ConfigError(f"{key}=True with MODEL.RESNETS.NORM={norm!r}: the biases are for a ResNet without a norm "
                          f"(a norm right after each convolution cancels its bias, which is why detectron2 builds "
                          f"none); set MODEL.RESNETS.NORM \"\" or {key} False")
    builder = _cfg_value(cfg, "MODEL.BACKBONE.NAME", "")
    if builder not in RESNET_BUILDERS:
        twin = "build_fastgn_" + builder[len("build_"):] if builder.startswith("build_") else ""
        fix = (f"set MODEL.BACKBONE.NAME {twin} (detectron2's {builder} with the biases)" if twin in RESNET_BUILDERS
               else f"build the backbone with one of gn_det's ResNet builders ({', '.join(RESNET_BUILDERS)})")
        raise ConfigError(f"{key}=True with MODEL.BACKBONE.NAME={builder!r}: only gn_det's ResNet builders add the "
                          f"biases, and this one would build the ResNet without them; {fix}, or set {key} False")
    deform = _cfg_value(cfg, "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [])
    if any(deform):
        raise ConfigError(f"{key}=True with MODEL.RESNETS.DEFORM_ON_PER_STAGE={list(deform)!r}: detectron2's deformable "
                          f"convolutions take no bias; set {key} False, or no deformable stage")


# Each setting's rule, from its field: a plain dict, which torch 2.5's dynamo can read inside a
# compiled GN call (a field's metadata is a mappingproxy, which it cannot).
_RULES = {field.name: field.metadata["rule"] for field in dataclasses.fields(GNSettings)}


def check_setting(name: str, value: Any, terms: Terms = argument_key, where: str = "") -> None:
    """Setting ``name``'s rule (its field's ``rule``) on ``value``; ``SettingError`` naming the
    setting by ``terms`` (``where``: a layer or function, added to the message)."""
    rule = _RULES[name]
    if rule is not None and not rule[0](value):
        raise SettingError(f"{{{name}}}={_v(value)}: {rule[1]}", terms, where)


def groups_for(channels: int, num_groups: int, channels_per_group: int = 0, terms: Terms = argument_key,
               where: str = "") -> int:
    """The rule that needs a layer's channels: the group count of a GN layer over ``channels``,
    ``channels // channels_per_group`` when that is set (> 0), else ``num_groups``, which must
    divide the channels. ``SettingError`` naming the setting by ``terms``, the channels and the fix."""
    if channels_per_group:
        check_setting("channels_per_group", channels_per_group, terms, where)
        if channels % channels_per_group:
            raise SettingError(f"{{channels_per_group}}={channels_per_group} does not divide the {channels} channels "
                               f"of a GN layer; choose a divisor of {channels}, or set {{num_groups}} instead",
                               terms, where)
        return channels // channels_per_group
    if not num_groups:
        raise SettingError(_no_groups(num_groups, channels_per_group), terms, where)
    check_setting("num_groups", num_groups, terms, where)
    if channels % num_groups:
        raise SettingError(f"{{num_groups}}={num_groups} does not divide the {channels} channels of a GN layer; "
                           f"choose a divisor of {channels}, or set {{channels_per_group}} instead", terms, where)
    return num_groups


def add_gn_config(cfg: "CN") -> "CN":
    """Add gn_det's keys (``GNSettings``' and ``ResNetSettings``' fields, with their defaults, and
    the data checks' ``gn_det.train.data.checks.DataSettings`` fields) to ``cfg``, in place. Returns cfg. Adding
    twice is harmless."""
    from .train.data.checks import add_data_config

    from detectron2.config import CfgNode as CN

    add_data_config(cfg)
    keys = [(GNSettings.key(f.name), f.default) for f in dataclasses.fields(GNSettings)]
    keys += [(f.metadata["key"], f.default) for f in dataclasses.fields(ResNetSettings)]
    for key, default in keys:
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                node[part] = CN()
            node = node[part]
        if leaf not in node:
            node[leaf] = default
    return cfg


def get_config(config_file: str = "", opts=None, allow_unsafe: bool = False) -> "CN":
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
