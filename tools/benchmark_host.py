"""Host (Python) microseconds per GN call, gn_det against what it replaces, side by side.

Every row calls a layer's ``__call__`` as a model does, with verification and tuning at their
defaults and the input already decided (warm-up calls first): eval forward under
``torch.no_grad()``, training forward + backward (``torch.autograd.grad`` of x, gamma, beta).

Without CUDA (a proxy, and every result says so): gn_det's Triton kernels run on a stand-in
GPU (``gn_det.diagnostics.bench.host.stand_in_gpu``: kernels compiled for sm_90, each launch
stops at a no-op launcher; CPU tensors stand for
CUDA ones, so allocations are the CPU allocator's, set to keep freed memory as CUDA's caching
allocator does: ``keep_freed_memory``); the baselines and gn_det's PyTorch/ATen
paths run PyTorch's CPU dispatch of the same ops at a size where their arithmetic is small
(``TINY``: the host's work is what is left). With CUDA: real launches and real baselines at
the rows' own shapes, host time only (the GPU is not waited for inside a timing).

Baselines: ``nn.GroupNorm`` + ``relu_`` (detectron2's "GN"), detectron2's
``FrozenBatchNorm2d`` + ``relu_``, and for a block end ``nn.GroupNorm``, ``+=`` shortcut,
``relu_`` (what gn_det's ``forward_residual`` does in one call). The per-step totals weigh
each model's own norm calls in one GN Mask R-CNN R50-FPN training step: GN models 58 forward +
backward and 11 forward-only calls (the box and mask heads' GN at inference of the sampled
proposals is not counted), frozen BN 42 and 11.

    python tools/benchmark_host.py                      # results under benchmarks/results/
    python tools/benchmark_host.py --quick --out /tmp   # fewer repetitions (the test's run)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from typing import Callable, Dict, List

import torch
from torch import nn

import gn_det
from gn_det.recompute import recompute_outputs
from gn_det.diagnostics.bench.host import (host_seconds, host_seconds_alternating, keep_freed_memory, stand_in_gpu,
                                           triton_launches_skipped)

# (name, shape, memory format): one row per kernel set a detectron2 model reaches.
KERNEL_ROWS = [
    ("split reduction, NCHW", (2, 256, 32, 32), torch.contiguous_format),
    ("split reduction, channels_last", (2, 256, 32, 32), torch.channels_last),
    ("one program per group (mask head)", (16, 256, 14, 14), torch.contiguous_format),
    ("flat tiles (box head)", (64, 256, 7, 7), torch.contiguous_format),
]
TINY = (2, 256, 1, 2)  # the baselines' and PyTorch paths' size on CPU: their host work, little arithmetic
GN_TRAIN_CALLS, GN_EVAL_CALLS = 58, 11
BN_TRAIN_CALLS, BN_EVAL_CALLS = 42, 11


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "_")
    return f"cpu_{platform.machine()}_x{os.cpu_count()}"


def _timer(fn: Callable[[], object], number: int, repeats: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    least, _ = host_seconds(fn, number, repeats)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return least * 1e6


def _train(layer_call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: List[torch.Tensor]):
    grad = torch.ones_like(x)
    leaves = [x] + params

    def run():
        torch.autograd.grad(layer_call(x), leaves, grad)
    return run


def _eval(layer_call, x):
    def run():
        with torch.no_grad():
            layer_call(x)
    return run


def _frozen_bn(channels: int) -> nn.Module:
    from detectron2.layers import FrozenBatchNorm2d

    return FrozenBatchNorm2d(channels)


def _measure(runs: Dict[str, Callable[[], object]], number: int, repeats: int) -> Dict[str, float]:
    return {mode: _timer(run, number, repeats) for mode, run in runs.items()}


def _side_by_side(first: Dict[str, Callable[[], object]], second: Dict[str, Callable[[], object]], number: int,
                  repeats: int):
    """Per mode, the least microseconds per call of each of two sets of calls, timed in
    alternation (``host_seconds_alternating``). Returns ({mode: us}, {mode: us})."""
    out_a, out_b = {}, {}
    for mode in first:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        a, b = host_seconds_alternating(first[mode], second[mode], number, repeats)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out_a[mode], out_b[mode] = a * 1e6, b * 1e6
    return out_a, out_b


def rows(device: str, number: int, repeats: int) -> List[dict]:
    """One dict per (path, mode): gn_det_us, baseline_us, their ratio."""
    out = []
    cuda = device == "cuda"

    def tensors(shape, fmt):
        x = torch.randn(shape, device=device).to(memory_format=fmt).requires_grad_()
        return x

    def both(gn_layer, baseline_layer, x, xb, residual=None, rb=None):
        if residual is None:
            gn_call = gn_layer

            def base_call(t):
                return torch.relu_(baseline_layer(t))
        else:
            def gn_call(t):
                return gn_layer.forward_residual(t, residual)

            def base_call(t):
                y = baseline_layer(t)
                y += rb
                return torch.relu_(y)
        gp = [p for p in gn_layer.parameters()]
        bp = [p for p in baseline_layer.parameters() if p.requires_grad]
        return ({"eval forward": _eval(gn_call, x), "train forward+backward": _train(gn_call, x, gp)},
                {"eval forward": _eval(base_call, xb), "train forward+backward": _train(base_call, xb, bp)})

    # the Triton kernels
    context = stand_in_gpu() if not cuda else _nothing()
    with context:
        for name, shape, fmt in KERNEL_ROWS:
            for block_end in (False, True):
                if block_end and "split" not in name:
                    continue  # (block ends are at the backbone's resolutions)
                c = shape[1]
                gn_layer = gn_det.GroupNorm(32, c, activation=None if block_end else "relu").to(device)
                baseline = nn.GroupNorm(32, c).to(device)
                x = tensors(shape, fmt)
                xb = x if cuda else tensors(TINY, torch.contiguous_format)
                residual = torch.randn(shape, device=device).to(memory_format=fmt) if block_end else None
                rb = (residual if cuda else torch.randn(TINY)) if block_end else None
                g, b = both(gn_layer, baseline, x, xb, residual, rb)
                gn_us, base_us = _side_by_side(g, b, number, repeats)
                with triton_launches_skipped():  # (the plans and calls are made: only the launches go)
                    own_us = _measure(g, number, repeats)
                path = f"kernels: {name}" + (", block end" if block_end else ", + ReLU")
                for mode in gn_us:
                    out.append(dict(path=path, mode=mode, shape=list(shape),
                                    baseline="nn.GroupNorm + add + relu_" if block_end else "nn.GroupNorm + relu_",
                                    gn_det_us=round(gn_us[mode], 2), baseline_us=round(base_us[mode], 2),
                                    ratio=round(gn_us[mode] / base_us[mode], 3),
                                    triton_launch_us=round(max(0.0, gn_us[mode] - own_us[mode]), 2)))
        # Output recomputation (MODEL.GN.RECOMPUTE_OUTPUT): the same training call inside a
        # recompute scope, opened once (a model opens it once per forward, not per GN call):
        # what recording the output and the saved-tensor hooks add per GN call. The baseline is
        # timed outside the scope (inside, its own saved tensors would pass gn_det's hooks).
        name, shape, fmt = KERNEL_ROWS[0]
        gn_layer = gn_det.GroupNorm(32, shape[1], activation="relu").to(device)
        baseline = nn.GroupNorm(32, shape[1]).to(device)
        x = tensors(shape, fmt)
        xb = x if cuda else tensors(TINY, torch.contiguous_format)
        g, b = both(gn_layer, baseline, x, xb)
        mode = "train forward+backward"
        base_us = _measure({mode: b[mode]}, number, repeats)[mode]
        scope = recompute_outputs()
        scope.__enter__()
        try:
            gn_us = _measure({mode: g[mode]}, number, repeats)[mode]
        finally:
            scope.__exit__(None, None, None)
        out.append(dict(path=f"kernels: {name}, + ReLU, output recomputed", mode=mode, shape=list(shape),
                        baseline="nn.GroupNorm + relu_", gn_det_us=round(gn_us, 2), baseline_us=round(base_us, 2),
                        ratio=round(gn_us / base_us, 3)))
    # gn_det's PyTorch paths (on CPU: its own path for activations, ATen's for plain GN)
    if not cuda:
        for name, activation in (("PyTorch path, + ReLU", "relu"), ("ATen path, plain GN", None)):
            gn_layer = gn_det.GroupNorm(32, 256, activation=activation)
            baseline = nn.GroupNorm(32, 256)
            x = tensors(TINY, torch.contiguous_format)
            g, b = both(gn_layer, baseline, x, x)
            if activation is None:
                b = {"eval forward": _eval(baseline, x), "train forward+backward": _train(baseline, x,
                                                                                         list(baseline.parameters()))}
            gn_us, base_us = _side_by_side(g, b, number, repeats)
            for mode in gn_us:
                out.append(dict(path=name, mode=mode, shape=list(TINY),
                                baseline="nn.GroupNorm" + (" + relu_" if activation else ""),
                                gn_det_us=round(gn_us[mode], 2), baseline_us=round(base_us[mode], 2),
                                ratio=round(gn_us[mode] / base_us[mode], 3)))
    # frozen BN, for the per-step totals
    fbn = _frozen_bn(256).to(device)
    x = tensors(TINY if not cuda else KERNEL_ROWS[0][1], torch.contiguous_format)
    fbn_us = _measure({"eval forward": _eval(lambda t: torch.relu_(fbn(t)), x),
                       "train forward+backward": _train(lambda t: torch.relu_(fbn(t)), x, [])}, number, repeats)
    for mode, us in fbn_us.items():
        out.append(dict(path="frozen BN + relu_ (reference)", mode=mode, shape=list(x.shape), baseline="-",
                        gn_det_us=None, baseline_us=round(us, 2), ratio=None))
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def per_step(results: List[dict]) -> Dict[str, float]:
    """Host milliseconds in norm calls per training step (module docstring's counts)."""
    def mean(field, mode, prefix="kernels"):
        values = [r[field] for r in results
                  if r["mode"] == mode and r["path"].startswith(prefix) and "recomputed" not in r["path"]]
        return statistics.mean(values)

    fbn = {r["mode"]: r["baseline_us"] for r in results if r["path"].startswith("frozen BN")}
    train, infer = "train forward+backward", "eval forward"
    return {
        "gn_det_ms": round((GN_TRAIN_CALLS * mean("gn_det_us", train) + GN_EVAL_CALLS * mean("gn_det_us", infer)) / 1e3, 3),
        "detectron2_gn_ms": round((GN_TRAIN_CALLS * mean("baseline_us", train)
                                   + GN_EVAL_CALLS * mean("baseline_us", infer)) / 1e3, 3),
        "frozen_bn_ms": round((BN_TRAIN_CALLS * fbn[train] + BN_EVAL_CALLS * fbn[infer]) / 1e3, 3),
    }


def markdown(results: List[dict], totals: Dict[str, float], meta: dict) -> str:
    lines = [f"# Host time per GN call: {meta['machine']}", "", meta["method"], "",
             f"torch {meta['torch']}, triton {meta['triton']}; least of {meta['repeats']} timings of "
             f"{meta['number']} calls each, gn_det's and the baseline's in alternation, in microseconds.", "",
             "| path | mode | shape | gn_det us | of which Triton's launch path | baseline | baseline us | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['mode']} | {tuple(r['shape'])} | {r['gn_det_us'] if r['gn_det_us'] else '-'} "
                     f"| {r.get('triton_launch_us', '-')} | {r['baseline']} | {r['baseline_us']} "
                     f"| {r['ratio'] if r['ratio'] else '-'} |")
    lines += ["", "Per training step (GN Mask R-CNN R50-FPN: 58 forward + backward and 11 forward-only GN calls; "
              "frozen BN 42 and 11), host milliseconds in norm calls:", "",
              f"- gn_det (kernels): {totals['gn_det_ms']} ms", f"- detectron2's GN: {totals['detectron2_gn_ms']} ms",
              f"- frozen BN: {totals['frozen_bn_ms']} ms", ""]
    return "\n".join(lines)


def _method(device: str, kept: bool) -> str:
    if device == "cuda":
        return "CUDA: real launches and baselines at the rows' shapes."
    allocator = ("the CPU allocator keeps freed memory (mallopt), as CUDA's caching allocator does" if kept
                 else "the CPU allocator as it is")
    return ("No GPU: gn_det's kernels on a stand-in GPU (sm_90; Triton's launch path up to a no-op launch, CPU "
            f"tensors; {allocator}); baselines and gn_det's PyTorch/ATen paths as PyTorch's CPU dispatch at {TINY} "
            "(a proxy for their host work).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "benchmarks", "results"))
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    parser.add_argument("--repeats", type=int, default=7, help="timings of 200 calls per side and row (default 7)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    number, repeats = (5, 2) if args.quick else (200, args.repeats)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kept = device == "cpu" and keep_freed_memory()  # (CUDA's allocator caches by itself)
    results = rows(device, number, repeats)
    totals = per_step(results)
    import triton

    meta = dict(machine=_machine(), torch=torch.__version__, triton=triton.__version__, number=number, repeats=repeats,
                method=_method(device, kept))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"host_{meta['machine']}" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta, rows=results, per_step=totals), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(results, totals, meta))
    print(markdown(results, totals, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
