"""mmdetection's ImageNet ResNet weights (torchvision-style names, mmcv's GN layers) under
detectron2's names, as detectron2's ``tools/convert-torchvision-to-d2.py`` does for BN models.

mmdetection's GN and GN+WS backbones (``open-mmlab://detectron/resnet50_gn``'s layout after
mmdetection's own conversion, ``open-mmlab://jhu/resnet50_gn_ws``, ``.../resnet101_gn_ws``)
are state dicts of mmdetection's ``ResNet``:

    conv1.weight, gn1.{weight,bias}                         -> stem.conv1.weight, stem.conv1.norm.*
    layer1.0.conv1.weight, layer1.0.gn1.{weight,bias}       -> res2.0.conv1.weight, res2.0.conv1.norm.*
    layer1.0.downsample.0.weight, layer1.0.downsample.1.*   -> res2.0.shortcut.weight, res2.0.shortcut.norm.*
    fc.{weight,bias} (the ImageNet classifier)              -> dropped (detectron2's backbone has none)

(``layerN`` is detectron2's ``res{N+1}``.) The result loads into detectron2's ResNet built with
GN, ``STRIDE_IN_1X1: False`` (torchvision's stride in the 3x3), with no missing or unexpected
keys; written in detectron2's model-zoo ``.pkl`` format (``matching_heuristics``), it loads as
``MODEL.WEIGHTS`` into a whole detector. GN+WS weights need ``MODEL.GN.WEIGHT_STANDARDIZATION:
"mmcv"`` (the definition they were trained with) and mmdetection's input normalization: RGB,
pixel mean ``[123.675, 116.28, 103.53]``, std ``[58.395, 57.12, 57.375]``
(configs/mask_rcnn_gn_ws.yaml).
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch

from ..errors import ConfigError, MissingFileError, UntrustedWeightsError

__all__ = ["convert_mmdet_resnet", "load_mmdet_checkpoint", "save_detectron2_weights"]

# mmdetection ResNet name -> detectron2 ResNet name; {n}: stage (layer1 = res2), {b}: block, {i}: conv index
_RULES: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"^conv1\.weight$"), "stem.conv1.weight"),
    (re.compile(r"^gn1\.(weight|bias)$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"), "res{stage}.{1}.conv{2}.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.gn(\d)\.(weight|bias)$"), "res{stage}.{1}.conv{2}.norm.{3}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"), "res{stage}.{1}.shortcut.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(weight|bias)$"), "res{stage}.{1}.shortcut.norm.{2}"),
]
_DROPPED = re.compile(r"^fc\.(weight|bias)$")  # the ImageNet classifier


def _detectron2_name(name: str) -> str:
    for pattern, target in _RULES:
        match = pattern.match(name)
        if match is None:
            continue
        if "{stage}" not in target:
            return match.expand(target)
        groups = match.groups()
        return target.format(*groups, stage=int(groups[0]) + 1)
    return ""


def convert_mmdet_resnet(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """An mmdetection ResNet GN/GN+WS state dict -> ``(weights, dropped)``: detectron2 ResNet
    names to float arrays, and the names left out (the classifier ``fc``). A ``module.``
    prefix (DataParallel) is removed; a whole detector's checkpoint is reduced to its
    ``backbone.`` keys. Any other name (a BN's running statistics, another architecture's
    layer) is a ``ConfigError`` listing them: nothing is silently lost."""
    names = {key[len("module."):] if key.startswith("module.") else key: key for key in state_dict}
    if any(name.startswith("backbone.") for name in names):
        names = {name[len("backbone."):]: key for name, key in names.items() if name.startswith("backbone.")}
    converted: Dict[str, np.ndarray] = {}
    dropped, unknown = [], []
    for name, key in sorted(names.items()):
        target = _detectron2_name(name)
        if target:
            converted[target] = state_dict[key].detach().cpu().float().numpy()
        elif _DROPPED.match(name):
            dropped.append(name)
        else:
            unknown.append(name)
    if unknown:
        is_bn = any("running_" in n or re.search(r"(^|\.)bn\d", n) for n in unknown)
        hint = " (a BN model: convert it with detectron2's tools/convert-torchvision-to-d2.py)" if is_bn else ""
        raise ConfigError(f"{len(unknown)} names are not those of mmdetection's GN ResNet: "
                          f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}{hint}")
    if "stem.conv1.weight" not in converted:
        raise ConfigError("no conv1.weight: this is not an mmdetection ResNet state dict (expected conv1, gn1, "
                          "layer1.0.conv1, ...)")
    return converted, dropped


def load_mmdet_checkpoint(path: str, trust_file: bool = False) -> Mapping[str, torch.Tensor]:
    """The state dict of an mmdetection/mmcv checkpoint file (its ``state_dict`` entry, or the
    file itself), read with ``torch.load(weights_only=True)`` unless ``trust_file`` (mmcv's
    ``meta`` may hold objects that weights_only refuses)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint not found: {path!r}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust_file)
    except pickle.UnpicklingError as exc:
        raise UntrustedWeightsError(f"{path}: torch.load(weights_only=True) refuses objects in it "
                                    f"({str(exc).splitlines()[-1][:200]}); if you trust the file, pass --trust-file") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a state dict (or a dict with 'state_dict'), found {type(data).__name__}")
    return data


def save_detectron2_weights(weights: Mapping[str, np.ndarray], path: str, author: str = "mmdetection") -> None:
    """Write ``weights`` as detectron2's model-zoo ``.pkl`` (``{"model", "__author__",
    "matching_heuristics"}``, what its torchvision converter writes): loadable as
    ``MODEL.WEIGHTS``, names matched to the model's (``backbone.bottom_up.`` prefixed) by
    detectron2's heuristics. ``path`` must end in ``.pkl`` (detectron2 reads the format by it)."""
    if not path.endswith(".pkl"):
        raise ConfigError(f"output {path!r}: write a .pkl (detectron2's model-zoo format, chosen by the suffix), "
                          "e.g. weights/R-50-GN-WS.pkl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"model": dict(weights), "__author__": author, "matching_heuristics": True}, f)
