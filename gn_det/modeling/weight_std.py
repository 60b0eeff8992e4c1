"""Weight Standardization in detectron2 models: the convolutions whose output feeds a GN use
standardized weights (``gn_det.layers.weight_std`` has the definitions, ``"mmcv"`` and
``"timm"``).

- ``WSConv2d``: detectron2's ``Conv2d`` that standardizes its weight in every forward (and in
  ``_conv_forward``, which fused block ends and output recomputation call to rerun it);
  ``WSTorchConv2d``: the same for torch's ``nn.Conv2d`` (a convolution followed by its norm in
  an ``nn.Sequential``, as in detectron2's RetinaNet head). They have the same parameters and
  state_dict keys: a module becomes one by a class change, in place (``standardize_weights``),
  so a detectron2 checkpoint loads into a model with WS or without.
- Which convolutions: ``standardize_weights(model, variant)`` changes every convolution that
  feeds a gn_det GN (``MODEL.GN.WEIGHT_STANDARDIZATION``: run by every build path through
  ``finish_model``), and, whatever ``variant``, every one whose norm asks for it: a norm built
  by the ``"FastGNWS"`` norm name or by ``ws_norm(...)`` (one layer), or under settings with
  weight standardization. A norm that asks for it and follows no convolution gn_det can see is
  an error when the model is built; one run while its convolution was never standardized (a
  module built in Python outside detectron2's build functions and ``build_lazy_model``,
  without a call to ``standardize_weights``) raises instead of silently running without it.
- Training: the standardization is part of autograd (its gradient flows to the weight). Where
  no gradient reaches the weight (eval, ``no_grad``, frozen stages), the standardized weight is
  cached per convolution and made again when the weight changes (its version counter: an
  optimizer step, ``load_state_dict``, an in-place write to the parameter), is replaced, or the
  module's mode is set (``train()``/``eval()``). A write through ``weight.data`` bypasses the
  version counter: code that writes weights that way (some EMA implementations) is seen at
  its next ``model.eval()``/``train()``. Under ``torch.compile``, tracing and ONNX
  export it is computed in the graph (standard reductions and elementwise operators).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple, Union

import torch
from detectron2.layers import Conv2d
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.group_norm import GroupNorm
from ..layers.weight_std import (REQUEST_ATTR, WEIGHT_STANDARDIZATIONS, WSVariant, awaits_standardization,
                                  in_graph_capture, remove_unstandardized_guard, request_weight_standardization,
                                  resolve_weight_standardization, standardize_weight)

__all__ = ["WSConv2d", "WSTorchConv2d", "request_weight_standardization", "standardize_weights", "ws_norm"]

class _StandardizedWeight:
    """What a convolution class needs to standardize its weight (mixed into detectron2's
    ``Conv2d`` and torch's ``nn.Conv2d``): the variant, the cached standardized weight, and
    ``_conv_forward`` using it. ``_plain`` is the class a module is converted from."""

    _plain: type
    _plain_name: str  # for messages

    def _set_variant(self, variant: Union[str, WSVariant]) -> None:
        spec = resolve_weight_standardization(variant)
        if spec is None:
            raise ValueError(f"{type(self).__name__} needs a weight standardization variant: "
                             f"{', '.join(repr(n) for n in WEIGHT_STANDARDIZATIONS)}")
        fan_in = self.weight[0].numel()
        if spec.unbiased and fan_in < 2:
            raise ValueError(f"weight standardization {spec.name!r} of a convolution with {fan_in} input element per "
                             "output channel: its unbiased std of one value is NaN; use 'timm' or leave this layer "
                             "unstandardized")
        self.weight_standardization = spec
        self.__dict__.pop("_ws_cache", None)

    @classmethod
    def convert(cls, conv: nn.Conv2d, variant: Union[str, WSVariant] = "mmcv"):
        """Make ``conv`` (exactly of the class this one standardizes, or already of this one)
        standardize its weight with ``variant``, in place (parameters, hooks, device kept).
        Returns it."""
        if type(conv) not in (cls._plain, cls):
            raise TypeError(f"weight standardization: {type(conv).__name__} is not {cls._plain_name} (its forward is its "
                            f"own, which {cls.__name__} would replace); "
                            "standardize its weight in its forward with gn_det.layers.weight_std.standardize_weight")
        conv.__class__ = cls
        conv._set_variant(variant)
        return conv

    def standardized_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """``weight`` (default: this layer's) standardized: computed with autograd where a
        gradient reaches the weight or in a graph being captured, else cached per weight
        version."""
        weight = self.weight if weight is None else weight
        if (weight.requires_grad and torch.is_grad_enabled()) or in_graph_capture():
            return standardize_weight(weight, self.weight_standardization)
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
        cache = self.__dict__.get("_ws_cache")
        if cache is not None and cache[0] is weight and cache[1] == key:
            return cache[2]
        # made outside inference mode, so that a frozen layer's cached weight can be saved for
        # the input's gradient in a later training step
        with torch.inference_mode(False), torch.no_grad():
            standardized = standardize_weight(weight, self.weight_standardization)
        self.__dict__["_ws_cache"] = (weight, key, standardized)
        return standardized

    def train(self, mode: bool = True):
        # (writes through .data, which the cache's version key cannot see, come before a mode change)
        self.__dict__.pop("_ws_cache", None)
        return super().train(mode)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return super()._conv_forward(input, self.standardized_weight(weight), bias)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_ws_cache", None)  # derived: not pickled with the module
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_standardization={self.weight_standardization.name}"


class WSConv2d(_StandardizedWeight, Conv2d):
    """detectron2's ``Conv2d`` with its weight standardized in every forward (``variant``:
    ``"mmcv"`` or ``"timm"``). Input ``(N, C_in, H, W)``, output ``(N, C_out, H', W')`` as
    ``Conv2d``'s; the same parameters and state_dict keys. Made from a ``Conv2d`` in place
    with ``WSConv2d.convert(conv, variant)``, or built like a ``Conv2d`` with the keyword-only
    ``weight_standardization``."""

    _plain, _plain_name = Conv2d, "detectron2's Conv2d"

    def __init__(self, *args, weight_standardization: Union[str, WSVariant] = "mmcv", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._set_variant(weight_standardization)

    def forward(self, x: Tensor) -> Tensor:  # (Conv2d's own calls F.conv2d, not _conv_forward)
        x = self._conv_forward(x, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class WSTorchConv2d(_StandardizedWeight, nn.Conv2d):
    """torch's ``nn.Conv2d`` with its weight standardized in every forward: a convolution
    followed by its norm in an ``nn.Sequential`` (detectron2's RetinaNet head, many projects'
    heads). The same parameters and state_dict keys; made in place by ``convert``."""

    _plain, _plain_name = nn.Conv2d, "torch's nn.Conv2d"


def _conv_norm_pairs(model: nn.Module) -> Iterator[Tuple[str, nn.Conv2d, nn.Module]]:
    """``(name, conv, norm)`` for each convolution of ``model`` whose output feeds a norm module:
    a detectron2 ``Conv2d`` and its ``norm``; a torch ``nn.Conv2d`` and the module after it in an
    ``nn.Sequential``."""
    for name, module in model.named_modules():
        norm = getattr(module, "norm", None)
        if isinstance(module, Conv2d) and isinstance(norm, nn.Module):
            yield name, module, norm
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (_, after) in zip(children, children[1:]):
                if type(conv) in (nn.Conv2d, WSTorchConv2d):
                    yield f"{name}.{conv_name}" if name else conv_name, conv, after


def standardize_weights(model: nn.Module, variant: Union[str, WSVariant, None] = None) -> List[str]:
    """Standardize, in place, the weights of ``model``'s convolutions whose output feeds a GN
    (a detectron2 ``Conv2d`` and its ``norm``; a torch ``nn.Conv2d`` followed by its norm in an
    ``nn.Sequential``): with ``variant`` (``"mmcv"``, ``"timm"``), every one feeding a gn_det
    GN; whatever ``variant`` (None: only these), every one whose norm asks for it
    (``request_weight_standardization``, in its own variant). Idempotent; state_dict keys
    unchanged. Returns the names of the convolutions that standardize now. A norm in
    ``model`` that asks for it and follows no such convolution is a ``ConfigError`` naming it."""
    default = resolve_weight_standardization(variant)
    changed = []
    for name, conv, norm in list(_conv_norm_pairs(model)):
        spec = resolve_weight_standardization(getattr(norm, REQUEST_ATTR, None))
        if spec is None and default is not None and isinstance(norm, GroupNorm):
            spec = default
        if spec is None:
            continue
        try:
            (WSConv2d if isinstance(conv, Conv2d) else WSTorchConv2d).convert(conv, spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name or type(model).__name__}: {exc}") from None
        remove_unstandardized_guard(norm)
        changed.append(name)
    orphans = [name or type(model).__name__ for name, module in model.named_modules() if awaits_standardization(module)]
    if orphans:
        raise ConfigError(
            f"{', '.join(orphans[:4])}{' ...' if len(orphans) > 4 else ''}: "
            f"{'this norm asks' if len(orphans) == 1 else f'these {len(orphans)} norms ask'} for weight standardization "
            "of the convolution before it, and no convolution is known to feed it: gn_det standardizes a detectron2 "
            "Conv2d's norm= and a torch nn.Conv2d followed by its norm in an nn.Sequential; build this norm where "
            "weight standardization is off (MODEL.GN.WEIGHT_STANDARDIZATION \"\", or a norm name without WS for this "
            "layer), or standardize the convolution's weight in its forward (gn_det.layers.weight_std.standardize_weight)")
    return changed


def ws_norm(norm="FastGN", variant: str = "mmcv"):
    """A norm factory ``channels -> module`` for one layer's ``norm=``: ``norm`` (a norm name
    or a factory, as detectron2's ``get_norm`` takes) whose convolution standardizes its
    weight with ``variant``. In a LazyConfig:
    ``conv_norm=L(gn_det.ws_norm)(norm=L(gn_det.GroupNorm.factory)(num_groups=16), variant="timm")``."""
    spec = resolve_weight_standardization(variant)
    if spec is None:
        raise ValueError(f"ws_norm: variant={variant!r}: name one of {', '.join(map(repr, WEIGHT_STANDARDIZATIONS))}")

    def build(channels: int) -> nn.Module:
        from .norm import get_norm

        module = get_norm(norm, channels)
        if module is None:
            raise ConfigError(f"ws_norm: norm={norm!r} builds no norm layer; weight standardization needs one to ask")
        return request_weight_standardization(module, spec)

    return build
