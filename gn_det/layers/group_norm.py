"""``GroupNorm``: a drop-in for ``torch.nn.GroupNorm`` with fused kernels and activation."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import init

from .. import padding as _padding
from .. import recompute as _recompute
from ..config import GNSettings, SettingError, argument_key, check_setting, groups_for
from ..ops.activation import ACTIVATION_NAMES, activation_code
from ..policy.calls import call_for

__all__ = ["GroupNorm", "resolve_num_groups"]

# torch >= 2.14's nn.GroupNorm takes keyword-only ``bias`` (False: a scale without a shift);
# with an older torch, gn_det implements that case itself (see GroupNorm.__init__).
_NN_GROUP_NORM_HAS_BIAS = "bias" in inspect.signature(nn.GroupNorm.__init__).parameters


def resolve_num_groups(
    num_channels: int,
    num_groups: Optional[int] = None,
    channels_per_group: Optional[int] = None,
    layer: str = "",
) -> int:
    """The group count of a GN layer over ``num_channels``, from either a number of groups or
    a number of channels per group (the GN paper's two ways to set its hyperparameter).

    ``channels_per_group`` wins when it is a positive number; otherwise ``num_groups`` is
    used. The rule is ``gn_det.config.groups_for``'s: a ``SettingError`` (a ``ValueError``)
    naming the argument, the layer (``layer``) and its channels when they don't divide.
    """
    return groups_for(num_channels, num_groups, channels_per_group or 0, where=_where(layer))


def _where(layer: str) -> str:
    return f"in layer {layer!r}" if layer else ""


class GroupNorm(nn.GroupNorm):
    """Group Normalization (Wu & He, ECCV 2018) with an optional fused activation.

    A drop-in for ``torch.nn.GroupNorm``: the same constructor arguments, in the same
    positions and with the same defaults (keyword-only ``bias`` included, with any torch),
    parameters (``weight``, ``bias``: ``(C,)``, ``bias`` None when there is no shift) and
    state_dict keys, and ``isinstance(m, nn.GroupNorm)`` holds. On CUDA it runs fused Triton
    kernels (forward and backward, the activation included, NCHW and channels_last, in the
    input's dtype under autocast); on CPU it runs PyTorch operations.

    Input ``(N, C, *)``; output of the same shape, dtype and memory format.

    Args:
        num_groups: number of groups G; C must be divisible by G.
        num_channels: C.
        eps: added to the variance; > 0 (``gn_det.config``'s rule for every input: torch's own
            accepts 0, which makes a group of equal values 0 / 0).
        affine: learn a per-channel scale (and shift, see ``bias``).
        device, dtype: of the parameters, as for any torch module.
        bias: with ``affine``, also learn the per-channel shift; False: a scale without a
            shift (``bias`` is None, as in ``nn.GroupNorm(..., bias=False)``). Keyword-only.
        activation: None, "relu" or "silu" (``ops.activation.ACTIVATION_TABLE``), applied
            after the affine, fused into the kernels.
            Keyword-only (gn_det's own argument, after nn.GroupNorm's).
    """

    ignore_padding: bool = False
    """Normalize each image over its own region inside ``gn_det.image_regions`` (and write 0 in
    the padding): set on the layers over the images' own feature maps (backbone, FPN, dense
    heads) by ``MODEL.GN.IGNORE_PADDING``; never on ROI heads. Not a parameter or buffer."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
    ) -> None:
        # The layer's rules, checked once per layer built (``gn_det.config``; ``SettingError``
        # naming the argument: a caller with other terms, a config's key, re-words it).
        groups_for(num_channels, num_groups, where="in GroupNorm")
        check_setting("eps", eps, where="in GroupNorm")
        code = activation_code(activation)  # an unknown name fails before any allocation
        if _NN_GROUP_NORM_HAS_BIAS:
            super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype, bias=bias)
        else:
            super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
            if affine and not bias:
                # What torch >= 2.14 does: the shift is registered as None, so it is neither a
                # parameter nor a state_dict key (assigning None to a registered parameter
                # re-registers it as None).
                self.bias = None
        self.activation = ACTIVATION_NAMES[code]

    @property
    def activation(self) -> Optional[str]:
        """The fused activation's name (None, or a name of ``ACTIVATION_TABLE``); settable."""
        return ACTIVATION_NAMES[self._act]

    @activation.setter
    def activation(self, name: Optional[str]) -> None:
        self._act = activation_code(name)

    def __setstate__(self, state: dict) -> None:
        # A whole module pickled by a gn_det whose ``activation`` was a plain attribute.
        if "_act" not in state:
            state["_act"] = activation_code(state.pop("activation", None))
        super().__setstate__(state)

    def reset_parameters(self) -> None:
        """gamma = 1, beta = 0 (no beta without a shift): nn.GroupNorm's, also correct for
        ``bias=False`` with a torch whose own version predates that argument."""
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    @classmethod
    def from_channels(
        cls,
        num_channels: int,
        num_groups: Optional[int] = 32,
        channels_per_group: Optional[int] = None,
        layer: str = "",
        **kwargs,
    ) -> "GroupNorm":
        """Build over ``num_channels`` with G from ``num_groups`` or ``channels_per_group``
        (which wins when > 0); a broken rule's ``SettingError`` names ``layer``."""
        try:
            if channels_per_group:  # its rule here; num_groups' (and eps') in __init__
                num_groups = groups_for(num_channels, 0, channels_per_group)
            return cls(num_groups, num_channels, **kwargs)
        except SettingError as exc:
            raise exc.in_terms(argument_key, _where(layer) or exc.where) from None

    @classmethod
    def factory(
        cls,
        num_groups: int = 32,
        channels_per_group: int = 0,
        eps: float = 1e-5,
        activation: Optional[str] = None,
        **kwargs,
    ) -> Callable[[int], "GroupNorm"]:
        """A norm factory ``channels -> GroupNorm`` with these settings: what detectron2's
        ``norm=`` arguments take besides a name (``get_norm`` accepts "str or callable").

        In a LazyConfig: ``norm=L(gn_det.GroupNorm.factory)(num_groups=16, eps=1e-6)``.
        ``channels_per_group > 0`` takes precedence over ``num_groups``. Other keyword
        arguments go to the constructor: ``bias=False`` (a scale without a shift), ``affine``,
        ``device``, ``dtype``. The settings are checked here, each layer's channels when it
        is built.
        """
        try:  # the settings' rules, as for a config's (gn_det.config.GNSettings), in argument terms
            GNSettings(num_groups=num_groups, channels_per_group=channels_per_group, eps=eps)
        except SettingError as exc:
            raise exc.in_terms(argument_key, "in GroupNorm.factory") from None
        activation_code(activation)  # an unknown activation fails here, not at every layer
        return functools.partial(cls.from_channels, num_groups=num_groups, channels_per_group=channels_per_group,
                                 eps=eps, activation=activation, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recording = _recompute.recording()  # inside a recompute scope (gn_det.set_recompute_output)
        weight, bias = self.weight, self.bias  # (each a lookup in the module's parameters: once)
        valid = self._valid_sizes(x) if self.ignore_padding else None
        # (the call decided for x's signature: one lookup once decided, gn_det.policy.calls)
        y = call_for(x, self.num_groups, weight, bias, self.eps, self._act, None, recording, valid)(
            x, weight, bias, None, valid)
        if recording:
            _recompute.record_output(y, self.bias, self.eps)
        return y

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor, activation: Optional[str] = "relu") -> torch.Tensor:
        """``activation(self(x) + residual)`` in one pass: a residual block's end (its last
        norm, the shortcut add and the ReLU). x and residual ``(N, C, *)`` of the same shape;
        the output has x's dtype and memory format. Backward keeps x and, with ReLU, the
        output (which the next layer keeps anyway) instead of the sum; under output
        recomputation it keeps the residual (the block's input, kept by the block anyway) and
        the output is recomputed like any GN output. For a layer without an activation of
        its own (one would apply before the add)."""
        if self.activation is not None:
            raise ValueError(f"GroupNorm.forward_residual: this layer applies its own activation "
                             f"({self.activation!r}) before any residual could be added; use a layer without one")
        recording = _recompute.recording()
        valid = self._valid_sizes(x) if self.ignore_padding else None
        y = call_for(x, self.num_groups, self.weight, self.bias, self.eps, activation_code(activation), residual,
                     recording, valid)(x, self.weight, self.bias, residual, valid)
        if recording:
            _recompute.record_output(y, self.bias, self.eps)
        return y

    def _valid_sizes(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x's image regions inside ``gn_det.image_regions`` (None outside one)."""
        regions = _padding.current_regions()
        return None if regions is None else regions.valid_sizes(x, f"GroupNorm({self.num_groups}, {self.num_channels})")

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if not _NN_GROUP_NORM_HAS_BIAS and self.affine and self.bias is None:
            text += ", bias=False"  # what torch >= 2.14's own repr says
        return f"{text}, activation={self.activation}" if self.activation else text
