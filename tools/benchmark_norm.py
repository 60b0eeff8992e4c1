#!/usr/bin/env python
"""Benchmark of GN layers at the shapes of a Mask R-CNN R50-FPN step (a benchmark, not a test).

Compares, side by side in one run: gn_det GroupNorm (no activation, and with fused ReLU),
nn.GroupNorm, nn.GroupNorm + ReLU, torch.compile(nn.GroupNorm + ReLU) and detectron2's
FrozenBatchNorm2d (the no-statistics floor). Reports the median time of forward, backward and
forward+backward over several input sets (CUDA events and warm-up on GPU; perf_counter on
CPU), the effective bandwidth on the fewest bytes the op must move (read x, write y; backward:
read x and dy, write dx) and on the two-pass bytes (forward: x twice + y; backward: x and dy
twice + dx) as a fraction of the device's measured copy bandwidth, and the speed-up over
nn.GroupNorm + ReLU. Writes a markdown table and JSON under benchmarks/results/.

    python tools/benchmark_norm.py                 # the full table on a GPU (or small shapes on CPU)
    python tools/benchmark_norm.py --quick         # a few shapes, few repetitions
    python tools/benchmark_norm.py --write-routes  # measure the Triton kernels everywhere (no
                                                   # routes), then route to PyTorch's GroupNorm
                                                   # the shape buckets where they lost
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch._dynamo
from bench_utils import command_line, result_stem
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import gn_det
from gn_det.diagnostics.bench.layer_shapes import CPU_SHAPES, MASK_RCNN_SHAPES
from gn_det.policy.timing import DeviceTimer
from gn_det.policy import routing, tuning, verification
from gn_det.ops.activation import activation_code
from gn_det.policy import dispatch_path
from gn_det.ops.functional import aten_group_norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (N, C, H, W): a Mask R-CNN R50-FPN step on 1333x800 images (one table for the tools).
GPU_SHAPES = MASK_RCNN_SHAPES
QUICK = ("stem N=1", "FPN P3", "box head")


ATEN_PATH = " (ATen path)"  # suffix of the candidates that force the path a route sends shapes to


class AtenPathGroupNorm(gn_det.GroupNorm):
    """gn_det's GN forced onto the path a route sends a shape to (PyTorch's GroupNorm and
    activation, output in the input's dtype): what --write-routes weighs the kernels against."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aten_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation_code(self.activation))


def candidates(channels: int, device, aten_path: bool = False) -> Dict[str, nn.Module]:
    """name -> module; a name with "ReLU" in it includes the ReLU. aten_path adds gn_det's GN
    forced onto PyTorch's GroupNorm (for --write-routes)."""
    gn = nn.GroupNorm(32, channels).to(device)
    gn_relu = nn.Sequential(nn.GroupNorm(32, channels), nn.ReLU()).to(device)
    frozen = FrozenBatchNorm2d(channels).to(device)
    frozen.weight.uniform_()  # buffers: no gradient, as in detectron2's frozen stages
    out = {
        "gn_det GN": gn_det.GroupNorm(32, channels).to(device),
        "gn_det GN+ReLU (fused)": gn_det.GroupNorm(32, channels, activation="relu").to(device),
        "nn.GroupNorm": gn,
        "nn.GroupNorm+ReLU": gn_relu,
        "compile(nn.GroupNorm+ReLU)": torch.compile(nn.Sequential(nn.GroupNorm(32, channels), nn.ReLU()).to(device)),
        "FrozenBatchNorm2d": frozen,
    }
    if aten_path:
        out["gn_det GN" + ATEN_PATH] = AtenPathGroupNorm(32, channels).to(device)
        out["gn_det GN+ReLU (fused)" + ATEN_PATH] = AtenPathGroupNorm(32, channels, activation="relu").to(device)
    return out


