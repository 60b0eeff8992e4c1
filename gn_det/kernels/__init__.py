"""GN compute: Triton kernels (CUDA), PyTorch operations (CPU), and the custom op joining them."""
from .activation import ACTIVATIONS, activation_code
from .group_norm_op import backend, backend_from_environment, group_norm, set_backend, triton_enabled_for
from .routing import set_routes

set_backend(backend_from_environment())  # a GN_DET_BACKEND that is not a backend fails here, at import, with the fix

__all__ = ["ACTIVATIONS", "activation_code", "backend", "group_norm", "set_backend", "set_routes", "triton_enabled_for"]
