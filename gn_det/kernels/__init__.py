"""GN compute: Triton kernels (CUDA), PyTorch operations (CPU), and the custom op joining them."""
from .activation import ACTIVATIONS, activation_code
from .group_norm_op import backend, group_norm, triton_enabled_for

backend()  # a GN_DET_BACKEND that is not a backend fails here, at import, with the fix

__all__ = ["ACTIVATIONS", "activation_code", "backend", "group_norm", "triton_enabled_for"]
