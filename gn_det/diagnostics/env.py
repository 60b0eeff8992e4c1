"""Environment report for bug reports: ``python -m gn_det.env``."""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import platform
import sys
from typing import List, Optional, Tuple


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # report, never fail: this runs when something is broken
        return f"not importable ({type(exc).__name__}: {exc})"
    return f"{getattr(mod, '__version__', '?')} @ {os.path.dirname(getattr(mod, '__file__', '') or '')}"


def detectron2_install() -> str:
    """Which install path detectron2 came from, and whether its compiled ops load."""
    try:
        import detectron2
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
    dists = metadata.packages_distributions().get("detectron2", [])
    if "sal-detectron2" in dists:
        source = "PyPI sources (sal-detectron2)"
    elif dists:
        source = f"distribution {', '.join(dists)} (git/upstream build)"
    else:
        source = "on sys.path, no distribution metadata"
    try:
        from detectron2 import _C  # noqa: F401

        ops = "compiled ops available (deformable conv, rotated ops, C++ COCOeval)"
    except Exception:
        ops = "no compiled ops (no deformable conv, no rotated ops; no C++ COCOeval of its own)"
    return f"{detectron2.__version__} @ {os.path.dirname(detectron2.__file__)}; {source}; {ops}"


def cocoeval_in_use() -> str:
    """Which COCOeval gn_det's COCO evaluator runs here (detectron2's C++, faster-coco-eval's,
    or pycocotools' Python one, with why)."""
    try:
        from ..train.evaluation import cocoeval_class

        return cocoeval_class()[1]
    except Exception as exc:  # no detectron2: the report still prints
        return f"unknown ({type(exc).__name__}: {exc})"


def kernel_support_line(index: int) -> str:
    """Where gn_det's Triton kernels run on CUDA device ``index``, per dtype, and why not
    (gn_det.policy.support)."""
    import warnings

    import torch

    from ..policy.support import kernels_support

    parts = []
    with warnings.catch_warnings():  # the reason is printed here instead
        warnings.simplefilter("ignore")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            found = kernels_support(torch.device("cuda", index), dtype)
            name = str(dtype).replace("torch.", "")
            parts.append(f"{name} Triton" if found.ok else f"{name} PyTorch path ({found.reason.split(': ', 1)[-1]})")
    return "; ".join(parts)


def supported_line() -> str:
    """What the kernels support (gn_det.policy.support), and whether this triton is one."""
    from ..policy import support

    return supported_line_for(support.triton_support())


def supported_line_for(why: Optional[str]) -> str:
    """``supported_line`` given ``support.triton_support()``'s answer (None: this triton runs them)."""
    from ..policy import support

    archs = ", ".join(f"sm_{a}" for a in support.SUPPORTED_ARCHITECTURES)
    return (f"compiled for {archs} (compute capability 7.0-12.x), bfloat16 from sm_80, triton "
            f"{'.'.join(map(str, support.MIN_TRITON))}+; "
            + ("this triton runs them" if why is None else f"off here: {why}"))


def collect_env() -> List[Tuple[str, str]]:
    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", platform.machine()),
        ("gn_det", _version("gn_det")),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("triton", _version("triton")),
        ("detectron2", detectron2_install()),
        ("COCOeval", cocoeval_in_use()),
    ]
    try:
        import torch

        rows.append(("CUDA available", str(torch.cuda.is_available())))
        rows.append(("torch CUDA build", str(torch.version.cuda)))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                rows.append((f"GPU {i}", f"{props.name} ({props.total_memory / 2**30:.0f} GiB, "
                                         f"{props.multi_processor_count} SMs)"))
                rows.append((f"GPU {i} kernels", kernel_support_line(i)))
        else:
            rows.append(("GPU", "none (gn_det runs its PyTorch path on CPU)"))
        rows.append(("gn_det kernels", supported_line()))
        rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")))
        rows.append(("GN_DET_BACKEND", os.environ.get("GN_DET_BACKEND", "unset (auto: Triton kernels on CUDA)")))
        from ..policy import tuning

        cache = tuning.tuning_cache()
        rows.append(("GN tuning", ("on (CUDA inputs)" if tuning.autotune_enabled() else "off")
                     + f"; decisions kept in {cache if cache is not None else 'this process only'}"))
    except Exception as exc:
        rows.append(("CUDA", f"unknown ({exc})"))
    return rows


def main() -> None:
    rows = collect_env()
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows))


if __name__ == "__main__":
    main()
