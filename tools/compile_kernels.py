#!/usr/bin/env python
"""Compile every Triton kernel gn_det launches, for an NVIDIA GPU, on a machine without one.

gn_det's launchers run at the benchmark shapes (gn_det.diagnostics.bench.layer_shapes: the GN layers of a
Mask R-CNN R50-FPN step, plus a sequence, a volume and G = C), in every dtype, layout and
activation, with a stand-in for Triton's GPU driver (gn_det.diagnostics.bench.inspection): the kernels
are specialised exactly as a real launch would specialise them (block sizes, warps, arguments
equal to 1 or divisible by 16), then compiled to a cubin for the target (default sm_90, the
H100/H200) instead of launched. ptxas reports each kernel's registers and spills; the PTX gives
the width of its global loads and stores; registers, warps and shared memory against the
architecture's limits (gn_det.ops.occupancy.ARCHITECTURES: per-SM limits and the SM count
of a GPU users have) give the blocks an SM holds, and the launcher's grid at each shape (sized
by that occupancy, as on that GPU) the waves.

This catches what Triton's interpreter cannot: code that does not compile for the GPU, and
register spills. It measures no speed.

    python tools/compile_kernels.py              # every shape, dtype, layout, activation
    python tools/compile_kernels.py --quick      # a few shapes (the test suite runs this)
    python tools/compile_kernels.py --json       # one JSON object: kernels, launches
    python tools/compile_kernels.py --json --replay-multiscale   # + replay_compiles
    python tools/compile_kernels.py --markdown out.json            # that JSON as markdown tables
    python tools/compile_kernels.py --arch 80,86,89,100,120 --json --no-launches   # several at once
    python tools/compile_kernels.py --arch all --quick             # every supported architecture
    python tools/compile_kernels.py --compact out.json             # a row per compiled variant, not per case
    python tools/compile_kernels.py --quick --block-ends --masked  # + the masked kernels (valid regions)
    python tools/compile_kernels.py --shapes res5,"FPN P5" --masked  # only these shapes (float32, bfloat16, float16)

Exits 1 if a kernel fails to compile, spills or exceeds the architecture's limits (registers
per thread, shared memory per block, one block per SM).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, List, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles for the GPU: run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget

from gn_det.diagnostics.bench.layer_shapes import COMPILE_EXTRA_SHAPES, MASK_RCNN_SHAPES
from gn_det.diagnostics.bench import inspection
from gn_det.ops import occupancy
from gn_det.ops import triton_launch as launchers
from gn_det.policy import support
from gn_det.ops.activation import ACT_RELU, ACTIVATION_TABLE, RESIDUAL_ADD, RESIDUAL_OUTPUT

SHAPES = {**MASK_RCNN_SHAPES, **COMPILE_EXTRA_SHAPES}
QUICK = ("res2 N=2", "box head", "volume", "features, G = C", "7 channels per group")
ACT_NAMES = {a.code: a.name or "none" for a in ACTIVATION_TABLE}  # every activation the kernels fuse
# --block-ends: the residual blocks' ends, relu(GN(x) + residual), with what backward reads.
BLOCK_ENDS = {"relu+residual": RESIDUAL_ADD, "relu+residual, output kept": RESIDUAL_OUTPUT}
# The shapes whose launches "launches" counts: one of each kernel path.
LAUNCH_SHAPES = {"split": "res2 N=2", "group": "box head"}


def masked_layer_launches(shape, dtype: torch.dtype, memory_format: torch.memory_format, activation: int,
                          num_groups: int = 32, residual_mode: int = 0, **recording
                          ) -> Tuple[List[inspection.Launch], List[inspection.Launch]]:
    """``inspection.layer_launches`` with valid regions (issue 35): the launches of one masked
    GN layer's forward and backward at this 4-D shape (the MASKED specialisations; recorded,
    not run: the regions' values never matter to a launch)."""
    x = torch.empty(tuple(shape), dtype=dtype, device="meta").contiguous(memory_format=memory_format)
    w = torch.empty(shape[1], device="meta")
    r = torch.empty_like(x) if residual_mode else None
    valid = torch.empty((shape[0], 2), dtype=torch.int32, device="meta")
    with inspection.recording_launches(**recording) as launches:
        _, mean, rstd = launchers.triton_group_norm_forward(x, w, w, r, num_groups, 1e-5, activation, valid)
        forward = list(launches)
        del launches[:]
        launchers.triton_group_norm_backward(torch.empty_like(x), x, w, w, mean, rstd, r, num_groups, 1e-5, activation,
                                             residual_mode, valid)
        backward = list(launches)
    return forward, backward


