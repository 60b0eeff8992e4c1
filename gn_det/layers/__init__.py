"""gn_det's layers."""
from .group_norm import GroupNorm, resolve_num_groups

__all__ = ["GroupNorm", "resolve_num_groups"]
