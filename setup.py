"""gn_det: Group Normalization for detectron2, with fused Triton kernels.

`pip install -e .` into an environment that already has torch, torchvision and detectron2.
install_requires (requirements/gn_det.txt) is exactly the PyPI packages gn_det imports at run
time (tests/test_dependencies.py checks it). torch/torchvision/triton/detectron2 are
deliberately not install_requires: a detectron2 project adding gn_det must keep its own builds
(detectron2 is not on PyPI, and pip would otherwise replace a CUDA torch and its triton).
`make setup` (tools/setup_env.sh) builds a complete environment.

torch >= MIN_TORCH (gn_det/requirements.py, read here as text) is stated in the description
and checked by `import gn_det`, which refuses an older torch in one line; it is not a pip
requirement for the reason above. So is the triton the Triton kernels need, MIN_TRITON
(gn_det/kernels/support.py, read as text): an older one (torch 2.5's 3.1) turns them off, with
one warning and the reason in `python -m gn_det.env`. Tested versions: README, Compatibility.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name: str) -> list:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


MIN_TORCH = re.search(r'^MIN_TORCH = "([0-9.]+)"', (HERE / "gn_det" / "requirements.py").read_text(), re.M).group(1)
SUPPORT_PY = (HERE / "gn_det" / "kernels" / "support.py").read_text()
MIN_TRITON = ".".join(re.search(r"^MIN_TRITON = \((\d+), (\d+)\)", SUPPORT_PY, re.M).groups())

setup(
    name="gn_det",
    version="0.1.0",
    description=("Group Normalization for detectron2: fused Triton GN layers, a norm registry, GN Mask R-CNN configs "
                 f"(needs torch >= {MIN_TORCH} and detectron2, installed beforehand; the Triton kernels need triton >= "
                 f"{MIN_TRITON}, which torch 2.6+ brings: with an older one GN runs PyTorch's path)"),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gn_det", "gn_det.*"]),
    python_requires=">=3.9",
    install_requires=read_requirements("gn_det.txt"),
    extras_require={"test": read_requirements("test.txt")},
    include_package_data=True,
    package_data={"gn_det.kernels": ["routes.json"]},  # measured routes, read at run time
)