def measure_all(modules: Dict[str, nn.Module], inputs: List[torch.Tensor], grads: List[torch.Tensor], timer: DeviceTimer,
                warmup: int, reps: int, autocast_dtype) -> Dict[str, Dict[str, float]]:
    """name -> median seconds of forward, backward and forward+backward (or an error). The
    candidates take turns within every repetition, in an order that rotates, so drift over
    the run (clocks, caches, the allocator) falls on all of them alike; each repetition
    uses the next input set."""
    device_type = inputs[0].device.type
    times = {name: {"fwd": [], "bwd": [], "fwd+bwd": [], "fwd+bwd host": []} for name in modules}
    errors: Dict[str, Dict[str, str]] = {}

    def one(module, x, g, record):
        def forward():
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return module(x)

        x.grad = None
        holder = {}
        t_fwd = timer(lambda: holder.__setitem__("y", forward()))
        y = holder["y"]
        g = g.to(y.dtype)  # nn.GroupNorm's output is float32 under autocast
        t_bwd = timer(lambda: y.backward(g))
        t_both = timer(lambda: forward().backward(g))
        if record is not None:
            record["fwd"].append(t_fwd)
            record["bwd"].append(t_bwd)
            record["fwd+bwd"].append(t_both)
            record["fwd+bwd host"].append(timer.host_seconds)

    names = list(modules)
    for i in range(warmup + reps):
        x, g = inputs[i % len(inputs)], grads[i % len(grads)]
        # The first to run after the input set changes finds it out of cache: rotate who that is.
        for name in names[i % len(names):] + names[:i % len(names)]:
            if name in errors:
                continue
            try:
                one(modules[name], x, g, times[name] if i >= warmup else None)
            except Exception as exc:  # report, do not stop the table
                errors[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return {name: errors.get(name) or {k: statistics.median(v) for k, v in times[name].items()} for name in modules}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth, bytes/s (read + write)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = DeviceTimer(device)
    for _ in range(3):
        dst.copy_(src)
    seconds = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(10))
    return 2 * n * 4 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--formats", default="nchw,channels_last")
    parser.add_argument("--quick", action="store_true", help="three shapes, few repetitions")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--input-sets", type=int, default=3, help="distinct inputs cycled through (defeats cache reuse)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--suffix", default="", help="appended to the result files' names (a partial table)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds; rows not started by then are "
                        "left out and listed (the table is still written)")
    parser.add_argument("--write-routes", nargs="?", const=str(routing.ROUTES_FILE), default=None, metavar="FILE",
                        help="run the Triton kernels on every shape (routes off), then update FILE (default: "
                        "the package's routes.json) with a route to PyTorch's GroupNorm for each shape bucket "
                        "where they were slower than nn.GroupNorm(+ReLU), and remove the routes of buckets "
                        "where they were faster")
    args = parser.parse_args()
    gn_det.set_autotune(False)  # the kernels' rows measure the kernels; ATen's path has rows of its own
    if args.write_routes:
        routing.set_routes(None)  # measure the kernels themselves
    # Every shape, dtype and layout is a new graph for torch.compile: let it recompile rather
    # than fall back to eager when dynamo's default limit (8) is reached.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    device = torch.device(args.device)
    is_gpu = device.type == "cuda"
    shapes = GPU_SHAPES if is_gpu else CPU_SHAPES
    if args.quick:
        shapes = {k: v for k, v in shapes.items() if k in QUICK} or dict(list(shapes.items())[:3])
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    reps = args.reps if args.reps is not None else (3 if args.quick else (20 if is_gpu else 18))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if not is_gpu:
        dtypes = [torch.float32]  # half precision on CPU is computed in float32: not a speed path
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    machine = (torch.cuda.get_device_name(device) if is_gpu
               else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}")
    bandwidth = copy_bandwidth(device)
    timer = DeviceTimer(device)
    rows = []
    started = time.monotonic()
    cases = [(name, shape, dtype, fmt_name) for name, shape in shapes.items() for dtype in dtypes
             for fmt_name in args.formats.split(",")]
    skipped = []
    for shape_name, shape, dtype, fmt_name in cases:
        if args.time_limit and time.monotonic() - started > args.time_limit:
            skipped.append(f"{shape_name} {str(dtype).replace('torch.', '')} {fmt_name}")
            continue
        numel = math.prod(shape)
        fmt = formats[fmt_name]
        gen = torch.Generator(device="cpu").manual_seed(0)
        inputs = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt).requires_grad_()
                  for _ in range(args.input_sets)]
        grads = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt)
                 for _ in range(args.input_sets)]
        # Half-precision inputs run under autocast, as in mixed-precision training:
        # nn.GroupNorm is upcast to float32 there, gn_det stays in the input's dtype.
        autocast = dtype if dtype != torch.float32 else None
        results = measure_all(candidates(shape[1], device, aten_path=bool(args.write_routes)), inputs, grads, timer,
                              warmup, reps, autocast)
        es = torch.tensor([], dtype=dtype).element_size()
        min_bytes = {"fwd": 2 * numel * es, "bwd": 3 * numel * es, "fwd+bwd": 5 * numel * es}
        two_pass = {"fwd": 3 * numel * es, "bwd": 5 * numel * es, "fwd+bwd": 8 * numel * es}
        base = results.get("nn.GroupNorm+ReLU", {})
        for name, res in results.items():
            row = {"shape": shape_name, "dims": list(shape), "dtype": str(dtype).replace("torch.", ""),
                   "format": fmt_name, "impl": name}
            if name.endswith(ATEN_PATH):
                row["path"] = "PyTorch: ATen GroupNorm (forced, weighed against the kernels for routes)"
            elif name.startswith("gn_det"):
                row["path"] = dispatch_path(inputs[0], 32, "relu" if "ReLU" in name else None)
                if is_gpu:  # (also where the kernels failed it: the row's path is then PyTorch's)
                    row["verification"] = verification_of(gn_det.decisions(), inputs[0], "ReLU" in name)
            if "error" in res:
                row["error"] = res["error"]
            else:
                row["fwd+bwd host ms"] = res.pop("fwd+bwd host") * 1e3
                for k, seconds in res.items():
                    row[f"{k} ms"] = seconds * 1e3
                    row[f"{k} GB/s"] = min_bytes[k] / seconds / 1e9
                    row[f"{k} two-pass %copy"] = 100 * two_pass[k] / seconds / bandwidth
                    if "error" not in base and k in base:
                        row[f"{k} speedup vs nn.GroupNorm+ReLU"] = base[k] / seconds
            rows.append(row)
        print(f"{shape_name:12s} {row['dtype']:8s} {fmt_name:13s} " + "  ".join(
            f"{n}: {r.get('fwd+bwd', float('nan')) * 1e3:.3f} ms" for n, r in results.items() if "error" not in r), flush=True)
    stem = result_stem(args.out_dir, "norm", machine, args.suffix)
    decisions: Dict[routing.RouteKey, Optional[str]] = {}
    notes = []
    if args.write_routes:
        where = f"{os.path.relpath(stem, ROOT)}.md, {datetime.date.today().isoformat()}"
        decisions = route_decisions(rows, machine, where)
        mark_routed_rows(rows, machine, decisions)
        routed = sum(measured is not None for measured in decisions.values())
        notes.append(os.path.relpath(args.write_routes, ROOT) + (
            f": {routed} shape buckets routed to PyTorch's GroupNorm, {len(decisions) - routed} kept on the "
            "Triton kernels" if decisions else ": unchanged (no row of this run ran the Triton kernels)"))
    write_results(stem, machine, bandwidth, rows, is_gpu, warmup, reps, args.input_sets, skipped, timer.host_bound,
                  notes)
    if decisions:
        write_routes(args.write_routes, decisions)
    for note in notes:
        print(note)


