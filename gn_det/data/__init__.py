"""Data for gn_det: synthetic detection batches (benchmarks, smoke tests)."""
from .synthetic import synthetic_batch

__all__ = ["synthetic_batch"]
