"""``python -m gn_det.check`` over every case in parallel processes: correctness in minutes on a
GPU that has compiled nothing yet.

The first check on a machine spends most of its time in Triton's compiler, one kernel at a time
in one process. This tool runs one ``python -m gn_det.check --shapes =NAME`` per case name,
``--jobs`` at a time (the largest shapes first), so that the kernels compile on many CPU cores at
once into the shared Triton cache, and a kernel fault (an illegal memory access poisons a CUDA
context) costs one shape's cases, not the rest. The processes share the GPU, so their times are
not measurements (``--reps 1``); run ``python -m gn_det.check`` alone afterwards for the timing, on
a warm cache. Without CUDA it does the same for the check's CPU-path cases.

    python tools/check_parallel.py --jobs 12 --time-limit 240 --out-dir results/
    python tools/check_parallel.py --shapes stem,res5 -- --dtypes bf16   # (after --: check's own flags)

Writes ``check_parallel_<gpu>.json`` (every row, each process's exit status and the end of its
stderr, the cases not run) and prints the failures and a last line; exits 1 if any case failed
or any process died, else 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from gn_det.diagnostics.check import machine_name, name_matches, shape_table, slug, split_names


def run_one(name: str, check_args: List[str], time_limit: float, out_dir: str) -> dict:
    """One check process for one case name; returns its rows and how it ended."""
    fd, path = tempfile.mkstemp(prefix="check_", suffix=".json", dir=out_dir)
    os.close(fd)
    command = [sys.executable, "-m", "gn_det.diagnostics.check", "--shapes", f"={name}", "--warmup", "0", "--reps", "1",
               "--json", path] + check_args
    if time_limit > 0:
        command += ["--time-limit", str(time_limit)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # many processes: one CPU thread each
    started = time.monotonic()
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = {"name": name, "exit_status": proc.returncode, "seconds": round(time.monotonic() - started, 1),
              "rows": [], "not_run": [], "stderr_tail": proc.stderr[-3000:]}
    try:
        with open(path) as f:
            report = json.load(f)
        result.update(rows=report["rows"], not_run=report["summary"]["not_run"], machine=report["machine"],
                      tolerances=report["tolerances"])
    except (OSError, ValueError, KeyError) as exc:
        result["report_error"] = f"{type(exc).__name__}: {exc}"
        result["stdout_tail"] = proc.stdout[-3000:]
    finally:
        os.unlink(path)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    check_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="processes at once (default: the CPU count less 2)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds after which a process starts no new case (0: none)")
    parser.add_argument("--shapes", default="", help="comma-separated parts of case names (default: all)")
    parser.add_argument("--quick", action="store_true", help="python -m gn_det.check's --quick shapes")
    parser.add_argument("--out-dir", default=".", help="where check_parallel_<gpu>.json goes")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    taken = [a for a in check_args if a.split("=")[0] in ("--shapes", "--json", "--part", "--quick", "--rows-out")]
    if taken:
        parser.error(f"{', '.join(taken)} after --: this tool sets them for each process (use its own --shapes, "
                     "--quick, --out-dir)")
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:  # the CPU path's cases (the interpreter's are python -m gn_det.check's own)
        check_args = ["--part", "cpu-path"] + check_args
    check_args = (["--quick"] if args.quick else []) + check_args
    table = shape_table("cuda" if cuda else "cpu path", args.quick)
    filters = split_names(args.shapes)
    names = [n for n in table if not filters or any(name_matches(f, n) for f in filters)]
    if not names:
        parser.error(f"--shapes {args.shapes!r} matches none of: {', '.join(table)}")
    names.sort(key=lambda n: -math.prod(table[n][0]))  # the longest first: the pool ends together
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.monotonic()
    print(f"check_parallel: {len(names)} case names, {args.jobs} processes"
          + ("" if cuda else " (no CUDA here: gn_det's CPU path)"), flush=True)

    def one(name: str) -> dict:
        result = run_one(name, check_args, args.time_limit, args.out_dir)
        bad = sum(r["status"] != "ok" for r in result["rows"])
        print(f"  {name}: {len(result['rows'])} cases, {bad} failed, exit {result['exit_status']}, "
              f"{result['seconds']:.0f} s", flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, names))
    rows = [row for r in results for row in r["rows"]]
    failed = [row for row in rows if row["status"] != "ok"]
    died = [r for r in results if r["exit_status"] not in (0, 1) or "report_error" in r]
    not_run = [label for r in results for label in r["not_run"]]
    machine = next((r["machine"] for r in results if "machine" in r), {})
    report = {"command": " ".join(["python tools/check_parallel.py"] + list(sys.argv[1:])),
              "machine": machine, "tolerances": next((r["tolerances"] for r in results if "tolerances" in r), {}),
              "note": "correctness only: the processes shared the GPU, so their times are not measurements",
              "seconds": round(time.monotonic() - started, 1),
              "summary": {"cases": len(rows), "failed": len(failed), "processes_died": len(died),
                          "not_run": len(not_run)},
              "processes": [{k: v for k, v in r.items() if k not in ("rows", "machine", "tolerances")}
                            for r in results],
              "rows": rows}
    path = os.path.join(args.out_dir, f"check_parallel_{slug(machine_name(machine)) if machine else 'unknown'}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    for row in failed:
        print(f"FAILED {row['label']}: {'; '.join(row.get('problems', []))}")
    for r in died:
        print(f"DIED {r['name']} (exit {r['exit_status']}): {r.get('report_error', '')} {r['stderr_tail'][-800:]}")
    print(f"check_parallel: {len(rows)} cases, {len(failed)} failed, {len(died)} processes died, "
          f"{len(not_run)} not run, in {report['seconds']:.0f} s; report {path}", flush=True)
    return 1 if failed or died else 0


if __name__ == "__main__":
    sys.exit(main())