def verification_of(records: Sequence[dict], x: torch.Tensor, relu: bool, num_groups: int = 32) -> List[dict]:
    """What first-use verification found for x's bucket (GN of ``num_groups`` groups, ReLU fused
    or not, no residual): its records among ``records`` (``gn_det.decisions()``, kind "verification"), one
    per check that ran: {"check", "passed", "detail", "source"}. Empty when none ran (verification
    off, or the kernels never ran the bucket)."""

    key = verification.verify_key_of(x, num_groups, activation_code("relu" if relu else None), False)
    wanted = dict(zip(tuning.VERIFY_FIELDS, key))
    return [{k: record[k] for k in ("check", "passed", "detail", "source")} for record in records
            if record.get("kind") == "verification" and all(record.get(k) == v for k, v in wanted.items())]


def describe_verification(checks: Sequence[dict]) -> str:
    """The table's cell for a row's verification records (``verification_of``): each check
    passed or failed (a failed bucket runs PyTorch's path from then on: its time is not the
    kernels'), or "not verified": the kernels never ran the bucket (a route or the support check
    sent it to PyTorch's path) or verification is off."""
    if not checks:
        return "not verified"
    return "; ".join(f"{c['check']} " + ("passed" if c["passed"] else f"FAILED ({c['detail']}), PyTorch's path since")
                     for c in checks).replace("|", "/")


