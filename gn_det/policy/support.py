"""Where gn_det's Triton kernels run: which GPUs (compute capability), which dtypes there, and
which triton. Everything else runs PyTorch's path, decided here before anything is compiled.

Supported (``SUPPORTED_ARCHITECTURES``: each compiled for by tools/compile_kernels.py without
spills and within its limits, benchmarks/results/kernels_*_compile*):

- compute capability 7.0 to 12.x: V100 (7.0), T4 and RTX 20 (7.5), A100 (8.0), A10, A40 and
  RTX 30 (8.6), L4, L40 and RTX 40 (8.9), H100/H200 (9.0), B200 (10.0), RTX 50 (12.0); a
  capability in that span but not listed (8.7, 10.3, 12.1) runs them too: same instruction
  set as its family's;
- float32 and float16 on all of them; bfloat16 from 8.0 (the first with bfloat16 arithmetic
  and conversions in hardware; torch's own bfloat16 kernels need it too);
- triton ``MIN_TRITON`` or newer (torch 2.5's triton 3.1 is older: see ``MIN_TRITON``).

Below 7.0 (Pascal and older) triton does not support the GPU (torch's inductor refuses it as "too
old to be supported by the triton GPU compiler") and gn_det's kernels were never compiled for it;
a capability above 12.x is one nobody has compiled them for: both run PyTorch's path.
``kernels_support(device, dtype)`` says which and why, once per device and dtype: one warning for
each GPU and dtype they are off for, or a single one when the triton installed is the reason (it
is for every GPU); ``python -m gn_det.env`` prints it per GPU and for the triton installed."""
from __future__ import annotations

import functools
import re
import warnings
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["MIN_TRITON", "SUPPORTED_ARCHITECTURES", "Support", "architecture_support", "describe_device",
           "kernels_support", "triton_support", "triton_version_support"]

# Compute capabilities x 10 the kernels are compiled for and checked at (tools/compile_kernels.py).
SUPPORTED_ARCHITECTURES = (70, 75, 80, 86, 89, 90, 100, 120)
MIN_ARCH, MAX_ARCH = 70, 129
BF16_MIN_ARCH = 80
# The oldest triton gn_det's kernels are checked with: 3.2's interpreter and compiler run them;
# 3.1's interpreter hands the kernels' helper functions their constexpr block sizes as arrays
# (tl.arange then fails), so 3.1 was never checked (torch 2.5's; torch 2.6 brings 3.2).
MIN_TRITON = (3, 2)


class Support(NamedTuple):
    """Whether the kernels run for a (device, dtype), and if not, why (None when they do)."""

    ok: bool
    reason: Optional[str]


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def triton_version_support(version: str) -> Optional[str]:
    """None when triton ``version`` (e.g. "3.1.0") runs the kernels, else why not, naming it,
    the triton needed and the torch that brings it."""
    if _version_tuple(version) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return (f"triton {version} is older than {need}, the oldest gn_det's kernels are checked with: "
                f"upgrade torch (2.6 or newer brings triton {need}+)")
    return None


@functools.lru_cache(maxsize=None)
def triton_support() -> Optional[str]:
    """None when the installed triton runs the kernels, else why not (not installed, too old)."""
    try:
        import triton
    except ImportError as exc:
        return f"triton is not importable ({exc}): install the triton that your torch names"
    return triton_version_support(triton.__version__)


def architecture_support(arch: int, dtype: torch.dtype) -> Optional[str]:
    """None when the kernels run in ``dtype`` on compute capability ``arch`` (x 10: 86 is 8.6),
    else why not. Device-free: tools/compile_kernels.py uses it to choose what to compile."""
    name = f"sm_{arch} (compute capability {arch // 10}.{arch % 10})"
    if arch < MIN_ARCH:
        return f"{name} is older than 7.0: triton does not support it and gn_det's kernels were never compiled for it"
    if arch > MAX_ARCH:
        return f"{name} is newer than any gn_det's kernels were compiled for (up to 12.x)"
    if dtype == torch.bfloat16 and arch < BF16_MIN_ARCH:
        return f"bfloat16 needs compute capability 8.0 or newer (Ampere); {name} has no bfloat16 arithmetic"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{dtype} is not a dtype of the kernels (float32, float16, bfloat16)"
    return None


def describe_device(index: int) -> str:
    """'NVIDIA A100-SXM4-80GB (sm_80)'."""
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=5)  # (kernels_support's caller)


def decide_support(where: str, arch: int, dtype: torch.dtype, triton_reason: Optional[str]) -> Support:
    """The decision for ``dtype`` on the GPU ``where`` ("GPU 0", naming it) of compute
    capability ``arch`` (x 10), given ``triton_support()``'s answer; warns once per GPU and
    dtype the kernels are off for, once in all when triton is why (device-free: tests give it
    a triton's answer)."""
    name = str(dtype).replace("torch.", "")
    if triton_reason is not None:  # the same for every GPU and dtype: said once
        _warn_once(f"gn_det: Triton kernels off ({triton_reason}); GroupNorm runs PyTorch's path on every GPU "
                   "(same results, no fused kernels)")
        return Support(False, f"{where}, {name}: {triton_reason}")
    reason = architecture_support(arch, dtype)
    if reason is None:
        return Support(True, None)
    reason = f"{where}, {name}: {reason}"
    _warn_once(f"gn_det: Triton kernels off for this GPU and dtype ({reason}); GroupNorm runs PyTorch's path there "
               "(same results, no fused kernels)")
    return Support(False, reason)


@functools.lru_cache(maxsize=None)
def _cuda_support(index: int, dtype: torch.dtype) -> Support:
    major, minor = torch.cuda.get_device_capability(index)
    return decide_support(f"GPU {index} ({describe_device(index)})", 10 * major + minor, dtype, triton_support())


def kernels_support(device: torch.device, dtype: torch.dtype) -> Support:
    """Whether gn_det's Triton kernels run for ``dtype`` tensors on ``device`` (a CUDA device),
    and why not: the triton installed, the device's compute capability, bfloat16 before 8.0.
    Decided once per (device, dtype), before anything is compiled; the first refusal warns."""
    if device.type != "cuda":
        return Support(False, f"{device.type} is not a CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_support(index, dtype)
