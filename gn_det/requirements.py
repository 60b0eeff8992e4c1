"""The oldest torch gn_det runs on, checked by ``import gn_det`` before anything else is
loaded: an older torch stops the import with one line naming both versions, not with a
traceback from inside torch (torch is not a pip requirement: see pyproject.toml).

Why 2.5: ``torch.library.custom_op`` with fake implementations and registered autograd (the
GN operator, ``gn_det.ops.autograd``) is complete from 2.5 on (2.4 introduced it).
Features newer than the minimum are checked where used and say which torch has them:
output recomputation inside outer saved-tensor hooks (``save_on_cpu``) needs 2.8. (ONNX
export with ``dynamo=True`` works from 2.5: there the exported graph holds gn_det's op, which
the exporter replaces by its decomposition, ``gn_det.ops.autograd``.)
"""
import re
from typing import Tuple

__all__ = ["MIN_TORCH", "check_torch", "version_tuple"]

MIN_TORCH = "2.5"


def version_tuple(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"2.5.1+cu124"``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch() -> None:
    """ImportError (one line) unless torch >= ``MIN_TORCH`` is importable."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"gn_det needs torch >= {MIN_TORCH}, which is not importable here ({exc}); install torch "
                          "first (README: Install)") from None
    if version_tuple(torch.__version__) < version_tuple(MIN_TORCH):
        raise ImportError(f"gn_det needs torch >= {MIN_TORCH}; this environment has torch {torch.__version__} "
                          f"(upgrade torch and its torchvision, e.g. GN_DET_TORCH=torch==2.5.1 "
                          "GN_DET_TORCHVISION=torchvision==0.20.1 bash tools/setup_env.sh)") from None