def _comparator(impl: str) -> str:
    """The PyTorch module a gn_det row is held against: GroupNorm (+ ReLU for the fused layer)."""
    return "nn.GroupNorm+ReLU" if "ReLU" in impl else "nn.GroupNorm"


def _route_key_of_row(row: dict, device: str) -> routing.RouteKey:
    n, c = row["dims"][:2]
    return routing.route_key(device, row["dtype"], row["format"], "relu" if "ReLU" in row["impl"] else "none",
                             n, c, math.prod(row["dims"][2:]), 32)


def _kernel_rows(rows: List[dict]) -> List[dict]:
    """The measured rows of gn_det's layers that ran the Triton kernels."""
    return [r for r in rows if "error" not in r and r["impl"].startswith("gn_det")
            and r.get("path", "").startswith("Triton")]


def route_decisions(rows: List[dict], device: str, where: str) -> Dict[routing.RouteKey, Optional[str]]:
    """Route key -> why it is routed to PyTorch's GroupNorm, or None to keep the Triton kernels,
    for every shape bucket this run measured both at. A bucket is routed when the kernels'
    forward+backward time, summed over its rows, exceeds that of the path a route would take
    (the ``(ATen path)`` rows: PyTorch's GroupNorm, with gn_det's output dtype)."""
    ok = [r for r in rows if "error" not in r]
    totals: Dict[routing.RouteKey, List] = {}
    for row in _kernel_rows(rows):
        ratio = _ratio(ok, row, row["impl"] + ATEN_PATH)
        if ratio is None:
            continue
        entry = totals.setdefault(_route_key_of_row(row, device), [0.0, 0.0, []])
        entry[0] += row["fwd+bwd ms"]
        entry[1] += row["fwd+bwd ms"] / ratio
        entry[2].append(f"{row['shape']} {tuple(row['dims'])} {ratio:.2f}x the ATen path")
    return {key: (f"fwd+bwd {'; '.join(shapes)} ({where})" if ours > theirs else None)
            for key, (ours, theirs, shapes) in totals.items()}


def mark_routed_rows(rows: List[dict], device: str, decisions: Dict[routing.RouteKey, Optional[str]]) -> None:
    """Flags the kernel rows whose bucket is now routed (``routed``) and says so in their path:
    from now on gn_det runs them at their ``(ATen path)`` row's time."""
    for row in _kernel_rows(rows):
        if decisions.get(_route_key_of_row(row, device)):
            row["routed"] = True
            row["path"] += "; now routed to PyTorch's GroupNorm (time: its ATen path row)"


def merge_routes(routes: Sequence[dict], decisions: Dict[routing.RouteKey, Optional[str]]) -> List[dict]:
    """routes updated by measured decisions: key -> the measurement to route it by, or None to
    remove its route (the kernels won there). Routes of keys not decided are kept; the result
    is sorted, so that the file's diffs are readable."""
    by_key = {routing.check_route(route, "routes"): route for route in routes}
    for key, measured in decisions.items():
        if measured is None:
            by_key.pop(key, None)
        else:
            by_key[key] = dict(zip(routing.ROUTE_FIELDS, key), measured=measured)
    return [by_key[key] for key in sorted(by_key)]


