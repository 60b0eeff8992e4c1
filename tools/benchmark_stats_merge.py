#!/usr/bin/env python
"""How the split forward's statistics are best merged: the three ways timed side by side.

The split-reduction forward writes per-(split, channel) records, and its apply kernel needs each
group's mean and rstd. ``group_norm_triton._stats_merge`` picks how: every apply program merges
its channels' records itself (``by lanes``, where channel blocks hold whole groups; ``gathered``
otherwise), or one launch of its own finalizes them first (``finalized``). It weighs the records
one apply program loads against a finalize launch, but every apply program repeats its merge: in
channels_last, where a sample's channels fit one block and the records come in up to hundreds of
splits, that may be why the H200's channels_last forward ran 4x slower than NCHW's at the stem
(0.17 against 0.04 ms, bf16; docs/PERFORMANCE.md). This measures instead of guessing: for each
shape, dtype and layout, the forward's device time with each way that applies forced (the
heuristic's own choice marked), the outputs of the ways compared (they must agree to rounding).

    python tools/benchmark_stats_merge.py                       # GPU: the stem, res2, FPN P3/P4, bf16
    python tools/benchmark_stats_merge.py --dtypes float32,bfloat16 --shapes "stem N=1,FPN P4"

Writes ``stats_merge_<machine>.{md,json}`` under benchmarks/results/ (--out-dir). On CPU it runs
the kernels under Triton's interpreter (set TRITON_INTERPRET=1 GN_DET_TRITON_ON_CPU=1) at small
stand-ins, for its test; those times mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
from typing import Callable, Dict, Iterator, List

import torch
from bench_utils import command_line, result_stem, write_result_files

from gn_det.diagnostics.bench.layer_shapes import MASK_RCNN_SHAPES
from gn_det.ops import triton_launch as kernels
from gn_det.policy.timing import DeviceTimer
from gn_det.tolerances import TOLERANCE, scaled_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAYS = {"by lanes": kernels.STATS_BY_LANES, "gathered": kernels.STATS_GATHERED, "finalized": kernels.STATS_FINALIZED}
GPU_DEFAULT = ("stem N=1", "stem N=2", "res2 N=1", "FPN P3 N=1", "FPN P3", "FPN P4")
CPU_SHAPES = {"small": (1, 64, 48, 48)}  # groups too big for one program; one channel block in channels_last
GROUPS = 32


@contextlib.contextmanager
def _stats_merge_as(choose: Callable[..., int]) -> Iterator[None]:
    """``group_norm_triton._stats_merge`` replaced by ``choose`` inside the block."""
    chosen = kernels._stats_merge
    kernels._stats_merge = choose
    try:
        yield
    finally:
        kernels._stats_merge = chosen


def forward_with(way: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The kernels' forward (GN + ReLU) with the statistics merged ``way``."""
    with _stats_merge_as(lambda *args, **kwargs: way):
        return kernels.triton_group_norm_forward(x, weight, bias, None, GROUPS, 1e-5, kernels.ACT_RELU)[0]


def heuristic_way(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> int:
    """The way ``_stats_merge`` picks for x (recorded from one forward)."""
    seen: List[int] = []
    chosen = kernels._stats_merge
    with _stats_merge_as(lambda *args, **kwargs: seen.append(chosen(*args, **kwargs)) or seen[-1]):
        kernels.triton_group_norm_forward(x, weight, bias, None, GROUPS, 1e-5, kernels.ACT_RELU)
    return seen[0] if seen else -1  # (-1: a one-program-per-group shape, nothing to merge)


def measure(name: str, shape, dtype: torch.dtype, fmt: torch.memory_format, device: str, timer: DeviceTimer,
            reps: int) -> Dict:
    x = (torch.randn(shape, device=device) + 0.5).to(dtype).contiguous(memory_format=fmt)
    weight = torch.rand(shape[1], device=device) + 0.5
    bias = torch.randn(shape[1], device=device)
    chosen = heuristic_way(x, weight, bias)
    row = {"shape": name, "dims": list(shape), "dtype": str(dtype)[6:],
           "format": "channels_last" if fmt == torch.channels_last else "nchw",
           "heuristic": next((k for k, v in WAYS.items() if v == chosen), "none (one program per group)")}
    if chosen < 0:
        return row
    outputs = {}  # (the first runs compile)
    for k, v in WAYS.items():
        try:
            outputs[k] = forward_with(v, x, weight, bias)
        except ValueError:  # the launcher's refusal: by lanes needs channel blocks of whole groups
            continue
    ways = {k: WAYS[k] for k in outputs}
    reference = outputs[row["heuristic"]]
    row["max difference between ways"] = max(scaled_error(y, reference) for y in outputs.values())
    row["ways agree"] = row["max difference between ways"] <= TOLERANCE[dtype]
    times: Dict[str, List[float]] = {k: [] for k in ways}
    for _ in range(reps):  # the ways take turns in each repetition
        for k, v in ways.items():
            times[k].append(timer(lambda way=v: forward_with(way, x, weight, bias)) * 1e3)
    row["forward ms"] = {k: statistics.median(t) for k, t in times.items()}
    row["fastest"] = min(row["forward ms"], key=row["forward ms"].get)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--formats", default="channels_last,nchw")
    parser.add_argument("--shapes", default="", help="comma-separated names (GPU default: " + ", ".join(GPU_DEFAULT)
                        + "; from the layer benchmark's table)")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (default 20 on GPU, 2 on CPU)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    table = MASK_RCNN_SHAPES if gpu else CPU_SHAPES
    names = [s.strip() for s in args.shapes.split(",") if s.strip()] or (list(GPU_DEFAULT) if gpu else list(table))
    unknown = [name for name in names if name not in table]
    if unknown:
        parser.error(f"--shapes {', '.join(unknown)}: choose from {', '.join(table)}")
    formats = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
    timer = DeviceTimer(torch.device(args.device))
    reps = args.reps or (20 if gpu else 2)
    rows = []
    for name in names:
        for dtype_name in args.dtypes.split(","):
            for fmt_name in args.formats.split(","):
                row = measure(name, table[name], getattr(torch, dtype_name), formats[fmt_name], args.device, timer,
                              reps)
                rows.append(row)
                print(row, flush=True)
    machine = torch.cuda.get_device_name() if gpu else f"CPU {platform.machine()} x{os.cpu_count()}"
    lines = [f"# How the split forward's statistics merge: {machine}", "",
             f"torch {torch.__version__}; forward (GN + ReLU) device time, median of {reps}, the ways taking turns"
             f"{'' if gpu else ' (CPU: the interpreter, times meaningless)'}. Command: "
             f"`{command_line('tools/benchmark_stats_merge.py', sys.argv[1:])}`.", "",
             "| shape | dtype | format | heuristic | by lanes ms | gathered ms | finalized ms | fastest | ways agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r.get("forward ms", {})
        cells = [f"{ms[k]:.3f}" if k in ms else "-" for k in WAYS]
        lines.append(f"| {r['shape']} {tuple(r['dims'])} | {r['dtype']} | {r['format']} | {r['heuristic']} | "
                     + " | ".join(cells) + f" | {r.get('fastest', '-')} | {r.get('ways agree', '-')} |")
    meta = {"machine": machine, "torch": torch.__version__, "reps": reps,
            "command": command_line("tools/benchmark_stats_merge.py", sys.argv[1:])}
    print(write_result_files(result_stem(args.out_dir, "stats_merge", machine), meta, rows, "\n".join(lines)))


if __name__ == "__main__":
    main()
