"""GN compute: Triton kernels (CUDA; ``group_norm_triton``), PyTorch operations (CPU;
``group_norm_torch``), the custom op and autograd joining them (``autograd``), which path a call
takes and why (``paths``: one function, ``decide``; ``tuning`` and ``routing`` for ATen's
GroupNorm where it is faster; ``dispatch`` runs the op's implementation), the switches that
steer it (``switches``), and the functional ``group_norm`` (``group_norm_op``)."""
from .activation import ACTIVATIONS, activation_code
from .group_norm_op import group_norm
from .paths import triton_enabled_for
from .routing import set_routes
from .switches import backend, set_autotune, set_backend
from .tuning import autotune_decisions, decisions, set_tuning_cache, synchronize_decisions

__all__ = ["ACTIVATIONS", "activation_code", "autotune_decisions", "backend", "decisions", "group_norm", "set_autotune",
           "set_backend", "set_routes", "set_tuning_cache", "synchronize_decisions", "triton_enabled_for"]
