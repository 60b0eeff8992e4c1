"""The Triton kernels compile for the H100/H200 (sm_90), and one specialisation for each
supported architecture (gn_det.policy.support), on a machine without a GPU, at the
specialisations real launches produce, without register spills and within each
architecture's limits (tools/compile_kernels.py).
The interpreter tests check what the kernels compute; this checks that the GPU compiler
accepts them, which the interpreter does not (it never folds arguments equal to 1 into
constants, for one), and that the tool's GPU-free evidence (--json: registers, access widths,
occupancy, launches, the multi-scale replay's compilation count) is well formed."""
import collections
import functools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from gn_det.diagnostics.bench import inspection
from gn_det.diagnostics.bench.layer_shapes import COMPILE_EXTRA_SHAPES, MASK_RCNN_SHAPES
from gn_det.ops import triton_launch as group_norm_triton, occupancy
from gn_det.policy import support
from gn_det.ops.activation import ACT_RELU

SHAPES = {**MASK_RCNN_SHAPES, **COMPILE_EXTRA_SHAPES}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"_group_forward_kernel", "_group_backward_kernel", "_group_forward_flat_kernel", "_group_backward_flat_kernel",
           "_stats_partial_kernel", "_stats_finalize_kernel",
           "_forward_apply_kernel", "_backward_partial_kernel", "_backward_finalize_kernel", "_backward_apply_kernel",
           "_param_grad_kernel"}
KEYS = {"kernel", "shape", "dtype", "layout", "registers", "spills", "load_bytes_min", "store_bytes_min",
        "blocks_per_sm", "waves"}


