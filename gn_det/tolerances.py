"""How close gn_det's GN must be to a reference, per dtype: the one table that the tests
(tests/gn_cases.py), ``python -m gn_det.check`` and first-use verification (the kernels
against the PyTorch path, ``gn_det.policy.verification``) judge results by.

The error is ``scaled_error(actual, reference)``: max|actual - reference| over the tensor,
divided by max(1, max|reference|), the reference computed in float64 from the same (rounded)
inputs. A result is correct when that is at most the dtype's tolerance. Justification per dtype:

- float32: outputs are O(1); float32 accumulation over up to ~1e5 elements per group gives
  ~1e-6..1e-5 relative error.
- float16: the output itself is rounded to 11 significant bits (ulp(1) = 9.8e-4): 2 ulps.
- bfloat16: the output is rounded to 8 significant bits (ulp(1) = 7.8e-3): 2 ulps.

Gradients (``GRAD_TOLERANCE``) sum dy * xhat over the whole group before they reach dx: one
more rounding of the output dtype, and for dweight/dbias sums of N*S rounded products. A
gradient rounded to another dtype than x's (d residual, in the residual's dtype) is held to
the coarser of the two tolerances.

The statistics are float32 whatever the dtype: float32's tolerance, or beyond about 2^15
elements per group sqrt(M) float32 ulps (``stats_tolerance``: two correct float32 sums drift
that far apart in huge groups; measured on an H200: ATen's rstd and the kernels' 1.1e-5 apart
at 2^26 elements per group, 5.7e-4 at 2^31).

ReLU's derivative jumps at 0: where the exact pre-activation z is within float32 rounding of
0, a correct implementation's z (computed in float32 from the same inputs, whatever x's
dtype) may fall on either side, and its gradient there differs from the reference's by the
whole upstream gradient. ``relu_unambiguous_grad`` zeroes the upstream gradient at those
elements, so that a comparison judges the gradient everywhere else (a reference check on a
Mask R-CNN stem, 34M elements, meets a few such elements by chance).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

__all__ = ["GRAD_TOLERANCE", "STATS_TOLERANCE", "TOLERANCE", "relu_unambiguous_grad", "scaled_error",
           "stats_tolerance"]

TOLERANCE: Dict[torch.dtype, float] = {
    torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10,
}
GRAD_TOLERANCE: Dict[torch.dtype, float] = {
    torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10,
}
STATS_TOLERANCE = TOLERANCE[torch.float32]  # mean and rstd are float32 for every dtype


def stats_tolerance(group_elements: int) -> float:
    """The statistics' tolerance for groups of this many elements (the module docstring)."""
    return max(STATS_TOLERANCE, math.sqrt(group_elements) * 2.0 ** -24)


def scaled_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max|actual - reference| / max(1, max|reference|), in float64 on reference's device
    (0 for empty tensors; NaN or inf wherever actual has a NaN or inf)."""
    if reference.numel() == 0:
        return 0.0
    reference = reference.detach().double()
    actual = actual.detach().to(device=reference.device, dtype=torch.float64)
    err = (actual - reference).abs().max().item()
    return err / max(1.0, reference.abs().max().item())


def relu_unambiguous_grad(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad (an upstream gradient of relu(z)) with 0 where the exact pre-activation ``z`` (float64)
    is within float32's tolerance of 0, scaled as ``scaled_error`` scales: there an
    implementation's ReLU mask may rightly differ from the reference's (module docstring)."""
    ambiguous = z.abs() <= TOLERANCE[torch.float32] * max(1.0, float(z.abs().max())) if z.numel() else z.bool()
    return grad.masked_fill(ambiguous.to(grad.device), 0)
