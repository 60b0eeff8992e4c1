"""The stated torch minimum: one value (gn_det/requirements.py) that import checks, pyproject.toml's
description (the package metadata) and README state; likewise the kernels' triton minimum
(gn_det/policy/support.py); tools/compat_check.sh's usage. The check itself on an older torch runs for real in
tools/compat_check.sh (README: Compatibility)."""
import os
import subprocess

import torch

from gn_det.kernels.support import MIN_TRITON
from gn_det.requirements import MIN_TORCH, check_torch, version_tuple

try:
    import tomllib
except ImportError:  # Python < 3.11: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_this_torch_passes_and_the_minimum_is_stated_where_users_look():
    check_torch()
    assert version_tuple(torch.__version__) >= version_tuple(MIN_TORCH)
    assert version_tuple("2.5.1+cu124") == (2, 5) and version_tuple("2.10.0a0") == (2, 10)
    # The description is static text (pyproject.toml): its numbers are kept equal to the constants here.
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        description = tomllib.load(f)["project"]["description"]
    min_triton = ".".join(map(str, MIN_TRITON))
    assert f"needs torch >= {MIN_TORCH}" in description
    assert f"the Triton kernels need triton >= {min_triton}" in description
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert f"torch >= {MIN_TORCH}" in readme and f"The Triton kernels need **triton >= {min_triton}**" in readme


def test_compat_check_usage():
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "compat_check.sh"), "2.5.1"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "usage: bash tools/compat_check.sh TORCH TORCHVISION" in proc.stderr
