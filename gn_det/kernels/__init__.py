"""GN compute: Triton kernels (CUDA; ``group_norm_triton``), PyTorch operations (CPU;
``group_norm_torch``), the custom op and autograd joining them (``autograd``), the choice
between them (``dispatch``; ``tuning`` and ``routing`` for ATen's GroupNorm where it is faster),
and the functional ``group_norm`` (``group_norm_op``)."""
from .activation import ACTIVATIONS, activation_code
from .dispatch import backend, backend_from_environment, set_backend, triton_enabled_for
from .group_norm_op import group_norm
from .routing import set_routes
from .tuning import autotune_decisions, decisions, set_autotune, set_tuning_cache, synchronize_decisions

set_backend(backend_from_environment())  # a GN_DET_BACKEND that is not a backend fails here, at import, with the fix

__all__ = ["ACTIVATIONS", "activation_code", "autotune_decisions", "backend", "decisions", "group_norm", "set_autotune", "set_backend",
           "set_routes", "set_tuning_cache", "synchronize_decisions", "triton_enabled_for"]
