"""Each image's own region in a padded batch: what GN layers that ignore padding read.

detectron2 pads every image of a batch at its bottom and right, with zeros, to the batch's
largest size rounded up to the backbone's ``size_divisibility`` (``ImageList.from_tensors``).
Inside ``image_regions(image_sizes, padded_size)``, a gn_det ``GroupNorm`` whose
``ignore_padding`` is set (the layers that normalize dense maps: backbone, FPN, dense heads;
``MODEL.GN.IGNORE_PADDING`` sets it at build) computes each image's group statistics over that
image's own region at its level only, and writes 0 in the rest, so an image's result does not
depend on the images batched with it. Outside such a block, or in a layer without the flag, GN
normalizes the whole tensor, as ``nn.GroupNorm`` does.

The rule for a map ``(N, C, H, W)`` of a padded input ``(Ph, Pw)``, per axis: the stride is the
power of two with ``ceil(P / s) == H`` (what a chain of stride-2 layers with ``ceil`` sizes gives:
convolutions padded by ``k // 2``, detectron2's max pools; P6 of a 96-row input has 2 rows at
stride 64, not 48), else ``P / H`` when that is a whole number; the image of size ``(h, w)``
holds the top-left ``ceil(h / s) x ceil(w / s)`` positions. That region is the same when the image is run alone and in any batch
(``ceil(ceil(h / a) / b) == ceil(h / (a b))``), so what is computed from it is too. With
``size_divisibility`` 0 or not a multiple of the largest stride the rule still holds for such
stride-2 chains; a map whose size fits no such stride raises ``PaddingError`` naming it. LSJ's
square padding (``padding_constraints``) is padding like any other.

The sizes reach the op as an ``(N, 2)`` int32 tensor of valid (height, width) per image, computed
from the sizes by tensor operations (never a host cache keyed on their values), so
``torch.compile`` sees a tensor argument and multi-scale training does not recompile per size.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from .errors import ConfigError
from .ops.torch_path import region_mask

__all__ = ["ImageRegions", "PaddingError", "current_regions", "image_regions", "level_stride", "valid_sizes_for",
           "edge_replicated", "zero_outside"]


class PaddingError(ConfigError):
    """A map whose size does not follow the padded input's by a stride (``level_stride``), or a
    batch whose size is not the number of images."""


def level_stride(padded: int, size: int) -> int:
    """The stride of a map axis of ``size`` positions over a padded input axis of ``padded``
    (module docstring's rule): the power of two ``s`` with ``ceil(padded / s) == size``, else the
    whole ratio ``padded / size``; ``PaddingError`` when neither fits."""
    if size <= 0:
        raise PaddingError(f"a feature map with an axis of {size} positions")
    s = 1
    while s <= 2 * padded:
        if -(-padded // s) == size:
            return s
        s *= 2
    if padded % size == 0:
        return padded // size
    raise PaddingError(f"a feature map axis of {size} positions is no stride of the padded input's {padded}: "
                       f"neither ceil({padded}/2^k) == {size} for any k nor {padded}/{size} is whole")


class ImageRegions:
    """The images of one padded batch: ``sizes`` ``(N, 2)`` int64 (height, width of each image)
    and the padded input's ``(height, width)``. ``valid_sizes(x)`` gives a map's valid region per
    image, computed once per map size and device while the block lasts."""

    def __init__(self, sizes: torch.Tensor, padded_size: Tuple[int, int]) -> None:
        self.sizes, self.padded_size = sizes, (int(padded_size[0]), int(padded_size[1]))
        self._by_level: Dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.sizes.shape[0]

    def valid_sizes(self, x: torch.Tensor, where: str = "") -> torch.Tensor:
        """``(N, 2)`` int32 on x's device: the valid (height, width) of each image in map x
        ``(N, C, H, W)``, ``ceil(image size / stride)`` clamped to the map."""
        if x.dim() != 4:
            raise PaddingError(f"{where or 'a GN layer'} that ignores padding got a {x.dim()}-D input {tuple(x.shape)}: "
                               f"only (N, C, H, W) feature maps have image regions")
        if x.shape[0] != len(self):
            raise PaddingError(f"{where or 'a GN layer'} that ignores padding got a batch of {x.shape[0]} inside "
                               f"image_regions of {len(self)} images: only layers over the images' own feature maps "
                               f"may ignore padding (never ROI heads)")
        h, w = x.shape[2], x.shape[3]
        key = (h, w, x.device)
        valid = self._by_level.get(key)
        if valid is None:
            try:
                stride = torch.tensor([level_stride(self.padded_size[0], h), level_stride(self.padded_size[1], w)])
            except PaddingError as exc:
                raise PaddingError(f"{where or 'a GN layer'}: {exc} (padded input {self.padded_size}, map "
                                   f"{tuple(x.shape)})") from None
            stride = stride.to(self.sizes.device)
            valid = torch.minimum(torch.div(self.sizes + stride - 1, stride, rounding_mode="floor"),
                                  torch.tensor([h, w], device=self.sizes.device))
            valid = valid.to(device=x.device, dtype=torch.int32, non_blocking=True).contiguous()
            self._by_level[key] = valid
        return valid


_STATE = threading.local()


def current_regions() -> Optional[ImageRegions]:
    """The innermost ``image_regions`` block's images (this thread's), or None."""
    return getattr(_STATE, "regions", None)


@contextlib.contextmanager
def image_regions(image_sizes: Union[Sequence[Tuple[int, int]], torch.Tensor],
                  padded_size: Union[Tuple[int, int], torch.Size]) -> Iterator[ImageRegions]:
    """Within this block, gn_det GN layers with ``ignore_padding`` normalize each image over its
    own region: ``image_sizes`` the images' (height, width) before padding (detectron2's
    ``ImageList.image_sizes``, a list of pairs or an ``(N, 2)`` tensor), ``padded_size`` the
    batch tensor's (height, width) (``images.tensor.shape[-2:]``). detectron2's meta-architectures
    open it themselves when built with ``MODEL.GN.IGNORE_PADDING`` (``gn_det.modeling.padding``);
    a project whose model calls its backbone on its own padded tensor wraps that call::

        with gn_det.image_regions(images.image_sizes, images.tensor.shape[-2:]):
            features = self.backbone(images.tensor)
    """
    if isinstance(image_sizes, torch.Tensor):
        sizes = image_sizes.reshape(-1, 2).long()
    else:
        sizes = torch.tensor([[int(h), int(w)] for h, w in image_sizes], dtype=torch.long).reshape(-1, 2)
    regions = ImageRegions(sizes, tuple(padded_size))
    outer = current_regions()
    _STATE.regions = regions
    try:
        yield regions
    finally:
        _STATE.regions = outer


def valid_sizes_for(x: torch.Tensor, where: str = "") -> Optional[torch.Tensor]:
    """x's valid region per image in the current ``image_regions`` block, or None outside one."""
    regions = current_regions()
    return None if regions is None else regions.valid_sizes(x, where)



def zero_outside(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x ``(N, C, H, W)`` with 0 outside each image's region ``valid`` ``(N, 2)``: for the few maps
    of a model that no GN zeroes but a convolution reads (a stem's max pool, which spreads an
    image's last row one position into the padding; RetinaNet's P6 and P7, convolutions without
    a norm). Out of place."""
    return x.masked_fill(~region_mask(x, valid), 0)


def edge_replicated(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x ``(N, C, H, W)`` with each image's last row and column of its region ``valid`` ``(N, 2)``
    repeated over the rest of the map: what ROI heads pool from. ROIAlign clamps a sample beyond
    a map's last position to that position, but reads a padded batch's next position with its
    bilinear weight; with the region's edge repeated, an ROI at an image's bottom or right edge
    pools the same values whether the image's map ends at its region or continues into padding."""
    n, c, h, w = x.shape
    last = (valid.long() - 1).clamp(min=0)
    rows = torch.minimum(torch.arange(h, device=x.device), last[:, :1])  # (N, H)
    cols = torch.minimum(torch.arange(w, device=x.device), last[:, 1:])  # (N, W)
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))
