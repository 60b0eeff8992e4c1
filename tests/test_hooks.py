"""What ``import gn_det`` changes in detectron2 (gn_det/modeling/hooks.py): the module
docstring's list is exactly what ``install()`` replaces, each detectron2 function still has the
signature recorded there, every loaded module holds gn_det's functions, and a module imported
later gets them without a rescan."""
import importlib
import inspect
import re
import sys

import gn_det  # runs install()
from gn_det.modeling import hooks

# "- ``detectron2.<module>.<function>(<signature>)``" rows of the docstring's list
ROW = re.compile(r"^- ``(detectron2(?:\.\w+)+)\.(\w+)(\(.*\))``$")


def _docstring_rows():
    rows = [ROW.match(line.strip()) for line in hooks.__doc__.splitlines()]
    return [(m.group(1), m.group(2), m.group(3)) for m in rows if m]


def test_the_docstring_lists_each_patched_function_with_the_signature_it_was_checked_at():
    rows = _docstring_rows()
    listed = {}
    for module_name, name, recorded in rows:
        # install() re-bound the defining module's name too: detectron2's own is behind __wrapped__
        original = hooks._original(getattr(importlib.import_module(module_name), name))
        assert (original.__module__, original.__name__) == (module_name, name), (
            f"hooks' docstring names {module_name}.{name}, but detectron2 defines it in "
            f"{original.__module__}.{original.__name__}: update the list")
        now = str(inspect.signature(original))
        assert now == recorded, (
            f"detectron2's {module_name}.{name} is now {name}{now}, not {name}{recorded} as recorded in "
            f"gn_det/modeling/hooks.py: check that gn_det's replacement still calls it rightly, then update the "
            f"docstring's list (and the detectron2 versions it was checked against)")
        listed[original] = f"{module_name}.{name}"
    assert len(listed) == len(rows), "a function is listed twice"
    patched = {f"{fn.__module__}.{fn.__name__}" for fn in hooks._REPLACEMENTS}
    assert set(listed.values()) == patched, "the docstring's list and what install() replaces differ"


def test_no_loaded_module_holds_a_detectron2_original_and_install_is_idempotent():
    assert hooks.install() == 0
    originals = {id(fn) for fn in hooks._REPLACEMENTS}
    holders = [f"{name}.{attr}" for name, module in list(sys.modules.items())
               for attr, value in list(getattr(module, "__dict__", {}).items()) if id(value) in originals]
    assert holders == []
    rebound = hooks.rebound_attributes()
    for where in ("detectron2.layers.get_norm", "detectron2.layers.batch_norm.get_norm",
                  "detectron2.modeling.backbone.resnet.get_norm", "detectron2.modeling.build_model",
                  "detectron2.modeling.meta_arch.build.build_model", "detectron2.config.config._get_args_from_config"):
        assert where in rebound


def test_a_module_imported_after_gn_det_gets_its_functions_without_a_rescan(tmp_path, monkeypatch):
    (tmp_path / "late_project.py").write_text(
        "from detectron2.layers import get_norm\n"
        "from detectron2.layers.batch_norm import get_norm as norm_from_its_module\n"
        "from detectron2.modeling import build_backbone, build_model\n"
        "from detectron2.modeling.roi_heads.box_head import build_box_head\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    late = importlib.import_module("late_project")
    try:
        assert late.get_norm is late.norm_from_its_module is gn_det.modeling.get_norm
        for name in ("build_backbone", "build_model", "build_box_head"):
            fn = getattr(late, name)
            assert fn in hooks._REPLACEMENTS.values() and fn.__wrapped__ in hooks._REPLACEMENTS, name
        assert hooks.install() == 0  # nothing left to re-bind
    finally:
        sys.modules.pop("late_project", None)


def test_the_evaluators_temporary_rebinding_is_listed_and_is_the_only_one():
    """While FastCOCOEvaluator binds its COCOeval, exactly the attributes hooks' docstring lists
    under "Rebound for a while" differ in detectron2's loaded modules, and all are restored."""
    from gn_det.train import evaluation

    listed = set(re.findall(r"^- ``(detectron2\.[\w.]+)``$", hooks.__doc__.split("Rebound for a while")[1], re.M))

    def snapshot():
        return {f"{name}.{attr}": id(value) for name, module in list(sys.modules.items())
                if name.startswith("detectron2") and module is not None
                for attr, value in list(vars(module).items())}

    before = snapshot()
    cls, _ = evaluation.cocoeval_class()
    with evaluation._detectron2_fast_cocoeval_bound_to(cls if cls is not None else object):
        during = snapshot()
    changed = {key for key in before if during.get(key) != before[key]}
    assert changed == listed, (changed, listed)
    assert snapshot() == before