def test_kernels_compile_for_sm90_without_spills_json():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GN_DET_TRITON_ON_CPU")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_kernels.py"), "--quick", "--json",
                           "--replay-multiscale", "--replay-iterations", "30"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert " 0 failed or spilled" in proc.stderr
    data = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert data["meta"]["failed_or_spilled"] == 0 and data["meta"]["compiled"] == data["meta"]["specialisations"]
    rows = data["kernels"]
    assert {row["kernel"] for row in rows} == KERNELS
    assert all(KEYS <= set(row) for row in rows)
    assert {row["shape"] for row in rows} == {"res2 N=2", "box head", "volume", "features, G = C",
                                              "7 channels per group"}
    # The split forward's statistics are merged by its apply programs (two launches) at the
    # detection shapes; a finalize launch only where a channels_last block's lanes would each
    # gather too many records (7 channels per group across blocks of 128, 66 splits).
    finalized = {(r["shape"], r["layout"]) for r in rows if r["kernel"] == "_stats_finalize_kernel"}
    assert finalized == {("7 channels per group", "channels_last")}, finalized
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["spills"] == 0, row
        assert 1 <= row["blocks_per_sm"] <= 32 and row["waves"] > 0, row
        assert row["blocks_per_sm"] * row["warps"] <= 64, row
        assert 0 < row["grid"] and abs(row["waves"] - row["grid"] / (132 * row["blocks_per_sm"])) < 1e-3
        element = 4 if row["dtype"] == "float32" else 2
        moves_activations = not row["kernel"].endswith(("_finalize_kernel", "_param_grad_kernel"))
        # Every access to x/y/dy/dx is a whole number of elements, at most 16 bytes (one v4.b32).
        assert (row["load_bytes_min"] is not None) == moves_activations, row
        if moves_activations:
            assert row["load_bytes_min"] in (element, 2 * element, 4 * element, 8, 16), row
        writes_activations = row["kernel"] in ("_group_forward_kernel", "_group_backward_kernel",
                                               "_group_forward_flat_kernel", "_group_backward_flat_kernel",
                                               "_forward_apply_kernel", "_backward_apply_kernel")
        assert (row["store_bytes_min"] is not None) == writes_activations, row
        # Each global access's address was traced to exactly one pointer parameter.
        assert "?" not in row["load_bytes_by_pointer"] and "?" not in row["store_bytes_by_pointer"], row
    # Full-width (16-byte) accesses where the layout allows them: channels_last, and NCHW
    # where S is a multiple of 8 (res2 here); at the box head's S = 49 in NCHW each group is
    # tiled flat (8 x 49 = 392 elements, a multiple of 8), so there too.
    for row in rows:
        if row["shape"] == "res2 N=2" and row["load_bytes_min"] is not None:
            assert row["load_bytes_min"] == 16 and row["store_bytes_min"] in (None, 16), row
    # NCHW rows that start misaligned (the volume's S = 3519, odd) are read and written by the
    # split kernels in shifted windows of whole 16-byte blocks: 16 bytes there too.
    volume = [r for r in rows if r["shape"] == "volume" and r["load_bytes_min"] is not None]
    assert {r["layout"] for r in volume} == {"nchw", "channels_last"}
    assert all(r["load_bytes_min"] == 16 and r["store_bytes_min"] in (None, 16) for r in volume), volume
    box = [r for r in rows if r["shape"] == "box head" and r["kernel"].startswith("_group")]
    assert {r["kernel"] for r in box if r["layout"] == "nchw"} == {"_group_forward_flat_kernel", "_group_backward_flat_kernel"}
    assert box and all(r["load_bytes_min"] == r["store_bytes_min"] == 16 for r in box), box
    # The partial-sums kernels' grids are one full wave at their own occupancy (no tail).
    partial = [r for r in rows if r["shape"] == "res2 N=2" and r["kernel"].endswith("_partial_kernel")]
    assert partial and all(0.9 <= r["waves"] <= 1.0 for r in partial), partial
    # dgamma/dbeta are summed (and cast) by the kernels: no torch op runs beside them.
    assert data["launches"] == {"split_forward": 2, "split_backward": 3, "group_forward": 1, "group_backward": 2}
    assert all(not name.startswith("torch") for entry in data["launch_detail"].values() for name in entry["launches"])
    replay = data["replay_compiles"]
    assert replay["iterations"] == 30 and replay["gn_layer_calls"] > 0
    assert 0 < replay["model_activations"] <= replay["compiles"] == sum(replay["by_kernel"].values())
    # Bounded specialisation: image sizes do not multiply compilations (300 iterations: 39,
    # benchmarks/results/kernels_sm90_compile.json; 297 before S and the split sizes were
    # unspecialised).
    assert replay["compiles"] <= 50, replay["by_kernel"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for the GPU: not under the interpreter")
def test_masked_kernels_compile_for_sm90_without_spills():
    """The masked specialisations (valid regions, issue 35) at res2 in three dtypes, both layouts,
    every activation and block end: compiled by ptxas, none spilling (every architecture and
    shape: benchmarks/results/kernels_masked_compile_*.md)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GN_DET_TRITON_ON_CPU")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_kernels.py"), "--shapes", "res2 N=2",
                           "--masked", "--json", "--no-launches"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    data = json.loads(proc.stdout)
    masked = [row for row in data["kernels"] if row.get("masked")]
    assert data["meta"]["failed_or_spilled"] == 0 and masked
    assert {row["layout"] for row in masked} == {"nchw", "channels_last"}
    assert {row["dtype"] for row in masked} == {"float32", "bfloat16", "float16"}
    assert all(row["spills"] == 0 and 0 < row["registers"] <= 255 for row in masked)


def test_one_specialisation_per_supported_architecture():
    # The box head's forward (one launch: the flat one-program-per-group kernel), compiled for
    # every architecture gn_det supports, in float32 and, where supported, bfloat16, with the
    # ptxas triton itself picks for it: no spill, within that architecture's limits. (The
    # full sweep per architecture: tools/compile_kernels.py --arch all,
    # benchmarks/results/kernels_archs_compile_triton*.)
    from triton.backends.compiler import GPUTarget

    shape = SHAPES["box head"]
    for arch in support.SUPPORTED_ARCHITECTURES:
        target = GPUTarget("cuda", arch, 32)
        assert os.path.isfile(inspection.ptxas_path(arch)), arch
        for dtype in (torch.float32, torch.bfloat16):
            if support.architecture_support(arch, dtype) is not None:
                assert arch < 80 and dtype == torch.bfloat16
                continue
            forward, _ = inspection.layer_launches(shape, dtype, torch.contiguous_format, ACT_RELU, target=target)
            assert [launch.kernel for launch in forward] == ["_group_forward_flat_kernel"]
            row = inspection.compile_specialisation(forward[0], target)
            assert row["spills"] == 0 and row["over_limits"] == [], (arch, dtype, row)
            assert 1 <= row["blocks_per_sm"] <= occupancy.ARCHITECTURES[arch].blocks, (arch, row)
            # The grid is one program per (n, group): independent of the architecture.
            assert forward[0].programs == shape[0] * 32


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for the GPU: not under the interpreter")
@pytest.mark.parametrize("arch,dtype", [(75, torch.float16), (80, torch.float32), (89, torch.float32),
                                        (120, torch.float32)])
def test_shifted_forward_apply_tiles_sized_per_architecture(arch, dtype):
    # The shifted forward apply at the record tiles of the others (2048 elements) spilled with
    # sm_75's and sm_80's ptxas at res5 (20 and 36 bytes), and with triton 3.9 sm_120's (28) and
    # sm_86/sm_89's (12, at the volume); the launcher sizes them by the target's own
    # (_STATS_TILE_ELEMENTS_BY_ARCH: 1024), which compiles without.
    from triton.backends.compiler import GPUTarget

    k = group_norm_triton
    assert k._stats_block_k(4, k.STATS_GATHERED, True, arch) == 256 and k._stats_block_k(4, k.STATS_GATHERED, True) == 512
    target = GPUTarget("cuda", arch, 32)
    forward, _ = inspection.layer_launches(SHAPES["res5"], dtype, torch.contiguous_format, 0, target=target)
    assert forward[-1].kernel == "_forward_apply_kernel"
    row = inspection.compile_specialisation(forward[-1], target)
    assert row["spills"] == 0 and row["over_limits"] == [], row


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for the GPU: not under the interpreter")
def test_backward_register_caps_per_architecture():
    # sm_100's ptxas capped the backward partial sums at 128 registers and spilled 8 bytes
    # (res2 N=1, float32 channels_last, SiLU), sm_120's at 80 (stem and res2 N=1, float16
    # channels_last, no activation) and its one-program-per-group backward at 80 (the sequence,
    # float32 NCHW): the launcher asks for caps of 168 and 128 there
    # (_BACKWARD_PARTIAL_MAXNREG_BY_ARCH, _GROUP_BACKWARD_MAXNREG_BY_ARCH), which compile
    # without spills; sm_90 gets none.
    from triton.backends.compiler import GPUTarget

    cases = [(100, (1, 256, 200, 336), torch.float32, torch.channels_last, 2, "_backward_partial_kernel", 168),
             (120, (1, 256, 200, 336), torch.float16, torch.channels_last, 0, "_backward_partial_kernel", 128),
             (120, SHAPES["sequence"], torch.float32, torch.contiguous_format, 0, "_group_backward_kernel", 128),
             (90, (1, 256, 200, 336), torch.float32, torch.channels_last, 2, "_backward_partial_kernel", None),
             (90, SHAPES["sequence"], torch.float32, torch.contiguous_format, 0, "_group_backward_kernel", None)]
    for arch, shape, dtype, fmt, act, kernel, cap in cases:
        target = GPUTarget("cuda", arch, 32)
        _, backward = inspection.layer_launches(shape, dtype, fmt, act, target=target)
        assert backward[0].kernel == kernel, (arch, backward[0].kernel)
        options = json.loads(backward[0].compile["specialization_data"])["options"]
        assert options.get("maxnreg") == cap, (arch, kernel, options.get("maxnreg"))
        row = inspection.compile_specialisation(backward[0], target)
        assert row["spills"] == 0 and row["over_limits"] == [], (arch, row)


def test_limit_violations():
    t4 = occupancy.ARCHITECTURES[75]
    assert occupancy.limit_violations(128, 8, 4096, t4) == []
    assert occupancy.limit_violations(255, 8, 0, t4) == []  # 255 x 256 threads: one block on 65536
    assert "registers per thread" in occupancy.limit_violations(256, 4, 0, t4)[0]
    assert "shared memory" in occupancy.limit_violations(32, 4, 65 * 1024, t4)[0]
    assert "threads per block" in occupancy.limit_violations(32, 64, 0, t4)[0]
    # 8 warps of 32 registers: 8 blocks on the H100 (64 warps per SM), 4 on the T4 (32 warps).
    assert occupancy.blocks_per_sm(32, 8, 0, occupancy.H100) == 8
    assert occupancy.blocks_per_sm(32, 8, 0, t4) == 4
    assert occupancy.blocks_per_sm(32, 4, 0, occupancy.ARCHITECTURES[86]) == 12  # 48 warps per SM


PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	ld.param.b64 	%rd9, [k_param_3];
	mul.wide.s32 	%rd3, %r1, 2;
	add.s64 	%rd4, %rd1, %rd3;
$L__loop:
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	add.s64 	%rd4, %rd4, 16;
	mad.wide.s32 	%rd5, %r1, 4, %rd9;
	ld.global.L1::evict_last.b32 { %r6 }, [ %rd5 + 0 ];
	add.s64 	%rd6, %rd2, %rd3;
	@%p1 st.global.b16 [ %rd6 + 0 ], { %rs1 };
	bra.uni 	$L__loop;
}
"""


def test_ptx_access_widths_by_pointer():
    # Widths are vector count x type width; each address is traced back through the
    # arithmetic (and the loop's increment) to the pointer parameter it came from.
    accesses = inspection.global_accesses(PTX, ["X", "Y", None, "W"])
    widths = inspection.access_widths(accesses)
    assert widths == {"load": {"X": 16, "W": 4}, "store": {"Y": 2}}
    assert inspection.activation_min(widths["load"]) == 16 and inspection.activation_min(widths["store"]) == 2
    assert inspection.pointer_params({"X": "*bf16", "C": "i32", "BLOCK": "constexpr", "W": "*fp32"}) == ["X", None, "W"]


def test_occupancy_against_h100_limits():
    assert occupancy.blocks_per_sm(32, 4, 0) == 16  # 64 warps per SM
    assert occupancy.blocks_per_sm(128, 8, 0) == 2  # 128 x 256 threads = 32K registers per block
    assert occupancy.blocks_per_sm(20, 1, 0) == 32  # 32 blocks per SM
    assert occupancy.blocks_per_sm(32, 4, 100 * 1024) == 2  # shared memory (228 KB, 1 KB reserved per block)
    assert occupancy.waves(132 * 4, 4) == 1.0


def test_split_counts_fill_one_wave():
    # 264 resident programs (2 per SM): rows x splits up to one full wave, never a tail.
    assert occupancy.one_wave_splits(rows=128, tiles=66, resident=264, max_splits=512) == 2  # 256 programs
    assert occupancy.one_wave_splits(rows=4, tiles=8400, resident=264, max_splits=512) == 66  # exactly 264
    assert occupancy.one_wave_splits(rows=1, tiles=3, resident=264, max_splits=512) == 3  # a split is a tile at least
    assert occupancy.one_wave_splits(rows=1, tiles=8400, resident=1056, max_splits=512) == 512
    assert occupancy.one_wave_splits(rows=1024, tiles=2, resident=264, max_splits=512) == 1  # rows alone: 3.9 waves
    # The launcher's splits are whole tiles; the last may be short, none is empty.
    for s, block_s, rows, resident in ((67200, 1024, 64, 264), (1050, 1024, 1024, 264), (4200, 32, 2, 396)):
        splits, chunk_s = group_norm_triton._splits(rows, s, block_s, resident)
        assert chunk_s % block_s == 0 and (splits - 1) * chunk_s < s <= splits * chunk_s
        assert rows * splits <= max(resident, rows)


def test_forward_statistics_merge_choice():
    # How the split forward's apply programs get their groups' statistics (_stats_merge), at
    # the split counts an H100 gives the partial-sums kernel (264 or 396 programs a wave).
    k = group_norm_triton
    # res2 channels_last, N=2: 2 x 2 blocks of 128 channels, 66 splits: lanes of whole groups of 8.
    assert k._stats_merge(8, 66, 128, False) == k.STATS_BY_LANES
    # res2 NCHW: blocks of 4 rows, groups of 8 across two blocks, 3 splits: 24 records a lane.
    assert k._stats_merge(8, 3, 4, False) == k.STATS_GATHERED
    # res5 NCHW, shifted windows (S = 1050): one split, 64 records for each of three rows.
    assert k._stats_merge(64, 1, 4, True) == k.STATS_GATHERED
    # 7 channels per group, channels_last, 66 splits: 462 records a lane; a launch is cheaper.
    assert k._stats_merge(7, 66, 128, False) == k.STATS_FINALIZED
    # ...but not over 3 splits (21 records: six loads of 4, no more than a launch).
    assert k._stats_merge(7, 3, 128, False) == k.STATS_GATHERED


def _docstring_table_cases():
    """kernel set -> the cases column of the kernel file's docstring table (triton_kernels)."""
    from gn_det.ops import triton_kernels

    rows = re.findall(r"^ *([a-z][a-z ]*?) *\| *(\d+) *\|", triton_kernels.__doc__, re.MULTILINE)
    return {name: int(cases) for name, cases in rows}


@functools.lru_cache(maxsize=None)
def _committed_sm90_compile():
    with open(os.path.join(ROOT, "benchmarks", "results", "kernels_sm90_compile.json")) as f:
        return json.load(f)


def _kernel_sets_at_h100_splits(shapes):
    """(shape name, dtype, layout) -> kernel_set for every case of ``shapes``, at the split counts
    of the committed sm_90 compile (its partial-sums kernel's occupancy on 132 SMs); the grids
    it recorded are checked to be those splits."""
    data = _committed_sm90_compile()
    partial = {(r["shape"], r["dtype"], r["layout"]): r for r in data["kernels"] if r["kernel"] == "_stats_partial_kernel"}
    sms, k = data["meta"]["sm_count"], group_norm_triton
    out = {}
    for name, shape in shapes.items():
        s = math.prod(shape[2:])
        for dtype, size in (("bfloat16", 2), ("float32", 4)):
            for layout in ("nchw", "channels_last") if len(shape) >= 4 else ("nchw",):
                row = partial.get((name, dtype, layout))
                programs = row["blocks_per_sm"] * sms if row else 0
                kernel_set = k.kernel_set(shape, size, layout == "channels_last", 32, programs)
                assert (row is None) == (kernel_set in ("flat", "one program per group")), (name, dtype, layout)
                if row:  # the launcher's recorded grid is (n, channel block) x the splits kernel_set assumed
                    block_s, n_cblocks = k._tiles(shape[1], s, layout == "channels_last", size)[1:3]
                    assert row["grid"] == shape[0] * n_cblocks * k._splits(shape[0] * n_cblocks, s, block_s, programs)[0]
                out[name, dtype, layout] = kernel_set
    return out


def test_kernel_sets_match_the_docstring_table(monkeypatch):
    # The 60 Mask R-CNN cases (15 shapes x 2 dtypes x 2 layouts) per kernel set, as the module
    # docstring's table says: a changed tile, knob or choice that moves a case fails here.
    sets = _kernel_sets_at_h100_splits(MASK_RCNN_SHAPES)
    assert len(sets) == 60
    counted = collections.Counter(sets.values())
    table = _docstring_table_cases()
    assert set(table) == set(group_norm_triton.KERNEL_SETS)
    assert {name: counted.get(name, 0) for name in table} == table
    # "finalized" earns its place at the compile check's RegNet-width shape (7 channels per
    # group in channels_last, many splits), and nowhere else it compiles.
    extra = _kernel_sets_at_h100_splits(COMPILE_EXTRA_SHAPES)
    assert {key for key, name in extra.items() if name == "finalized"} == {
        ("7 channels per group", "bfloat16", "channels_last"), ("7 channels per group", "float32", "channels_last")}
    # LAUNCH_IN_LOADS (unmeasured) decides no case: any value from 1 to 105 gives the same sets.
    everything = {**sets, **extra}
    for loads in (1, 105):
        monkeypatch.setattr(group_norm_triton, "LAUNCH_IN_LOADS", loads)
        assert {**_kernel_sets_at_h100_splits(MASK_RCNN_SHAPES),
                **_kernel_sets_at_h100_splits(COMPILE_EXTRA_SHAPES)} == everything
    for loads in (0, 106):  # ...and the range is tight: outside it a case moves
        monkeypatch.setattr(group_norm_triton, "LAUNCH_IN_LOADS", loads)
        assert {**_kernel_sets_at_h100_splits(MASK_RCNN_SHAPES),
                **_kernel_sets_at_h100_splits(COMPILE_EXTRA_SHAPES)} != everything