def write_routes(path: str, decisions: Dict[routing.RouteKey, Optional[str]]) -> None:
    """Merges the decisions into the routes file at path (created if missing)."""
    data = routing.read_routes_file(path) if os.path.exists(path) else {"routes": []}
    data = {"about": data.get("about", "Shapes where gn_det's Triton kernels were measured slower than PyTorch's "
                                       "GroupNorm; written by tools/benchmark_norm.py --write-routes."),
            "routes": merge_routes(data["routes"], decisions)}
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _same_case(rows: List[dict], row: dict, impl: str) -> Optional[dict]:
    """impl's row at row's shape, dtype and format (None if there is none)."""
    return next((other for other in rows if other["impl"] == impl and other["shape"] == row["shape"]
                 and other["dtype"] == row["dtype"] and other["format"] == row["format"]), None)


def _ratio(rows: List[dict], row: dict, other_impl: str, key: str = "fwd+bwd ms") -> Optional[float]:
    """row's time over other_impl's at the same shape, dtype and format (None if missing)."""
    other = _same_case(rows, row, other_impl)
    return row[key] / other[key] if other is not None and key in other and key in row else None


def _check(name: str, rows: List[dict], measure: Callable[[dict], Optional[Tuple[float, str]]],
           passes: Callable[[float], bool]) -> str:
    """One target as a line: measure(row) gives (value, what) for the rows the target covers,
    None for the others; passes(value) says whether that row meets it."""
    checked = [(row, got) for row in rows for got in [measure(row)] if got is not None]
    misses = [f"{row['shape']} {row['dtype']} {row['format']} {row['impl']}: {text}"
              for row, (value, text) in checked if not passes(value)]
    if not checked:
        return f"{name}: no rows to check in this run"
    if not misses:
        return f"{name}: met on all {len(checked)} rows"
    return f"{name}: missed on {len(misses)} of {len(checked)} rows: " + "; ".join(misses)


def target_checks(rows: List[dict], is_gpu: bool) -> List[str]:
    """The layer's performance targets, checked on this run's rows, one line each."""
    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["impl"].startswith("gn_det") and not r["impl"].endswith(ATEN_PATH)]
    fused = [r for r in ours if r["impl"] == "gn_det GN+ReLU (fused)"]

    def ratio_to(impl_of: Callable[[dict], str]):
        def measure(row):
            ratio = _ratio(ok, row, impl_of(row))
            return None if ratio is None else (ratio, f"{ratio:.2f}x")
        return measure

    def never_slower(row):
        ran = row
        if row.get("routed"):  # gn_det now runs this shape on the ATen path: hold that against the target
            ran = _same_case(ok, row, row["impl"] + ATEN_PATH) or row
        ratio = _ratio(ok, ran, _comparator(row["impl"]))
        return None if ratio is None else (ratio, f"{ratio:.2f}x" + (" (routed)" if ran is not row else ""))

    if not is_gpu:  # CPU: plain GN in NCHW within 10% of nn.GroupNorm (channels_last: correct first)
        plain_nchw = [r for r in ours if r["impl"] == "gn_det GN" and r["format"] == "nchw"]
        return [_check("CPU NCHW: gn_det GN fwd+bwd within 10% of nn.GroupNorm", plain_nchw,
                       ratio_to(lambda r: "nn.GroupNorm"), lambda v: v <= 1.10)]

    def speedup_need(row):
        if row["dtype"] != "bfloat16" or row["shape"].split(" N=")[0] not in ("stem", "res2", "FPN P2", "FPN P3"):
            return None
        need = 4.0 if row["format"] == "nchw" else 6.0
        got = row.get("fwd+bwd speedup vs nn.GroupNorm+ReLU", 0.0)
        return got / need, f"{got:.2f}x, target {need:.0f}x"

    big = [r for r in ours if math.prod(r["dims"]) >= 8 * 2**20]
    lines = [
        _check("fwd+bwd never slower than nn.GroupNorm(+ReLU) (a routed row counts at its ATen path time)", ours,
               never_slower, lambda v: v <= 1.0),
        _check("bf16 fused fwd+bwd speed-up over nn.GroupNorm+ReLU >= 4x (NCHW) / 6x (channels_last) at "
               "stem, res2, P2, P3", fused, speedup_need, lambda v: v >= 1.0),
    ]
    for k in ("fwd", "bwd"):
        lines.append(_check(f"{k}: >= 75% of copy bandwidth on the two-pass bytes (shapes of >= 8M elements)", big,
                            lambda r, k=k: (r[f"{k} two-pass %copy"], f"{r[f'{k} two-pass %copy']:.0f}%"),
                            lambda v: v >= 75))
    lines.append(_check("fused GN+ReLU fwd+bwd within 2x of FrozenBatchNorm2d", fused,
                        ratio_to(lambda r: "FrozenBatchNorm2d"), lambda v: v <= 2.0))
    return lines


