"""Launch planning and launchers of gn_det's Triton GN kernels (``triton_kernels.py``):
every size a launch chooses (the tuning knobs, with why), how a call's kernel set, tiles,
splits and grids follow from its input, and the launchers ``triton_group_norm_forward`` /
``triton_group_norm_backward``, which plan and launch each call. ``TritonPlans`` holds the
plans of one input signature, made once: the backend the policy (``gn_det.policy``) keeps per
decided input, so a repeat call only allocates its outputs and launches.

With ``valid`` (each image's region of a zero-padded batch: ``(N, 2)`` int32 on x's device) a
call runs the masked kernels (the MASKED specialisations: triton_kernels.py, "Valid regions"),
planned apart from the unmasked ones; ``masked_kernels_support`` says, from the shape, layout
and dtype alone, which inputs they take. The regions' values are never read on the host: one
plan serves any regions.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import triton

from . import occupancy
from .direct_launch import KernelLaunch
from .activation import ACT_RELU, RESIDUAL_ADD, RESIDUAL_NONE, RESIDUAL_OUTPUT
from .layout import memory_format_of
from .triton_kernels import (STATS_BY_LANES, STATS_FINALIZED, STATS_GATHERED, _backward_apply_kernel,
                             _backward_finalize_kernel, _backward_partial_kernel, _forward_apply_kernel,
                             _group_backward_flat_kernel, _group_backward_kernel, _group_forward_flat_kernel,
                             _group_forward_kernel, _param_grad_kernel, _stats_finalize_kernel, _stats_partial_kernel)

__all__ = ["LaunchPlan", "TritonPlans", "kernel_path", "kernel_set", "masked_kernels_support",
           "plan_backward", "plan_forward", "triton_group_norm_backward", "triton_group_norm_forward"]


# ---------------------------------------------------------------------------- tuning knobs
# Every size the launchers choose from, in one place, with why. None was chosen by timing on a
# GPU: they follow the rules given beside them, and the tile sizes the sm_90 compile's
# registers and spills (tools/compile_kernels.py; benchmarks/results/kernels_sm90_compile.json:
# 0 spills at every specialisation with triton 3.8, and with 3.6, the lent GPU machine's).

# The widest global access of a thread (ld.global.v4.b32): ALIGN is at most this many bytes'
# elements; more alignment would change nothing but add compilations.
ACCESS_BYTES = 16

# Groups of up to this many elements (padded to powers of two) are normalised by one program
# each, in one launch forward and one backward (detectron2's box and mask heads: 8 x 49 and
# 8 x 196 elements per group at 32 groups, N = hundreds of ROIs). Larger groups take the
# split reduction, which spreads each group over many programs.
GROUP_RESIDENT_MAX_ELEMENTS = 4096
# The flat backward's per-channel sums hold a (BLOCK_F, BLOCK_CG) tile: at most this many.
FLAT_MAX_MASK_ELEMENTS = 8192

# Elements per tile of the split kernels: 16 per thread at 8 warps.
_TILE_ELEMENTS = 4096
# Channels_last split tiles: up to 128 channels wide along the contiguous C (512 bytes of
# float32: one warp's 16-byte accesses side by side; and groups of up to 128 channels lie
# whole in a block, for STATS_BY_LANES), the rest of the tile along S. Untimed.
_CL_MAX_BLOCK_C = 128
# NCHW split tiles: up to 1024 positions along the contiguous S, the rest of the tile in
# channels. With shifted windows, 512 positions and half the tile's elements: the apply
# kernels' parameters are then per element (twice the registers).
_NCHW_MAX_BLOCK_S, _SHIFTED_MAX_BLOCK_S = 1024, 512
_SHIFTED_TILE_ELEMENTS = _TILE_ELEMENTS // 2

# Warps: one per 256 tile elements, 1 to 8 (the Triton layer-norm tutorial's rule), so that at
# most 16 elements of each of the backward's live tiles (x, dy, xhat, dz) sit in a thread's
# registers. Untuned: no GPU has measured the alternatives yet.
_ELEMENTS_PER_WARP, _MAX_WARPS = 256, 8

# Spatial splits of one row block at most: bounds the partials (N x splits x C float32) and
# the records a forward apply lane merges on GPUs that hold many programs; the Mask R-CNN
# shapes on an H100 take at most 382.
_MAX_SPLITS = 512

# dgamma/dbeta: a program sums the partials of PARAM_BLOCK_C channels, PARAM_BLOCK_R partial
# vectors at a time (1024-element tiles).
PARAM_BLOCK_R, PARAM_BLOCK_C = 32, 32
# The finalize kernels' (BLOCK_K splits, BLOCK_CG channels) tiles of a group's partials: 1024
# elements, whatever the split count (which varies with the image size) or channel count: a
# tile shaped to them would compile anew for each.
FINALIZE_BLOCK_K, FINALIZE_BLOCK_CG = 16, 64
# The statistics finalize's warps: with 4, triton 3.6's build spills (80 registers, 8 bytes).
FINALIZE_WARPS = 8

# The forward apply's statistics: records merged (BLOCK_C lanes, BLOCK_K records) at a time,
# this many elements, by lanes / gathered / gathered in shifted windows. Chosen by the sm_90
# compile's registers and spills with triton 3.8 and 3.6 (the GPU image's), whose register
# allocation moves in steps: 1024 gathered spilled 12 bytes in float32 NCHW res2 with 3.6, 1024
# with shifted windows 24 bytes in bf16 res5; 2048 by lanes 20 bytes in bf16 channels_last res2.
_STATS_TILE_ELEMENTS = {"by lanes": 1024, "gathered": 512, "shifted": 2048}
# Where an architecture's ptxas spills at those (compute capability x 10, by tools/compile_kernels.py
# --arch all, triton 3.8): shifted windows at 2048 spilled at res5 on sm_75 (T4: 12-20 bytes) and
# sm_80 (A100: 12-36 bytes), and with triton 3.9 on sm_120 (28 bytes) and sm_86/sm_89 (A10, L4:
# 12 bytes at the volume, float32); none at 1024.
_STATS_TILE_ELEMENTS_BY_ARCH = {arch: {"shifted": 1024} for arch in (75, 80, 86, 89, 120)}
# The masked kernels' (valid regions: MASKED) at most, whatever the architecture: their record
# counts come from the region (``_record_counts``), and ptxas's register allocation moves with the
# tile. By the sm_90 compile (triton 3.8): shifted windows at 2048 spilled 12 bytes in bfloat16
# res5 (80 registers) and at 1024 took 123-128 (2 blocks of 8 warps per SM), at 512 80 (3, as
# unmasked); gathered at 256 kept bfloat16 NCHW res2's 5 blocks per SM (4 at 512). (By lanes at
# 512 would keep bfloat16 channels_last's 4, but res2 N=2 would then take a finalize launch.)
_MASKED_STATS_TILE_ELEMENTS = {"by lanes": 1024, "gathered": 256, "shifted": 512}
# Register caps (Triton's ``maxnreg``) where an architecture's ptxas otherwise caps itself too
# low and spills (``_register_cap``; sm_90 gets none). The backward partial sums: sm_100 (B200,
# triton 3.8) took 128 registers and spilled 8 bytes at res2 N=1, float32 channels_last SiLU;
# with a cap of 168 it takes 157, no spill. sm_120 (RTX 50, triton 3.8) took 80 (three blocks of
# 8 warps per SM) and spilled 8 bytes at stem and res2 N=1, float16 channels_last; with a cap of
# 128 (two blocks of 8 warps still fit: 65536 / 512 threads) it takes 102-125, no spill.
_BACKWARD_PARTIAL_MAXNREG_BY_ARCH = {100: 168, 120: 128}
# The one-program-per-group backward: sm_120's ptxas took 80 and spilled 8 bytes at the
# sequence (3, 96, 1001), float32 NCHW, no activation; with 128, as above: 92-126, no spill.
_GROUP_BACKWARD_MAXNREG_BY_ARCH = {120: 128}
# A launch's cost in dependent loads from L2 (~0.5 us each on an H100: a launch gap of 2-3 us),
# for choosing between the forward apply merging the records itself and a finalize launch
# (``_stats_merge``). Unmeasured: a GPU is to tune it. Any value from 1 to 105 makes the same
# choices at every shape the compile check covers (the module docstring; tested).
LAUNCH_IN_LOADS = 4

# Programs the interpreter's grids are sized for on CPU (no occupancy there): a few, so that
# the tests cross several spatial splits.
CPU_RESIDENT_PROGRAMS = 8
# What the partial-sums kernels' registers allow on an H100 (compile_kernels), for a Triton
# whose compiled kernels do not say their registers.
_FALLBACK_BLOCKS_PER_SM = 2
# A split length or count that the occupancy query passes before the splits are known: neither
# 1 nor a multiple of 16, the values Triton would specialise on (those arguments are
# do_not_specialize anyway), so the query compiles the launch's own specialisation.
_UNSIZED = 2


# ------------------------------------------------------------------------ launch plans

# Memoisation of ``_resident_programs``, a function of (device, kernel, specialisation) alone:
# what the compiled kernel's registers let a wave hold does not change within a process.
_resident: Dict[tuple, int] = {}


def _specialisation_of(arg) -> tuple:
    """What Triton specialises a launch argument on: a tensor's dtype and 16-byte alignment,
    an integer's being 1 or a multiple of 16 (None: a float32 buffer the launch allocates)."""
    if arg is None:
        return ("buffer",)
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    return (arg == 1, arg % 16 == 0) if isinstance(arg, int) else (type(arg),)


