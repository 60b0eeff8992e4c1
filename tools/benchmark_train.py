#!/usr/bin/env python
"""End-to-end speed of Mask R-CNN R50-FPN training with each norm (a benchmark, not a test).

Builds each model from its config (random weights; frozen BN gets the statistics of one
forward pass in place of pretrained ones), feeds it one fixed synthetic batch (boxes and polygon
masks), and measures, side by side in one run: the median training step (forward, backward,
optimizer step; after warm-up; CUDA-synchronised on GPU), the median inference time per
image, and the peak memory (GPU); the first step's time beside them (Triton compilation and
GN first-use tuning, measured afresh: the tuning cache is off) with the number of GN buckets
it tuned, in float32 and in mixed precision (bf16 autocast on GPU).
The models compared:
  frozen-BN      detectron2's stock mask_rcnn_R_50_FPN_3x with the same 4conv1fc box head (no norm in the heads)
  d2 GN          detectron2's built-in GN config (Misc/mask_rcnn_R_50_FPN_3x_gn: nn.GroupNorm + separate ReLU)
  gn_det GN      configs/mask_rcnn_gn.yaml (gn_det's fused GN)
  gn_det GN NHWC configs/mask_rcnn_gn.yaml with MODEL.CHANNELS_LAST
  gn_det GN recompute  configs/mask_rcnn_gn.yaml with MODEL.GN.RECOMPUTE_OUTPUT
  frozen-BN NHWC       frozen-BN with MODEL.CHANNELS_LAST
Writes a markdown table and JSON under benchmarks/results/ (file named after the machine).

With --step-profile (tools/gpu_checks.sh's step-profile stage), where one step's time goes, per
model: the rows run in priority order (bf16 first: gn_det, frozen BN, detectron2's GN, gn_det
with recomputation, then the channels_last models; then float32), each row also profiles one
step after warm-up (torch.profiler): GPU busy and idle fractions of the step (the union of its
kernels' intervals), GPU time in GN kernels, in layout copies and in all kernels; host time
inside the norm layers' calls (forward hooks, real clock); the peak memory after warm-up and
the warm-up's own peak; inference per image with the same number of detections for every model
(TEST.DETECTIONS_PER_IMAGE 100 at score threshold 0); and gn_det's decisions (path and
verification per bucket). --time-limit stops starting rows after that many seconds; the files
are then named partial.

    python tools/benchmark_train.py                          # GPU: 2 images of 1333x800
    python tools/benchmark_train.py --device cpu --quick     # CPU: small images, few iterations
    python tools/benchmark_train.py --profile                # also: torch.profiler top ops of the gn_det step
    python tools/benchmark_train.py MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 128   # config overrides, every model
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch

from bench_utils import command_line, result_stem, write_result_files  # tools/ is the script's directory
from detectron2 import model_zoo
from detectron2.utils.events import EventStorage

import gn_det
from gn_det.train.data import synthetic_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "frozen-BN": (model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"),
                  ["MODEL.ROI_BOX_HEAD.NUM_CONV", 4, "MODEL.ROI_BOX_HEAD.NUM_FC", 1]),
    "d2 GN": (model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"), []),
    "gn_det GN": (os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"), []),
    "gn_det GN NHWC": (os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"), ["MODEL.CHANNELS_LAST", True]),
    "gn_det GN recompute": (os.path.join(ROOT, "configs", "mask_rcnn_gn.yaml"), ["MODEL.GN.RECOMPUTE_OUTPUT", True]),
    "frozen-BN NHWC": (model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"),
                       ["MODEL.ROI_BOX_HEAD.NUM_CONV", 4, "MODEL.ROI_BOX_HEAD.NUM_FC", 1, "MODEL.CHANNELS_LAST", True]),
}
DEFAULT_MODELS = ("frozen-BN", "d2 GN", "gn_det GN", "gn_det GN NHWC")
# --step-profile's rows, in priority order: (precision, model)
STEP_PROFILE_ORDER = ("gn_det GN", "frozen-BN", "d2 GN", "gn_det GN recompute", "gn_det GN NHWC", "frozen-BN NHWC")
# The same number of detections for every model at inference (--step-profile).
FIXED_DETECTIONS = ["TEST.DETECTIONS_PER_IMAGE", 100, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]


def build(name: str, device: str, extra_opts: List[str] = ()):
    """Model ``name`` of MODELS with random weights; ``extra_opts`` (KEY VALUE pairs) apply to
    every model after its own."""
    config, opts = MODELS[name]
    cfg = gn_det.get_config(config, list(opts) + list(extra_opts) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    torch.manual_seed(0)
    model = gn_det.build_model(cfg)
    return cfg, model


def calibrate_frozen_bn(model: torch.nn.Module, batch) -> int:
    """Give every FrozenBatchNorm2d the statistics of its input on ``batch`` (one forward pass),
    standing in for pretrained statistics: with none, frozen BN is the identity, and a randomly
    initialised R50 without normalisation diverges within a few steps. Returns how many."""
    from detectron2.layers import FrozenBatchNorm2d

    def set_stats(module, inputs):
        x = inputs[0].detach().float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    model.eval()
    with torch.no_grad():
        model([{"image": item["image"], "height": item["height"], "width": item["width"]} for item in batch])
    for hook in hooks:
        hook.remove()
    return len(hooks)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, device: str, batch, precision: str, warmup: int, iters: int, infer_iters: int,
            extra_opts: List[str] = (), infer_warmup: int = 2, step_profile: bool = False) -> Dict:
    cfg, model = build(name, device, list(extra_opts) + (FIXED_DETECTIONS if step_profile else []))
    calibrate_frozen_bn(model, batch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")

    def step():
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gn_det.policy.tuning.clear_decisions()  # each model's first step tunes its GN layers anew
    times = []
    with EventStorage(0):
        for i in range(max(warmup, 1) + iters):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i == 0:
                first = time.perf_counter() - start  # + kernel compilation and first-use tuning
            if i >= max(warmup, 1):
                times.append(time.perf_counter() - start)
            if i + 1 == max(warmup, 1) and device == "cuda":  # the warm-up's own peak, then the steps'
                warmup_peak = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    profile = profile_one_step(model, step, device) if step_profile else {}
    model.eval()
    image = {"image": batch[0]["image"], "height": batch[0]["height"], "width": batch[0]["width"]}
    infer = []
    with torch.no_grad():
        for i in range(infer_warmup + infer_iters):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                model([image])
            sync(device)
            if i >= infer_warmup:
                infer.append(time.perf_counter() - start)
    row = {"model": name, "precision": precision, "step_s": statistics.median(times), "first_step_s": first,
           "tuned_buckets": len(gn_det.autotune_decisions()),
           "infer_s": statistics.median(infer), "peak_gib": peak}
    if step_profile:
        row.update(profile, warmup_peak_gib=warmup_peak if device == "cuda" else None, decisions=decision_counts())
    return row


# Kernel names of GN in a profile: gn_det's Triton kernels, ATen's GroupNorm kernels, frozen BN's
# multiply-add (its forward is x * scale + bias: two elementwise kernels, not told apart from
# other elementwise ones, so frozen BN's GN time is reported as not measured).
GN_KERNEL_WORDS = ("group_norm", "groupnorm", "_stats_", "_apply_kernel", "_group_forward", "_group_backward",
                   "_param_grad", "_finalize_kernel", "_backward_partial")
COPY_KERNEL_WORDS = ("copy", "permute", "transpose", "nchwtonhwc", "nhwctonchw", "contiguous")


def norm_host_seconds(model: torch.nn.Module):
    """Forward hooks timing every norm layer's call (gn_det's GN, nn.GroupNorm, FrozenBatchNorm2d)
    on the host's clock; returns (a list the calls' seconds go to, the hook handles)."""
    from detectron2.layers import FrozenBatchNorm2d

    spent: List[float] = []
    started: List[float] = []
    handles = []
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, FrozenBatchNorm2d)):
            handles.append(module.register_forward_pre_hook(lambda m, i: started.append(time.perf_counter())))
            handles.append(module.register_forward_hook(lambda m, i, o: spent.append(time.perf_counter() - started.pop())))
    return spent, handles


def _union_seconds(intervals: List[tuple]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_one_step(model: torch.nn.Module, step, device: str) -> Dict:
    """Where one training step's time goes (module docstring's --step-profile). GPU fields are
    None on CPU."""
    spent, handles = norm_host_seconds(model)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    try:
        with EventStorage(0), torch.profiler.profile(activities=activities) as prof:
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    out = {"profiled_step_s": wall, "norm_calls": len(spent), "norm_host_s": sum(spent),
           "gpu_busy_fraction": None, "gpu_kernel_s": None, "gpu_gn_kernel_s": None, "gpu_copy_kernel_s": None}
    if device == "cuda":
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        intervals = [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in kernels]
        busy = _union_seconds(intervals)

        def total(words):
            return sum((e.time_range.end - e.time_range.start) / 1e6 for e in kernels
                       if any(w in e.name.lower() for w in words))
        out.update(gpu_busy_fraction=busy / wall if wall else None, gpu_kernel_s=sum(b - a for a, b in intervals),
                   gpu_gn_kernel_s=total(GN_KERNEL_WORDS), gpu_copy_kernel_s=total(COPY_KERNEL_WORDS))
    return out


def decision_counts() -> Dict[str, int]:
    """gn_det's decisions so far, counted by kind and outcome (path per tuning bucket; passed
    or failed per verification)."""
    counts: Dict[str, int] = {}
    for row in gn_det.decisions():
        key = f"tuning: {row['path']}" if row["kind"] == "tuning" else f"verification: {'passed' if row['passed'] else 'failed'}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def profile_step(name: str, device: str, batch, precision: str, extra_opts: List[str] = (), warmup: int = 2) -> str:
    """The profile of one training step of model ``name``: torch.profiler's top ops by self
    time, then the copies of activation-sized (4-D) tensors by the ops that made them (memory
    format changes and other avoidable copies show there)."""
    _, model = build(name, device, extra_opts)
    model.train()
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with EventStorage(0):
        for _ in range(warmup):
            with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                sum(model(batch).values()).backward()
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                sum(model(batch).values()).backward()
            sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25) + "\n\n" + copy_origins(prof)


def copy_origins(prof, top: int = 12) -> str:
    """Copies (aten::copy_) of 4-D tensors in a profile, grouped by shape and by the chain of
    ops that called them, most host time first."""
    count: Dict[tuple, int] = {}
    host_us: Dict[tuple, float] = {}
    for event in prof.events():
        shapes = event.input_shapes
        if event.name != "aten::copy_" or not shapes or len(shapes[0]) != 4:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name)
            parent = parent.cpu_parent
        group = (tuple(shapes[0]), " < ".join(chain))
        count[group] = count.get(group, 0) + 1
        host_us[group] = host_us.get(group, 0.0) + event.cpu_time_total
    lines = [f"Copies of 4-D tensors: {sum(count.values())} in the step, by origin (top {top}):",
             f"{'calls':>5}  {'host ms':>8}  {'shape':<22}  called from"]
    for group in sorted(count, key=lambda g: -host_us[g])[:top]:
        lines.append(f"{count[group]:>5}  {host_us[group] / 1e3:>8.2f}  {str(list(group[0])):<22}  {group[1][:120]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--height", type=int, default=0, help="default: 800 on GPU, 256 on CPU")
    parser.add_argument("--width", type=int, default=0, help="default: 1333 on GPU, 320 on CPU")
    parser.add_argument("--boxes", type=int, default=16, help="ground-truth boxes (and masks) per image")
    parser.add_argument("--precisions", default="", help="default: fp32,bf16 on GPU; fp32 on CPU")
    parser.add_argument("--models", default="", help=f"default: {','.join(DEFAULT_MODELS)}; with --step-profile all, "
                        "in its priority order")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--iters", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few iterations (tests)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--step-profile", action="store_true", help="where each step's time goes (module docstring)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds: start no row after this (0: none)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config KEY VALUE pairs applied to every model, e.g. MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 64")
    args = parser.parse_args()
    gn_det.set_tuning_cache(None)  # no decisions from an earlier run: the first step shows tuning's cost
    if len(args.opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs; got {args.opts}")
    gpu = args.device == "cuda"
    height = args.height or (800 if gpu else 256)
    width = args.width or (1333 if gpu else 320)
    precisions = (args.precisions or ("fp32,bf16" if gpu else "fp32")).split(",")
    warmup = args.warmup or (1 if args.quick else (10 if gpu else 2))
    iters = args.iters or (2 if args.quick else (30 if gpu else 5))
    # Inference and the profiled step are timed after 2 untimed calls; one with --quick (the
    # test's CPU run: the first call is the one that carries one-time costs).
    side_warmup = 1 if args.quick else 2
    batch = synthetic_batch(args.images, height, width, boxes_per_image=args.boxes, num_classes=80)
    if gpu:
        for item in batch:
            item["image"] = item["image"].cuda()
    machine = torch.cuda.get_device_name() if gpu else f"CPU {platform.machine()} x{os.cpu_count()}"
    meta = {"machine": machine, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "batch": f"{args.images} images of {width}x{height}, {args.boxes} boxes+masks each",
            "timing": f"median of {iters} steps after {warmup} warm-up",
            "command": command_line("tools/benchmark_train.py", sys.argv[1:])}
    models = args.models.split(",") if args.models else list(STEP_PROFILE_ORDER if args.step_profile else DEFAULT_MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    if args.step_profile:
        precisions = sorted(precisions, key=lambda p: p != "bf16")  # bf16 first
        order = [m for m in STEP_PROFILE_ORDER if m in models] + [m for m in models if m not in STEP_PROFILE_ORDER]
        models = order
    kind = "step_profile" if args.step_profile else "train"
    stem = result_stem(args.out_dir, kind, machine, "quick" if args.quick else "")
    rows: List[Dict] = []
    planned = [(p, m) for p in precisions for m in models]
    started = time.monotonic()
    for index, (precision, name) in enumerate(planned):
        if index and args.time_limit and time.monotonic() - started > args.time_limit:  # (the first row always runs)
            meta["partial"] = f"stopped at the time limit ({args.time_limit:.0f} s): not run: {planned[index:]}"
            stem = result_stem(args.out_dir, kind, machine, "_".join(x for x in ("quick" if args.quick else "",
                                                                                 "partial") if x))
            break
        row = measure(name, args.device, batch, precision, warmup, iters, iters, args.opts, side_warmup,
                      step_profile=args.step_profile)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(stem, meta, rows, precisions)  # after every row: a run cut short keeps what it measured
        if gpu:  # the model is gone with measure()'s frame: give its memory back
            torch.cuda.empty_cache()
    profile = None
    if args.profile:  # gn_det's model, and its channels_last twin when that was measured
        names = ["gn_det GN"] + [n for n in ("gn_det GN NHWC",) if n in models]
        profile = [(n, precisions[-1], profile_step(n, args.device, batch, precisions[-1], args.opts, side_warmup))
                   for n in names]
    print(write_results(stem, meta, rows, precisions, profile))


def write_results(stem: str, meta: Dict, rows: List[Dict], precisions: List[str], profile=None) -> str:
    """Write the JSON and markdown files (stem + .json/.md); returns the markdown."""
    lines = [f"# Training-step benchmark: {meta['machine']}", "",
             f"{meta['date']}, torch {meta['torch']}; {meta['batch']}; {meta['timing']}. "
             f"Command: `{meta['command'].strip()}`.", "",
             "| precision | model | step (s) | step / frozen-BN | first step (s) | GN buckets tuned "
             "| inference per image (s) | inference / frozen-BN | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for precision in precisions:
        base = next((r for r in rows if r["precision"] == precision and r["model"] == "frozen-BN"), None)
        for r in (r for r in rows if r["precision"] == precision):
            step_ratio = f"{r['step_s'] / base['step_s']:.3f}" if base else ""
            infer_ratio = f"{r['infer_s'] / base['infer_s']:.3f}" if base else ""
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a (CPU)"
            lines.append(f"| {precision} | {r['model']} | {r['step_s']:.3f} | {step_ratio} | {r['first_step_s']:.3f} | "
                         f"{r['tuned_buckets']} | {r['infer_s']:.3f} | {infer_ratio} | {peak} |")
    if any("norm_host_s" in r for r in rows):
        lines += ["", "## Where a step's time goes (one profiled step after warm-up)", "",
                  "| precision | model | profiled step (s) | GPU busy | GPU kernels (s) | GN kernels (s) | layout copies (s) "
                  "| host in norm calls (s) | norm calls | warm-up peak (GiB) | decisions |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def fmt(value, spec):
            return "n/a" if value is None else format(value, spec)
        for r in (r for r in rows if "norm_host_s" in r):
            decisions = ", ".join(f"{k} {v}" for k, v in r["decisions"].items()) or "none"
            lines.append(f"| {r['precision']} | {r['model']} | {r['profiled_step_s']:.3f} | {fmt(r['gpu_busy_fraction'], '.2f')} "
                         f"| {fmt(r['gpu_kernel_s'], '.4f')} | {fmt(r['gpu_gn_kernel_s'], '.4f')} "
                         f"| {fmt(r['gpu_copy_kernel_s'], '.4f')} | {r['norm_host_s']:.4f} | {r['norm_calls']} "
                         f"| {fmt(r['warmup_peak_gib'], '.2f')} | {decisions} |")
    if meta.get("partial"):
        lines += ["", f"PARTIAL: {meta['partial']}"]
    for name, precision, table in profile or ():
        lines += ["", f"## Top ops of the {name} training step ({precision})", "", "```", table, "```"]
    return write_result_files(stem, meta, rows, "\n".join(lines))

if __name__ == "__main__":
    main()
