"""One run per output folder (gn_det.train.checkpoint.OutputDirLock, hold_output_dir) and
temporaries unique per writer. Real processes, real files, real signals: two train_net runs
started together against one folder, an --eval-only run against a running one, a lock holder
killed with SIGKILL, two processes over GLOO."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gn_det.errors import OutputDirInUseError
from gn_det.train import checkpoint as checkpoint_module
from gn_det.train.checkpoint import (LOCK_NAME, STALE_AFTER_S, OutputDirLock, SafeCheckpointer, check_output_dir_free,
                                     hold_output_dir)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_gn_shapes.yaml")
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
QUICK = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(128,)",
         "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()"]

# A process that takes the lock of argv[1], says so on stdout, and sleeps until killed.
HOLDER = ("import sys, time\nfrom gn_det.train.checkpoint import OutputDirLock\n"
          "OutputDirLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")


def start_holder(directory):
    """A real process that takes the lock with OutputDirLock (it imports gn_det: seconds)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def start_sleeper_holding(directory):
    """A live process of this host (``sleep``) named as the holder in a lock record written as
    OutputDirLock writes it: a held folder, without the holder's start-up time."""
    proc = subprocess.Popen(["sleep", "600"])
    now = time.time()
    record = {"host": socket.gethostname(), "pid": proc.pid, "pid_start": checkpoint_module._process_start(proc.pid),
              "started": now, "heartbeat": now, "purpose": "training", "token": "sleeper", "command": "sleep 600"}
    (Path(directory) / LOCK_NAME).write_text(json.dumps(record))
    return proc


