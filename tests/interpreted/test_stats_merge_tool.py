"""tools/benchmark_stats_merge.py (the three ways the split forward's statistics merge, forced
one at a time for a GPU to time) under the interpreter: each way runs and they agree."""
import os

import torch

from gn_det.ops import triton_launch as group_norm_triton
from gn_det.policy.timing import DeviceTimer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_each_way_of_merging_runs_and_they_agree(monkeypatch):
    monkeypatch.setattr(group_norm_triton, "GROUP_RESIDENT_MAX_ELEMENTS", 0)  # the split reduction at a tiny shape
    monkeypatch.setattr(group_norm_triton, "CPU_RESIDENT_PROGRAMS", 3)  # and several splits
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import benchmark_stats_merge as tool

    timer = DeviceTimer(torch.device("cpu"))
    for fmt in (torch.channels_last, torch.contiguous_format):
        row = tool.measure("tiny", (1, 64, 5, 7), torch.float32, fmt, "cpu", timer, 1)
        assert row["heuristic"] in tool.WAYS, row
        # by lanes where channel blocks hold whole groups: channels_last here (2 channels per group);
        # not NCHW rows of 35 positions, read in shifted windows
        assert set(row["forward ms"]) == set(tool.WAYS) - ({"by lanes"} if fmt == torch.contiguous_format else set())
        assert row["ways agree"] and row["max difference between ways"] <= 1e-5, row
        calls = []
        original = group_norm_triton._stats_merge
        monkeypatch.setattr(group_norm_triton, "_stats_merge",
                            lambda *a, calls=calls, original=original, **k: calls.append(a) or original(*a, **k))
        tool.forward_with(group_norm_triton.STATS_FINALIZED, *_inputs(fmt))
        assert calls == []  # a forced way: the heuristic is not asked
        assert tool.heuristic_way(*_inputs(fmt)) in tool.WAYS.values() and len(calls) == 1
        monkeypatch.setattr(group_norm_triton, "_stats_merge", original)


def _inputs(fmt):
    x = torch.randn(1, 64, 5, 7).contiguous(memory_format=fmt)
    return x, torch.rand(64) + 0.5, torch.randn(64)
