"""Routes: the shape buckets where the Triton kernels were measured slower than PyTorch's
GroupNorm, read from a checked JSON file and written by tools/benchmark_norm.py
--write-routes. (That gn_det follows a route is tested where the kernels run on CPU:
tests/interpreted/test_triton_kernels.py.)"""
import json
import os
import sys

import pytest
import torch

from gn_det.policy import routing
from gn_det.ops.activation import ACT_NONE, ACT_RELU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = "NVIDIA H100 80GB HBM3"


def _route(**changes):
    route = {"device": H100, "dtype": "bfloat16", "format": "nchw", "activation": "relu",
             "group_elements_log2": 13, "batch_groups_log2": 6, "measured": "FPN P5 1.20x"}
    route.update(changes)
    return route


@pytest.fixture
def routes_env(tmp_path):
    """Uses a file of the test's routes (and restores the routes in use before)."""
    previous = routing.routes_file()

    def use(routes, apply=True):
        path = tmp_path / "routes.json"
        path.write_text(json.dumps({"routes": routes}))
        if apply:
            routing.set_routes(path)
        return path
    yield use
    routing.set_routes(previous)


def test_route_keys_bucket_group_size_and_group_count():
    # FPN P5 at 1333x800, 2 images: 8 channels x 1050 positions per group, 2 x 32 groups.
    assert routing.route_key(H100, "bfloat16", "nchw", "relu", 2, 256, 25 * 42, 32) == (H100, "bfloat16", "nchw", "relu", 13, 6)
    # The box head: 8 x 49 = 392 elements per group (2^8 <= 392 < 2^9), 512 x 32 groups.
    assert routing.route_key(H100, "float32", "nchw", "none", 512, 256, 49, 32)[4:] == (8, 14)
    x = torch.zeros(2, 64, 5, 6).to(memory_format=torch.channels_last)
    assert routing.route_key_of(x, 32, ACT_RELU) == ("cpu", "float32", "channels_last", "relu", 5, 6)
    x3d = torch.zeros(1, 4, 2, 2, 2, dtype=torch.float16).to(memory_format=torch.channels_last_3d)
    assert routing.route_key_of(x3d, 2, ACT_NONE)[1:4] == ("float16", "channels_last_3d", "none")


def test_package_routes_file_is_valid():
    assert routing.routes_file() == routing.ROUTES_FILE or os.environ.get("GN_DET_ROUTES")
    routing.read_routes_file(routing.ROUTES_FILE)  # raises if a route is malformed
    assert "routes" in json.loads(routing.ROUTES_FILE.read_text())


def test_a_route_matches_its_bucket_only(routes_env):
    routes_env([_route(device="cpu", dtype="float32", group_elements_log2=5, batch_groups_log2=6)])
    assert routing.aten_route(torch.zeros(2, 64, 5, 6), 32, ACT_RELU) == "FPN P5 1.20x"
    assert routing.aten_route(torch.zeros(2, 64, 4, 5), 32, ACT_RELU) == "FPN P5 1.20x"  # 40 elements: same bucket
    assert routing.aten_route(torch.zeros(2, 64, 6, 6), 32, ACT_RELU) is None  # 72 elements: the next bucket
    assert routing.aten_route(torch.zeros(2, 64, 5, 6), 32, ACT_NONE) is None  # no activation
    assert routing.aten_route(torch.zeros(4, 64, 5, 6), 32, ACT_RELU) is None  # twice the groups
    assert routing.aten_route(torch.zeros(2, 64, 5, 6, dtype=torch.bfloat16), 32, ACT_RELU) is None
    assert routing.aten_route(torch.zeros(0, 64, 5, 6), 32, ACT_RELU) is None  # empty: nothing to route


def test_routes_can_be_turned_off(monkeypatch, routes_env):
    routes_env([_route(device="cpu", dtype="float32", group_elements_log2=5, batch_groups_log2=6)])
    assert routing.set_routes(None) is not None  # returns the file in use before
    assert routing.routes_file() is None and routing.load_routes() == {}
    assert routing.aten_route(torch.zeros(2, 64, 5, 6), 32, ACT_RELU) is None


@pytest.mark.parametrize("route, message", [
    (_route(dtype="bf16"), r"routes\[0\]: dtype 'bf16' is not one of float32, bfloat16, float16"),
    (_route(format="NHWC"), r"routes\[0\]: format 'NHWC' is not one of nchw, channels_last"),
    ({k: v for k, v in _route().items() if k != "batch_groups_log2"}, r"routes\[0\]: missing batch_groups_log2"),
    (_route(group_elements_log2=13.0), r"routes\[0\]: group_elements_log2 must be an integer"),
    (_route(device=""), r"routes\[0\]: device must be a GPU name"),
    ("FPN P5", r"routes\[0\]: a route must be an object"),
])
def test_malformed_routes_are_named(routes_env, route, message):
    in_use = routing.routes_file()
    path = routes_env([route], apply=False)
    with pytest.raises(ValueError, match=message) as info:
        routing.set_routes(path)
    assert str(path) in str(info.value)
    assert routing.routes_file() == in_use  # a refused file changes nothing