def test_a_training_run_and_an_evaluation_into_a_held_folder_are_refused_before_writing(tmp_path):
    # The default run's variant of the slow test below: the folder held by another process, and
    # a train_net training run and an --eval-only run started against it (together: 2 cores).
    holder = start_sleeper_holding(tmp_path)
    try:
        runs = [subprocess.Popen([sys.executable, TRAIN_NET, "--config", DEMO, *extra, "OUTPUT_DIR", str(tmp_path)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for extra in ([*QUICK, "SOLVER.MAX_ITER", "1"], ["--eval-only"])]
        for run in runs:
            _, err = run.communicate(timeout=300)
            assert run.returncode == 2 and "Traceback" not in err, err[-3000:]
            [line] = [x for x in err.splitlines() if x.startswith("train_net: error:")]
            assert f"OUTPUT_DIR {tmp_path} is in use by another run: pid {holder.pid} on host {socket.gethostname()}" in line
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(tmp_path) == [LOCK_NAME]  # nothing written: no config.yaml, log.txt, inference/


@pytest.mark.slow
def test_two_runs_started_together_one_trains_the_other_and_an_eval_are_refused(tmp_path):
    # (56 s on 2 shared cores; the variant above runs by default)
    out = str(tmp_path)
    # Both with a long schedule: the winner is stopped by SIGTERM once the others were refused.
    args = [sys.executable, TRAIN_NET, "--config", DEMO, *QUICK, "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.MAX_ITER", "400",
            "OUTPUT_DIR", out]
    runs = [subprocess.Popen(args + ["SOLVER.BASE_LR", lr], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for lr in ("0.0101", "0.0102")]
    try:
        deadline = time.time() + 300
        while all(r.poll() is None for r in runs):
            assert time.time() < deadline, "neither run ended"
            time.sleep(0.2)
        loser = next(r for r in runs if r.poll() is not None)
        winner = next(r for r in runs if r is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        line = next(x for x in err.splitlines() if x.startswith("train_net: error:"))
        assert f"OUTPUT_DIR {out} is in use by another run: pid {winner.pid} on host {socket.gethostname()}" in line
        assert f"delete {os.path.join(out, LOCK_NAME)}" in line
        # --eval-only (which writes inference files) against the running one: refused too, writing nothing
        evaluated = subprocess.run([sys.executable, TRAIN_NET, "--config", DEMO, "--eval-only", "OUTPUT_DIR", out,
                                    "SOLVER.BASE_LR", "0.0103"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert winner.poll() is None, "the winner ended before the evaluation was tried"
        assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr, evaluated.stderr[-3000:]
        assert f"is in use by another run: pid {winner.pid}" in evaluated.stderr
        assert not os.path.exists(os.path.join(out, "inference"))
        wait_for(os.path.join(out, "model_0000001.pth"), winner)
        winner.send_signal(signal.SIGTERM)
        _, err = winner.communicate(timeout=300)
        assert winner.returncode == 128 + signal.SIGTERM, err[-3000:]
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()
                r.wait()
    winner_lr = "0.0101" if winner is runs[0] else "0.0102"
    config = open(os.path.join(out, "config.yaml")).read()
    assert f"BASE_LR: {winner_lr}" in config  # the loser wrote no config.yaml, the evaluation neither
    log = open(os.path.join(out, "log.txt")).read()
    assert "0.0103" not in log and ("0.0102" if winner_lr == "0.0101" else "0.0101") not in log
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.json")) if x.strip()]
    iterations = [r["iteration"] for r in rows]
    assert iterations and len(iterations) == len(set(iterations))  # one run's rows (two runs: each iteration twice)
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    assert torch.load(os.path.join(out, last), weights_only=True)["iteration"] >= 1  # whole
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released by the stopped run
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled"
        time.sleep(0.1)


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(OutputDirInUseError, match=rf"OUTPUT_DIR {tmp_path} is in use by another run: pid "
                                                      rf"{holder.pid} on host {socket.gethostname()} \(training"):
            OutputDirLock(str(tmp_path)).acquire()
        with pytest.raises(OutputDirInUseError):
            check_output_dir_free(str(tmp_path))  # train_net's check before its workers start
    finally:
        holder.send_signal(signal.SIGKILL)  # leaves its lock file behind
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    check_output_dir_free(str(tmp_path))  # stale: not an error
    lock = OutputDirLock(str(tmp_path)).acquire()
    try:
        assert f"Took over the lock of {tmp_path}: pid {holder.pid}" in caplog.text
        assert f"pid {holder.pid} is not running on this host" in caplog.text
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def write_lock(path, **record):
    record = {"host": "node-b.example", "pid": 4242, "started": time.time() - 3600, "heartbeat": time.time(),
              "purpose": "training", "token": "abc", "command": "train_net.py ...", **record}
    (path / LOCK_NAME).write_text(json.dumps(record))
    os.utime(path / LOCK_NAME, (record["heartbeat"], record["heartbeat"]))  # the holder's last touch


def test_lock_of_another_host_is_held_until_its_heartbeat_is_stale(tmp_path, caplog):
    write_lock(tmp_path, heartbeat=time.time() - 20)
    with pytest.raises(OutputDirInUseError, match=r"pid 4242 on host node-b.example \(training, started .* UTC, last "
                                                  r"heartbeat 2\d s ago; command: train_net.py ...\)"):
        OutputDirLock(str(tmp_path)).acquire()
    write_lock(tmp_path, heartbeat=time.time() - STALE_AFTER_S - 60)
    with OutputDirLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == socket.gethostname()
    assert "its last heartbeat is 3" in caplog.text and "node-b.example" in caplog.text


def test_unreadable_lock_is_held_while_recent(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a holder between creating the file and writing its record
    with pytest.raises(OutputDirInUseError, match="an unreadable lock file"):
        OutputDirLock(str(tmp_path)).acquire()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    OutputDirLock(str(tmp_path)).acquire().release()


def test_heartbeat_is_refreshed_and_a_lost_lock_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "HEARTBEAT_S", 0.05)
    lock = OutputDirLock(str(tmp_path)).acquire()
    path = tmp_path / LOCK_NAME
    first, first_touched = json.loads(path.read_text()), path.stat().st_mtime
    time.sleep(0.5)
    assert path.stat().st_mtime > first_touched  # the heartbeat: the file's modification time
    assert json.loads(path.read_text()) == first  # the record itself is never rewritten
    assert lock.heartbeat(first) == path.stat().st_mtime
    # The lock was taken over: deleted by hand, then another run created its own. The heartbeat
    # touches only the file this run created, so the other run's lock keeps its contents and time.
    path.unlink()
    write_lock(tmp_path, token="someone else's", heartbeat=time.time() - 100)
    time.sleep(0.3)
    assert json.loads(path.read_text())["token"] == "someone else's"  # not overwritten
    assert time.time() - path.stat().st_mtime > 90  # nor refreshed
    lock.release()
    assert path.exists()  # not ours to remove
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_lock_rewritten_in_place_is_not_ours_any_more(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "HEARTBEAT_S", 0.05)
    lock = OutputDirLock(str(tmp_path)).acquire()
    write_lock(tmp_path, token="someone else's")  # same file, another run's record
    time.sleep(0.3)
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "someone else's"


def test_hold_output_dir_is_reentrant_in_one_process(tmp_path):
    with hold_output_dir(str(tmp_path)):
        with hold_output_dir(str(tmp_path)):  # train_net's block around the Trainer's
            assert (tmp_path / LOCK_NAME).exists()
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def _rank_process(rank, world, init_file, out_dir, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    outcome = {}
    for case in ("held elsewhere", "free"):
        try:
            with hold_output_dir(os.path.join(out_dir, case)):
                outcome[case] = {"entered": True, "lock_pid": json.load(open(os.path.join(out_dir, case, LOCK_NAME)))["pid"]}
                torch.distributed.barrier()
        except OutputDirInUseError as exc:
            outcome[case] = {"entered": False, "error": str(exc)}
    outcome["pid"] = os.getpid()
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    torch.distributed.destroy_process_group()


def test_two_processes_over_gloo_share_one_lock_and_one_refusal(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    (out / "free").mkdir(parents=True)
    (out / "held elsewhere").mkdir()
    results.mkdir()
    holder = start_sleeper_holding(out / "held elsewhere")
    try:
        context = mp.start_processes(_rank_process, args=(2, str(tmp_path / "init"), str(out), str(results)), nprocs=2,
                                     start_method="spawn", join=False)
        deadline = time.time() + 240
        while not context.join(timeout=5):
            assert time.time() < deadline, "a process hangs"
    finally:
        holder.kill()
        holder.wait()
    ranks = [json.load(open(results / f"rank{r}.json")) for r in (0, 1)]
    for rank in ranks:  # both refused, with process 0's message (only it tried)
        assert rank["held elsewhere"]["entered"] is False
        assert f"is in use by another run: pid {holder.pid}" in rank["held elsewhere"]["error"]
        assert rank["free"] == {"entered": True, "lock_pid": ranks[0]["pid"]}  # process 0 holds it for both
    assert not (out / "free" / LOCK_NAME).exists()


def test_only_temporaries_of_writers_that_are_gone_are_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {"live": f"model_0000009.pth.{live.pid}.0a1b2c3d.tmp", "dead": f"model_0000009.pth.{dead.pid}.0a1b2c3d.tmp",
                 "older gn_det": "last_checkpoint.tmp"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"half a checkpoint")
        removed = SafeCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path)).remove_stale_temporaries()
        assert sorted(os.path.basename(p) for p in removed) == sorted([names["dead"], names["older gn_det"]])
        assert os.listdir(tmp_path) == [names["live"]]
    finally:
        live.kill()
        live.wait()


def test_each_writer_writes_its_own_temporary(tmp_path, monkeypatch):
    seen = []
    real_save = torch.save

    def recording(data, f):
        seen.append(f.name)
        real_save(data, f)

    monkeypatch.setattr(torch, "save", recording)
    checkpointer = SafeCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    checkpointer.save("model_0000001", iteration=1)
    assert len(set(seen)) == 2 and all(f".pth.{os.getpid()}." in name and name.endswith(".tmp") for name in seen)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_the_lazyconfig_loop_holds_the_lock_itself(tmp_path):
    # Used as a library (without train_net): lazy_train refuses a held folder before it builds
    # anything (Trainer.train holds it the same way: hold_output_dir in gn_det/train/engine.py).
    from gn_det.lazy import load_lazy_config
    from gn_det.train.lazy_loop import lazy_train

    holder = start_sleeper_holding(tmp_path)
    try:
        lazy = load_lazy_config(os.path.join(ROOT, "configs", "lazy", "mask_rcnn_gn_R_50_FPN_3x.py"),
                                ["train.device=cpu", f"train.output_dir={tmp_path}"])
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            lazy_train(lazy)
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(tmp_path) == [LOCK_NAME]