def _kernel_name(row: dict) -> str:
    """A row's kernel, with " MASKED" for the masked specialisations (--masked)."""
    return row["kernel"] + (" MASKED" if row.get("masked") else "")


def launch_counts(recording: dict) -> Dict[str, dict]:
    """Launches of one layer call per path and direction: Triton kernels and the torch ops
    beside them (float32, NCHW, ReLU; the count is the same in every dtype and layout)."""
    out = {}
    for path, shape_name in LAUNCH_SHAPES.items():
        forward, backward = inspection.layer_launches(SHAPES[shape_name], torch.float32, torch.contiguous_format,
                                                      ACT_RELU, **recording)
        for direction, launches in (("forward", forward), ("backward", backward)):
            out[f"{path}_{direction}"] = {"count": len(launches), "at": f"{shape_name} {SHAPES[shape_name]}",
                                          "launches": [launch.kernel for launch in launches]}
    return out


def bytes_model(sm_count: int) -> List[dict]:
    """The bytes-moved model (gn_det.diagnostics.bench.inspection.bytes_moved) at the Mask R-CNN shapes,
    bfloat16 and float32, NCHW (the split count, the only layout-dependent term, barely moves it)."""
    return [{"shape": name, "dims": list(shape), "dtype": dtype, **inspection.bytes_moved(shape, size, sm_count=sm_count)}
            for name, shape in MASK_RCNN_SHAPES.items() for dtype, size in (("bfloat16", 2), ("float32", 4))]


def _span(values: List) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    fmt = (lambda v: f"{v:.2f}") if isinstance(lo, float) else str
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def compact(data: dict) -> dict:
    """One architecture's --json output without its per-case rows: each distinct compiled
    variant (kernel, dtype, layout, warps, registers, spills, shared memory) once, with how
    many cases launch it, at which shapes and activations, and its grids' and waves' ranges."""
    if "variants" in data:
        return data
    variants: Dict[tuple, dict] = {}
    for r in data["kernels"]:
        key = (r["kernel"], r.get("masked", False), r["dtype"], r["layout"], r["warps"], r["registers"], r["spills"],
               r["shared"])
        v = variants.setdefault(key, {
            "kernel": r["kernel"], "masked": r.get("masked", False), "dtype": r["dtype"], "layout": r["layout"],
            "warps": r["warps"],
            "registers": r["registers"], "spills": r["spills"], "shared": r["shared"],
            "blocks_per_sm": r["blocks_per_sm"], "over_limits": r.get("over_limits", []),
            "load_bytes_min": r["load_bytes_min"], "store_bytes_min": r["store_bytes_min"],
            "cases": 0, "shapes": [], "activations": [], "grid": [r["grid"], r["grid"]],
            "waves": [r["waves"], r["waves"]]})
        v["cases"] += 1
        for name, value in (("shapes", r["shape"]), ("activations", r["activation"])):
            if value not in v[name]:
                v[name].append(value)
        v["grid"] = [min(v["grid"][0], r["grid"]), max(v["grid"][1], r["grid"])]
        v["waves"] = [min(v["waves"][0], r["waves"]), max(v["waves"][1], r["waves"])]
    out = {k: v for k, v in data.items() if k not in ("kernels", "bytes_model")}
    out["variants"] = list(variants.values())
    return out


