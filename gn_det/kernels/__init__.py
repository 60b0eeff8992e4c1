"""GN compute: Triton kernels (CUDA), PyTorch operations (CPU), and the custom op joining them."""
from .activation import ACTIVATIONS, activation_code
from .group_norm_op import backend, group_norm, triton_enabled_for
from .routing import load_routes

backend()  # a GN_DET_BACKEND that is not a backend fails here, at import, with the fix
load_routes()  # so does a malformed routes file (GN_DET_ROUTES or the package's), naming the route

__all__ = ["ACTIVATIONS", "activation_code", "backend", "group_norm", "triton_enabled_for"]
