#!/usr/bin/env python
"""GN's classification claims on data, in the style of the GN paper (Wu & He, ECCV 2018), with
several seeds per setting and one rule for what counts as a difference:

  --study batch   (Figure 1): the same small ResNet with BatchNorm and with GroupNorm (32 groups)
                  at batch sizes 32, 16, 8, 4, 2; learning rate scaled linearly with the batch, the
                  same number of epochs.
  --study groups  (Table 3): GN at a fixed batch with 64, 32, ..., 1 groups, and with 64, 32, ...,
                  1 channels per group. Where a layer has fewer channels than the requested groups
                  (or channels per group), it uses all its channels (G = C: instance norm; or one
                  group: layer norm); the table gives each setting's groups per layer, and settings
                  that build the same network share their runs.

Data: gn_det's embedded 10-class shapes classification set (generated, nothing downloaded). A
seed changes everything random: the generated training and validation images (data seed, by
default the seed), the initial weights, and the order and flips of the batches; --data-seed fixes
the images while the seed varies the rest.

Every finished run is appended at once to <out-dir>/<name>_runs.jsonl (seed, settings, error,
seconds, threads, commit), so a killed study loses at most the run in progress: --resume reuses
every run recorded in <out-dir>/*_runs.jsonl (of any section) with the same settings and seed.
The tables (<name>.md/.json, and .png for the batch study) are made from the recorded runs of the
section's settings and the command's seeds, whichever invocation ran them: per cell the mean, the
sample std over seeds and n; differences are judged by NOISE_RULE; a cell with fewer than
--min-seeds seeds marks the table PARTIAL.

    python tools/batch_size_study.py --seeds 0 1 2 --resume                  # the batch study
    python tools/batch_size_study.py --study groups --seeds 0 1 2 --resume   # the group-count study
    python tools/batch_size_study.py --study groups --epochs 20 --seeds 0 1 --resume  # writes groups_study_20ep.*
    python tools/batch_size_study.py --tables-only ...                       # the tables from the records, no runs
    python tools/batch_size_study.py --quick                                 # a tiny run, for tests
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import gn_det

try:  # gn_det's layout after the move of its diagnostics; the older one
    from gn_det.diagnostics.bench.classification import CLASSES, make_shapes_classification
except ImportError:  # pragma: no cover - older checkouts (the study's pinned commit)
    from gn_det.bench.classification import CLASSES, make_shapes_classification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NormFactory = Callable[[int], nn.Module]

# The one rule every table and verdict of the studies uses (tools/detection_norm_study.py too).
NOISE_RULE = ("a difference between two settings counts only if it is larger than twice its standard error over "
              "seeds, 2 x sqrt(s_a^2/n_a + s_b^2/n_b) (s: sample std over seeds, n: seeds), and only with at "
              "least 2 seeds on each side; otherwise it is inside the noise and nothing is claimed")


def noise_compare(a: Sequence[float], b: Sequence[float]) -> dict:
    """``mean(a) - mean(b)`` judged by NOISE_RULE: ``{"diff", "two_se", "n_a", "n_b", "verdict"}``,
    verdict one of ``"a higher"``, ``"b higher"``, ``"inside the noise"``, ``"too few seeds"``
    (``two_se`` is NaN then)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    out = {"diff": (statistics.fmean(a) - statistics.fmean(b)) if a and b else math.nan,
           "two_se": math.nan, "n_a": len(a), "n_b": len(b)}
    if len(a) < 2 or len(b) < 2:
        out["verdict"] = "too few seeds"
        return out
    out["two_se"] = 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    if abs(out["diff"]) > out["two_se"]:
        out["verdict"] = "a higher" if out["diff"] > 0 else "b higher"
    else:
        out["verdict"] = "inside the noise"
    return out


