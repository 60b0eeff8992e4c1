"""gn_det: Group Normalization for detectron2.

``gn_det.GroupNorm`` / ``gn_det.group_norm``: GN with fused Triton kernels on CUDA and
PyTorch operations on CPU, a drop-in for ``torch.nn.GroupNorm``.
"""
from .kernels import group_norm
from .layers import GroupNorm, resolve_num_groups

__version__ = "0.1.0"
__all__ = ["GroupNorm", "group_norm", "resolve_num_groups", "__version__"]
