"""First-use tuning (gn_det/policy/tuning.py) on CPU, with real clocks: the decision logic,
the disk cache's life, the switches, and two GLOO processes reaching the same decisions. On CPU
the candidates are gn_det's PyTorch path and ATen's GroupNorm (``set_autotune(on_cpu=True)``);
tests/interpreted runs it against the Triton interpreter, tests/test_group_norm_cuda.py on a GPU."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import gn_det
from gn_det.policy import tuning
from gn_det.ops.activation import ACT_RELU, RESIDUAL_ADD
from gn_det.ops.autograd import OpCall
from gn_det.ops.torch_path import TORCH_PATH
from gn_det.policy import dispatch_path
from gn_det.ops.functional import aten_group_norm
from gn_cases import make_affine, make_input, reference

CL = torch.channels_last
SLOW_S = 0.1  # what a test adds to one runner to make it the slower one, on real clocks
# Shapes of the tests that make a runner slower: small NCHW inputs, where both paths run ATen's
# GroupNorm kernels in well under SLOW_S, so that the sleep decides.
SMALL, SMALL_TOO, OTHER = (2, 16, 6, 5), (2, 16, 5, 6), (1, 64, 4, 4)


@pytest.fixture
def tuned(tmp_path):
    """Tuning on for CPU inputs, decisions kept under tmp_path; the settings restored after."""
    previous = gn_det.set_autotune(True, on_cpu=True), gn_det.set_tuning_cache(tmp_path)
    tuning.clear_decisions()
    yield tmp_path
    tuning.clear_decisions()
    gn_det.set_autotune(previous[0][0], on_cpu=previous[0][1])
    gn_det.set_tuning_cache(previous[1])


def runners(slow: str, calls: list):
    """Both paths as group_norm gives them to tuning (the op's own path, ATen's GroupNorm),
    ``slow`` made SLOW_S slower; each call is appended to ``calls``."""
    def make(path, run):
        def runner(x, weight, bias, residual):
            calls.append(path)
            if path == slow:
                time.sleep(SLOW_S)
            return run(x, weight, bias, residual)
        return runner
    return {
        "kernels": make("kernels", _op_path),
        "aten": make("aten", lambda x, w, b, r: aten_group_norm(x, 4, w, b, 1e-5, ACT_RELU, r)),
    }


def choose(x, slow, calls, train=True, make_runners=None):
    weight, bias = make_affine(x.shape[1])
    return tuning.choose_path(x, weight, bias, None, 4, ACT_RELU, train, (make_runners or runners)(slow, calls))


def runners_slower_by_construction(slow: str, calls: list):
    """``runners``, but ``slow`` (measured second: tuning times the paths in tuning.PATHS' order)
    is slower whatever the machine's load, not by a fixed sleep: each of its calls lasts longer
    than the longest span between the other path's call starts i-1 and i+1 (the last one's
    successor: the slow path's first call), which holds the other path's whole timed run i
    (forward, backward and the timer's own steps). So each of its timed runs is longer than
    each of the other's, and so is its median. Real clocks, no margin to guess."""
    assert tuning.PATHS.index(slow) == 1, "the slow path must be the one measured second"
    starts, bound = [], []  # the other path's call starts; the bound, fixed at the slow path's first call

    def make(path, run):
        def runner(x, weight, bias, residual):
            start = time.perf_counter()
            calls.append(path)
            if path != slow:
                starts.append(start)
            else:
                if not bound:
                    spans = starts + [start]
                    bound.append(max(spans[i + 1] - spans[i - 1] for i in range(1, len(spans) - 1)))
                while time.perf_counter() - start <= bound[0]:
                    time.sleep(bound[0] / 4)
            return run(x, weight, bias, residual)
        return runner
    return {path: make(path, run) for path, run in runners("none", []).items()}


def test_the_faster_path_is_kept_and_measured_once(tuned):
    x = make_input(SMALL)
    calls = []
    assert choose(x, "kernels", calls) == "aten"
    assert calls.count("kernels") >= 4 and calls.count("aten") >= 4  # an untimed run, then 3 or more timed
    (row,) = gn_det.autotune_decisions()
    assert row["path"] == "aten" and row["source"] == "measured" and row["shape"] == list(SMALL)
    assert row["times_ms"]["kernels"] >= SLOW_S * 1e3 > row["times_ms"]["aten"]
    assert (row["format"], row["activation"], row["residual"], row["passes"]) == ("nchw", "relu", False, "train")
    # The same bucket (another size with as many elements per group and groups): decided, not measured.
    del calls[:]
    assert choose(make_input(SMALL_TOO), "aten", calls) == "aten" and calls == []
    # Inference is a bucket of its own (forward only); here the other path is the slower one.
    assert choose(x, "aten", calls, train=False) == "kernels" and calls
    assert [r["passes"] for r in gn_det.autotune_decisions()] == ["infer", "train"]


def test_group_norm_runs_the_decided_path_with_the_same_results(tuned):
    x = make_input((2, 16, 12, 10), memory_format=CL).requires_grad_()
    weight, bias = (t.requires_grad_() for t in make_affine(16))
    y = gn_det.group_norm(x, 4, weight, bias, activation="relu")
    (row,) = gn_det.autotune_decisions()  # measured at the first call, on this machine's clocks
    assert row["source"] == "measured" and set(row["times_ms"]) == {"kernels", "aten"}
    assert all(t > 0 for t in row["times_ms"].values())
    expected_path = "PyTorch: ATen GroupNorm, tuned" if row["path"] == "aten" else "PyTorch: channels_last statistics"
    assert dispatch_path(x, 4, "relu").startswith(expected_path)
    ref = reference(x, 4, weight, bias, 1e-5, "relu")
    assert (y.double() - ref).abs().max().item() < 1e-5 and y.is_contiguous(memory_format=CL)
    y.square().sum().backward()  # either path gives gradients
    assert x.grad is not None and weight.grad is not None and torch.isfinite(x.grad).all()
    # Under output recomputation the op's own path runs, and nothing is measured.
    tuning.clear_decisions()
    gn_det.group_norm(make_input((1, 32, 9, 9), memory_format=CL).requires_grad_(), 4, output_recomputed=True)
    assert gn_det.autotune_decisions() == []


def test_not_measured_where_tuning_is_off_or_inside_compiled_graphs(tuned):
    x = make_input(SMALL)
    gn_det.set_autotune(False, on_cpu=True)
    gn_det.group_norm(x, 4, activation="relu")
    gn_det.set_autotune(True, on_cpu=False)  # CPU inputs are not tuned unless asked
    gn_det.group_norm(x, 4, activation="relu")
    assert gn_det.autotune_decisions() == []
    gn_det.set_autotune(True, on_cpu=True)
    compiled = torch.compile(lambda t: gn_det.group_norm(t, 4, activation="relu"), fullgraph=True)
    torch.testing.assert_close(compiled(x), gn_det.group_norm(x, 4, activation="relu", output_recomputed=True))
    assert gn_det.autotune_decisions() == []  # the compiled graph holds the custom op; the eager call recomputed


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_decisions_persist_across_processes_in_the_disk_cache(tuned):
    x = make_input(SMALL)
    calls = []
    assert choose(x, "kernels", calls) == "aten"
    (path,) = tuned.iterdir()  # one file for this device and these versions
    versions = tuning._versions()
    assert path.name == f"cpu-k{versions['kernel_version']}-triton{versions['triton']}-torch{torch.__version__}.jsonl"
    (row,) = _lines(path)  # one line per decision
    assert (row["device"], row["kind"], row["path"], row["cache_format"]) == ("cpu", "tuning", "aten", 2)
    # A new process (here: decisions forgotten) reads the file and measures nothing.
    tuning.clear_decisions()
    del calls[:]
    assert choose(x, "aten", calls) == "aten" and calls == []
    assert gn_det.autotune_decisions()[0]["source"] == "disk cache"
    # Another bucket is appended (one line; the file is not rewritten: its first bytes stay).
    first = path.read_bytes()
    choose(make_input(OTHER), "aten", calls)
    assert path.read_bytes().startswith(first) and len(_lines(path)) == 2
    assert [p.name for p in tuned.iterdir()] == [path.name]  # no temporary file, no lock file


def _damaged_lines(good: dict) -> list:
    """Lines a cache file may hold that are not decisions: each is skipped, the rest used."""
    return [
        '{"cache_format": 2, "decis',  # cut short: a writer killed mid-line
        "[" * 100000 + "]" * 100000,  # nesting deeper than the JSON parser recurses (RecursionError)
        json.dumps(dict(good, path=["aten"])),  # a list where a string belongs
        json.dumps(dict(good, residual="yes")),  # a string where a boolean belongs
        json.dumps(dict(good, group_elements_log2=True)),  # a boolean where an integer belongs
        json.dumps(dict(good, times_ms={"kernels": "fast", "aten": 1.0})),
        json.dumps(dict(good, device="another GPU")),  # not this file's device
        json.dumps(dict(good, cache_format=1)),
        json.dumps(dict(good, kind="verification")),  # its fields missing
        json.dumps([good]),
        "null",
    ]


def test_malformed_lines_are_skipped_with_one_warning_naming_the_file(tuned):
    x = make_input(SMALL)
    choose(x, "kernels", [])  # decided: aten
    (path,) = tuned.iterdir()
    (good,) = _lines(path)
    other = dict(good, group_elements_log2=good["group_elements_log2"] + 1, path="kernels")
    damaged = _damaged_lines(good)
    with open(path, "wb") as f:  # the damaged lines, a line that is not UTF-8, two valid decisions
        f.write(("\n".join(damaged[:5]) + "\n").encode())
        f.write(b"\xff\xfe not utf-8 \x80\n")
        f.write((json.dumps(other) + "\n" + "\n".join(damaged[5:]) + "\n" + json.dumps(good)).encode())  # no final newline
    tuning.clear_decisions()
    tuning.STORE.warned.clear()
    calls = []
    with pytest.warns(RuntimeWarning, match=r"gn_det decisions cache .*\.jsonl: 12 unreadable line\(s\) skipped") as record:
        assert choose(x, "kernels", calls) == "aten" and calls == []  # the valid line is used: nothing measured
        choose(make_input(OTHER), "kernels", calls)
    assert len([w for w in record if "decisions cache" in str(w.message)]) == 1
    assert {(r["group_elements_log2"], r["path"]) for r in gn_det.autotune_decisions()} >= {
        (good["group_elements_log2"], "aten"), (other["group_elements_log2"], "kernels")}
    # The next decision starts on a line of its own (the file did not end with a newline).
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[-1])["shape"] == list(OTHER) and json.loads(lines[-2]) == good


@pytest.mark.parametrize("damage", ["not a file", "no permission"])
def test_an_unreadable_cache_file_is_ignored_with_one_warning(tuned, damage):
    x = make_input(SMALL)
    path = tuning.cache_file("cpu")
    if damage == "not a file":
        path.mkdir(parents=True)
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_text("")
        path.chmod(0)
    tuning.STORE.warned.clear()
    with pytest.warns(RuntimeWarning, match="gn_det decisions cache") as record:
        assert choose(x, "kernels", []) == "aten"  # measured, and kept in this process
    assert gn_det.autotune_decisions()[0]["source"] == "measured"
    assert len({str(w.message) for w in record}) <= 2  # cannot be read; cannot be written: once each


_DECIDER = """
import sys, time
import torch
from gn_det.policy import tuning
from gn_det.ops.activation import ACT_NONE
tuning.set_autotune(True, on_cpu=True)
tuning.set_tuning_cache(sys.argv[1])
start = float(sys.argv[3])
while time.time() < start:  # every process decides at the same moment
    time.sleep(0.005)
runner = lambda x, w, b, r: torch.nn.functional.group_norm(x, 1, w, b)
rank = int(sys.argv[2])
for i in range(4):  # 4 buckets of its own: 2^rank groups of 2^(i+1) elements
    x = torch.randn(2 ** rank, 1, 2 ** (i + 1))
    tuning.choose_path(x, torch.ones(1), torch.zeros(1), None, 1, ACT_NONE, False, {"kernels": runner, "aten": runner})
"""


@pytest.mark.parametrize("processes", [3, pytest.param(6, marks=pytest.mark.slow)])  # (6: the measurement)
def test_processes_deciding_at_once_lose_nothing(tuned, processes):
    start = time.time() + 4 + 2 * processes  # after every process has imported gn_det
    procs = [subprocess.Popen([sys.executable, "-c", _DECIDER, str(tuned), str(rank), str(start)])
             for rank in range(processes)]
    try:
        assert [proc.wait(timeout=120) for proc in procs] == [0] * processes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    (path,) = tuned.iterdir()
    assert sorted((r["batch_groups_log2"], r["group_elements_log2"]) for r in _lines(path)) == [
        (rank, i + 1) for rank in range(processes) for i in range(4)]
    tuning.clear_decisions()
    tuning._load("cpu")
    assert len(gn_det.autotune_decisions()) == 4 * processes


def test_an_unwritable_cache_warns_once_and_keeps_decisions_in_process(tuned):
    blocker = tuned / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    gn_det.set_tuning_cache(blocker / "gn_det")
    tuning.STORE.warned.clear()
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        assert choose(make_input(SMALL), "kernels", []) == "aten"
    assert gn_det.autotune_decisions()[0]["path"] == "aten"


def test_gn_det_autotune_is_read_at_import_and_checked(monkeypatch):
    for value, expected in (("0", False), ("1", True), ("", True), (" 1 ", True)):
        monkeypatch.setenv("GN_DET_AUTOTUNE", value)
        assert tuning.autotune_from_environment() is expected
    # At import, into set_autotune: a bad value fails there, naming it and the choices.
    env = dict(os.environ, GN_DET_AUTOTUNE="yes")
    out = subprocess.run([sys.executable, "-c", "import gn_det"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "GN_DET_AUTOTUNE='yes': use 1" in out.stderr
    with pytest.raises(TypeError, match="set_autotune takes booleans"):
        gn_det.set_autotune("1")


def _rank_process(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gn_det.set_autotune(True, on_cpu=True)
    gn_det.set_tuning_cache(os.path.join(out_dir, "rank1_cache") if rank == 1 else None)
    both = make_input(SMALL)
    # Both ranks meet `both` and hold different decisions for it: rank 0 measures it ("aten"
    # slower by construction: "kernels"), rank 1 finds "aten" in its decisions cache (written by
    # the test). Rank 1 alone meets OTHER, measured ("kernels").
    if rank == 0:
        choose(both, "aten", [], make_runners=runners_slower_by_construction)
    else:
        choose(make_input(OTHER), "aten", [], make_runners=runners_slower_by_construction)
    path_before = choose(both, "none", [])  # decided: looked up (and remembered by exact input)
    before = gn_det.autotune_decisions()
    adopted = gn_det.synchronize_decisions()
    gn_det.synchronize_decisions()  # nothing new: nothing changes, and nobody waits on anybody
    calls = []
    paths = [path_before, choose(both, "none", calls)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"before": before, "after": gn_det.autotune_decisions(), "adopted": adopted, "paths": paths,
                   "calls": calls}, f)
    torch.distributed.destroy_process_group()


def write_cached_decision(cache_dir, shape, path):
    """A decisions-cache line for a bucket of ``shape`` (what choose() would measure), as a process
    that decided ``path`` there earlier would have left it."""
    x = make_input(shape)
    decision = tuning.Decision(tuning.tune_key_of(x, 4, ACT_RELU, False, True), path, "measured",
                               {"kernels": 1.0, "aten": 1.0}, tuple(shape))
    previous = gn_det.set_tuning_cache(cache_dir)
    try:
        cache = tuning.cache_file(decision.key[0])
    finally:
        gn_det.set_tuning_cache(previous)
    cache.parent.mkdir(parents=True, exist_ok=True)
    row = {k: v for k, v in dict(decision.as_dict(), cache_format=tuning.CACHE_FORMAT).items() if k != "source"}
    cache.write_text(json.dumps(row) + "\n")


def test_two_gloo_processes_reach_the_same_decisions(tmp_path):
    write_cached_decision(tmp_path / "rank1_cache", SMALL, "aten")
    mp.start_processes(_rank_process, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [(tuple(r["shape"]), r["path"], r["source"]) for r in ranks[0]["before"]] == [(SMALL, "kernels", "measured")]
    assert sorted((tuple(r["shape"]), r["path"], r["source"]) for r in ranks[1]["before"]) == [
        (OTHER, "kernels", "measured"), (SMALL, "aten", "disk cache")]
    strip = lambda rows: [{k: v for k, v in row.items() if k != "source"} for row in rows]  # noqa: E731
    assert strip(ranks[0]["after"]) == strip(ranks[1]["after"]) and len(ranks[0]["after"]) == 2
    by_shape = {tuple(r["shape"]): r for r in ranks[1]["after"]}
    assert by_shape[SMALL]["path"] == "kernels" and by_shape[SMALL]["source"] == "rank 0"
    assert {tuple(r["shape"]): r["source"] for r in ranks[0]["after"]}[OTHER] == "rank 1"
    assert (ranks[0]["adopted"], ranks[1]["adopted"]) == (1, 1)
    # Rank 1 ran its own (cached) decision for the shared bucket until the exchange, then rank 0's.
    assert ranks[0]["paths"] == ["kernels", "kernels"] and ranks[1]["paths"] == ["aten", "kernels"]
    assert ranks[0]["calls"] == ranks[1]["calls"] == []


def _op_path(x, w, b, r):
    """The op on the PyTorch path, as a tuning candidate (with autograd when x requires grad)."""
    mode = RESIDUAL_ADD if r is not None else 0
    return OpCall(TORCH_PATH, 4, 1e-5, ACT_RELU, mode, torch.is_grad_enabled() and x.requires_grad, True)(x, w, b, r)


def test_a_call_costs_the_larger_of_its_device_and_host_time():
    assert tuning.call_cost_ms(device_seconds=2e-4, host_seconds=1e-5) == pytest.approx(0.2)  # the GPU decides
    assert tuning.call_cost_ms(device_seconds=1e-5, host_seconds=3e-4) == pytest.approx(0.3)  # the host decides


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_charges_a_path_its_host_time_where_the_host_decides():
    """A candidate whose kernels are short on the GPU but which takes 2 ms to enqueue loses to
    one that is longer on the GPU (about 0.3 ms) and quick to enqueue: device times alone
    would pick the first."""
    x = torch.randn(2, 64, 64, 64, device="cuda")

    def host_bound(x, w, b, r):
        time.sleep(2e-3)
        return x * 2

    def device_bound(x, w, b, r):
        return torch.matmul(x.view(-1, 64), torch.randn(64, 512, device="cuda")).sum() + x

    w, b = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    times = tuning._measure(x, w, b, None, False, {"kernels": host_bound, "aten": device_bound})
    assert times["kernels"] >= 2.0 > times["aten"], times
