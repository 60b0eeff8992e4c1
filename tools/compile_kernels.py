#!/usr/bin/env python
"""Compile every Triton kernel gn_det launches, for an NVIDIA GPU, on a machine without one.

gn_det's launchers run at the shapes of a Mask R-CNN R50-FPN step (the layer benchmark's
table), in every dtype, layout and activation, with a stand-in for Triton's GPU driver: the
kernels are specialised exactly as a real launch would specialise them (block sizes, warps,
arguments equal to 1 or divisible by 16), then compiled to a cubin for the target (default
sm_90, the H100/H200) instead of launched. ptxas reports each kernel's registers and spills.

This catches what Triton's interpreter cannot: code that does not compile for the GPU, and
register spills. It measures no speed.

    python tools/compile_kernels.py              # every shape, dtype, layout, activation
    python tools/compile_kernels.py --quick      # a few shapes (the test suite runs this)

Exits 1 if a kernel fails to compile or spills.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gn_det.kernels import group_norm_triton as kernels  # noqa: E402
from gn_det.kernels.activation import ACT_NONE, ACT_RELU, ACT_SILU  # noqa: E402

SHAPES = {  # the layer benchmark's shapes (tools/benchmark_norm.py), N x C x H x W
    "stem N=1": (1, 64, 400, 672), "res2": (2, 256, 200, 336), "res3": (2, 512, 100, 168),
    "res4": (2, 1024, 50, 84), "res5": (2, 2048, 25, 42), "FPN P3 N=1": (1, 256, 100, 168),
    "FPN P5": (2, 256, 25, 42), "box head": (512, 256, 7, 7), "mask head": (128, 256, 14, 14),
    "sequence": (3, 96, 1001), "volume": (2, 64, 9, 17, 23),
    "features, G = C": (8, 32),  # one channel per group and S = 1: arguments Triton folds to 1
}
QUICK = ("res2", "box head", "volume", "features, G = C")


class _CompileOnlyDriver:
    """What Triton's JIT asks of its driver before it compiles; launching is never reached
    (the cache hook below stops every call after specialisation)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def specialisations(shapes: Dict[str, tuple], dtypes, sm_count: int) -> Dict[str, dict]:
    """Run the launchers on meta tensors with the JIT's cache hook catching each launch:
    kernel key -> {"name", "compile" (what the JIT would compile), "where" (first shape)}."""
    found: Dict[str, dict] = {}
    current = {"where": ""}

    def hook(*, key, fn, compile, **_):
        name = fn.jit_function.fn.__name__
        found.setdefault(f"{name}:{key}:{compile['num_warps']}",
                         {"name": name, "fn": fn.jit_function, "compile": compile, "where": current["where"]})
        return True  # do not compile or launch here

    saved_programs = kernels._target_programs
    kernels._target_programs = lambda device_index: 4 * sm_count  # as on the GPU (4 waves per SM)
    knobs.runtime.jit_cache_hook = hook
    try:
        for shape_name, shape in shapes.items():
            for dtype in dtypes:
                formats = [torch.contiguous_format]
                formats += [torch.channels_last] if len(shape) == 4 else [torch.channels_last_3d] if len(shape) == 5 else []
                for fmt in formats:
                    x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)
                    w = torch.empty(shape[1], device="meta")
                    for act in (ACT_NONE, ACT_RELU, ACT_SILU):
                        current["where"] = f"{shape_name} {tuple(shape)} {str(dtype)[6:]} {fmt} act={act}"
                        _, mean, rstd = kernels.triton_group_norm_forward(x, w, w, 32, 1e-5, act)
                        kernels.triton_group_norm_backward(torch.empty_like(x), x, w, w, mean, rstd, 32, act)
    finally:
        knobs.runtime.jit_cache_hook = None
        kernels._target_programs = saved_programs
    return found


def compile_and_check(spec: dict, target: GPUTarget, ptxas: str) -> dict:
    """Compile one specialisation to a cubin; registers and spill bytes from ptxas -v."""
    c = spec["compile"]
    source = ASTSource(spec["fn"], c["signature"], c["constants"], c["configs"][0])
    options = {"num_warps": c["num_warps"], "num_stages": c["num_stages"], "num_ctas": c["num_ctas"]}
    compiled = triton.compile(source, target=target, options=options)
    arch = re.search(r"\.target\s+(\w+)", compiled.asm["ptx"]).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return {"kernel": spec["name"], "warps": c["num_warps"], "registers": registers, "spill_bytes": spills,
            "shared": compiled.metadata.shared, "warps_per_sm": resident_warps(registers, c["num_warps"],
                                                                                 compiled.metadata.shared),
            "where": spec["where"]}


def resident_warps(registers: int, warps: int, shared: int) -> int:
    """Warps an sm_90 SM can hold of this kernel (of 64): 64K registers, allocated per warp in
    units of 256; 32 blocks; 2048 threads; 227 KiB of shared memory per block set."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(32, 65536 // (per_warp * warps), 2048 // (32 * warps), (227 * 1024) // shared if shared else 32)
    return blocks * warps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--sm-count", type=int, default=132, help="SMs of the target GPU (132: H100 SXM)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}; float32 and bfloat16")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    shapes = {k: v for k, v in SHAPES.items() if k in QUICK} if args.quick else SHAPES
    dtypes = (torch.float32, torch.bfloat16) if args.quick else (torch.float32, torch.bfloat16, torch.float16)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    driver.set_active(_CompileOnlyDriver(target))  # for this process's life: it only compiles
    specs = specialisations(shapes, dtypes, args.sm_count)
    print(f"{len(specs)} kernel specialisations for sm_{args.arch} (triton {triton.__version__})")
    rows: List[dict] = []
    failures = 0
    for spec in specs.values():
        try:
            row = compile_and_check(spec, target, ptxas)
        except Exception as exc:  # report every failure, then exit 1
            failures += 1
            print(f"FAILED {spec['name']} at {spec['where']}: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        rows.append(row)
        failures += row["spill_bytes"] > 0
        print(f"{row['kernel']:28s} warps {row['warps']}  registers {row['registers']:3d}  spill bytes "
              f"{row['spill_bytes']:4d}  shared {row['shared']:6d}  warps/SM {row['warps_per_sm']:2d}  "
              f"first at {row['where']}")
    print(f"{len(rows)} compiled, {failures} failed or spilled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
