"""gn_det's settings rules (gn_det.config): one rule per setting, declared once in GNSettings'
table, enforced with one message on every input that carries the setting (YAML MODEL.GN.*,
a LazyConfig's gn dict, Python arguments of GroupNorm, GroupNorm.factory, gn_det.group_norm),
each naming the setting in its own terms; the layer's rules checked once per layer built."""
import dataclasses
import sys

import pytest
import torch

import gn_det
from gn_det.config import GNSettings, SettingError, check_setting, groups_for
from gn_det.errors import ConfigError
from gn_det.lazy import fast_gn, settings_from_gn
from gn_det.modeling.norm import get_norm

pytest.importorskip("detectron2")
from detectron2.config import LazyCall as L, instantiate
from detectron2.modeling.backbone.resnet import BasicStem
from omegaconf import OmegaConf

EPS_RULE = "eps must be > 0 (e.g. 1e-5), or a constant group divides by zero"


def eps_zero_paths():
    """Every input that takes eps, with eps=0, and the key it should name."""
    x = torch.randn(2, 8, 3, 3)
    return {
        "MODEL.GN.EPS": lambda: gn_det.validate_gn_config(gn_det.get_config(opts=["MODEL.GN.EPS", 0.0])),
        "gn.eps": lambda: settings_from_gn({"eps": 0.0}),
        "eps (GroupNorm)": lambda: gn_det.GroupNorm(4, 8, eps=0.0),
        "eps (factory)": lambda: gn_det.GroupNorm.factory(num_groups=4, eps=0.0),
        "eps (group_norm)": lambda: gn_det.group_norm(x, 4, eps=0.0),
        "eps (convert)": lambda: gn_det.convert_to_group_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(8)),
                                                                num_groups=4, eps=0.0),
    }


def test_eps_zero_gets_one_decision_and_one_message_on_every_path():
    for name, build in eps_zero_paths().items():
        key = name.split()[0]
        with pytest.raises(SettingError) as info:
            build()
        message = str(info.value)
        assert message.startswith(f"{key}=0.0: {EPS_RULE}"), (name, message)
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    # the same rule lets a small positive eps through everywhere
    assert gn_det.GroupNorm(4, 8, eps=1e-12).eps == 1e-12
    assert settings_from_gn({"eps": 1e-12}).eps == 1e-12
    assert torch.isfinite(gn_det.group_norm(torch.randn(2, 8, 3), 4, eps=1e-12)).all()


# A value that breaks each field's rule (the fields that have one).
BROKEN = {"num_groups": -2, "channels_per_group": -4, "eps": 0.0}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_rule_is_declared_once_and_worded_alike_in_each_inputs_terms(name):
    field = GNSettings.__dataclass_fields__[name]
    assert field.metadata["rule"] is not None  # declared in the table
    why = field.metadata["rule"][1]
    value = BROKEN[name]
    messages = {}
    for terms, make in (("yaml", lambda: GNSettings(**{name: value})),
                        ("lazy", lambda: settings_from_gn({name: value})),
                        ("argument", lambda: check_setting(name, value))):
        with pytest.raises(SettingError) as info:
            make()
        messages[terms] = str(info.value)
    assert messages["yaml"] == f"{GNSettings.key(name)}={value!r}: {why.format_map(_yaml_keys())}"
    assert messages["lazy"] == f"gn.{name}={value!r}: {why.format_map({f: f'gn.{f}' for f in _fields()})}"
    assert messages["argument"] == f"{name}={value!r}: {why.format_map({f: f for f in _fields()})}"


def _fields():
    return [f.name for f in dataclasses.fields(GNSettings)]


def _yaml_keys():
    return {f: GNSettings.key(f) for f in _fields()}


def test_group_count_that_does_not_divide_gives_one_error_naming_the_layer_and_the_key():
    """48 channels, 32 groups: YAML names MODEL.GN.NUM_GROUPS, a LazyConfig gn.num_groups, each
    with the module being built; the chained cause is dropped (one error, not two)."""
    cfg = gn_det.get_config(opts=["MODEL.GN.NUM_GROUPS", 32])
    with pytest.raises(SettingError) as info, gn_det.building_from(cfg):
        BasicStem(3, 48, norm="FastGN")
    assert str(info.value) == ("MODEL.GN.NUM_GROUPS=32 does not divide the 48 channels of a GN layer; choose a divisor "
                               "of 48, or set MODEL.GN.CHANNELS_PER_GROUP instead (in BasicStem)")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    lazy = OmegaConf.create({"gn": {"num_groups": 32}})
    lazy.stem = L(BasicStem)(in_channels=3, out_channels=48, norm=fast_gn())
    with pytest.raises(SettingError) as info:
        instantiate(lazy.stem)
    assert str(info.value) == ("gn.num_groups=32 does not divide the 48 channels of a GN layer; choose a divisor "
                               "of 48, or set gn.channels_per_group instead (in BasicStem)")
    with pytest.raises(SettingError, match=r"^channels_per_group=5 does not divide the 48 channels .*'a.b'\)$"):
        gn_det.GroupNorm.from_channels(48, channels_per_group=5, layer="a.b")


def rules_run_during(fn):
    """Which of gn_det.config's rules run during ``fn()``, how often: ``check_setting`` per
    setting, ``groups_for``, ``GNSettings`` checks (a profiler hook: the real calls, nothing
    replaced)."""
    counts = {}
    config_file = sys.modules["gn_det.config"].__file__

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == config_file:
            name = frame.f_code.co_name
            if name == "check_setting":
                name = f"rule:{frame.f_locals['name']}"
            if name in ("groups_for", "__post_init__") or name.startswith("rule:"):
                counts[name] = counts.get(name, 0) + 1

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, counts


@pytest.mark.parametrize("opts", [["MODEL.GN.NUM_GROUPS", 16],
                                  ["MODEL.GN.NUM_GROUPS", 0, "MODEL.GN.CHANNELS_PER_GROUP", 8]])
def test_a_layers_rules_run_once_per_layer_built(opts):
    cfg = gn_det.get_config(opts=opts)
    with gn_det.building_from(cfg):  # the settings' own checks run here, once per model
        layer, counts = rules_run_during(lambda: get_norm("FastGN", 64))
    if opts[1]:
        assert layer.num_groups == 16
        assert counts == {"groups_for": 1, "rule:num_groups": 1, "rule:eps": 1}, counts
    else:  # channels_per_group's rule gives the group count; num_groups' rule then runs on it, once
        assert layer.num_groups == 8
        assert counts == {"groups_for": 2, "rule:channels_per_group": 1, "rule:num_groups": 1, "rule:eps": 1}, counts


def test_groups_for_is_the_one_divisibility_rule():
    assert groups_for(256, 32) == 32 and groups_for(256, 32, 64) == 4 and groups_for(256, 0, 16) == 16
    assert gn_det.resolve_num_groups(256, channels_per_group=16) == 16
    assert gn_det.GroupNorm.from_channels(64, 0, 16).num_groups == 4
    with pytest.raises(SettingError, match=r"^MODEL.GN.NUM_GROUPS=0 and MODEL.GN.CHANNELS_PER_GROUP=0: set one"):
        GNSettings(num_groups=0)
    with pytest.raises(SettingError, match=r"^num_groups=0 and channels_per_group=0: set one .*\(in GroupNorm\)$"):
        gn_det.GroupNorm(0, 8)
