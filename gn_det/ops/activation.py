"""The activations gn_det's GN fuses: one table, from which everything else derives.

Each ``Activation`` row holds its name, its integer code (the Triton kernels' ``ACT``
constexpr, branched on in triton_kernels.py's ``_activation``/``_activation_grad``), its
PyTorch forward (in place on a fresh temporary), its gradient (ATen's own backward kernel,
written over the recomputed input), its standard-operator form (what tracing and ONNX
export record) and its largest derivative (verification's gradient tolerances). Names
accepted by the layer, route keys, error messages, the compile check's specialisations
(tools/compile_kernels.py) and the tests' cases (tests/gn_cases.py) come from
``ACTIVATION_TABLE``. Adding an activation: a row here, and in triton_kernels.py a branch in
the two Triton helpers; then its tests.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS", "ACTIVATION_NAMES", "ACTIVATION_TABLE", "ACT_NONE", "ACT_RELU", "ACT_SILU", "Activation",
    "RESIDUAL_ADD", "RESIDUAL_NONE", "RESIDUAL_OUTPUT",
    "activation_code", "activation_grad_", "apply_activation", "export_activation",
]


@dataclasses.dataclass(frozen=True)
class Activation:
    name: Optional[str]  # as the layer's ``activation=`` takes it (None: no activation)
    code: int  # the kernels' ACT constexpr
    forward_: Callable[[torch.Tensor], torch.Tensor]  # act(z), in place on z
    grad_: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, grad) -> d act/dz * grad, written over z
    export: Callable[[torch.Tensor], torch.Tensor]  # standard operators (tracing, ONNX)
    max_slope: float = 1.0  # max |d act/dz|: how much the activation may grow a gradient's rounding


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


ACTIVATION_TABLE: Tuple[Activation, ...] = (
    Activation(None, 0, _identity, lambda z, grad: grad, _identity),
    # ATen's threshold/silu backward: one pass each (grad * (z > 0) takes a float-times-bool
    # promotion path, ~50x slower on CPU)
    Activation("relu", 1, torch.relu_, lambda z, grad: torch.ops.aten.threshold_backward.grad_input(grad, z, 0, grad_input=z),
               F.relu),
    Activation("silu", 2, lambda z: F.silu(z, inplace=True),
               lambda z, grad: torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=z), F.silu,
               max_slope=1.1),  # (1.0998 at z = 2.40)
)
assert [a.code for a in ACTIVATION_TABLE] == list(range(len(ACTIVATION_TABLE)))  # codes index the table

ACT_NONE, ACT_RELU, ACT_SILU = (a.code for a in ACTIVATION_TABLE)
# name (lower case; "none" for None) -> code; code -> name
ACTIVATIONS: Dict[Optional[str], int] = {a.name: a.code for a in ACTIVATION_TABLE}
ACTIVATIONS["none"] = ACT_NONE
ACTIVATION_NAMES: Dict[int, Optional[str]] = {a.code: a.name for a in ACTIVATION_TABLE}


# With a residual, how a backward gets the activation's input z = GN(x) + residual (the
# kernels' RES constexpr): RESIDUAL_ADD, from x and the residual, saved; RESIDUAL_OUTPUT,
# ReLU only: from the layer's output, saved instead (its sign is z's, and the next layer
# keeps it anyway; not under output recomputation, which recomputes the output from z).
RESIDUAL_NONE, RESIDUAL_ADD, RESIDUAL_OUTPUT = 0, 1, 2


def activation_code(activation: Optional[str]) -> int:
    """Resolve an activation name (None or a name of ``ACTIVATION_TABLE``: "relu", "silu";
    case-insensitive) to its code."""
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in ACTIVATIONS:
        names = ", ".join(repr(a.name) for a in ACTIVATION_TABLE)
        raise ValueError(f"Unknown GN activation {activation!r}; expected one of {names}")
    return ACTIVATIONS[key]


def apply_activation(z: torch.Tensor, code: int) -> torch.Tensor:
    """act(z) with PyTorch operations (in place where z is a fresh temporary)."""
    return ACTIVATION_TABLE[code].forward_(z)


def activation_grad_(z: torch.Tensor, grad: torch.Tensor, code: int) -> torch.Tensor:
    """d act(z)/dz * grad, written over z (a temporary the caller no longer needs: one fewer
    activation-sized allocation), by ATen's own activation backward kernels."""
    return ACTIVATION_TABLE[code].grad_(z, grad)


def export_activation(y: torch.Tensor, code: int) -> torch.Tensor:
    """act(y) with standard operators, not in place: what tracing and ONNX export record."""
    return ACTIVATION_TABLE[code].export(y)