def stats(values: Sequence[float]) -> dict:
    """Mean, sample std (NaN for one value), n, min and max."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values) if values else math.nan,
            "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "n": len(values), "min": min(values, default=math.nan), "max": max(values, default=math.nan)}


def cell_text(s: dict, digits: int = 2) -> str:
    """``mean ± std (n)``; one seed: ``mean (n=1)``; none: ``–``."""
    if not s["n"]:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


def diff_text(c: dict, names: Tuple[str, str], digits: int = 2) -> str:
    """A comparison's difference, its 2 SE and the verdict in words, e.g.
    ``-1.35 ± 2.10: inside the noise``; ``names`` name a and b (e.g. ``("BN", "GN")``)."""
    if math.isnan(c["diff"]):
        return "–"
    if c["verdict"] == "too few seeds":
        return f"{c['diff']:+.{digits}f} (too few seeds)"
    words = {"a higher": f"{names[0]} higher", "b higher": f"{names[1]} higher"}.get(c["verdict"], c["verdict"])
    return f"{c['diff']:+.{digits}f} ± {c['two_se']:.{digits}f}: {words}"


def git_state(root: str = ROOT) -> dict:
    """The checkout's commit, the paths that differ from it, and this tool's blob hash."""
    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "dirty": dirty,
            "tool_blob": git("hash-object", os.path.abspath(__file__)).strip() or None}


# --- the model and one training run (unchanged since the seed-0 tables: same numbers) ---

def gn_factory(num_groups: int = 32, channels_per_group: int = 0) -> NormFactory:
    def make(channels: int) -> nn.Module:
        return gn_det.GroupNorm(groups_for(channels, num_groups, channels_per_group), channels)
    return make


def groups_for(channels: int, num_groups: int = 32, channels_per_group: int = 0) -> int:
    """The groups a layer of ``channels`` gets: ``num_groups`` or ``channels / channels_per_group``,
    capped at the channels (G = C) or at one group."""
    if channels_per_group:
        return max(1, channels // min(channels_per_group, channels))
    return min(num_groups, channels)


NORMS: Dict[str, NormFactory] = {"BN": nn.BatchNorm2d, "GN": gn_factory(32)}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class SmallResNet(nn.Module):
    """A ResNet-style classifier for 32x32 images: stem + 3 stages of 2 basic blocks."""

    def __init__(self, norm: NormFactory, width: int = 32, num_classes: int = 10):
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU())
        layers, cin = [], width
        for i, w in enumerate(widths):
            layers += [BasicBlock(cin, w, 1 if i == 0 else 2, norm), BasicBlock(w, w, 1, norm)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def standardize_per_image(images: torch.Tensor) -> torch.Tensor:
    """Each image to zero mean, unit variance per channel. The images' backgrounds have random
    colours; without this, GN (which normalises each sample) removes that offset for free while
    BN (which normalises over the batch) must learn to, and the comparison would measure the
    data rather than the norms."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    return (images - mean) / (images.std(dim=(2, 3), keepdim=True) + 1e-3)


