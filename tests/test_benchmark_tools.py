"""The benchmark tools run (on CPU, tiny settings) and write their result files. They measure
speed; these tests only check that they work and report what they claim to."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_norm_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark_norm.py"), "--device", "cpu", "--quick",
         "--warmup", "0", "--reps", "1", "--input-sets", "1", "--out-dir", str(tmp_path)],
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
    assert "| shape | dtype | format | impl |" in (tmp_path / md).read_text()


def test_benchmark_train_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark_train.py"), "--device", "cpu", "--quick",
         "--height", "64", "--width", "96", "--boxes", "4", "--iters", "1", "--models", "frozen-BN,gn_det GN NHWC",
         "--profile", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    data = json.load(open(tmp_path / md.replace(".md", ".json")))
    assert [r["model"] for r in data["rows"]] == ["frozen-BN", "gn_det GN NHWC"]
    assert all(r["step_s"] > 0 and r["infer_s"] > 0 for r in data["rows"])
    text = (tmp_path / md).read_text()
    assert "| fp32 | frozen-BN |" in text and "1.000" in text and "Top ops of the gn_det GN training step" in text
    assert "--out-dir" not in data["meta"]["command"]
