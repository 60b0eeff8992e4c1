"""Memory layouts the GN kernels accept: contiguous or channels_last-contiguous."""
from __future__ import annotations

from typing import Optional

import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format x is dense in (channels_last formats only for 4-D/5-D tensors)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def suggested_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The format a copy of a non-dense x should take: channels_last when x's strides
    put channels innermost (a strided view of a channels_last tensor), else contiguous."""
    if x.dim() in (4, 5) and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous():
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def to_dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous or channels_last-contiguous, else a copy in the nearest of those."""
    if x.is_contiguous() or memory_format_of(x) is not torch.contiguous_format:
        return x
    return x.contiguous(memory_format=suggested_memory_format(x))


def flat_spatial_stride(t: torch.Tensor) -> Optional[int]:
    """The stride of t's spatial dims flattened into one axis, or None when they don't flatten."""
    if t.dim() <= 2:
        return 1
    expected = None
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if expected is None:
            inner = expected = stride
        elif stride != expected:
            return None
        expected *= size
    return 1 if expected is None else inner
