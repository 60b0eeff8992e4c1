"""Data for gn_det: the embedded shapes dataset, dataset checks, synthetic batches."""
from .datasets import SHAPES_TRAIN, SHAPES_VAL, check_datasets_exist, datasets_root, register_shapes_dataset
from .synthetic import synthetic_batch

__all__ = ["SHAPES_TRAIN", "SHAPES_VAL", "check_datasets_exist", "datasets_root", "register_shapes_dataset", "synthetic_batch"]
