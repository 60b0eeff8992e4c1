"""``python -m gn_det.check``: its CPU mode run for real (a subprocess: the PyTorch path, and
the Triton kernels under the interpreter in the subprocess it starts), its JSON report, its
exit status when gn_det's implementation is made wrong (``--inject-fault``, the check's hook
for this), and its GPU run where CUDA is present."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import gn_det
from gn_det import check
from gn_det.diagnostics.bench.layer_shapes import MASK_RCNN_SHAPES
from gn_det.tolerances import GRAD_TOLERANCE, TOLERANCE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_check(args, env=None, timeout=300):
    environment = dict(os.environ, **(env or {}))
    for name in ("TRITON_INTERPRET", "GN_DET_TRITON_ON_CPU"):  # the check sets them where it needs them
        if not env or name not in env:
            environment.pop(name, None)
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "gn_det.diagnostics.check"] + args, cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(stdout: str):
    """The table's case rows as printed (each ends in its result, then tuning's decision)."""
    return [line for line in stdout.splitlines() if re.search(r" (ok|FAIL|ERROR)( |$)", line)]


SMALL = ["--quick", "--dtypes", "fp32,bf16", "--ops", "relu,block", "--reps", "1", "--warmup", "0"]


def test_cpu_mode_runs_what_it_can_and_reports(tmp_path):
    report = tmp_path / "report.json"
    proc = run_check(["--device", "cpu", "--json", str(report)] + SMALL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    lines = out.strip().splitlines()
    if not torch.cuda.is_available():
        assert lines[0].startswith("CUDA is not available here")
    assert "gn_det's PyTorch path on CPU" in out and "under Triton's interpreter" in out
    assert check.header().splitlines()[0] in out
    # The last line says it all; the report's path is printed before it.
    assert lines[-1].startswith("gn_det check: all ") and "cases correct; median speed-up " in lines[-1]
    assert f"Report written to {report} (attach it to a bug report)" in out

    data = json.loads(report.read_text())
    rows = data["rows"]
    cpu_rows = [r for r in rows if r["part"] == "cpu path"]
    interpreted = [r for r in rows if r["part"] == "interpreter"]
    # quick: 2 shapes x 2 dtypes x 2 layouts x 2 ops in each part
    assert len(cpu_rows) == 16 and len(interpreted) == 16, [r["label"] for r in rows]
    assert lines[-1] == data["summary"]["line"] == "gn_det check: all 32 cases correct; " + lines[-1].split("; ", 1)[1]
    assert data["mode"] == "cpu" and data["parts"] == ["cpu path", "interpreter"]
    assert data["summary"]["failed"] == 0 and data["injected_faults"] == []
    machine = data["machine"]
    assert machine["torch"] == torch.__version__ and machine["gn_det"] == gn_det.__version__
    assert machine["gpu"] is None and machine["compute_capability"] is None and "triton" in machine
    assert machine["env"]["torch"].startswith(torch.__version__)  # gn_det.diagnostics.env's rows
    assert data["tolerances"]["forward"] == {"float32": TOLERANCE[torch.float32], "float16": TOLERANCE[torch.float16],
                                             "bfloat16": TOLERANCE[torch.bfloat16]}
    assert data["tolerances"]["backward"]["bfloat16"] == GRAD_TOLERANCE[torch.bfloat16]
    for row in rows:
        assert row["status"] == "ok" and row["problems"] == []
        tol = row["tolerance"]
        ours = row["errors"]["gn_det"]
        assert set(ours) == {"forward", "dx", "dweight", "dbias"} | ({"dresidual"} if row["op"] == "block" else set())
        assert ours["forward"] <= tol["forward"]
        assert max(v for k, v in ours.items() if k != "forward") <= tol["backward"]
        assert row["errors"]["pytorch"]["forward"] < 0.1  # PyTorch's own, measured alike
        assert row["implementation"] == "PyTorch path" if row["part"] == "cpu path" else \
            row["implementation"].startswith("Triton kernels (interpreter): ")
    # The CPU path is timed side by side with PyTorch's ops; the interpreter is not timed.
    assert all(r["time_ms"]["gn_det"] > 0 and r["time_ms"]["pytorch"] > 0 and r["speedup"] > 0 for r in cpu_rows)
    assert all("time_ms" not in r for r in interpreted)
    assert len(table_rows(out)) == 32


def test_kernels_made_wrong_or_raising_fail_the_check_and_the_run_goes_on(tmp_path):
    # The Triton kernels (interpreted) corrupted by the check's documented hook, as a faulty kernel would be.
    report = tmp_path / "faults.json"
    args = ["--device", "cpu", "--part", "interpreter", "--quick", "--dtypes", "fp32", "--layouts", "nchw",
            "--ops", "gn,block", "--json", str(report),
            "--inject-fault", "wrong-output:odd 5x7 1x12x5x7 G=4 | float32 | nchw | gn",
            "--inject-fault", "wrong-dx:volume",
            "--inject-fault", "raise:odd 5x7 1x12x5x7 G=4 | float32 | nchw | block"]
    proc = run_check(args, env={"TRITON_INTERPRET": "1", "GN_DET_TRITON_ON_CPU": "1"})
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(report.read_text())
    by_label = {(r["case"], r["op"]): r for r in data["rows"]}
    assert set(by_label) == {("odd 5x7", "gn"), ("odd 5x7", "block"), ("volume", "gn"), ("volume", "block")}
    wrong_output = by_label["odd 5x7", "gn"]
    assert wrong_output["status"] == "incorrect" and wrong_output["errors"]["gn_det"]["forward"] > 0.1
    error = wrong_output["errors"]["gn_det"]["forward"]
    assert wrong_output["problems"] == [f"gn_det: forward error {error:.3g} > 1e-05"]
    assert wrong_output["errors"]["gn_det"]["dx"] <= GRAD_TOLERANCE[torch.float32]  # only what was corrupted
    raised = by_label["odd 5x7", "block"]
    assert raised["status"] == "error" and "fault injected by --inject-fault raise" in raised["problems"][0]
    for op in ("gn", "block"):  # cases after the raising one ran
        volume = by_label["volume", op]
        assert volume["status"] == "incorrect" and volume["errors"]["gn_det"]["dx"] > 0.1
        assert volume["errors"]["gn_det"]["forward"] <= TOLERANCE[torch.float32]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("gn_det check: 4 failures in 4 cases (3 incorrect, 1 raised)")
    assert data["summary"]["failed"] == 4 and len(data["injected_faults"]) == 3
    assert "Failures (4):" in proc.stdout and raised["label"] in proc.stdout


def test_cpu_path_made_wrong_fails_only_where_injected(tmp_path, capsys):
    report = tmp_path / "cpu.json"
    status = check.main(["--device", "cpu", "--part", "cpu-path", "--shapes", "box head", "--dtypes", "bf16",
                         "--ops", "gn,relu", "--reps", "1", "--warmup", "0", "--quick", "--json", str(report),
                         "--inject-fault", "wrong-dx:| channels_last | relu"])
    assert status == 1
    rows = json.loads(report.read_text())["rows"]
    failed = [(r["layout"], r["op"]) for r in rows if r["status"] != "ok"]
    assert failed == [("channels_last", "relu")] and len(rows) == 4
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("gn_det check: 1 failure in 4 cases (1 incorrect, 0 raised)")
    # main restores what it changed for its run
    assert gn_det.policy.backend() == "auto" and gn_det.policy.tuning.tuning_cache() is not None


@pytest.mark.parametrize("argv,message", [
    (["--dtypes", "fp8"], "dtype fp8: choose from float32,float16,bfloat16"),
    (["--layouts", "nhwc"], "layout nhwc: choose from nchw,channels_last"),
    (["--ops", "silu"], "op silu: choose from gn,relu,block,block-recomputed"),
    (["--inject-fault", "slow"], "--inject-fault 'slow': the kind is one of wrong-output, wrong-dx, raise"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--reps", "0"], "need warmup >= 0 and reps >= 1"),
])
def test_bad_arguments_exit_2_naming_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_interpreter_process_that_dies_is_a_failed_row(monkeypatch, capsys):
    # A real failure of the process the check starts: gn_det refuses to import with a bad
    # GN_DET_BACKEND (read at import), so the process exits 1 with a traceback and no rows.
    monkeypatch.setenv("GN_DET_BACKEND", "bogus")
    args = check.parse_args(["--device", "cpu", "--quick", "--dtypes", "fp32", "--ops", "gn"])
    rows, not_run = [], []
    assert check.run_interpreter_subprocess(args, None, rows, not_run) is None
    assert not_run == [] and len(rows) == 1
    row = rows[0]
    assert row["status"] == "error" and row["case"] == "interpreter process"
    assert row["problems"][0].startswith("raised ")  # no rows written / exit status 1
    assert "GN_DET_BACKEND='bogus' is not a gn_det backend" in row["stderr"]
    assert "ERROR" in capsys.readouterr().out


def test_cases_past_the_time_limit_are_listed_not_run(tmp_path, capsys):
    report = tmp_path / "limited.json"
    assert check.main(["--device", "cpu", "--part", "cpu-path", "--quick", "--dtypes", "fp32", "--ops", "gn",
                       "--time-limit", "1e-9", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["rows"] == [] and data["summary"]["not_run"] == [
        "cpu path | box head (small) 8x64x7x7 G=32 | float32 | nchw | gn",
        "cpu path | box head (small) 8x64x7x7 G=32 | float32 | channels_last | gn",
        "cpu path | volume (small) 2x12x3x5x4 G=3 | float32 | nchw | gn",
        "cpu path | volume (small) 2x12x3x5x4 G=3 | float32 | channels_last | gn"]
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == "gn_det check: no case checked; speed not measured; 4 cases not run (time limit)"


def test_a_shape_filter_that_selects_nothing_is_an_error(capsys):
    assert check.main(["--device", "cpu", "--quick", "--shapes", "box,res9"]) == 2
    err = capsys.readouterr().err
    assert "--shapes 'res9' matches no case here; the names (with --quick) are: box head (small), volume" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: --device cuda is valid")
def test_asking_for_cuda_without_it_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "CUDA is not available here" in capsys.readouterr().err


def test_the_gpu_cases_cover_the_benchmark_table_and_the_others():
    cases = check.cases("cuda", False, list(check.DTYPES), list(check.LAYOUTS), list(check.OPS), [])
    names = {c.name for c in cases}
    assert set(MASK_RCNN_SHAPES) <= names
    assert {"G = 1 (layer norm)", "G = C (instance norm)", "volume", "odd 37x53 (3 ch/group)"} <= names
    by_name = {}
    for c in cases:
        by_name.setdefault(c.name, set()).add((c.dtype, c.layout, c.op))
    full = {(d, lay, op) for d in check.DTYPES for lay in check.LAYOUTS for op in check.OPS}
    assert by_name["stem N=1"] == full and by_name["volume"] == full  # channels_last_3d for volumes
    assert {lay for _, lay, _ in by_name["sequence"]} == {"nchw"}  # no channels_last for (N, C, L)
    groups = {c.name: c.groups for c in cases}
    assert groups["G = 1 (layer norm)"] == 1 and groups["G = C (instance norm)"] == 64 and groups["res4"] == 32


def test_tuning_entries_show_every_field_of_a_real_decision():
    # A real decision (tuning on CPU inputs, both paths measured), found by the case's bucket;
    # a field tuning may add later is shown as key=value without the check knowing it.
    before = gn_det.set_autotune(True, on_cpu=True)
    try:
        x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
        op = check.OPS["relu"]
        gn_det.group_norm(x, 4, weight, bias, activation="relu").sum().backward()
        entries = check.tuning_entries(x, 4, op)
        assert len(entries) == 1 and entries[0]["path"] in ("kernels", "aten") and entries[0]["passes"] == "train"
        assert check.tuning_entries(x, 2, op) == []  # another bucket
        text = check.describe_tuning([dict(entries[0], verification={"outcome": "passed", "max_error": 1e-7})])
        assert text.startswith(f"{entries[0]['path']}, measured, kernels ")
        assert 'verification={"outcome": "passed", "max_error": 1e-07}' in text
    finally:
        gn_det.set_autotune(before[0], on_cpu=before[1])
        gn_det.policy.tuning.clear_decisions()


def test_json_path_names_the_machine(tmp_path):
    info = {"gpu": "NVIDIA H100 80GB HBM3", "cpu": None, "cpus": None}
    assert check._json_path(str(tmp_path), info) == str(tmp_path / "check_nvidia_h100_80gb_hbm3.json")
    assert check._json_path(str(tmp_path / "r.json"), info) == str(tmp_path / "r.json")
    assert check._json_path(None, info) == os.path.abspath("gn_det_check_nvidia_h100_80gb_hbm3.json")


@pytest.mark.gpu
@needs_cuda
def test_gpu_check_runs_and_reports(tmp_path):
    report = tmp_path / "gpu.json"
    proc = run_check(["--quick", "--dtypes", "bf16", "--json", str(report)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["mode"] == "cuda" and data["machine"]["gpu"] == torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    assert data["machine"]["compute_capability"] == f"{major}.{minor}"
    rows = data["rows"]
    assert rows and all(r["status"] == "ok" and r["implementation"].startswith("Triton kernels: ") for r in rows)
    assert all(r["time_ms"]["gn_det"] > 0 and r["speedup"] > 0 for r in rows)
    # Tuning decided every bucket it measures (not under recomputation, nor where a route
    # decides), and the rows say what.
    assert all(r["tuning"] or "routed" in r["tuning_note"] for r in rows if r["op"] != "block-recomputed")
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == data["summary"]["line"] and "median speed-up" in lines[-1]


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernels_made_wrong_fail_the_check(tmp_path):
    report = tmp_path / "gpu_fault.json"
    proc = run_check(["--shapes", "box head", "--dtypes", "bf16", "--layouts", "channels_last", "--ops", "relu",
                      "--reps", "1", "--json", str(report), "--inject-fault", "wrong-output"], timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:]
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "incorrect", rows[0].get("problems")
    assert rows[0]["errors"]["gn_det"]["forward"] > 0.1
    # gn_det.group_norm as called (tuning included) is not corrupted by the hook: still correct
    assert rows[0]["errors"]["gn_det as called"]["forward"] <= TOLERANCE[torch.bfloat16]


def test_no_module_of_the_package_imports_the_check():
    # `import gn_det` must not load the check (it is imported by `python -m gn_det.check` only).
    import ast

    package = os.path.join(ROOT, "gn_det")
    importers = []
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == check.__file__:
                continue
            for node in ast.walk(ast.parse(open(path).read())):
                names = []
                if isinstance(node, ast.ImportFrom):
                    names = [f"{node.module or ''}.{a.name}" for a in node.names] + [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if any(n.split(".")[-1] == "check" or n.endswith("gn_det.diagnostics.check") for n in names):
                    importers.append(os.path.relpath(path, ROOT))
    assert importers == []


def test_relu_ambiguous_elements_carry_no_gradient():
    # Where the exact pre-activation is within float32's tolerance of 0 (scaled by max|z| as the
    # errors are), a correct ReLU mask may go either way: the checks send no gradient there.
    from gn_det.tolerances import relu_unambiguous_grad
    z = torch.tensor([0.0, 5e-6, -5e-6, 1e-3, -2.0], dtype=torch.float64)
    assert relu_unambiguous_grad(z, torch.ones(5)).tolist() == [0, 0, 0, 1, 1]
    assert relu_unambiguous_grad(z * 1000, torch.ones(5)).tolist() == [0, 0, 0, 1, 1]  # 1e-2 of 2000 is 0.02
    assert relu_unambiguous_grad(z[:0], torch.ones(0)).numel() == 0


def test_verification_statistics_tolerance_grows_with_huge_groups():
    # Two correct float32 paths drift apart in huge groups (an H200: ATen's rstd and the kernels'
    # 5.7e-4 apart at 2^31 elements): float32's 1e-5 up to ~2^15 elements, sqrt(M) ulps beyond.
    from gn_det.tolerances import STATS_TOLERANCE, stats_tolerance
    assert stats_tolerance(4096) == STATS_TOLERANCE == 1e-5
    assert 1e-5 < stats_tolerance(2 ** 26) < 1e-3 and stats_tolerance(2 ** 31) > 5.7e-4


def test_shapes_option_names_cases_exactly_and_keeps_commas_in_parentheses():
    from gn_det.diagnostics.check import name_matches, split_names
    assert split_names("=features (N, C), stem,,box") == ["=features (N, C)", "stem", "box"]
    assert name_matches("=FPN P2", "FPN P2") and not name_matches("=FPN P2", "FPN P2 N=1")
    assert name_matches("fpn p2", "FPN P2 N=1")


def test_check_parallel_merges_its_processes_and_fails_on_a_fault(tmp_path):
    # tools/check_parallel.py (the GPU's first, correctness-only pass) on CPU: the check's CPU-path
    # cases, one process per case name; a fault injected into one name's cases fails the run.
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GN_DET_TRITON_ON_CPU")}
    command = [sys.executable, "-W", "ignore", os.path.join(ROOT, "tools", "check_parallel.py"), "--jobs", "2",
               "--quick", "--out-dir", str(tmp_path)]
    proc = subprocess.run(command + ["--", "--inject-fault", "wrong-output:box"], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (report_path,) = tmp_path.glob("check_parallel_*.json")
    report = json.loads(report_path.read_text())
    names = {row["case"] for row in report["rows"]}
    assert names == set(check.CPU_QUICK) and report["summary"]["processes_died"] == 0
    failed = {row["case"] for row in report["rows"] if row["status"] != "ok"}
    assert failed == {"box head (small)"} and report["summary"]["failed"] == 24
    assert "check_parallel: 48 cases, 24 failed" in proc.stdout
