"""Helpers shared by the benchmark scripts in tools/."""
from __future__ import annotations

import json
import os
from typing import List


def command_line(script: str, argv: List[str]) -> str:
    """The command that re-runs a benchmark, for its result files: the script and its
    arguments, less --out-dir (where the files went is not part of what was measured)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out-dir":
            skip = True
        elif not arg.startswith("--out-dir="):
            kept.append(arg)
    return " ".join([f"python {script}"] + kept)


def machine_slug(machine: str) -> str:
    """A machine's name as it goes into result file names: "NVIDIA H100 80GB HBM3" ->
    "nvidia_h100_80gb_hbm3"."""
    return "".join(c if c.isalnum() else "_" for c in machine).strip("_").lower()


def write_result_files(stem: str, meta: dict, rows: list, text: str) -> str:
    """Write a benchmark's results: ``<stem>.json`` (``{"meta", "rows"}``) and ``<stem>.md``
    (``text``, newline-terminated). Returns the markdown text."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = text if text.endswith("\n") else text + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    return text


def result_stem(out_dir: str, prefix: str, machine: str, suffix: str = "") -> str:
    """A benchmark's result files' path without the extension, named after the machine:
    ``<out_dir>/<prefix>_<machine slug>[_<suffix>]``."""
    return os.path.join(out_dir, f"{prefix}_{machine_slug(machine)}" + (f"_{suffix}" if suffix else ""))
