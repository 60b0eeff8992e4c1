#!/usr/bin/env python
"""GN's claims on data, in the style of the GN paper (Wu & He, ECCV 2018):

  --study batch   (Figure 1): the same small ResNet with BatchNorm and with GroupNorm at batch
                  sizes 32, 16, 8, 4, 2; learning rate scaled linearly with the batch, the same
                  number of epochs. BN's error grows as the batch shrinks; GN's barely moves.
  --study groups  (Table 3): GN at a fixed batch with 1, 2, 4, ... 64 groups, and with 64, 32,
                  ..., 1 channels per group. Where a layer has fewer channels than the
                  requested groups (or channels per group), it uses all its channels
                  (G = C: instance norm; or one group: layer norm); the table says so.

Data: gn_det's embedded 10-class shapes classification set (generated, nothing downloaded).
Reports validation error per setting as a markdown table, JSON, and (batch study) a PNG plot.

    python tools/batch_size_study.py                     # the batch study, default size (~20 min on 2 CPU cores)
    python tools/batch_size_study.py --study groups      # the group-count study
    python tools/batch_size_study.py --quick             # a tiny run, for tests
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import gn_det
from gn_det.bench.classification import CLASSES, make_shapes_classification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NormFactory = Callable[[int], nn.Module]


def gn_factory(num_groups: int = 32, channels_per_group: int = 0) -> NormFactory:
    def make(channels: int) -> nn.Module:
        if channels_per_group:
            return gn_det.GroupNorm(max(1, channels // min(channels_per_group, channels)), channels)
        return gn_det.GroupNorm(min(num_groups, channels), channels)
    return make


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


def batch_study(args, data) -> List[dict]:
    rows = []
    for batch_size in args.batch_sizes:
        for name in ("BN", "GN"):
            start = time.time()
            error = train_and_evaluate(NORMS[name], batch_size, data, args.epochs, args.lr, args.width, args.seed)
            rows.append({"norm": name, "batch_size": batch_size, "val_error": error, "seconds": time.time() - start})
            print(f"{name} batch {batch_size:2d}: val error {error:5.2f}%  ({time.time() - start:.0f} s)", flush=True)
    return rows


def groups_study(args, data) -> List[dict]:
    rows = []
    widths = [args.width, 2 * args.width, 4 * args.width]
    for kind, values in (("groups", args.groups), ("channels_per_group", args.channels_per_group)):
        for value in values:
            norm = gn_factory(num_groups=value) if kind == "groups" else gn_factory(channels_per_group=value)
            capped = [w for w in widths if value > w]
            start = time.time()
            error = train_and_evaluate(norm, args.fixed_batch, data, args.epochs, args.lr, args.width, args.seed)
            note = f"capped at C in layers of {capped} channels" if capped else ""
            rows.append({"setting": kind, "value": value, "val_error": error, "note": note, "seconds": time.time() - start})
            print(f"GN {kind}={value:2d}: val error {error:5.2f}%  {note} ({time.time() - start:.0f} s)", flush=True)
    return rows


def write_batch_results(rows: List[dict], meta: dict, stem: str) -> None:
    sizes = sorted({r["batch_size"] for r in rows}, reverse=True)
    err = {(r["norm"], r["batch_size"]): r["val_error"] for r in rows}
    lines = [f"# Batch-size study ({meta['machine']}, {meta['date']})", "", f"Command: `{meta['command']}`; {meta['setup']}.", "",
             "| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for norm in ("BN", "GN"):
        lines.append(f"| {norm} | " + " | ".join(f"{err[(norm, b)]:.2f}" for b in sizes) + " |")
    lines.append("| BN - GN | " + " | ".join(f"{err[('BN', b)] - err[('GN', b)]:+.2f}" for b in sizes) + " |")
    lines += ["", "Validation error (%), lower is better."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for norm, colour in (("BN", "tab:blue"), ("GN", "tab:red")):
        ax.plot(range(len(sizes)), [err[(norm, b)] for b in sizes], "o-", color=colour, label=f"{norm}")
    ax.set_xticks(range(len(sizes)), [str(b) for b in sizes])
    ax.set_xlabel("batch size (images per worker)")
    ax.set_ylabel("validation error (%)")
    ax.set_title("BN vs GN as the batch shrinks (cf. GN paper, Fig. 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


def write_groups_results(rows: List[dict], meta: dict, stem: str) -> None:
    lines = [f"# Group-count study ({meta['machine']}, {meta['date']})", "",
             f"Command: `{meta['command']}`; {meta['setup']}.", ""]
    for kind, header in (("groups", "groups G"), ("channels_per_group", "channels per group")):
        sel = [r for r in rows if r["setting"] == kind]
        if not sel:
            continue
        best = min(r["val_error"] for r in sel)
        lines += [f"| {header} | " + " | ".join(str(r["value"]) for r in sel) + " |", "|---|" + "---|" * len(sel),
                  "| val error (%) | " + " | ".join(f"{r['val_error']:.2f}" for r in sel) + " |",
                  "| vs best | " + " | ".join(f"{r['val_error'] - best:+.2f}" for r in sel) + " |", ""]
        notes = [f"{r['value']}: {r['note']}" for r in sel if r["note"]]
        if notes:
            lines += [f"Capped ({header}): " + "; ".join(notes), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=("batch", "groups"), default="batch")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "reproduction"))
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.val_images, args.epochs, args.width = 256, 128, 1, 8
        args.batch_sizes, args.groups, args.channels_per_group = [8, 2], [8, 1], [4]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    x_train, y_train = make_shapes_classification(args.train_images, seed=1000 + args.seed)
    x_val, y_val = make_shapes_classification(args.val_images, seed=2000 + args.seed)
    data = (standardize_per_image(x_train), y_train, standardize_per_image(x_val), y_val)
    start = time.time()
    rows = batch_study(args, data) if args.study == "batch" else groups_study(args, data)
    command = " ".join(["python tools/batch_size_study.py", *sys.argv[1:]])  # as run: the table can be made again
    meta = {
        "machine": f"CPU {platform.machine()} x{os.cpu_count()}", "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "command": command, "total_seconds": time.time() - start,
        "setup": (f"SmallResNet width {args.width}/{2 * args.width}/{4 * args.width} (GN: 32 groups, G = C in narrower layers), "
                  f"{len(CLASSES)} classes, inputs standardised per image, "
                  f"{args.train_images} train / {args.val_images} val images, {args.epochs} epochs, "
                  f"SGD lr {args.lr} x batch/32, cosine; seed {args.seed}; run time {time.time() - start:.0f} s"),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{args.study}_study" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    (write_batch_results if args.study == "batch" else write_groups_results)(rows, meta, stem)
    print(open(stem + ".md").read())
    print(f"wrote {stem}.md/.json" + (" and .png" if args.study == "batch" else ""))


if __name__ == "__main__":
    main()