def markdown_architectures(runs: List[dict]) -> str:
    """Several architectures' --json (or --compact) outputs as markdown: one line per
    architecture, then per architecture the per-kernel ranges over every shape."""
    runs = [compact(r) for r in runs]
    lines = [f"# Triton kernels compiled for {', '.join(r['meta']['arch'] for r in runs)} "
             f"(triton {runs[0]['meta']['triton']}, torch {runs[0]['meta']['torch']})", "",
             "Each architecture's command is in its section. Each architecture's limits and SM count are those of the "
             "GPU named (gn_det.ops.occupancy.ARCHITECTURES); its grids are sized as on that GPU. A failure is a "
             "kernel that does not compile, spills, or exceeds the architecture's limits (registers per thread, "
             "shared memory per block, one block per SM).", "",
             "| arch | GPU (SMs) | dtypes | specialisations | compiled | failed, spilled or over limits | "
             "registers | max shared B | blocks/SM | waves |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m, vs = r["meta"], r["variants"]
        lines.append(f"| {m['arch']} | {m.get('gpu', '?')} ({m['sm_count']}) | {', '.join(m.get('dtypes', []))} | "
                     f"{m['specialisations']} | {m['compiled']} | {m['failed_or_spilled']} | "
                     f"{_span([v['registers'] for v in vs])} | {max(v['shared'] for v in vs)} | "
                     f"{_span([v['blocks_per_sm'] for v in vs])} | "
                     f"{_span([v['waves'][0] for v in vs] + [v['waves'][1] for v in vs])} |")
    for r in runs:
        m = r["meta"]
        left_out = "".join(f" {dtype} left out: {why}." for dtype, why in m.get("dtypes_left_out", {}).items())
        lines += ["", f"## {m['arch']}: {m.get('gpu', '?')} limits, {m['sm_count']} SMs", "",
                  f"{m['limits']['registers']} registers, {m['limits']['shared_bytes'] // 1024} KB shared memory, "
                  f"{m['limits']['warps']} warps and {m['limits']['blocks']} blocks per SM. ptxas: `{m.get('ptxas')}`."
                  f"{left_out} Command: `{m['command']}`.", "",
                  "| kernel | dtype | layout | registers | spills | shared B | blocks/SM | waves | over limits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        groups: Dict[tuple, List[dict]] = {}
        for v in r["variants"]:
            groups.setdefault((_kernel_name(v), v["dtype"], v["layout"]), []).append(v)
        for (kernel, dtype, layout), vs in groups.items():
            over = sorted({o for v in vs for o in v["over_limits"]})
            lines.append(f"| {kernel} | {dtype} | {layout} | {_span([v['registers'] for v in vs])} | "
                         f"{_span([v['spills'] for v in vs])} | {_span([v['shared'] for v in vs])} | "
                         f"{_span([v['blocks_per_sm'] for v in vs])} | "
                         f"{_span([v['waves'][0] for v in vs] + [v['waves'][1] for v in vs])} | "
                         f"{'; '.join(over) or '-'} |")
    return "\n".join(lines) + "\n"


def markdown(data: dict) -> str:
    """A --json output as markdown: the summary per kernel, launches, the replay, the
    bytes-moved model and the full per-shape table (ReLU rows)."""
    meta = data["meta"]
    rows = data["kernels"]
    lim = meta["limits"]
    left_out = "".join(f" {dtype} left out: {why}." for dtype, why in meta.get("dtypes_left_out", {}).items())
    lines = [f"# Triton kernels compiled for {meta['arch']} (triton {meta['triton']}, torch {meta['torch']})", "",
             f"{meta['specialisations']} specialisations, {meta['compiled']} compiled, {meta['failed_or_spilled']} "
             f"failed, spilled or over the limits.{left_out} Occupancy against {meta['sm_count']} SMs"
             f"{' (' + meta['gpu'] + ')' if 'gpu' in meta else ''}, {lim['registers']} registers, "
             f"{lim['shared_bytes'] // 1024} KB shared memory, {lim['warps']} warps and {lim['blocks']} blocks per SM. "
             f"Command: `{meta.get('command', 'python tools/compile_kernels.py --json --replay-multiscale')}`.", "",
             "## Per kernel over the Mask R-CNN shapes (ranges over shapes and activations)", "",
             "| kernel | dtype | layout | registers | spills | load bytes min | store bytes min | blocks/SM | waves |",
             "|---|---|---|---|---|---|---|---|---|"]
    mask_rcnn = [r for r in rows if r["shape"] in MASK_RCNN_SHAPES]
    groups: Dict[tuple, List[dict]] = {}
    for r in mask_rcnn:
        groups.setdefault((_kernel_name(r), r["dtype"], r["layout"]), []).append(r)
    for (kernel, dtype, layout), rs in groups.items():
        lines.append(f"| {kernel} | {dtype} | {layout} | {_span([r['registers'] for r in rs])} | "
                     f"{_span([r['spills'] for r in rs])} | {_span([r['load_bytes_min'] for r in rs])} | "
                     f"{_span([r['store_bytes_min'] for r in rs])} | {_span([r['blocks_per_sm'] for r in rs])} | "
                     f"{_span([float(r['waves']) for r in rs])} |")
    if "launch_detail" in data:
        lines += ["", "## Launches per layer call", "", "| path | launches | what |", "|---|---|---|"]
        for name, entry in data["launch_detail"].items():
            lines.append(f"| {name} | {entry['count']} | {', '.join(entry['launches'])} (at {entry['at']}) |")
    if "replay_compiles" in data:
        rep = data["replay_compiles"]
        lines += ["", "## Multi-scale training replay", "",
                  f"{rep['iterations']} iterations (seed {rep['seed']}), {rep['gn_layer_calls']} GN layer calls, "
                  f"{rep['distinct_layer_shapes']} distinct layer shapes, {rep['dtype']}, both layouts, activations "
                  f"{rep['activations']}: **{rep['compiles']} compilations** ({rep['model_activations']} with each "
                  "layer's own activation only). By kernel: "
                  + ", ".join(f"{k} {v}" for k, v in rep["by_kernel"].items()) + "."]
    if "bytes_model" in data:
        lines += ["", "## Bytes moved per element, and the H100 time at 3.0 TB/s", "",
                  "| shape | dtype | path | fwd B/elem (ideal) | bwd B/elem (ideal) | fwd us (ideal) | bwd us (ideal) |",
                  "|---|---|---|---|---|---|---|"]
        for b in data["bytes_model"]:
            f, bw = b["forward"], b["backward"]
            lines.append(f"| {b['shape']} {tuple(b['dims'])} | {b['dtype']} | {b['path']} | "
                         f"{f['bytes_per_element']:.2f} ({f['ideal_bytes_per_element']:.0f}) | "
                         f"{bw['bytes_per_element']:.2f} ({bw['ideal_bytes_per_element']:.0f}) | "
                         f"{f['us_at_3TBps']:.1f} ({f['ideal_us_at_3TBps']:.1f}) | "
                         f"{bw['us_at_3TBps']:.1f} ({bw['ideal_us_at_3TBps']:.1f}) |")
    lines += ["", "## Every kernel at every shape (ReLU)", "",
              "| shape | dtype | layout | kernel | warps | registers | spills | load bytes min | store bytes min | "
              "grid | blocks/SM | waves |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["activation"] == "relu":
            lines.append(f"| {r['shape']} {tuple(r['dims'])} | {r['dtype']} | {r['layout']} | {_kernel_name(r)} | "
                         f"{r['warps']} | {r['registers']} | {r['spills']} | {r['load_bytes_min'] or '-'} | "
                         f"{r['store_bytes_min'] or '-'} | {r['grid']} | {r['blocks_per_sm']} | {r['waves']:.2f} |")
    return "\n".join(lines) + "\n"


def compile_arch(arch: int, sm_count: int, args: argparse.Namespace) -> Tuple[int, dict]:
    """Every specialisation of the chosen cases compiled for sm_<arch>: (failures, the --json
    object). A failure is a kernel that does not compile, spills, or exceeds the architecture's
    limits (occupancy.limit_violations). Dtypes the architecture does not support
    (gn_det.policy.support) are left out, and said so."""
    target = GPUTarget("cuda", arch, 32)
    limits = inspection.limits_of(target)
    shapes = {k: v for k, v in SHAPES.items() if k in (args.shapes or (QUICK if args.quick else SHAPES))}
    wanted = (torch.float32, torch.bfloat16) if args.quick else (torch.float32, torch.bfloat16, torch.float16)
    log = sys.stderr if args.json else sys.stdout
    dtypes, skipped = [], {}
    for dtype in wanted:
        reason = support.architecture_support(arch, dtype)
        if reason is None:
            dtypes.append(dtype)
        else:
            skipped[str(dtype)[6:]] = reason
            print(f"sm_{arch}: {str(dtype)[6:]} left out: {reason}", file=log)
    recording = {"target": target, "sm_count": sm_count}

    # Every launch at every case, then each distinct specialisation compiled once.
    cases = []
    for shape_name, shape in shapes.items():
        for dtype in dtypes:
            for layout, fmt in inspection.memory_formats(len(shape)):
                variants = [(name, act, 0) for act, name in ACT_NAMES.items()]
                if args.block_ends:
                    variants += [(name, ACT_RELU, mode) for name, mode in BLOCK_ENDS.items()]
                for name, act, mode in variants:
                    forward, backward = inspection.layer_launches(shape, dtype, fmt, act, residual_mode=mode,
                                                                  **recording)
                    cases += [(shape_name, shape, dtype, layout, name, launch, False)
                              for launch in forward + backward if launch.is_triton]
                    if args.masked and len(shape) == 4:  # (the masked kernels take 4-D maps only)
                        forward, backward = masked_layer_launches(shape, dtype, fmt, act, residual_mode=mode,
                                                                  **recording)
                        cases += [(shape_name, shape, dtype, layout, name, launch, True)
                                  for launch in forward + backward if launch.is_triton]
    specs: Dict[str, inspection.Launch] = {}
    where: Dict[str, str] = {}
    for shape_name, shape, dtype, layout, act, launch, masked in cases:
        specs.setdefault(launch.key, launch)
        where.setdefault(launch.key, f"{shape_name} {tuple(shape)} {str(dtype)[6:]} {layout} act={act}"
                                     f"{' masked' if masked else ''}")
    print(f"{len(specs)} kernel specialisations for sm_{arch} ({limits.name} limits, {sm_count} SMs; triton "
          f"{triton.__version__}, ptxas {inspection.ptxas_path(arch)})", file=log, flush=True)
    compiled: Dict[str, dict] = {}
    failures = 0
    for key, launch in specs.items():
        try:
            row = inspection.compile_specialisation(launch, target, limits)
        except Exception as exc:  # report every failure, then exit 1
            failures += 1
            print(f"FAILED {launch.kernel} at {where[key]}: {type(exc).__name__}: {str(exc)[:2000]}", file=log)
            continue
        compiled[key] = row
        if row["spills"] > 0 or row["over_limits"]:
            failures += 1
            print(f"OVER sm_{arch} {row['kernel']} at {where[key]}: spill bytes {row['spills']}; "
                  f"{'; '.join(row['over_limits']) or 'within limits'}", file=log)
        if not args.json:
            print(f"{row['kernel']:28s} warps {row['warps']}  registers {row['registers']:3d}  spill bytes "
                  f"{row['spills']:4d}  shared {row['shared']:6d}  warps/SM {row['warps_per_sm']:2d}  "
                  f"first at {where[key]}")
    print(f"sm_{arch}: {len(compiled)} compiled, {failures} failed or spilled", file=log, flush=True)
    if not args.json:
        return failures, {}
    kernels: List[dict] = []
    for shape_name, shape, dtype, layout, act, launch, masked in cases:
        row = compiled.get(launch.key)
        if row is None:
            continue
        kernels.append({
            "kernel": launch.kernel, **({"masked": True} if masked else {}), "shape": shape_name, "dims": list(shape),
            "dtype": str(dtype)[6:],
            "layout": layout, "activation": act, "registers": row["registers"], "spills": row["spills"],
            "load_bytes_min": row["load_bytes_min"], "store_bytes_min": row["store_bytes_min"],
            "blocks_per_sm": row["blocks_per_sm"],
            "waves": round(occupancy.waves(launch.programs, row["blocks_per_sm"], limits_with(limits, sm_count)), 3),
            "grid": launch.programs, "warps": row["warps"], "shared": row["shared"], "over_limits": row["over_limits"],
            "load_bytes_by_pointer": row["load_bytes_by_pointer"],
            "store_bytes_by_pointer": row["store_bytes_by_pointer"]})
    out = {"meta": {"command": " ".join(["python tools/compile_kernels.py"] + sys.argv[1:]),
                    "arch": f"sm_{arch}", "gpu": limits.name, "sm_count": sm_count, "triton": triton.__version__,
                    "torch": torch.__version__, "ptxas": inspection.ptxas_path(arch),
                    "specialisations": len(specs), "compiled": len(compiled), "failed_or_spilled": failures,
                    "dtypes": [str(d)[6:] for d in dtypes], "dtypes_left_out": skipped,
                    "limits": vars(limits_with(limits, sm_count))},
           "kernels": kernels}
    if args.launches:
        counts = launch_counts(recording)
        out["launches"] = {name: entry["count"] for name, entry in counts.items()}
        out["launch_detail"] = counts
        if arch == 90:  # (its times are an H100's)
            out["bytes_model"] = bytes_model(sm_count)
    if args.replay_multiscale:
        out["replay_compiles"] = inspection.replay_compiles(args.replay_iterations, **recording)
    return failures, out


def limits_with(limits: occupancy.GPULimits, sm_count: int) -> occupancy.GPULimits:
    """``limits`` of a GPU with ``sm_count`` SMs (--sm-count)."""
    return dataclasses.replace(limits, sms=sm_count)


def parse_archs(text: str) -> List[int]:
    """--arch: comma-separated compute capabilities x 10, or "all" (every supported one)."""
    if text == "all":
        return list(support.SUPPORTED_ARCHITECTURES)
    try:
        archs = [int(a.strip().removeprefix("sm_")) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--arch {text!r}: give compute capabilities x 10 separated by commas "
                                         "(e.g. 80,86,90) or 'all'") from None
    unknown = [a for a in archs if a not in occupancy.ARCHITECTURES]
    if unknown or not archs:
        raise argparse.ArgumentTypeError(f"--arch {text!r}: {unknown or 'none given'}; known architectures: "
                                         f"{', '.join(map(str, occupancy.ARCHITECTURES))}")
    return archs


def parse_shapes(text: str) -> List[str]:
    """--shapes: comma-separated names of ``SHAPES``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHAPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: {unknown or 'none given'}; known: {', '.join(SHAPES)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=parse_archs, default=[90],
                        help="compute capabilities x 10, comma-separated (default 90: H100/H200), or 'all': every "
                             "architecture gn_det supports (gn_det.policy.support.SUPPORTED_ARCHITECTURES)")
    parser.add_argument("--sm-count", type=int, default=None,
                        help="SMs of the target GPU (default: occupancy.ARCHITECTURES' GPU of each architecture; "
                             "132 for sm_90, an H100 SXM)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}; float32 and bfloat16")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="only these shapes (comma-separated names: " + ", ".join(SHAPES) + "); with --quick "
                             "in float32 and bfloat16 only")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the text report (with several --arch, "
                             "{\"architectures\": [one object per architecture]})")
    parser.add_argument("--no-launches", dest="launches", action="store_false",
                        help="leave out the launch counts and the bytes-moved model (--json)")
    parser.add_argument("--replay-multiscale", action="store_true",
                        help="also count the compilations of detectron2 multi-scale training (replay_compiles)")
    parser.add_argument("--replay-iterations", type=int, default=300)
    parser.add_argument("--markdown", metavar="JSON", help="print the markdown report of a --json output and exit "
                        "(of several architectures: a line per architecture and per-kernel ranges)")
    parser.add_argument("--compact", metavar="JSON", help="print a --json output with each distinct compiled variant "
                        "once instead of a row per case, and exit")
    parser.add_argument("--block-ends", action="store_true",
                        help="also the residual block ends (GN + residual + ReLU), both of their backward modes")
    parser.add_argument("--masked", action="store_true",
                        help="also the masked kernels (valid regions of a padded batch, MASKED) at every 4-D case: "
                             "rows with \"masked\": true")
    args = parser.parse_args()
    if args.markdown or args.compact:
        with open(args.markdown or args.compact) as f:
            data = json.load(f)
        if args.compact:
            runs = [compact(d) for d in data.get("architectures", [data])]
            print(json.dumps(runs[0] if len(runs) == 1 else {"architectures": runs}, indent=1))
        elif "architectures" in data:
            print(markdown_architectures(data["architectures"]))
        else:
            print(markdown(data))
        return 0
    failures, outs = 0, []
    for arch in args.arch:
        sm_count = args.sm_count or occupancy.ARCHITECTURES[arch].sms
        failed, out = compile_arch(arch, sm_count, args)
        failures += failed
        outs.append(out)
    if args.json:
        print(json.dumps(outs[0] if len(outs) == 1 else {"architectures": outs}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