def test_unreadable_routes_files_are_named(monkeypatch, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"routes": [')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        routing.read_routes_file(broken)
    broken.write_text('[]')
    with pytest.raises(ValueError, match=r'broken.json: expected an object with a list under "routes"'):
        routing.read_routes_file(broken)
    with pytest.raises(FileNotFoundError, match=r"missing.json does not exist \(GN_DET_ROUTES names it\?\)"):
        routing.read_routes_file(tmp_path / "missing.json")


def test_merge_adds_replaces_and_removes_measured_buckets_only():
    merge_routes = _benchmark_norm().merge_routes
    kept = _route(dtype="float16")
    stale = _route()
    won = routing.route_key(H100, "float32", "nchw", "none", 2, 256, 1050, 32)
    lost = routing.route_key(H100, "bfloat16", "nchw", "relu", 2, 256, 1050, 32)  # = stale's key
    merged = merge_routes([kept, stale, _route(dtype="float32", activation="none")],
                                  {lost: "FPN P5 1.10x (new run)", won: None})
    assert [(r["dtype"], r["activation"], r["measured"]) for r in merged] == [
        ("bfloat16", "relu", "FPN P5 1.10x (new run)"), ("float16", "relu", "FPN P5 1.20x")]


def _rows(triton_ms, aten_ms, impl="gn_det GN+ReLU (fused)", dims=(2, 256, 25, 42), shape="FPN P5"):
    base = {"shape": shape, "dims": list(dims), "dtype": "bfloat16", "format": "nchw"}
    return [dict(base, impl=impl, path="Triton: split reduction", **{"fwd+bwd ms": triton_ms}),
            dict(base, impl=impl + " (ATen path)", path="PyTorch: ATen GroupNorm (forced)", **{"fwd+bwd ms": aten_ms})]


def _benchmark_norm():
    """tools/benchmark_norm.py, the writer of routes files."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import benchmark_norm
    finally:
        sys.path.pop(0)
    return benchmark_norm


def test_benchmark_routes_the_buckets_the_kernels_lose(tmp_path):
    tool = _benchmark_norm()
    mark_routed_rows, route_decisions, target_checks, write_routes = (
        tool.mark_routed_rows, tool.route_decisions, tool.target_checks, tool.write_routes)
    rows = (_rows(0.12, 0.10)                                  # fused ReLU at P5: the kernels lose
            + _rows(0.05, 0.10, impl="gn_det GN")              # plain GN at P5: the kernels win
            + _rows(0.20, 0.30, dims=(2, 256, 24, 43), shape="P5'")  # same bucket as the first, a win
            + _rows(1.0, 0.5, dims=(512, 256, 7, 7), shape="box head"))
    decisions = route_decisions(rows, H100, "norm_x.md")
    p5_relu = (H100, "bfloat16", "nchw", "relu", 13, 6)
    # P5 and P5' share a bucket: 0.32 ms of kernels against 0.40 ms of ATen, kept on the kernels.
    assert decisions[p5_relu] is None
    assert decisions[(H100, "bfloat16", "nchw", "none", 13, 6)] is None
    box = decisions[(H100, "bfloat16", "nchw", "relu", 8, 14)]
    assert box == "fwd+bwd box head (512, 256, 7, 7) 2.00x the ATen path (norm_x.md)"
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"about": "kept", "routes": [_route()]}))  # P5 routed by an older run
    write_routes(str(path), decisions)
    data = json.loads(path.read_text())
    assert data["about"] == "kept"
    assert [(r["group_elements_log2"], r["batch_groups_log2"]) for r in data["routes"]] == [(8, 14)]
    assert routing.read_routes_file(path)["routes"]  # the file it writes is one gn_det reads

    # The table says which rows are now routed, and the "never slower" target holds them to
    # the time of the path they will run from now on.
    mark_routed_rows(rows, H100, decisions)
    assert [r["shape"] for r in rows if r.get("routed")] == ["box head"]
    box = [r for r in rows if r.get("routed")][0]
    assert box["path"].endswith("now routed to PyTorch's GroupNorm (time: its ATen path row)")
    nn_rows = [dict(r, impl="nn.GroupNorm+ReLU", **{"fwd+bwd ms": 0.8}) for r in rows if r.get("routed")]
    lines = target_checks(rows + nn_rows, is_gpu=True)
    assert "never slower" in lines[0] and "met on all 1 rows" in lines[0], lines[0]
    box.pop("routed")
    assert "box head bfloat16 nchw gn_det GN+ReLU (fused): 1.25x" in target_checks(rows + nn_rows, is_gpu=True)[0]