def _kwargs_key(kwargs: dict) -> tuple:
    """The launch options and constexprs of an occupancy query, as a memo key: a tensor (the
    masked kernels' VALID) by its specialisation, the map width (MASKED: not specialised) left
    out."""
    return tuple(sorted((k, _specialisation_of(v) if isinstance(v, torch.Tensor) else v)
                        for k, v in kwargs.items() if k != "width"))


def _resident_programs(kernel, x: torch.Tensor, args: tuple, kwargs: dict) -> int:
    """Programs of ``kernel``'s specialisation for these arguments that x's GPU holds at once
    (a full wave): the compiled kernel's registers, warps and shared memory against the
    device's limits. ``args`` are the launch's, None for the float32 buffers it will allocate
    by the result. Compiles the kernel if need be (the launch that follows would), once per
    specialisation; after that, a dict lookup."""
    if not x.is_cuda:
        return CPU_RESIDENT_PROGRAMS
    key = (x.device.index, kernel.fn.__name__, tuple(map(_specialisation_of, args)), _kwargs_key(kwargs))
    found = _resident.get(key)
    if found is None:
        limits = occupancy.device_limits(x.device.index)
        buffer = torch.empty(4, dtype=torch.float32, device=x.device)  # stands for them: fresh, aligned
        args = tuple(buffer if a is None else a for a in args)
        try:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            compiled._init_handles()  # loads the binary: its register count
            blocks = occupancy.blocks_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                                             limits)
        except Exception as exc:  # a Triton whose compiled kernels say less: the grid is sized without them
            blocks = _FALLBACK_BLOCKS_PER_SM
            warnings.warn(f"gn_det: the occupancy of {kernel.fn.__name__} could not be read from its compiled kernel "
                          f"({type(exc).__name__}: {exc}); its grids assume {blocks} programs per SM", stacklevel=2)
        found = _resident[key] = max(1, blocks) * limits.sms
    return found