def train_and_evaluate(norm: NormFactory, batch_size: int, data, epochs: int, base_lr: float,
                       width: int, seed: int) -> float:
    """Validation error (%) after training with SGD; lr = base_lr * batch_size / 32."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = SmallResNet(norm, width)
    lr = base_lr * batch_size / 32
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // batch_size
    total = epochs * steps_per_epoch
    warmup = min(total // 10, 5 * steps_per_epoch // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            inputs = x_train[idx]
            if torch.rand(1, generator=gen).item() < 0.5:  # flip augmentation
                inputs = inputs.flip(3)
            loss = F.cross_entropy(model(inputs), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x_val[i:i + 500]).argmax(1) for i in range(0, len(x_val), 500)])
    return 100.0 * (predictions != y_val).float().mean().item()


# --- the studies' cells, records and resume ---

def widths_of(width: int) -> List[int]:
    return [width, 2 * width, 4 * width]


def cells(args) -> List[dict]:
    """The section's settings, in table order: ``{"norm", "batch_size", "label", "setting",
    "value", "layer_groups"}``; ``layer_groups`` (GN's groups in the 3 stages' layers, () for
    BN) identifies the network, so settings that build the same one share their runs."""
    widths = widths_of(args.width)
    if args.study == "batch":
        return [{"norm": name, "batch_size": b, "label": f"{name} batch {b}", "setting": "norm", "value": name,
                 "layer_groups": [groups_for(w) for w in widths] if name == "GN" else []}
                for b in args.batch_sizes for name in ("BN", "GN")]
    out = []
    for kind, values in (("groups", args.groups), ("channels_per_group", args.channels_per_group)):
        for v in values:
            lg = [groups_for(w, v) if kind == "groups" else groups_for(w, 0, v) for w in widths]
            out.append({"norm": "GN", "batch_size": args.fixed_batch, "setting": kind, "value": v,
                        "label": f"GN {'G' if kind == 'groups' else 'C/G'}={v}", "layer_groups": lg})
    return out


def run_key(record: dict) -> tuple:
    """What makes two runs the same experiment (the thread count, commit and date do not)."""
    return (record["norm"], tuple(record["layer_groups"]), record["batch_size"], record["epochs"], record["seed"],
            record["data_seed"], float(record["lr"]), record["width"], record["train_images"], record["val_images"])


def cell_key(cell: dict, args, seed: int) -> tuple:
    return run_key({**cell, "epochs": args.epochs, "seed": seed, "data_seed": data_seed_of(args, seed),
                    "lr": args.lr, "width": args.width, "train_images": args.train_images,
                    "val_images": args.val_images})


def data_seed_of(args, seed: int) -> int:
    return seed if args.data_seed is None else args.data_seed


def load_records(out_dir: str) -> List[dict]:
    """Every run recorded in ``out_dir/*_runs.jsonl`` (a line cut short by a kill is skipped)."""
    records = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*_runs.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def index_records(records: Sequence[dict]) -> Dict[tuple, List[dict]]:
    """Records by run_key; a key run more than once keeps all its records (the first is used)."""
    out: Dict[tuple, List[dict]] = {}
    for r in records:
        out.setdefault(run_key(r), []).append(r)
    return out


def legacy_records(path: str, note: str = "") -> List[dict]:
    """Runs of the tool's earlier single-seed format (``{"meta", "rows"}``, settings in
    ``meta["setup"]``) as records, marked with their source file (commit and threads unknown
    unless ``meta`` has them)."""
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    setup = meta["setup"]

    def grab(pattern, cast=int):
        return cast(re.search(pattern, setup).group(1))
    width, epochs, seed = grab(r"width (\d+)/"), grab(r"(\d+) epochs"), grab(r"seed (\d+)")
    train_images, val_images = grab(r"(\d+) train /"), grab(r"/ (\d+) val images")
    lr = grab(r"SGD lr ([0-9.]+)", float)
    fixed = re.search(r"--fixed-batch (\d+)", meta["command"])
    out = []
    for row in data["rows"]:
        if "batch_size" in row:
            cell = {"norm": row["norm"], "batch_size": row["batch_size"], "setting": "norm", "value": row["norm"],
                    "label": f"{row['norm']} batch {row['batch_size']}",
                    "layer_groups": [groups_for(w) for w in widths_of(width)] if row["norm"] == "GN" else []}
        else:
            kind, v = row["setting"], row["value"]
            cell = {"norm": "GN", "batch_size": int(fixed.group(1)) if fixed else 32, "setting": kind, "value": v,
                    "label": f"GN {'G' if kind == 'groups' else 'C/G'}={v}",
                    "layer_groups": [groups_for(w, v) if kind == "groups" else groups_for(w, 0, v)
                                     for w in widths_of(width)]}
        out.append({**cell, "epochs": epochs, "seed": seed, "data_seed": seed, "lr": lr, "width": width,
                    "train_images": train_images, "val_images": val_images, "val_error": row["val_error"],
                    "seconds": row["seconds"], "date": meta["date"], "machine": meta["machine"],
                    "torch": meta.get("torch"), "commit": meta.get("commit"),
                    # the earlier tool set torch's threads to the CPU count, whatever a note said
                    "threads": meta.get("threads") or int(re.search(r" x(\d+)$", meta["machine"]).group(1)),
                    "source": os.path.relpath(path, ROOT) + (f" ({note})" if note else ""),
                    "command": meta["command"]})
    return out


def run_cells(args, todo: Sequence[Tuple[dict, int]], records_path: str, state: dict) -> List[dict]:
    """Runs ``(cell, seed)`` pairs in order, appending each finished run to ``records_path``."""
    data_cache: Dict[int, tuple] = {}
    done = []
    for cell, seed in todo:
        ds = data_seed_of(args, seed)
        if ds not in data_cache:
            data_cache.clear()
            x_train, y_train = make_shapes_classification(args.train_images, seed=1000 + ds)
            x_val, y_val = make_shapes_classification(args.val_images, seed=2000 + ds)
            data_cache[ds] = (standardize_per_image(x_train), y_train, standardize_per_image(x_val), y_val)
        if cell["norm"] == "BN":
            norm = NORMS["BN"]
        elif cell["setting"] == "channels_per_group":
            norm = gn_factory(channels_per_group=cell["value"])
        else:
            norm = gn_factory(num_groups=cell["value"] if cell["setting"] == "groups" else 32)
        start = time.time()
        error = train_and_evaluate(norm, cell["batch_size"], data_cache[ds], args.epochs, args.lr, args.width, seed)
        record = {**cell, "epochs": args.epochs, "seed": seed, "data_seed": ds, "lr": args.lr, "width": args.width,
                  "steps": args.epochs * (args.train_images // cell["batch_size"]),
                  "lr_used": args.lr * cell["batch_size"] / 32,
                  "train_images": args.train_images, "val_images": args.val_images, "val_error": error,
                  "seconds": time.time() - start, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "machine": f"CPU {platform.machine()} x{os.cpu_count()}", "torch": torch.__version__,
                  "threads": torch.get_num_threads(), **state, "command": args.command}
        with open(records_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        done.append(record)
        print(f"{cell['label']} seed {seed}: val error {error:5.2f}%  ({record['seconds']:.0f} s)", flush=True)
    return done


# --- tables ---

def summarize(args, records: Sequence[dict]) -> List[dict]:
    """Per cell of the section (table order): its recorded runs of the command's seeds, and stats."""
    index = index_records(records)
    seeds = sorted(set(args.seeds))  # the command's seeds: the table is what its command makes
    out = []
    for cell in cells(args):
        runs = [index[cell_key(cell, args, s)][0] for s in seeds if cell_key(cell, args, s) in index]
        out.append({**cell, "steps": args.epochs * (args.train_images // cell["batch_size"]),
                    "lr_used": args.lr * cell["batch_size"] / 32, "val_images": args.val_images,
                    "seeds": [r["seed"] for r in runs], "errors": [r["val_error"] for r in runs],
                    "seconds": [r["seconds"] for r in runs], "stats": stats([r["val_error"] for r in runs])})
    return out


def partial_note(summary: Sequence[dict], min_seeds: int) -> str:
    short = [e for e in summary if e["stats"]["n"] < min_seeds]
    if not short:
        return ""
    return (f"**PARTIAL**: {len(short)} of {len(summary)} cells have fewer than {min_seeds} seeds ("
            + "; ".join(f"{e['label']}: seeds {e['seeds'] or 'none'}" for e in short) + ").")


def batch_markdown(summary: Sequence[dict], meta: dict) -> str:
    sizes = sorted({e["batch_size"] for e in summary}, reverse=True)
    by = {(e["norm"], e["batch_size"]): e for e in summary}
    lines = ["| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for norm in ("BN", "GN"):
        lines.append(f"| {norm} | " + " | ".join(cell_text(by[(norm, b)]["stats"]) for b in sizes) + " |")
    comps = {b: noise_compare(by[("BN", b)]["errors"], by[("GN", b)]["errors"]) for b in sizes}
    lines.append("| BN - GN | " + " | ".join(diff_text(comps[b], ("BN", "GN")) for b in sizes) + " |")
    lines += ["", "Validation error (%): mean ± sample std over seeds (n seeds). BN - GN: the difference of the "
              "means ± 2 standard errors, and the verdict by the rule (\"BN higher\": BN's error is higher).", "",
              "Per seed:", "", "| norm | seed | " + " | ".join(f"batch {b}" for b in sizes) + " |",
              "|---|---|" + "---|" * len(sizes)]
    seeds = sorted({s for e in summary for s in e["seeds"]})
    for norm in ("BN", "GN"):
        for s in seeds:
            vals = []
            for b in sizes:
                e = by[(norm, b)]
                vals.append(f"{e['errors'][e['seeds'].index(s)]:.2f}" if s in e["seeds"] else "–")
            lines.append(f"| {norm} | {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def groups_markdown(summary: Sequence[dict], meta: dict) -> str:
    lines = []
    for kind, header in (("groups", "groups G"), ("channels_per_group", "channels per group")):
        sel = [e for e in summary if e["setting"] == kind]
        if not sel:
            continue
        # the best by mean among the settings the rule can judge (2 seeds or more), else among all
        judged = [e for e in sel if e["stats"]["n"] >= 2] or [e for e in sel if e["stats"]["n"]]
        best = min(judged, key=lambda e: e["stats"]["mean"]) if judged else None
        lines += [f"| {header} | groups per layer ({'/'.join(map(str, meta['widths']))} ch) | val error (%) "
                  f"| seeds | vs the best ({header} = {best['value'] if best else '–'}) |", "|---|---|---|---|---|"]
        for e in sel:
            versus = "–" if e is best or best is None else diff_text(
                noise_compare(e["errors"], best["errors"]), (f"{e['value']}", f"{best['value']}"))
            if "higher" in versus:
                versus = versus.replace(f": {e['value']} higher", ": worse")
            lines.append(f"| {e['value']} | {'/'.join(map(str, e['layer_groups']))} | {cell_text(e['stats'])} "
                         f"| {', '.join(map(str, e['seeds'])) or '–'} | {versus} |")
        lines.append("")
    lines += ["Validation error: mean ± sample std over seeds (n). vs best: the difference from the setting with "
              "the lowest mean ± 2 standard errors, judged by the rule. Settings with the same groups per layer "
              "are the same network and share their runs (e.g. at width 16, G = 64 and 1 channel per group: "
              "instance norm in every layer).", "", "Per seed:", "",
              "| setting | groups per layer | " + " | ".join(f"seed {s}" for s in
                                                         sorted({s for e in summary for s in e["seeds"]})) + " |"]
    seeds = sorted({s for e in summary for s in e["seeds"]})
    lines.append("|---|---|" + "---|" * len(seeds))
    for e in summary:
        lines.append(f"| {e['label']} | {'/'.join(map(str, e['layer_groups']))} | " + " | ".join(
            f"{e['errors'][e['seeds'].index(s)]:.2f}" if s in e["seeds"] else "–" for s in seeds) + " |")
    return "\n".join(lines)


def write_tables(args, records: Sequence[dict], stem: str) -> dict:
    summary = summarize(args, records)
    index = index_records(records)
    used = list({id(r): r for e in summary for r in (index[cell_key(e, args, s)][0] for s in e["seeds"])}.values())
    secs = [r["seconds"] for r in used]
    meta = {"command": args.command, "rule": NOISE_RULE, "min_seeds": args.min_seeds, "widths": widths_of(args.width),
            "setup": (f"SmallResNet width {'/'.join(map(str, widths_of(args.width)))}, {len(CLASSES)} classes, "
                      f"inputs standardised per image, {args.train_images} train / {args.val_images} val images, "
                      f"{args.epochs} epochs, SGD lr {args.lr} x batch/32, cosine"
                      + (f", batch {args.fixed_batch}" if args.study == "groups" else "")
                      + (f"; data seed {args.data_seed} for every seed" if args.data_seed is not None else
                         "; each seed its own data, initial weights and batch order")),
            "run_seconds": sum(secs), "runs": len(secs), "generated": time.strftime("%Y-%m-%d %H:%M"),
            "commits": sorted({str(r.get("commit") or "not recorded")[:12] for r in used}),
            "partial": partial_note(summary, args.min_seeds)}
    title = "Batch-size study" if args.study == "batch" else f"Group-count study ({args.epochs} epochs)"
    body = batch_markdown(summary, meta) if args.study == "batch" else groups_markdown(summary, meta)
    text = "\n".join([f"# {title}", "", meta["partial"] or "All cells have at least "
                      f"{args.min_seeds} seeds.", "", f"Command: `{args.command}`", "",
                      f"Setup: {meta['setup']}.", "",
                      f"Runs: {meta['runs']} ({meta['run_seconds'] / 60:.0f} min of training in all (per-run times in "
                      f"the JSON)); commits {', '.join(meta['commits'])} (each run's in the JSON).", "",
                      f"Rule: {NOISE_RULE}.", "", body, ""])
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": used}, f, indent=1)
    if args.study == "batch":
        plot_batch(summary, stem + ".png")
    return {"summary": summary, "meta": meta, "text": text}


def plot_batch(summary: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({e["batch_size"] for e in summary}, reverse=True)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k, (norm, colour) in enumerate((("BN", "tab:blue"), ("GN", "tab:red"))):
        entries = [next(e for e in summary if e["norm"] == norm and e["batch_size"] == b) for b in sizes]
        xs = [i + (k - 0.5) * 0.08 for i in range(len(sizes))]
        means = [e["stats"]["mean"] for e in entries]
        stds = [0 if math.isnan(e["stats"]["std"]) else e["stats"]["std"] for e in entries]
        ax.errorbar(xs, means, yerr=stds, fmt="o-", color=colour, capsize=3, label=f"{norm} (mean ± std)")
        for x, e in zip(xs, entries):
            ax.scatter([x] * len(e["errors"]), e["errors"], s=8, color=colour, alpha=0.5, zorder=3)
    ax.set_xticks(range(len(sizes)), [str(b) for b in sizes])
    ax.set_xlabel("batch size (images per worker)")
    ax.set_ylabel("validation error (%)")
    ax.set_title("BN vs GN as the batch shrinks (cf. GN paper, Fig. 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_name(args) -> str:
    if args.quick:
        return f"{args.study}_study_quick"
    return f"{args.study}_study" + (f"_{args.epochs}ep" if args.epochs != 5 else "")


def canonical_command(args) -> str:
    """The command with every setting spelled out: it makes the section's table again."""
    parts = ["python tools/batch_size_study.py", "--study", args.study, "--name", args.name,
             "--seeds", *map(str, args.seeds)]
    if args.data_seed is not None:
        parts += ["--data-seed", str(args.data_seed)]
    if args.quick:
        parts += ["--quick"]
    else:
        parts += ["--epochs", str(args.epochs), "--lr", str(args.lr), "--width", str(args.width),
                  "--train-images", str(args.train_images), "--val-images", str(args.val_images)]
        if args.study == "batch":
            parts += ["--batch-sizes", *map(str, args.batch_sizes)]
        else:
            parts += ["--fixed-batch", str(args.fixed_batch), "--groups", *map(str, args.groups),
                      "--channels-per-group", *map(str, args.channels_per_group)]
    parts += ["--threads", str(args.threads), "--min-seeds", str(args.min_seeds), "--resume"]
    if os.path.abspath(args.out_dir) != os.path.join(ROOT, "docs", "reproduction"):
        parts += ["--out-dir", os.path.relpath(args.out_dir, ROOT) if args.out_dir.startswith(ROOT) else args.out_dir]
    return " ".join(parts)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=("batch", "groups"), default="batch")
    parser.add_argument("--name", default="", help="the section's files: <out-dir>/<name>.{md,json,png} and "
                        "<name>_runs.jsonl (default: <study>_study, _<E>ep when --epochs is not 5, _quick)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (tests)")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate at batch 32 (scaled linearly)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (then x2, x4)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 16, 8, 4, 2])
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 32, 16, 8, 4, 2, 1])
    parser.add_argument("--channels-per-group", type=int, nargs="+", default=[64, 32, 16, 8, 4, 2, 1])
    parser.add_argument("--fixed-batch", type=int, default=32, help="batch size of the groups study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="each cell runs once per seed")
    parser.add_argument("--seed", type=int, dest="one_seed", default=None, help="one seed (same as --seeds N)")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="generate the images with this seed for every run (default: each run's seed)")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1)")
    parser.add_argument("--min-seeds", type=int, default=3, help="fewer seeds in a cell mark the table PARTIAL")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs recorded in <out-dir>/*_runs.jsonl; run only the missing ones")
    parser.add_argument("--tables-only", action="store_true", help="write the tables from the records; run nothing")
    parser.add_argument("--import-legacy", nargs="+", default=[], metavar="JSON",
                        help="convert earlier single-seed result files into records (<out-dir>/<name>_runs.jsonl); "
                             "run nothing")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "reproduction"))
    args = parser.parse_args(argv)
    if args.one_seed is not None:
        args.seeds = [args.one_seed]
    if args.quick:
        args.train_images, args.val_images, args.epochs, args.width = 256, 128, 1, 8
        args.batch_sizes, args.groups, args.channels_per_group = [8, 2], [8, 1], [4]
    args.name = args.name or default_name(args)
    args.command = canonical_command(args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    records_path = os.path.join(args.out_dir, args.name + "_runs.jsonl")
    if args.import_legacy:
        with open(records_path, "a") as f:
            for path in args.import_legacy:
                for r in legacy_records(path):
                    f.write(json.dumps(r) + "\n")
        print(f"appended {len(args.import_legacy)} files' runs to {records_path}")
        return
    torch.set_num_threads(args.threads)
    records = load_records(args.out_dir)
    if not args.tables_only:
        if os.path.exists(records_path) and not args.resume:
            raise SystemExit(f"batch_size_study: {records_path} exists: pass --resume to keep its runs (and run "
                             "only the missing ones), or --name for a new section")
        index = index_records(records)
        todo = [(cell, seed) for seed in args.seeds for cell in cells(args)]
        todo = [(c, s) for c, s in todo if cell_key(c, args, s) not in index]
        unique, seen = [], set()
        for c, s in todo:  # settings that build the same network run once
            if cell_key(c, args, s) not in seen:
                seen.add(cell_key(c, args, s))
                unique.append((c, s))
        print(f"{args.command}\n{len(unique)} runs to do, torch threads {torch.get_num_threads()}", flush=True)
        records += run_cells(args, unique, records_path, git_state())
    result = write_tables(args, records, os.path.join(args.out_dir, args.name))
    print(result["text"])
    print(f"wrote {os.path.join(args.out_dir, args.name)}.md/.json" + (" and .png" if args.study == "batch" else ""))


if __name__ == "__main__":
    main()