def _routes_in_use() -> str:
    path = routing.routes_file()
    if path is None:
        return "off (GN_DET_ROUTES=none: gn_det rows ran the Triton kernels wherever they apply)"
    count = len(routing.load_routes())
    return f"{count} from {os.path.relpath(path, ROOT)} (rows routed say so in the gn_det path column)"


def write_results(stem: str, machine: str, bandwidth: float, rows: List[dict], is_gpu: bool,
                  warmup: int, reps: int, input_sets: int, skipped: Sequence[str] = (), host_bound: int = 0,
                  notes: Sequence[str] = ()) -> None:
    """Writes the markdown table (stem.md) and the JSON (stem.json); notes go under the targets."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    meta = {
        "machine": machine, "torch": torch.__version__, "gn_det": gn_det.__version__,
        "date": datetime.date.today().isoformat(), "copy_bandwidth_GBps": bandwidth / 1e9,
        "timing": f"median of {reps} after {warmup} warm-up, {input_sets} input sets, "
                  + (f"device time (CUDA events, the GPU given a {DeviceTimer.HEAD_START_S * 1e3:.0f} ms head start so that "
                     f"host launch time is hidden; calls whose enqueueing outlasted it: {host_bound})"
                     if is_gpu else "perf_counter"),
        "command": command_line("tools/benchmark_norm.py", sys.argv[1:]),
        "not_measured": list(skipped),  # rows left out by --time-limit
        "routes": _routes_in_use(),
    }
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# GN layer benchmark: {machine}", "",
             f"{meta['date']}, torch {meta['torch']}, {meta['timing']}; measured copy bandwidth "
             f"{meta['copy_bandwidth_GBps']:.0f} GB/s. Command: `{meta['command']}`. Routes to PyTorch's "
             f"GroupNorm: {meta['routes']}.", "",
             "| shape | dtype | format | impl | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd two-pass % copy BW "
             "| speed-up vs nn.GroupNorm+ReLU | fwd+bwd host ms | gn_det path | verified against PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['format']} | {r['impl']} | {r['error']} | | | | | | | | |")
            continue
        speedup = r.get("fwd+bwd speedup vs nn.GroupNorm+ReLU")
        lines.append(
            f"| {r['shape']} {tuple(r['dims'])} | {r['dtype']} | {r['format']} | {r['impl']} | {r['fwd ms']:.3f} | "
            f"{r['bwd ms']:.3f} | {r['fwd+bwd ms']:.3f} | {r['fwd+bwd GB/s']:.0f} | {r['fwd+bwd two-pass %copy']:.0f} | "
            f"{'' if speedup is None else f'{speedup:.2f}x'} | {r['fwd+bwd host ms']:.3f} | {r.get('path', '')} | "
            f"{describe_verification(r['verification']) if 'verification' in r else ''} |")
    if skipped:
        lines += ["", f"Not measured (the run's --time-limit came first): {'; '.join(skipped)}."]
    lines += ["", "## Against the targets", ""] + [f"- {line}" for line in target_checks(rows, is_gpu)]
    lines += [""] + [f"Routes: {note}." for note in notes] if notes else []
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