def _as_ncs(x: torch.Tensor) -> Tuple[int, int, int, bool]:
    """(N, C, S) sizes of x, which is contiguous or channels_last-contiguous, and whether it
    is channels_last (the one place that decides the layout)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    channels_last = x.dim() > 2 and x.stride(1) == 1 and c > 1
    return n, c, s, channels_last


def _alignment(s: int, channels_last: bool, element_size: int, cpg: int = 0) -> int:
    """The kernels' ALIGN, up to one 16-byte access (8 bf16 or 4 float32 elements: more
    would change nothing but add compilations): in NCHW the largest power of two dividing S,
    how many elements each row start is a multiple of. In channels_last, where accesses run
    along C (which is specialised), 1 for the split kernels, and for the one-program-per-group
    kernels (a group's channels in a row) the largest power of two dividing ``cpg``."""
    align = (cpg & -cpg) if channels_last else (s & -s)
    return max(1, min(align, ACCESS_BYTES // element_size))


def _dense_like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it, dense in x's layout: the kernels index it with x's offsets."""
    if t.shape != x.shape:
        raise ValueError(f"a tensor of shape {tuple(t.shape)} where x's shape {tuple(x.shape)} is needed")
    fmt = memory_format_of(x)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _tiles(c: int, s: int, channels_last: bool, element_size: int) -> Tuple[int, int, int, int, dict]:
    """The split kernels' tiles: (BLOCK_C, BLOCK_S, channel blocks, spatial tiles of the apply
    kernels, layout constexprs CHANNELS_LAST / ALIGN / SHIFT). NCHW rows whose starts are not
    16-byte aligned (S not a multiple of 16 bytes' elements) are read and written in shifted
    windows (``_window``: SHIFT), whole 16-byte blocks, where every sample's C * S elements
    are whole blocks and S at least one block; one window more per row then covers the end."""
    align, full = _alignment(s, channels_last, element_size), ACCESS_BYTES // element_size
    shift = not channels_last and align < full and s >= full and (c * s) % full == 0
    if channels_last:  # contiguous along C: wide in C
        block_c = min(triton.next_power_of_2(c), _CL_MAX_BLOCK_C)
        block_s = max(1, min(triton.next_power_of_2(s), _TILE_ELEMENTS // block_c))
    else:  # contiguous along S: long in S
        block_s = min(triton.next_power_of_2(s), _SHIFTED_MAX_BLOCK_S if shift else _NCHW_MAX_BLOCK_S)
        tile_elements = _SHIFTED_TILE_ELEMENTS if shift else _TILE_ELEMENTS
        block_c = max(1, min(triton.next_power_of_2(c), tile_elements // block_s))
    align = full if shift else align
    layout = {"CHANNELS_LAST": channels_last, "ALIGN": align, "SHIFT": shift}
    return block_c, block_s, triton.cdiv(c, block_c), triton.cdiv(s + (align - 1) * shift, block_s), layout


def _splits(n_row_blocks: int, s: int, block_s: int, resident: int) -> Tuple[int, int]:
    """(splits, positions per split) of each of ``n_row_blocks`` (n, channel block) reductions along S
    for a partial-sums kernel of which ``resident`` programs fill the GPU: one full wave
    (occupancy.one_wave_splits), each split whole tiles."""
    s_tiles = triton.cdiv(s, block_s)
    splits = occupancy.one_wave_splits(n_row_blocks, s_tiles, resident, _MAX_SPLITS)
    chunk_s = triton.cdiv(s_tiles, splits) * block_s
    return triton.cdiv(s, chunk_s), chunk_s


def _num_warps(tile_elements: int) -> int:
    """Warps for a kernel over tiles of this many elements (``_ELEMENTS_PER_WARP``)."""
    return min(max(tile_elements // _ELEMENTS_PER_WARP, 1), _MAX_WARPS)


def _group_resident_blocks(cpg: int, s: int) -> Optional[Tuple[int, int]]:
    """(BLOCK_CG, BLOCK_S) when a whole group fits one program's tile, else None."""
    block_cg, block_s = triton.next_power_of_2(cpg), triton.next_power_of_2(s)
    return (block_cg, block_s) if block_cg * block_s <= GROUP_RESIDENT_MAX_ELEMENTS else None


def _flat_group_blocks(cpg: int, s: int, channels_last: bool, element_size: int) -> Optional[Tuple[int, int, int]]:
    """(BLOCK_F, BLOCK_CG, ALIGN) when a resident NCHW group is better tiled flat: its rows
    (S elements apart) allow narrower accesses than the group as a whole (cpg * S); else None."""
    if channels_last:
        return None
    align = _alignment(cpg * s, False, element_size)
    block_f, block_cg = triton.next_power_of_2(cpg * s), triton.next_power_of_2(cpg)
    if (align <= _alignment(s, False, element_size) or block_f > GROUP_RESIDENT_MAX_ELEMENTS
            or block_f * block_cg > FLAT_MAX_MASK_ELEMENTS):
        return None
    return block_f, block_cg, align


def _stats_block_k(block_c: int, stats: int, shift: bool, arch: int = 0, masked: bool = False) -> int:
    """BLOCK_K of the forward apply's record tiles (``_STATS_TILE_ELEMENTS``, or the target
    architecture's own, ``_STATS_TILE_ELEMENTS_BY_ARCH``; masked, at most
    ``_MASKED_STATS_TILE_ELEMENTS``)."""
    kind = "shifted" if shift else "by lanes" if stats == STATS_BY_LANES else "gathered"
    elements = _STATS_TILE_ELEMENTS_BY_ARCH.get(arch, _STATS_TILE_ELEMENTS).get(kind, _STATS_TILE_ELEMENTS[kind])
    if masked:
        elements = min(elements, _MASKED_STATS_TILE_ELEMENTS[kind])
    return max(1, elements // block_c)


def _target_arch(x: torch.Tensor) -> int:
    """Compute capability x 10 of the GPU x's kernels are compiled for: x's device's; for meta
    tensors (tools/compile_kernels.py) its target, from its stand-in for Triton's driver; 0 on
    CPU (the interpreter)."""
    if x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        return 10 * major + minor
    if x.device.type == "meta":
        return triton.runtime.driver.active.get_current_target().arch
    return 0


def _register_cap(caps_by_arch: Dict[int, int], x: torch.Tensor) -> Dict[str, int]:
    """The launch option capping a kernel's registers on x's target architecture (``maxnreg``,
    from one of the ``*_MAXNREG_BY_ARCH`` tables), or none: ptxas's own choice."""
    cap = caps_by_arch.get(_target_arch(x))
    return {"maxnreg": cap} if cap else {}


def _groups_whole_in_blocks(cpg: int, block_c: int, shift: bool) -> bool:
    """Whether STATS_BY_LANES may run: every channel block holds whole groups as aligned runs of
    lanes (channels per group a power of two up to BLOCK_C), and no shifted window reaches a row
    outside the block."""
    return not shift and cpg & (cpg - 1) == 0 and cpg <= block_c


def _stats_merge(cpg: int, splits: int, block_c: int, shift: bool, arch: int = 0, masked: bool = False) -> int:
    """The forward apply's STATS: by lanes where its channel blocks hold whole groups
    (``_groups_whole_in_blocks``): each lane merges its channel's ``splits`` records, the group's lanes
    merge in registers. Else each lane gathers its group's cpg x splits records (three times
    with SHIFT: its row's and its neighbours'). Either, where its dependent tile loads are no
    more than a finalize launch's two passes plus the launch (LAUNCH_IN_LOADS); else finalized
    by a launch of its own: channels_last groups whose size is not a power of two over many
    splits, groups wider than a channel block."""
    budget = 2 * -(-splits // FINALIZE_BLOCK_K) * -(-cpg // FINALIZE_BLOCK_CG) + LAUNCH_IN_LOADS
    by_lanes = _stats_block_k(block_c, STATS_BY_LANES, shift, arch, masked)
    if _groups_whole_in_blocks(cpg, block_c, shift) and -(-splits // by_lanes) <= budget:
        return STATS_BY_LANES
    if -(-splits * cpg // _stats_block_k(block_c, STATS_GATHERED, shift, arch, masked)) * (3 if shift else 1) <= budget:
        return STATS_GATHERED
    return STATS_FINALIZED


# -------------------------------------------------------------------- which kernel set

def kernel_path(x: torch.Tensor, num_groups: int) -> str:
    """Which of the two kernel sets normalises x: "one program per group" or "split reduction"."""
    _, c, s, *_ = _as_ncs(x)
    return "one program per group" if _group_resident_blocks(c // num_groups, s) else "split reduction"


KERNEL_SETS = ("flat", "one program per group", "by lanes", "gathered", "shifted windows", "finalized")


def kernel_set(shape: Sequence[int], element_size: int, channels_last: bool, num_groups: int,
               partial_programs: int, masked: bool = False) -> str:
    """The kernel set (one of ``KERNEL_SETS``: the table in triton_kernels.py's docstring) that normalises a
    dense ``(N, C, *)`` input of this shape, element size in bytes and layout (``masked``: with
    valid regions, the MASKED kernels'). The split reduction's sets depend on its split count:
    ``partial_programs`` is how many programs of its partial-sums kernel a wave holds (on a GPU,
    ``_resident_programs``; ignored for the one-program-per-group sets). Decided by the
    launchers' own plan functions."""
    n, c = shape[0], shape[1]
    s, cpg = math.prod(shape[2:]), c // num_groups
    if _group_resident_blocks(cpg, s) is not None:
        return "flat" if _flat_group_blocks(cpg, s, channels_last, element_size) else "one program per group"
    block_c, block_s, n_cblocks, _, layout = _tiles(c, s, channels_last, element_size)
    splits, _ = _splits(n * n_cblocks, s, block_s, partial_programs)
    stats = _stats_merge(cpg, splits, block_c, layout["SHIFT"], masked=masked)
    if stats == STATS_FINALIZED:
        return "finalized"
    if layout["SHIFT"]:
        return "shifted windows"
    return "by lanes" if stats == STATS_BY_LANES else "gathered"


def masked_kernels_support(x: torch.Tensor, num_groups: int) -> bool:
    """Whether the masked kernels (``valid`` regions: MASKED) cover x's kernel set, from x's
    shape, layout and dtype alone (never the regions' values): every kernel set, for a 4-D
    ``(N, C, H, W)`` input, NCHW- or channels_last-dense, float32, float16 or bfloat16, with
    H * W * W <= 2^32 (the kernels' multiply-high quotient by W is exact there: triton_kernels.py,
    "valid regions"; a 2048 x 2048 map is beyond it, a 1024 x 2048 one not) and H * W < 2^31
    (int32 positions). Anything else is the PyTorch path's (the policy sends it there)."""
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or num_groups <= 0:
        return False
    h, w = x.shape[2], x.shape[3]
    if x.shape[1] % num_groups or h * w * w > 2 ** 32 or h * w >= 2 ** 31:
        return False
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _check_valid(x: torch.Tensor, valid: torch.Tensor) -> None:
    """``valid``'s form for x (shape, dtype, layout, device; its values are the kernels' to
    read, never the host's). Every masked call's (a few attribute reads); that the masked
    kernels take x's shape is checked once, by its plan (``_masked``)."""
    if x.dim() != 4:
        raise ValueError(f"valid regions need a 4-D (N, C, H, W) input; got {tuple(x.shape)}")
    if (valid.dtype != torch.int32 or tuple(valid.shape) != (x.shape[0], 2) or valid.device != x.device
            or not valid.is_contiguous()):
        raise ValueError(f"valid must be a contiguous int32 ({x.shape[0]}, 2) tensor on {x.device}; got "
                         f"{valid.dtype} {tuple(valid.shape)} on {valid.device}")


# --------------------------------------------------------------------------- launchers

def _on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: make that x's device for the launches
    (a tensor on cuda:1 while cuda:0 is current would otherwise be read from the wrong GPU)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _residual_of(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """What the kernels' R pointer gets: the residual (or output) dense in x's layout, or x
    itself as an unread placeholder."""
    return x if residual is None else _dense_like(x, residual)


# ------------------------------------------------------------------------------- plans
# A plan is everything a launch decides from its input's signature (sizes, strides, dtypes,
# pointer alignments, groups, activation, residual mode): kernel set, tiles, splits, grids and
# constexprs. Running one only allocates the outputs and scratch and launches: the repeat
# call's whole host work. Plans are made from a first input (its tensors stand in for the
# occupancy query's compile) and hold no tensor.

_FLAT, _RESIDENT, _SPLIT = 0, 1, 2  # LaunchPlan.kind


class LaunchPlan(NamedTuple):
    """How ``triton_group_norm_forward`` (``plan_forward``) or ``triton_group_norm_backward``
    (``plan_backward``) runs one input signature: its launch sites (kernel, grid, constexprs and
    launch options each) and the sizes its calls pass. Fields marked "forward" stay 0 in a
    backward plan."""

    kind: int  # _FLAT, _RESIDENT: one program per group (n * G programs); _SPLIT: split reduction
    n: int
    c: int
    s: int
    g: int
    launches: Tuple[KernelLaunch, ...]  # in order (``direct_launch``)
    masked: bool = False  # valid regions: every launch MASKED, given VALID (``_masked``)
    splits: int = 0  # _SPLIT: spatial splits per row block (the records' second dim)
    split_tiles: int = 0  # _SPLIT: tiles per split of the partial sums
    n_cblocks: int = 0  # _SPLIT: channel blocks per image (row blocks: n * n_cblocks)
    n_sblocks: int = 0  # _SPLIT: spatial blocks per row block of the apply launch
    finalize: bool = False  # forward, _SPLIT: a statistics finalize launch (STATS_FINALIZED)
    chunk_s: int = 0  # forward, _SPLIT: positions per split
    apply_split_tiles: int = 0  # forward, _SPLIT: the apply launch's tiles per split
    apply_splits: int = 0  # forward, _SPLIT: the apply launch's splits


def _masked(x: torch.Tensor, valid: Optional[torch.Tensor], num_groups: int) -> dict:
    """The masked kernels' constexpr and width (``MASKED``, ``width``: x's last size), merged
    into a masked plan's launch constants; none without ``valid``. VALID itself is each call's.
    Refuses a shape the masked kernels do not cover (``masked_kernels_support``)."""
    if valid is None:
        return {}
    if not masked_kernels_support(x, num_groups):
        raise ValueError(f"the masked kernels do not take a {x.dtype} input of shape {tuple(x.shape)} "
                         f"(masked_kernels_support): the PyTorch path's")
    return dict(MASKED=True, width=x.shape[-1])


def _with_valid(kwargs: dict, valid: Optional[torch.Tensor]) -> dict:
    """An occupancy query's constants with the VALID a masked launch passes (its stand-in)."""
    return kwargs if valid is None else dict(kwargs, VALID=valid)


def plan_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, activation: int,
                 residual: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None) -> LaunchPlan:
    """The forward plan of x's signature; x ``(N, C, *)`` dense, non-empty, weight and bias
    ``(C,)``, residual None or dense in x's layout; with ``valid`` (its values unread: it
    stands for every call's), the masked kernels' (4-D x). Compiles the split reduction's
    kernels for their occupancy (once per specialisation and process)."""
    n, c, s, channels_last = _as_ncs(x)
    g = num_groups
    cpg = c // g
    res_mode = RESIDUAL_NONE if residual is None else RESIDUAL_ADD
    masked = _masked(x, valid, num_groups)
    resident = _group_resident_blocks(cpg, s)
    flat = resident and _flat_group_blocks(cpg, s, channels_last, x.element_size())
    if flat:
        block_f, _, align = flat
        consts = dict(ACT=activation, RES=res_mode, ALIGN=align, BLOCK_F=block_f, num_warps=_num_warps(block_f),
                      **masked)
        return LaunchPlan(_FLAT, n, c, s, g, (KernelLaunch(_group_forward_flat_kernel, (n * g,), consts),),
                          bool(masked))
    if resident is not None:
        block_cg, block_s = resident
        consts = dict(ACT=activation, RES=res_mode, CHANNELS_LAST=channels_last,
                      ALIGN=_alignment(s, channels_last, x.element_size(), cpg), BLOCK_CG=block_cg, BLOCK_S=block_s,
                      num_warps=_num_warps(block_cg * block_s), **masked)
        return LaunchPlan(_RESIDENT, n, c, s, g, (KernelLaunch(_group_forward_kernel, (n * g,), consts),),
                          bool(masked))
    block_c, block_s, n_cblocks, n_sblocks, layout = _tiles(c, s, channels_last, x.element_size())
    consts = dict(layout, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_num_warps(block_c * block_s), **masked)
    n_row_blocks = n * n_cblocks
    splits, chunk_s = _splits(n_row_blocks, s, block_s, _resident_programs(
        _stats_partial_kernel, x, (x, None, None, c, s, _UNSIZED, _UNSIZED, n_cblocks), _with_valid(consts, valid)))
    # The apply programs merge the records into their groups' statistics themselves (no
    # launch between) unless that takes too many loads each (_stats_merge); each loops over
    # its split of the row block's tiles, as many splits as fill one wave at its occupancy.
    arch = _target_arch(x)
    stats = _stats_merge(cpg, splits, block_c, layout["SHIFT"], arch, bool(masked))
    if stats == STATS_BY_LANES and not _groups_whole_in_blocks(cpg, block_c, layout["SHIFT"]):
        raise ValueError(f"STATS_BY_LANES needs channel blocks of whole groups: {cpg} channels per group, "
                         f"blocks of {block_c}, shifted windows {layout['SHIFT']}")
    apply_consts = dict(consts, RES=res_mode, STATS=stats,
                        BLOCK_K=_stats_block_k(block_c, stats, layout["SHIFT"], arch, bool(masked)))
    # (x stands for y, the records and the statistics in the occupancy query: the same dtype
    # and alignment as the tensors each call allocates)
    query = (x, x, weight, bias, None, None, None, None, _residual_of(x, residual), c, s, g, cpg, 1.0, n * c, n_cblocks,
             chunk_s, splits, _UNSIZED, _UNSIZED, n_sblocks, activation)
    apply_splits, apply_chunk = _splits(n_row_blocks, n_sblocks * block_s, block_s,
                                        _resident_programs(_forward_apply_kernel, x, query,
                                                           _with_valid(apply_consts, valid)))
    finalize = stats == STATS_FINALIZED
    finalize_consts = dict(BLOCK_K=FINALIZE_BLOCK_K, BLOCK_CG=FINALIZE_BLOCK_CG, num_warps=FINALIZE_WARPS, **masked)
    launches = (KernelLaunch(_stats_partial_kernel, (n_row_blocks * splits,), consts),
                *((KernelLaunch(_stats_finalize_kernel, (n * g,), finalize_consts),) if finalize else ()),
                KernelLaunch(_forward_apply_kernel, (n_row_blocks * apply_splits,), apply_consts))
    return LaunchPlan(_SPLIT, n, c, s, g, launches, bool(masked), splits=splits, split_tiles=chunk_s // block_s,
                      finalize=finalize, chunk_s=chunk_s, n_cblocks=n_cblocks, n_sblocks=n_sblocks,
                      apply_split_tiles=apply_chunk // block_s, apply_splits=apply_splits)


def _check_plan_kind(plan, valid: Optional[torch.Tensor]) -> None:
    """A masked plan takes the call's regions (its launches' VALID), an unmasked one none (the
    kernels' default, no MASKED code); a plan given the wrong kind of call refuses it."""
    if plan.masked != (valid is not None):
        raise ValueError("a masked plan needs valid regions, an unmasked one takes none")


def run_forward(plan: LaunchPlan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                activation: int, residual: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) of x by ``plan`` (made for x's signature; ``valid`` for a masked plan)."""
    n, c, s, g = plan.n, plan.c, plan.s, plan.g
    cpg = c // g
    y = torch.empty_like(x)
    mean = torch.empty((n, g), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    r = x if residual is None else residual
    _check_plan_kind(plan, valid)
    launches = plan.launches
    if plan.kind == _FLAT:
        launches[0].run(x, y, weight, bias, mean, rstd, r, s, g, cpg, eps, VALID=valid)
    elif plan.kind == _RESIDENT:
        launches[0].run(x, y, weight, bias, mean, rstd, r, c, s, g, cpg, eps, VALID=valid)
    else:
        part_mean = torch.empty((n, plan.splits, c), dtype=torch.float32, device=x.device)
        part_m2 = torch.empty_like(part_mean)
        launches[0].run(x, part_mean, part_m2, c, s, plan.split_tiles, plan.splits, plan.n_cblocks, VALID=valid)
        if plan.finalize:
            launches[1].run(part_mean, part_m2, mean, rstd, c, s, g, cpg, plan.chunk_s, plan.splits, eps, VALID=valid)
        launches[-1].run(x, y, weight, bias, part_mean, part_m2, mean, rstd, r, c, s, g, cpg, eps, n * c,
                         plan.n_cblocks, plan.chunk_s, plan.splits, plan.apply_split_tiles, plan.apply_splits,
                         plan.n_sblocks, activation, VALID=valid)
    return y, mean, rstd


def plan_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, activation: int,
                  residual: Optional[torch.Tensor] = None, residual_mode: int = RESIDUAL_ADD,
                  valid: Optional[torch.Tensor] = None) -> LaunchPlan:
    """The backward plan of this signature (grad_y dense in x's layout; ``residual`` what the
    forward saved for it, dense in x's layout; with ``valid``, the masked kernels')."""
    n, c, s, channels_last = _as_ncs(x)
    g = num_groups
    cpg = c // g
    res_mode = RESIDUAL_NONE if residual is None else residual_mode
    if res_mode == RESIDUAL_OUTPUT and activation != ACT_RELU:
        raise ValueError("RESIDUAL_OUTPUT stands for the activation's input by its sign: ReLU only")
    masked = _masked(x, valid, num_groups)
    resident = _group_resident_blocks(cpg, s)
    if resident is not None:
        param_grid = triton.cdiv(c, PARAM_BLOCK_C)
        flat = _flat_group_blocks(cpg, s, channels_last, x.element_size())
        if flat:
            block_f, block_cg, align = flat
            consts = dict(ACT=activation, RES=res_mode, ALIGN=align, BLOCK_F=block_f, BLOCK_CG=block_cg,
                          num_warps=_num_warps(block_f), **masked)
            return LaunchPlan(_FLAT, n, c, s, g, (KernelLaunch(_group_backward_flat_kernel, (n * g,), consts),
                              _param_grad_launch(param_grid)), bool(masked))
        block_cg, block_s = resident
        consts = dict(ACT=activation, RES=res_mode, CHANNELS_LAST=channels_last,
                      ALIGN=_alignment(s, channels_last, x.element_size(), cpg), BLOCK_CG=block_cg, BLOCK_S=block_s,
                      num_warps=_num_warps(block_cg * block_s), **_register_cap(_GROUP_BACKWARD_MAXNREG_BY_ARCH, x),
                      **masked)
        return LaunchPlan(_RESIDENT, n, c, s, g, (KernelLaunch(_group_backward_kernel, (n * g,), consts),
                          _param_grad_launch(param_grid)), bool(masked))
    block_c, block_s, n_cblocks, n_sblocks, layout = _tiles(c, s, channels_last, x.element_size())
    consts = dict(layout, RES=res_mode, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_num_warps(block_c * block_s),
                  **masked)
    n_row_blocks = n * n_cblocks
    partial_consts = dict(consts, ACT=activation, **_register_cap(_BACKWARD_PARTIAL_MAXNREG_BY_ARCH, x))
    splits, chunk_s = _splits(n_row_blocks, s, block_s, _resident_programs(
        _backward_partial_kernel, x,
        (x, grad_y, weight, bias, mean, rstd, _residual_of(x, residual), None, None, c, s, g, cpg, _UNSIZED, _UNSIZED,
         n_cblocks), _with_valid(partial_consts, valid)))
    finalize_grid = n * g + triton.cdiv(c, PARAM_BLOCK_C)
    apply_consts = dict(consts, ACT=activation)
    finalize_consts = dict(BLOCK_K=FINALIZE_BLOCK_K, BLOCK_CG=FINALIZE_BLOCK_CG, BLOCK_R=PARAM_BLOCK_R,
                           BLOCK_C=PARAM_BLOCK_C, **({"MASKED": True} if masked else {}))
    launches = (KernelLaunch(_backward_partial_kernel, (n_row_blocks * splits,), partial_consts),
                KernelLaunch(_backward_finalize_kernel, (finalize_grid,), finalize_consts),
                KernelLaunch(_backward_apply_kernel, (n_row_blocks * n_sblocks,), apply_consts))
    return LaunchPlan(_SPLIT, n, c, s, g, launches, bool(masked), splits=splits, split_tiles=chunk_s // block_s,
                      n_cblocks=n_cblocks, n_sblocks=n_sblocks)


def _param_grad_launch(param_grid: int) -> KernelLaunch:
    """dgamma/dbeta from the per-sample partial sums (the one-program-per-group backward's)."""
    return KernelLaunch(_param_grad_kernel, (param_grid,), dict(BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C))


def run_backward(plan: LaunchPlan, grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 mean: torch.Tensor, rstd: torch.Tensor, residual: Optional[torch.Tensor] = None,
                 valid: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dx, dweight, dbias, dresidual) by ``plan``; grad_y and residual dense in x's layout;
    ``valid`` for a masked plan."""
    n, c, s, g = plan.n, plan.c, plan.s, plan.g
    cpg = c // g
    dx = torch.empty_like(x)
    r = x if residual is None else residual
    # dR is written with x's offsets: dense in x's layout, in the residual's dtype.
    dres = None if residual is None else torch.empty_like(r)
    dr = dx if dres is None else dres  # (an unwritten placeholder without a residual)
    dweight, dbias = torch.empty_like(weight), torch.empty_like(weight)
    _check_plan_kind(plan, valid)
    launches = plan.launches
    if plan.kind != _SPLIT:
        part_ds = torch.empty((n, c), dtype=torch.float32, device=x.device)
        part_db = torch.empty_like(part_ds)
        launches[0].run(x, grad_y, dx, weight, bias, mean, rstd, part_ds, part_db, r, dr, c, s, g, cpg, VALID=valid)
        launches[1].run(part_ds, part_db, dweight, dbias, n, c)
        return dx, dweight, dbias, dres
    part_ds = torch.empty((n, plan.splits, c), dtype=torch.float32, device=x.device)
    part_db = torch.empty_like(part_ds)
    launches[0].run(x, grad_y, weight, bias, mean, rstd, r, part_ds, part_db, c, s, g, cpg, plan.split_tiles,
                    plan.splits, plan.n_cblocks, VALID=valid)
    coef_xhat = torch.empty((n, g), dtype=torch.float32, device=x.device)
    coef_const = torch.empty_like(coef_xhat)
    launches[1].run(part_ds, part_db, weight, rstd, coef_xhat, coef_const, dweight, dbias, c, s, g, cpg, plan.splits,
                    n * g, n * plan.splits, VALID=valid)
    launches[2].run(x, grad_y, dx, weight, bias, mean, rstd, coef_xhat, coef_const, r, dr, c, s, g, cpg, n * c,
                    plan.n_cblocks, plan.n_sblocks, VALID=valid)
    return dx, dweight, dbias, dres


# --------------------------------------------------------------------------- launchers

class TritonPlans:
    """The Triton backend for one input signature (sizes, strides, dtypes, alignments, groups,
    activation, residual): its forward plan, made at the first call, and a backward plan per
    gradient signature (dtype, alignment). The policy keeps one per decided input signature
    (``gn_det.policy.calls.call_key``): given another input, its plans would misread it, so it
    is never handed to a caller (``group_norm_op`` refuses it). The interface is the backends'
    (``torch_path.Backend``)."""

    __slots__ = ("forward_plan", "masked_forward_plan", "backward_plans")

    def __init__(self) -> None:
        self.forward_plan: Optional[LaunchPlan] = None
        self.masked_forward_plan: Optional[LaunchPlan] = None  # with valid regions: the masked kernels'
        self.backward_plans: Dict[tuple, LaunchPlan] = {}

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
                num_groups: int, eps: float, activation: int, valid: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, mean, rstd): ``triton_group_norm_forward``'s, planned once (with valid regions,
        once more: the masked kernels' plan)."""
        if residual is not None:
            residual = _dense_like(x, residual)
        if valid is None:
            plan = self.forward_plan
        else:
            _check_valid(x, valid)
            plan = self.masked_forward_plan
        if plan is None:
            with _on_device_of(x):
                plan = plan_forward(x, weight, bias, num_groups, activation, residual, valid)
            if valid is None:
                self.forward_plan = plan
            else:
                self.masked_forward_plan = plan
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return run_forward(plan, x, weight, bias, eps, activation, residual, valid)
        return run_forward(plan, x, weight, bias, eps, activation, residual, valid)

    def backward(self, grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 mean: torch.Tensor, rstd: torch.Tensor, saved: Optional[torch.Tensor], num_groups: int, eps: float,
                 activation: int, residual_mode: int, valid: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(dx, dweight, dbias, dresidual): ``triton_group_norm_backward``'s, planned once per
        gradient dtype and alignment (and with valid regions or not)."""
        grad_y = _dense_like(x, grad_y)
        if saved is not None:
            saved = _dense_like(x, saved)
        if valid is not None:
            _check_valid(x, valid)
        key = (grad_y.dtype, grad_y.data_ptr() % 16 == 0, None if saved is None else saved.dtype, valid is None)
        plan = self.backward_plans.get(key)
        with _on_device_of(x):
            if plan is None:
                plan = self.backward_plans[key] = plan_backward(grad_y, x, weight, bias, mean, rstd, num_groups,
                                                                activation, saved, residual_mode, valid)
            return run_backward(plan, grad_y, x, weight, bias, mean, rstd, saved, valid)


def triton_group_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor], num_groups: int,
    eps: float, activation: int, valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(group_norm(x) [+ residual]); x is ``(N, C, *)``, contiguous or
    channels_last-contiguous, with ``numel > 0``; weight and bias ``(C,)``; residual None or
    of x's shape (any float dtype; copied if not dense in x's layout). Returns y (x's dtype and
    memory format) and the float32 mean and rstd, ``(N, G)``. Plans anew at every call (the
    policy keeps plans per input: ``TritonPlans``).

    ``valid``: None, or for a 4-D x ``(N, C, H, W)`` (``masked_kernels_support``) a contiguous
    int32 ``(N, 2)`` tensor on x's device, each sample's valid region (vh, vw): position (h, w)
    is inside iff h < vh and w < vw. Each (n, group)'s statistics are then over its inside
    positions only (mean and rstd are those), and y is act(GN(x) [+ residual]) inside, exactly 0
    outside; an empty region (vh * vw = 0) gives mean 0, rstd 1 / sqrt(eps), y 0. The values are
    read by the kernels only (no host synchronisation); any values run the same plan."""
    return TritonPlans().forward(x, weight, bias, residual, num_groups, eps, activation, valid)


def triton_group_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, residual: Optional[torch.Tensor], num_groups: int, eps: float, activation: int,
    residual_mode: int = RESIDUAL_ADD, valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of ``triton_group_norm_forward`` w.r.t. x, weight, bias and residual (None
    without one). grad_y has x's shape (copied if not dense in x's layout, as a
    convolution's gradient is); dx and dresidual come in x's layout, dresidual in
    ``residual``'s dtype; dweight/dbias in weight's dtype. ``residual`` is what the forward
    saved: the residual itself (RESIDUAL_ADD) or, with ReLU, the output (RESIDUAL_OUTPUT); eps
    is unused (the backends' one signature: the PyTorch path's recomputes with it). With
    ``valid`` (the forward's, and its mean and rstd), the masked forward's gradients: dx and
    dresidual 0 outside each sample's region, grad_y there ignored, dweight/dbias summed over
    the regions."""
    return TritonPlans().backward(grad_y, x, weight, bias, mean, rstd, residual, num_groups, eps, activation,
                                  residual_mode, valid)
