"""The benchmark tools run (on CPU, tiny settings) and write their result files. They measure
speed; these tests only check that they work and report what they claim to."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_norm_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark_norm.py"), "--device", "cpu", "--quick",
         "--warmup", "0", "--reps", "1", "--input-sets", "1", "--time-limit", "0.001", "--out-dir", str(tmp_path),
         "--write-routes", str(tmp_path / "routes.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    data = json.load(open(tmp_path / md.replace(".md", ".json")))
    assert data["meta"]["machine"].startswith("CPU") and data["meta"]["copy_bandwidth_GBps"] > 0
    impls = {row["impl"] for row in data["rows"]}
    assert {"gn_det GN", "gn_det GN+ReLU (fused)", "nn.GroupNorm", "nn.GroupNorm+ReLU",
            "compile(nn.GroupNorm+ReLU)", "FrozenBatchNorm2d"} <= impls
    ok = [row for row in data["rows"] if "error" not in row]
    assert len(ok) == len(data["rows"]), [row for row in data["rows"] if "error" in row]
    assert all(row["fwd+bwd ms"] > 0 and "fwd+bwd speedup vs nn.GroupNorm+ReLU" in row for row in ok)
    # --time-limit: the first case is measured, the others are listed as not measured.
    assert {(row["shape"], row["format"]) for row in ok} == {("box head", "nchw")}
    assert data["meta"]["not_measured"] == ["box head float32 channels_last"]
    text = (tmp_path / md).read_text()
    assert "| shape | dtype | format | impl |" in text and "## Against the targets" in text
    assert "Not measured (the run's --time-limit came first): box head float32 channels_last." in text
    paths = {row["impl"]: row.get("path") for row in ok if row["format"] == "nchw"}
    assert paths["gn_det GN"] == "PyTorch: ATen GroupNorm" and paths["nn.GroupNorm"] is None
    # --write-routes: the kernels measured with routes off, against gn_det forced onto the
    # path a route takes; no row ran the kernels on CPU, so no routes file is written.
    assert paths["gn_det GN+ReLU (fused) (ATen path)"].startswith("PyTorch: ATen GroupNorm (forced")
    assert "Routes to PyTorch's GroupNorm: off (GN_DET_ROUTES=none" in text
    assert not (tmp_path / "routes.json").exists()
    assert "routes.json: unchanged (no row of this run ran the Triton kernels)" in proc.stdout
    assert "Routes: " in text and "routes.json: unchanged" in text


def _row(impl, ms, shape="FPN P2", dims=(2, 256, 200, 336), fmt="nchw", speedup=None, pct=90.0):
    row = {"shape": shape, "dims": list(dims), "dtype": "bfloat16", "format": fmt, "impl": impl,
           "fwd+bwd ms": ms, "fwd two-pass %copy": pct, "bwd two-pass %copy": pct}
    if speedup is not None:
        row["fwd+bwd speedup vs nn.GroupNorm+ReLU"] = speedup
    return row


def test_benchmark_norm_checks_the_targets():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from benchmark_norm import target_checks
    finally:
        sys.path.pop(0)
    met = [_row("gn_det GN", 1.0), _row("gn_det GN+ReLU (fused)", 1.0, speedup=5.0), _row("nn.GroupNorm", 4.0),
           _row("nn.GroupNorm+ReLU", 5.0), _row("FrozenBatchNorm2d", 0.6)]
    lines = target_checks(met, is_gpu=True)
    assert len(lines) == 5 and all(": met on all" in line for line in lines), lines
    # A slower fused layer: slower than GroupNorm + ReLU, short of 4x, off the floor, and a
    # channels_last row that needs 6x.
    missed = met[:1] + [_row("gn_det GN+ReLU (fused)", 6.0, speedup=0.8, pct=40.0)] + met[2:]
    missed += [_row("gn_det GN+ReLU (fused)", 1.0, fmt="channels_last", speedup=5.0),
               _row("nn.GroupNorm+ReLU", 5.0, fmt="channels_last")]
    lines = target_checks(missed, is_gpu=True)
    assert "never slower" in lines[0] and "missed on 1 of 3 rows" in lines[0] and "6.00x" not in lines[0]
    assert "missed on 2 of 2 rows" in lines[1] and "target 6x" in lines[1] and "target 4x" in lines[1]
    assert "missed on 1 of" in lines[2] and "40%" in lines[2]
    assert "within 2x of FrozenBatchNorm2d: missed on 1 of 1 rows" in lines[4]
    cpu = [_row("gn_det GN", 1.05, shape="box head"), _row("nn.GroupNorm", 1.0, shape="box head")]
    assert target_checks(cpu, is_gpu=False) == ["CPU NCHW: gn_det GN fwd+bwd within 10% of nn.GroupNorm: met on all 1 rows"]


def test_benchmark_train_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark_train.py"), "--device", "cpu", "--quick",
         "--height", "64", "--width", "96", "--boxes", "4", "--iters", "1", "--models", "frozen-BN,gn_det GN NHWC",
         "--profile", "--out-dir", str(tmp_path),
         # config overrides for every model: few ROIs, so the CPU box head is not most of the time
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    data = json.load(open(tmp_path / md.replace(".md", ".json")))
    assert [r["model"] for r in data["rows"]] == ["frozen-BN", "gn_det GN NHWC"]
    assert all(r["step_s"] > 0 and r["infer_s"] > 0 for r in data["rows"])
    text = (tmp_path / md).read_text()
    assert "| fp32 | frozen-BN |" in text and "1.000" in text and "Top ops of the gn_det GN training step" in text
    # The channels_last model was measured, so it is profiled too, with the copies by origin.
    assert "Top ops of the gn_det GN NHWC training step" in text and text.count("Copies of 4-D tensors:") == 2
    assert "--out-dir" not in data["meta"]["command"]
    assert data["meta"]["command"].endswith("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32 MODEL.RPN.POST_NMS_TOPK_TEST 50")
    # the overrides reached the models: 32 sampled ROIs per image, not detectron2's 512
    assert "[64, 256, 7, 7]" in text and "[734, 256, 7, 7]" not in text


def test_benchmark_train_step_profile_runs_on_cpu_and_stops_at_its_time_limit(tmp_path):
    """The GPU run's step-profile stage (tools/gpu_checks.sh), at a tiny size on CPU: rows in its
    priority order, each with where the step's time went (GPU fields n/a here), the norm layers'
    host time from their real calls, gn_det's decisions; past --time-limit no row starts and the
    files are named partial."""
    command = [sys.executable, os.path.join(ROOT, "tools", "benchmark_train.py"), "--device", "cpu", "--quick",
               "--height", "64", "--width", "96", "--boxes", "2", "--iters", "1", "--step-profile",
               "--models", "frozen-BN,gn_det GN", "--out-dir", str(tmp_path), "--time-limit", "1e-9",
               "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.POST_NMS_TOPK_TEST", "20"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (partial,) = [f for f in os.listdir(tmp_path) if f.endswith("partial.json")]
    data = json.load(open(tmp_path / partial))
    assert [r["model"] for r in data["rows"]] == ["gn_det GN"] and "not run" in data["meta"]["partial"]
    row = data["rows"][0]
    assert row["norm_calls"] > 0 and 0 < row["norm_host_s"] < row["profiled_step_s"]
    assert row["gpu_busy_fraction"] is None and row["decisions"] == {}  # (CPU: nothing tuned or verified)
    assert "Where a step's time goes" in (tmp_path / partial.replace(".json", ".md")).read_text()


def test_profile_kernels_driver_runs_on_cpu():
    # The driver tools/gpu_checks.sh runs under Nsight Compute: each configuration twice, with
    # the kernel path it takes (here the PyTorch path: no GPU).
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "profile_kernels.py"), "--device", "cpu",
                           "--shapes", "box head", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [line for line in proc.stderr.splitlines() if line.startswith("box head (512, 256, 7, 7) float32")]
    assert [line.split(": ")[0].split("float32 ")[1] for line in runs] == [
        "nchw run 1", "nchw run 2", "channels_last run 1", "channels_last run 2"], runs
    assert runs[0].endswith("PyTorch: ATen GroupNorm + activation")
    assert runs[2].endswith("PyTorch: channels_last statistics + ATen backward")


def test_gpu_checks_script_plumbing(tmp_path):
    # tools/gpu_checks.sh is what a GPU session runs, with minutes to spend: its plumbing is
    # checked here on CPU. A layer stage (cut to its first row) writes its table, its log and
    # a routes file seeded from the package's; an unknown stage is named and counted.
    results = tmp_path / "results"
    env = dict(os.environ, GPU_RESULTS=str(results), NORM_TIME_LIMIT="0.001",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_checks.sh"), "norm-bf16", "nonsense"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "unknown stage 'nonsense'" in proc.stderr and "=== norm-bf16 done" in proc.stdout
    files = set(os.listdir(results))
    assert {"gpu_checks.log", "routes.json"} <= files, files
    assert [f for f in files if f.startswith("norm_") and f.endswith("_bf16.md")], files  # named after the machine
    assert json.loads((results / "routes.json").read_text()) == json.loads(
        open(os.path.join(ROOT, "gn_det", "policy", "routes.json")).read())
    assert "routes.json: unchanged (no row of this run ran the Triton kernels)" in proc.stdout


def test_benchmark_padding_runs_on_cpu(tmp_path):
    # tools/benchmark_padding.py: GN + ReLU over image regions against plain GN, side by side.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_padding.py"), "--quick", "--reps", "1",
                           "--threads", "1", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.load(open(tmp_path / "padding_cpu_x86_64_x{}_quick.json".format(os.cpu_count())))
    assert data["meta"]["threads"] == 1 and "--out-dir" not in data["meta"]["command"]
    assert {(r["layer"], r["format"]) for r in data["rows"]} == {
        (layer, fmt) for layer in ("stem", "res3") for fmt in ("nchw", "channels_last")}
    assert all(r["plain_ms"] > 0 and r["ratio"] == r["masked_ms"] / r["plain_ms"] for r in data["rows"])
    assert "| layer | dtype | format | without regions ms | with regions ms | ratio |" in (
        tmp_path / "padding_cpu_x86_64_x{}_quick.md".format(os.cpu_count())).read_text()


def test_benchmark_eval_runs_quick(tmp_path):
    # tools/benchmark_eval.py: pycocotools, faster-coco-eval and (where detectron2 has its
    # compiled ops) detectron2's COCOeval_opt, timed side by side on one synthetic set; their
    # stats must agree with pycocotools' (exit status 1 otherwise).
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark_eval.py"), "--quick", "--images", "20", "--dets", "30",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    assert md.startswith("eval_cpu_")  # named after the machine
    data = json.load(open(tmp_path / md.replace(".md", ".json")))
    assert data["meta"]["set"].startswith("20 images, ") and "600 detections" in data["meta"]["set"]
    assert "--out-dir" not in data["meta"]["command"] and data["meta"]["timing"] == "one run each (perf_counter)"
    rows = {(r["iou_type"], r["implementation"]): r for r in data["rows"]}
    assert set(rows) == {(t, i) for t in ("bbox", "segm")
                         for i in ("pycocotools", "faster-coco-eval", "detectron2 COCOeval_opt")}
    for iou_type in ("bbox", "segm"):
        ref, fast = rows[iou_type, "pycocotools"], rows[iou_type, "faster-coco-eval"]
        assert ref["speedup"] == 1.0 and fast["seconds"] > 0 and len(fast["stats"]) == 12
        assert fast["max_abs_diff"] <= 0.05 and 0 < ref["stats"][0] < 100
        d2 = rows[iou_type, "detectron2 COCOeval_opt"]
        assert ("seconds" in d2) == d2["note"].startswith("detectron2 COCOeval_opt")  # run where importable
    text = (tmp_path / md).read_text()
    assert "| IoU type | implementation | eval s | speed-up vs pycocotools |" in text
    assert "| segm | faster-coco-eval " in text and "tolerance 0.05 points: agree." in text


def test_tools_share_one_shape_table_and_edit_no_sys_path():
    # The benchmark, compile and profile tools take their shapes from gn_det.diagnostics.bench.layer_shapes,
    # and no tool edits sys.path (gn_det is installed; a tool's helpers sit beside it).
    tools = os.path.join(ROOT, "tools")
    for name in sorted(os.listdir(tools)):
        if name.endswith(".py"):
            assert "sys.path" not in open(os.path.join(tools, name)).read(), name
    for name in ("benchmark_norm.py", "compile_kernels.py", "profile_kernels.py"):
        assert "from gn_det.diagnostics.bench.layer_shapes import" in open(os.path.join(tools, name)).read(), name


@pytest.mark.slow  # three Mask R-CNN builds and several steps: minutes on a shared 2-core machine
def test_benchmark_memory_runs_on_cpu(tmp_path):
    recompute = "gn_det GN + recompute"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark_memory.py"), "--device", "cpu", "--sizes", "64x96",
         "--boxes", "4", "--iters", "1", "--held-repeats", "1", "--models", f"frozen-BN,gn_det GN,{recompute}",
         "--suffix", "quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    rows = {r["model"]: r for r in json.load(open(tmp_path / md.replace(".md", ".json")))["rows"]}
    assert rows[recompute]["activation_mib"] < rows["gn_det GN"]["activation_mib"]
    assert rows["gn_det GN"]["step_s"] > 0 and rows[recompute]["step_s"] > 0
    text = (tmp_path / md).read_text()
    assert "| 64x96 | frozen-BN |" in text and "without recomputation" in text and "Where the saved" in text


def test_benchmark_norm_reports_each_buckets_verification():
    # benchmark_norm's rows carry what first-use verification found for their bucket (from
    # gn_det.decisions()): records of other buckets, and tuning decisions, are not theirs.
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from benchmark_norm import describe_verification, verification_of
    finally:
        sys.path.pop(0)
    import torch


    from gn_det.policy import tuning, verification
    from gn_det.ops.activation import ACT_NONE, ACT_RELU

    x, larger = torch.empty(2, 64, 8, 8), torch.empty(2, 64, 64, 64)
    key = verification.verify_key_of(x, 32, ACT_RELU, False)
    records = [
        tuning.Verification(key, "forward", True, "y: 1e-07 <= 1e-05", "verified", tuple(x.shape)).as_dict(),
        tuning.Verification(key, "backward", False, "dx: 0.25 > 5e-05", "disk cache").as_dict(),
        tuning.Verification(verification.verify_key_of(larger, 32, ACT_RELU, False), "forward",
                            False, "raised", "verified").as_dict(),
        tuning.Verification(verification.verify_key_of(x, 32, ACT_NONE, False), "forward",
                            False, "raised", "verified").as_dict(),
        tuning.Decision(tuning.tune_key_of(x, 32, ACT_RELU, False, True), "kernels", "measured", {}).as_dict(),
    ]
    checks = verification_of(records, x, relu=True)
    assert checks == [{"check": "forward", "passed": True, "detail": "y: 1e-07 <= 1e-05", "source": "verified"},
                      {"check": "backward", "passed": False, "detail": "dx: 0.25 > 5e-05", "source": "disk cache"}]
    assert describe_verification(checks) == ("forward passed; backward FAILED (dx: 0.25 > 5e-05), "
                                             "PyTorch's path since")
    assert [c["detail"] for c in verification_of(records, x, relu=False)] == ["raised"]
    assert verification_of(records, torch.empty(2, 64, 32, 32), relu=True) == []
    assert describe_verification([]) == "not verified"


def test_benchmark_host_runs_on_cpu(tmp_path):
    """tools/benchmark_host.py on a stand-in GPU: one row per path and mode with gn_det's and the
    baseline's host time, the kernels' rows with Triton's share, and the per-step totals."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_host.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [n for n in os.listdir(tmp_path) if n.endswith("_quick.json")]
    with open(tmp_path / name) as f:
        result = json.load(f)
    rows = result["rows"]
    kernel_rows = [r for r in rows if r["path"].startswith("kernels:")]
    assert {r["mode"] for r in kernel_rows} == {"eval forward", "train forward+backward"} and len(kernel_rows) == 13
    assert [r["mode"] for r in kernel_rows if "output recomputed" in r["path"]] == ["train forward+backward"]
    for r in rows:
        if r["gn_det_us"] is not None:
            assert r["gn_det_us"] > 0 and r["baseline_us"] > 0 and r["ratio"] == pytest.approx(
                r["gn_det_us"] / r["baseline_us"], rel=1e-2)
    assert all(0 <= r["triton_launch_us"] <= r["gn_det_us"] for r in kernel_rows if "triton_launch_us" in r)
    assert set(result["per_step"]) == {"gn_det_ms", "detectron2_gn_ms", "frozen_bn_ms"}
    assert "stand-in GPU" in result["method"] and "keeps freed memory" in result["method"]
