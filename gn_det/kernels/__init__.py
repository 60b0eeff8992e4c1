"""GN compute: Triton kernels (CUDA), PyTorch operations (CPU), and the custom op joining them."""
from .activation import ACTIVATIONS, activation_code
from .group_norm_op import group_norm, triton_enabled_for

__all__ = ["ACTIVATIONS", "activation_code", "group_norm", "triton_enabled_for"]
