#!/usr/bin/env python
"""Stop tools/train_net.py with a real signal at random moments and count the stops that were
not clean: anything but exit status 128 + signal, the one `train_net: stopped by ...` line, no
traceback and no `*.tmp` left.

    python tools/stop_signal_check.py --runs 30            # SIGTERM, demo config, 2 data workers

Each run trains the embedded dataset's demo Mask R-CNN (checkpoints every 2 iterations) and is
signalled at a uniformly random delay of up to --spread seconds after its second checkpoint
appears, so the signal lands in steps, data loading and checkpoint saves alike. A stop that
was not clean prints its output's end. docs/RELIABILITY.md records the counts before and after
gn_det.train.stopping.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "configs/demo/mask_rcnn_gn_shapes.yaml"
SMALL = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(96,)",
         "INPUT.MAX_SIZE_TRAIN", "160", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.MAX_ITER", "100000"]


def stop_once(sig: signal.Signals, spread: float, workers: int) -> tuple:
    """One run stopped by ``sig``: (clean, exit status, the output's end)."""
    out = tempfile.mkdtemp(prefix="gn_det_stop_")
    try:
        proc = subprocess.Popen([sys.executable, "tools/train_net.py", "--config", DEMO, *SMALL, "DATALOADER.NUM_WORKERS",
                                 str(workers), "OUTPUT_DIR", out], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while not os.path.exists(os.path.join(out, "model_0000001.pth")):
            if proc.poll() is not None:
                raise SystemExit(f"train_net ended before its second checkpoint:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, spread))
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=600)
        log = stdout + stderr
        clean = (proc.returncode == 128 + sig and "Traceback" not in log
                 and f"train_net: stopped by {sig.name}; the last checkpoint is" in log
                 and not [f for f in os.listdir(out) if f.endswith(".tmp")])
        return clean, proc.returncode, stderr[-3000:]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--signal", choices=["SIGTERM", "SIGINT"], default="SIGTERM")
    parser.add_argument("--spread", type=float, default=1.0, help="seconds: the random delay's upper end")
    parser.add_argument("--workers", type=int, default=2, help="DATALOADER.NUM_WORKERS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    sig = signal.Signals[args.signal]
    unclean = 0
    for i in range(args.runs):
        clean, code, tail = stop_once(sig, args.spread, args.workers)
        unclean += not clean
        print(f"run {i}: exit {code}, {'clean' if clean else 'NOT CLEAN'}", flush=True)
        if not clean:
            print(tail, flush=True)
    print(f"{unclean} of {args.runs} stops by {sig.name} not clean")
    raise SystemExit(1 if unclean else 0)


if __name__ == "__main__":
    main()
