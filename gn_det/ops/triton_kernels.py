"""Triton kernels for Group Normalization with a fused activation and residual, forward and
backward. Their launch planning and launchers are in ``triton_launch.py``.

Words used throughout. Every input ``(N, C, *)`` is seen as a dense ``(N, C, S)``, NCHW or
channels_last. A *row* is one (n, channel): S positions; there are ``n_rows`` = N * C of them
(``row`` = n * C + channel) and ``row_start`` is the offset of a row's first element. A *row
block* is BLOCK_C consecutive rows of one sample (an (n, channel block)); a *split* is a run of
whole spatial tiles of a row block that one program loops over. A *record* is what a
partial-sums program stores per (n, split, channel): a mean and M2 (forward) or the sums of
dz * xhat and dz (backward); the *partials* are those arrays, ``(N, splits, C)``, or ``(N, C)``
after the one-program-per-group backward: ``n_partials`` vectors of C.

Kernel arguments. A name means the same in every kernel (the kernels comment only their own,
and where a standard one differs, e.g. an input that is an output elsewhere)::

    X              x, (N, C, S) dense in x's layout (NCHW or channels_last); float32, float16 or bfloat16
    Y, DX          out: y, dL/dx; x's shape, dtype and layout
    DY             dL/dy, x's shape, dense in x's layout, any float dtype
    W, B           gamma, beta: (C,), any float dtype (computed in float32)
    DW, DB         out: dgamma, dbeta: (C,), gamma's and beta's dtype
    MEAN, RSTD     each (n, group)'s mean and 1 / sqrt(var + eps), (N, G) float32
    R              the residual (RES_ADD) or the ReLU output (RES_OUTPUT), dense like x, any float
                   dtype (RES_NONE: x, unread)
    DR             out: dL/dR = dz, dense like x, in R's dtype (RES_NONE: dx, unwritten)
    C              channels (specialised: fixed per layer)
    S              positions per channel, the product of the spatial sizes
    G, cpg         groups; channels per group, C // G
    eps            added to the variance, float
    n_rows         rows, N * C (a shifted window's neighbouring rows are clamped to [0, n_rows))
    n_cblocks      channel blocks per sample, cdiv(C, BLOCK_C)
    n_sblocks      spatial tiles per row, cdiv(S, BLOCK_S) (SHIFT: of S + ALIGN - 1 window positions)
    ACT            activation code (activation.ACT_*): none, ReLU, SiLU
    RES            residual mode (activation.RESIDUAL_*): none, add R, R is the ReLU output
    CHANNELS_LAST  layout: positions C elements apart (channels_last) or rows S apart (NCHW)
    ALIGN          row starts are multiples of ALIGN elements (channels_last groups: their first
                   channels; the flat kernels: each group's start)
    SHIFT          shifted windows: NCHW rows not ALIGN-aligned, read in whole ALIGN blocks (``_window``)
    BLOCK_C        channels (rows) per tile
    BLOCK_S        positions per tile
    VALID          MASKED: each sample's valid region (vh, vw), (N, 2) int32 contiguous: its top-left vh
                   rows and vw columns (data on the device: no plan depends on it; None unmasked)
    width          MASKED: the map's width W of a 4-D x (N, C, H, W), S = H * W (not specialised; None unmasked)
    MASKED         valid regions (issue 35): statistics over each sample's region only, y / dx / dR 0 outside
                   it; False (the default) compiles the kernels exactly as without the arguments

Kernel sets, by the size of a group (``cpg * S``, channels per group times spatial size) and,
in the split reduction, by how the forward apply gets its groups' statistics (``STATS``).
``kernel_set`` names the set of a shape; ``test_kernel_sets_match_the_docstring_table``
(tests/test_kernels_compile.py) classifies the 60 Mask R-CNN cases of gn_det.diagnostics.bench.layer_shapes
(15 layer shapes x bfloat16/float32 x NCHW/channels_last, 32 groups) at the split counts of an
H100 (the sm_90 compile's occupancy, benchmarks/results/kernels_sm90_compile.json) and checks
the cases column::

    kernel set            | cases | shapes that reach it                      | launches forward; backward
    ----------------------+-------+-------------------------------------------+---------------------------
    flat                  |     2 | box head (7 x 7) NCHW: rows of 49         | 1 _group_forward_flat_kernel;
                          |       | elements allow no wide access, the group  | 2 _group_backward_flat_kernel,
                          |       | (8 x 49) allows 16 bytes                  |   _param_grad_kernel
    one program per group |     6 | box head channels_last, mask head (14 x   | 1 _group_forward_kernel;
                          |       | 14) both layouts: groups of up to 4096    | 2 _group_backward_kernel,
                          |       | elements (GROUP_RESIDENT_MAX_ELEMENTS)    |   _param_grad_kernel
    by lanes              |    30 | every larger shape in channels_last, the  | 2 _stats_partial_kernel,
                          |       | stem in NCHW: channel blocks hold whole   |   _forward_apply_kernel;
                          |       | groups (cpg a power of two <= BLOCK_C)    | 3 _backward_partial_kernel,
                          |       |                                           |   _backward_finalize_kernel,
                          |       |                                           |   _backward_apply_kernel
    gathered              |    18 | res2-res4, P2-P4 in NCHW: groups of 8-32  | 2 as by lanes; 3 as by lanes
                          |       | rows across blocks of 4 rows              |
    shifted windows       |     4 | res5, P5 in NCHW (25 x 42: rows start off | 2 as by lanes (SHIFT,
                          |       | 16-byte boundaries): gathered, with the   |   gathered); 3 as by lanes
                          |       | neighbouring rows' statistics (SHIFT)     |   (SHIFT)
    finalized             |     0 | no Mask R-CNN case; see below             | 3 _stats_partial_kernel,
                          |       |                                           |   _stats_finalize_kernel,
                          |       |                                           |   _forward_apply_kernel; 3

Why "finalized" stays: channels_last groups whose channel count is not a power of two over
many splits (the compile check's "7 channels per group", RegNet widths at 32 groups: 66 splits
in bfloat16, 88 in float32). Gathering would have each lane merge 462-616 records, 116-154
dependent loads, against the finalize launch's 10-12 (two passes over 16 x 64 record tiles)
plus the launch (``LAUNCH_IN_LOADS`` = 4 loads: an estimate no GPU has measured). The choice
does not rest on that estimate: any value from 1 to 105 makes the same choice at every shape
the compile check covers (the same test checks it).

One program per (n, group), for groups that fit one program's registers:
  forward  ``_group_forward_kernel``: x read once, exact two-pass statistics in registers,
           y written once, one launch;
  backward ``_group_backward_kernel``: x and dy read once, dx written once, per-(n, channel)
           partial sums for dgamma/dbeta; ``_param_grad_kernel`` sums them over n: two launches.
  The flat variants (``_group_forward_flat_kernel``, ``_group_backward_flat_kernel``) do the
  same on an NCHW group tiled as one contiguous run of cpg * S elements, gamma and beta
  gathered per element, where that run allows wider accesses than its rows do
  (``_flat_group_blocks``).

Split reduction, for larger groups: work is spread over the GPU even when ``N * G`` is
small (1-2 images per GPU) by splitting each group's reduction over many programs along
the spatial axis: as many as fill one wave of the GPU at the partial-sums kernel's compiled
occupancy (``_resident_programs``), each looping over its tiles, so no partial wave trails.
Forward (2 launches, x is read twice, y written once):
  1. ``_stats_partial_kernel``: per (n, channel block, spatial split) the mean/M2 of each
     channel: per-lane Welford across the split's tiles, the lanes merged by Chan's formula
     after the loop, so a large mean against the standard deviation costs no accuracy (no
     E[x^2] - E[x]^2).
  2. ``_forward_apply_kernel``: per (n, channel block, spatial split), the statistics of its
     rows' groups merged from those records (``_group_mean_rstd``: Chan's formula in a fixed
     order, the same bits in every program; split 0's programs store them for backward),
     then y = act(GN(x)) over the split's tiles. No launch finalizes in between, and no
     atomics order anything: each program reads the few records its groups have (a group's
     cpg x splits, STATS_GATHERED; in channels_last, where a block holds whole groups, its
     channels' splits, merged across the group's lanes in registers, STATS_BY_LANES), a small
     fraction of the tiles it moves. Where that would take more loads than a launch
     (``_stats_merge``), ``_stats_finalize_kernel`` merges them per (n, group) in a launch
     between (STATS_FINALIZED, 3 launches).
Backward (3 launches; x and dy read twice, dx written once):
  1. ``_backward_partial_kernel``: per channel partial sums of dz * xhat and dz.
  2. ``_backward_finalize_kernel``: per (n, group) the two coefficients of dx, and in the
     same launch dgamma, dbeta: the partials summed over (n, split), in the weight's dtype.
  3. ``_backward_apply_kernel``: dx = rstd * gamma * dz + c_xhat * xhat + c_0.

Layouts and alignment. One set of kernels serves NCHW and channels_last (the
``CHANNELS_LAST`` constexpr), addressing each layout from its sizes, so loads run along
whichever axis is contiguous. dy, the residual and their gradients are dense in x's layout (the
launchers copy anything else), so one offset serves them all. Sizes that change from image to
image (S, the split lengths and counts, channels per group) are not specialised
(``do_not_specialize``): multi-scale training compiles each kernel a few times, not once per
image size. What their divisibility told the compiler is the ``ALIGN`` constexpr instead: how
many elements each row start is a multiple of (the largest power of two dividing S for NCHW
rows, or channels per group for a group's channels in a channels_last row; up to one 16-byte
access). Where NCHW rows start misaligned (S not a multiple of 16 bytes' elements: res5 and
P5's 25 x 42), the split kernels still move whole 16-byte blocks: their tiles are windows
shifted back to the aligned address before each row (``SHIFT``, ``_window``), the few elements
of the neighbouring rows in the end blocks left out of the sums and, in the apply kernels,
written with those rows' own parameters (the values their own tiles write).

Modes (named constants below; one definition of each code). The activation (``ACT``:
activation.ACT_*) is a runtime argument of the split apply kernels, a branch that is the same
for every element; it stays a constexpr where carrying every activation's code costs registers
(``_backward_partial_kernel``: 161 instead of 127 at most, one block of 8 warps per SM instead
of two) or spilled (the one-program-per-group kernels at some shapes). With an activation, its
input z is recomputed in backward from x and the statistics by the same formula as in forward,
so nothing but x and the per-group statistics is saved. With a residual (``RES``:
activation.RESIDUAL_*, R dense with x's strides): RESIDUAL_ADD, z = GN(x) + R: the forward reads
R once more, the backward reads it where it reads x and writes dR = dz beside dx;
RESIDUAL_OUTPUT (backward, ReLU only): R is the layer's output, whose sign is z's, read instead
of the residual. ``STATS``: STATS_BY_LANES / STATS_GATHERED / STATS_FINALIZED, above.

Valid regions (``MASKED``; ``triton_launch.masked_kernels_support`` says which inputs: 4-D,
every kernel set). A zero-padded batch's images each normalise over their own top-left region
(``VALID``) and write 0 in the padding, as if normalised alone (detectron2's ``ImageList``). The
masked kernels are the same kernels specialised on ``MASKED`` (with ``VALID`` and ``width``: the
arguments default to None and False, so the unmasked specialisations compile to the same code
and registers as before them). Each position's (h, w) comes from its spatial index by a
multiply-high (``_inside``: no division per element); the loads and stores keep their masks, so
they stay as wide, and the region enters by selects: statistics and the backward sums over the
inside positions, 0 stored outside. The split reduction's records count the region's positions
of their split in closed form (``_record_counts``: F(hi) - F(lo), F(p) the region's positions
before p), so Chan's merges stay exact and an empty record counts 0; the partial-sums programs
stop at the region's last row (tiles past it are not read). An empty region (vh * vw = 0) gives
mean 0, rstd 1 / sqrt(eps), y and dx 0.

All offsets into x/y/dy/dx are 64-bit. No host-device synchronisation anywhere: launch
parameters depend on shapes only.

The file, in order: modes; shared jit helpers; the split-reduction kernels (forward, then
backward); the one-program-per-group kernels (tiled, then flat). Every size a launch chooses
(the tuning knobs) is in ``triton_launch.py``.
"""
import torch
import triton
import triton.language as tl

from .activation import ACT_RELU, ACT_SILU, ACTIVATION_TABLE, RESIDUAL_ADD, RESIDUAL_NONE, RESIDUAL_OUTPUT


# ---------------------------------------------------------------------------------- modes
# The launchers pass these Python ints as constexprs, and the kernels compare them with literal
# codes, each commented with its name. Not with tl.constexpr globals: Triton checks at every
# launch that each global a kernel was compiled with is unchanged, a Python comparison of
# constexpr objects per global (about 1-3 us each on the host). Each code is defined once
# (activation.py for ACT and RES, STATS_* here); the asserts tie the literals to them.
#
# ACT, the fused activation (activation.ACT_*): 0 none, 1 ReLU, 2 SiLU.
# RES, the residual (activation.RESIDUAL_*): 0 none, 1 z = GN(x) + R, 2 R is the ReLU output.
# STATS, how the forward apply gets its groups' statistics (``_group_mean_rstd``, ``_stats_merge``):
# 0 by lanes (each lane merges its channel's records, the group's lanes merge in registers),
# 1 gathered (each lane gathers its group's records), 2 finalized (read from MEAN / RSTD, stored
# by ``_stats_finalize_kernel``).
STATS_BY_LANES, STATS_GATHERED, STATS_FINALIZED = 0, 1, 2
assert (ACT_RELU, ACT_SILU) == (1, 2) and (RESIDUAL_NONE, RESIDUAL_ADD, RESIDUAL_OUTPUT) == (0, 1, 2)
# The masked forward apply writes act(0) outside the valid region (its 0: ``_forward_apply_kernel``).
assert all(float(a.export(torch.zeros(()))) == 0.0 for a in ACTIVATION_TABLE), "an activation with act(0) != 0"
# (SHIFT and CHANNELS_LAST are booleans: shifted windows, ``_window``; the layout.)


# ------------------------------------------------------------------ shared jit helpers

@triton.jit
def _activation(z, ACT):
    if ACT == 1:  # ReLU
        z = tl.maximum(z, 0.0)
    elif ACT == 2:  # SiLU
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _activation_grad(z, dy, ACT):
    """d act(z) / dz * dy."""
    if ACT == 1:  # ReLU
        dy = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:  # SiLU
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


@triton.jit
def _rstd(var, eps):
    """1 / sqrt(var + eps), NaN where var is infinite (squares of deviations beyond ~1.8e19
    overflow float32): rstd = 0 there would make the output beta, finite and wrong."""
    rstd = 1.0 / tl.sqrt(var + eps)
    return tl.where(rstd > 0.0, rstd, rstd / rstd)  # 0 / 0: NaN (and a NaN var stays NaN)


@triton.jit
def _affine_input(x, mean, rstd, w, b):
    """z = (x - mean) * (gamma * rstd) + beta, the parameters broadcastable to x (per row of a
    tile as (BLOCK_C, 1) columns, per element, or scalars). Centring first keeps z exact when
    the mean is large against the spread (x * scale + shift would cancel), and forward and
    backward share this one formula so ReLU's mask agrees between them."""
    return (x - mean) * (w * rstd) + b


@triton.jit
def _with_residual(z, R, offs, mask, RES: tl.constexpr):
    """z [+ residual] (RESIDUAL_ADD); with RESIDUAL_OUTPUT, R is the ReLU output, which stands
    for z (the same sign)."""
    if RES == 1:  # add R
        z += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    elif RES == 2:  # R is the ReLU output
        z = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def _activation_input(x, mean, rstd, w, b, R, offs, mask, RES: tl.constexpr):
    """z = GN(x) [+ residual]: the one formula of every forward and backward kernel on
    (channels, positions) tiles."""
    return _with_residual(_affine_input(x, mean, rstd, w, b), R, offs, mask, RES)


@triton.jit
def _channel_params(MEAN, RSTD, W, B, grp, c_offs, c_mask):
    """Per channel of a tile: its group's mean and rstd, its gamma and beta (float32), as
    (BLOCK_C, 1) columns along the tile's rows."""
    mean = tl.load(MEAN + grp, mask=c_mask, other=0.0)
    rstd = tl.load(RSTD + grp, mask=c_mask, other=0.0)
    w = tl.load(W + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(B + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    return mean[:, None], rstd[:, None], w[:, None], b[:, None]


@triton.jit
def _row_starts(pid_n, c_offs, C, S, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, SHIFT: tl.constexpr = False):
    """64-bit offset of each channel's first position in sample pid_n of a dense (N, C, S)
    tensor. NCHW rows are S elements apart; S is not specialised, so ALIGN says how aligned
    they are (what lets the loads along them be vectorised), unless SHIFT (``_window``)."""
    base = pid_n.to(tl.int64) * C * S
    if CHANNELS_LAST:
        return base + c_offs.to(tl.int64)
    if SHIFT:
        return base + c_offs.to(tl.int64) * S
    return tl.multiple_of(base + c_offs.to(tl.int64) * S, ALIGN)


@triton.jit
def _window(row_start, c_mask, j, lo, hi, C, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, SHIFT: tl.constexpr):
    """A (BLOCK_C rows, BLOCK_S) tile along each row at window positions ``j``, covering the
    row positions [lo, hi): (element offsets, access mask, exact mask).

    Without SHIFT, window position j is row position j (row starts ALIGN-aligned; ALIGN
    divides hi), and both masks are j in [.., hi) by whole ALIGN blocks.
    With SHIFT (NCHW rows whose starts are not ALIGN-aligned: S not a multiple of ALIGN), the
    windows start at the aligned address at or before each row's start: position j of row c
    is its element j - delta_c, delta_c = (row start) mod ALIGN. The access mask takes the
    whole ALIGN blocks that overlap [lo, hi), so that it is uniform over each block and the
    accesses stay ALIGN wide; those blocks hold up to ALIGN - 1 elements of the neighbouring
    rows at each end, which the exact mask (the row's own [lo, hi)) leaves out."""
    if SHIFT:
        delta = row_start % ALIGN
        offs = tl.multiple_of(row_start - delta, ALIGN)[:, None] + j.to(tl.int64)[None, :]
        pos = j[None, :] - delta[:, None]
        block = (j // ALIGN * ALIGN)[None, :] - delta[:, None]  # each ALIGN block's first position
        access = c_mask[:, None] & (block + ALIGN > lo) & (block < hi)
        exact = c_mask[:, None] & (pos >= lo) & (pos < hi)
        return offs, access, exact
    mask = c_mask[:, None] & _below(j, hi, ALIGN)[None, :]
    return _offsets(row_start, j, C, CHANNELS_LAST), mask, mask


@triton.jit
def _row_side(row_start, j, S, ALIGN: tl.constexpr):
    """In a SHIFT window, which row each element is in: -1 the previous row, 0 its own, 1 the
    next (int32, (BLOCK_C, BLOCK_S))."""
    pos = j[None, :] - (row_start % ALIGN)[:, None]
    return (pos >= S).to(tl.int32) - (pos < 0).to(tl.int32)


@triton.jit
def _by_side(own, prev, nxt, side, SHIFT: tl.constexpr):
    """A per-row value for each element of a tile: the (BLOCK_C,) ``own`` as a (BLOCK_C, 1)
    column, or with SHIFT per element, from the row each element is in (``_row_side``: the
    rows before and after hold ``prev`` / ``nxt``)."""
    value = own[:, None]
    if SHIFT:  # (one return: Triton types every return of a function alike)
        value = tl.where(side < 0, prev[:, None], tl.where(side > 0, nxt[:, None], value))
    return value


@triton.jit
def _row_values(P, idx, idx_prev, idx_next, side, c_mask, SHIFT: tl.constexpr):
    """A per-row float32 value, P[idx] for each row of a tile, for each element (``_by_side``;
    idx_prev / idx_next index the rows before and after)."""
    own = tl.load(P + idx, mask=c_mask, other=0.0).to(tl.float32)
    prev, nxt = own, own
    if SHIFT:
        prev = tl.load(P + idx_prev, mask=c_mask, other=0.0).to(tl.float32)
        nxt = tl.load(P + idx_next, mask=c_mask, other=0.0).to(tl.float32)
    return _by_side(own, prev, nxt, side, SHIFT)


@triton.jit
def _offsets(row_start, s_offs, C, CHANNELS_LAST: tl.constexpr):
    """(BLOCK_C, BLOCK_S) element offsets from the row starts and spatial positions: positions
    are C apart in channels_last, adjacent in NCHW."""
    if CHANNELS_LAST:
        return row_start[:, None] + s_offs.to(tl.int64)[None, :] * C
    return row_start[:, None] + s_offs.to(tl.int64)[None, :]


@triton.jit
def _below(s_offs, S, ALIGN: tl.constexpr):
    """s_offs < S, told what the launcher knows of S (ALIGN divides it): the mask is then
    constant over ALIGN positions, so the masked accesses along S stay vectorised."""
    return (s_offs // ALIGN) < (S // ALIGN)  # (s < S, in whole ALIGN-blocks: the compiler sees them)


@triton.jit
def _neighbour_rows(row, n_rows):
    """The rows before and after each of ``row`` in the (N * C, S) tensor (clamped at its
    ends), whose elements share a shifted window's end blocks (``_window``)."""
    return tl.maximum(row - 1, 0), tl.minimum(row + 1, n_rows - 1)


@triton.jit
def _split_program(pid, C, n_splits, n_cblocks, BLOCK_C: tl.constexpr):
    """A partial-sums program's (n, spatial split, channel offsets, channel mask)."""
    pid_k = pid % n_splits
    rest = pid // n_splits
    c_offs = (rest % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rest // n_cblocks, pid_k, c_offs, c_offs < C


@triton.jit
def _welford_combine(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan et al.'s merge of two (mean, M2, count) statistics; empty ones merge to nothing."""
    count = count_a + count_b
    frac_b = tl.where(count > 0.0, count_b / tl.maximum(count, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * frac_b, m2_a + m2_b + delta * delta * count_a * frac_b, count


@triton.jit
def _merge_along(delta, m2, count, axis: tl.constexpr):
    """Chan's merge of (mean - ref, M2, count) statistics along ``axis`` of a tile whose entries
    share one ref along it, by sums: M2 = sum(M2_i + n_i (mean_i - mean)^2), exact, the means
    entering as deltas small against a mean that is large against the spread."""
    total = tl.sum(count, axis)
    merged = tl.sum(count * delta, axis) / tl.maximum(total, 1.0)
    spread = delta - tl.expand_dims(merged, axis)
    return merged, tl.sum(m2 + count * spread * spread, axis), total


@triton.jit
def _split_counts(k_offs, S, chunk_s):
    """Number of spatial positions in each split (the last one may be short)."""
    return tl.minimum(tl.maximum(S - k_offs * chunk_s, 0), chunk_s).to(tl.float32)


@triton.jit
def _param_sums(PART_DS, PART_DB, DW, DB, pid_c, n_partials, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dgamma and dbeta of one block of channels: their ``n_partials`` partial sums (one per n,
    or per (n, split)) added in a fixed order (deterministic), stored in the parameters' dtype."""
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    acc_ds = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, n_partials, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        mask = (r_offs < n_partials)[:, None] & c_mask[None, :]
        offs = r_offs.to(tl.int64)[:, None] * C + c_offs[None, :]
        acc_ds += tl.load(PART_DS + offs, mask=mask, other=0.0)
        acc_db += tl.load(PART_DB + offs, mask=mask, other=0.0)
    tl.store(DW + c_offs, tl.sum(acc_ds, axis=0).to(DW.dtype.element_ty), mask=c_mask)
    tl.store(DB + c_offs, tl.sum(acc_db, axis=0).to(DB.dtype.element_ty), mask=c_mask)


# ------------------------------------------------------- valid regions (MASKED kernels)
# With MASKED (a constexpr: its own specialisations; the unmasked kernels' code is unchanged),
# each sample n of a 4-D (N, C, H, W) input has a valid region, its top-left VALID[n] = (vh, vw)
# rows and columns (int32 data on the device: never read on the host): statistics over the
# region only, and 0 written (y, dx, dR) elsewhere. Position p of a row is (h, w) = divmod(p,
# width), width = W the map's last size; it is inside iff h < vh and w < vw. The quotient is a
# multiply-high by magic = ceil(2^32 / W) (``_width_magic``, once per program): exact for every
# p <= H * W when H * W * W <= 2^32 (``masked_kernels_support`` requires it), four integer
# instructions per position where a division takes ~20. At W = 1 the magic wraps to 0 and every
# quotient is 0: the region is then tested as its transpose's (a one-row map H wide: ``_region``
# swaps vh and vw), which is the same set of positions.

@triton.jit
def _width_magic(width):
    """ceil(2^32 / width), uint32 (0 at width 1): ``_width_quotient``'s multiplier."""
    return 0xFFFFFFFF // width.to(tl.uint32) + 1


@triton.jit
def _width_quotient(p, magic):
    """p // width (int32) for 0 <= p <= H * W, by a multiply-high (exact: module section above;
    0 at width 1)."""
    return tl.umulhi(p.to(tl.uint32), magic).to(tl.int32)


@triton.jit
def _as_tested(vh, vw, width):
    """A region (vh, vw) as ``_inside`` and ``_region_before`` test it: swapped at width 1 (the
    transpose's, there every quotient is 0)."""
    column = width == 1
    return tl.where(column, vw, vh), tl.where(column, vh, vw)


@triton.jit
def _region(VALID, n, width):
    """Sample n's valid region (n a scalar): (vh, vw) as tested (``_as_tested``), and the
    position its last row ends at, vh * width: every position from it on is outside."""
    vh = tl.load(VALID + 2 * n)
    vw = tl.load(VALID + 2 * n + 1)
    th, tw = _as_tested(vh, vw, width)
    return th, tw, vh * width


@triton.jit
def _split_range(pid_n, pid_k, split_tiles, S, VALID, width, BLOCK_S: tl.constexpr, MASKED: tl.constexpr):
    """A spatial split's positions [s_start, split_end) (whole tiles, which the compiler sees)
    and where its loop may stop: split_end, or MASKED, the sample's region's rows' end (vh *
    width: every position from it on is outside); with the region (vh, vw as tested) and the
    width's magic (0s without MASKED). The partial-sums kernels' (forward and backward) setup."""
    s_start = pid_k * split_tiles * BLOCK_S
    split_end = tl.minimum(s_start + split_tiles * BLOCK_S, S)
    loop_end = split_end
    vh, vw, magic = 0, 0, 0
    if MASKED:
        vh, vw, rows_end = _region(VALID, pid_n, width)
        magic = _width_magic(width)
        loop_end = tl.minimum(split_end, rows_end)
    return s_start, split_end, loop_end, vh, vw, magic


@triton.jit
def _region_size(cpg, vh, vw):
    """A group's positions in the valid region, cpg * vh * vw, float32, at least 1 (an empty
    region's sums are 0: its mean 0, variance 0, no NaN)."""
    return tl.maximum(tl.cast(cpg, tl.float32) * tl.cast(vh * vw, tl.float32), 1.0)


@triton.jit
def _inside(p, width, magic, vh, vw):
    """Whether position p (int32) lies in the valid region (vh, vw as tested): h < vh and
    p - h * width (w) < vw, h = p // width; any broadcastable shapes (a tile's positions,
    per-row or per-element regions)."""
    h = _width_quotient(p, magic)
    return (h < vh) & (p - h * width < vw)


@triton.jit
def _region_before(p, width, magic, vh, vw):
    """The valid region's positions before position p (0 <= p <= S), int32:
    min(h, vh) * vw + (min(w, vw) if h < vh else 0), (h, w) = divmod(p, width)."""
    h = _width_quotient(p, magic)
    return tl.minimum(h, vh) * vw + tl.where(h < vh, tl.minimum(p - h * width, vw), 0)


@triton.jit
def _record_counts(k, S, chunk_s, width, magic, vh, vw, MASKED: tl.constexpr):
    """Positions each record of spatial split k counted, float32: the split's (``_split_counts``)
    or, MASKED, the valid region's in it (exact counts for Chan's merge; an empty split 0)."""
    if MASKED:
        lo = tl.minimum(k * chunk_s, S)
        hi = tl.minimum(lo + chunk_s, S)
        counts = (_region_before(hi, width, magic, vh, vw) - _region_before(lo, width, magic, vh, vw)).to(tl.float32)
    else:
        counts = _split_counts(k, S, chunk_s)
    return counts


@triton.jit
def _window_inside(row_start, j, width, magic, vh, vw, ALIGN: tl.constexpr, SHIFT: tl.constexpr):
    """MASKED: whether a ``_window`` tile's own-row positions lie in the valid region: (1, BLOCK_S)
    over positions j, or with SHIFT per element (position j - delta of its row; the neighbouring
    rows' elements in the end blocks are outside the exact mask anyway)."""
    if SHIFT:
        pos = j[None, :] - (row_start % ALIGN).to(tl.int32)[:, None]
    else:
        pos = j[None, :]
    return _inside(pos, width, magic, vh, vw)


@triton.jit
def _apply_inside(row_start, j, S, width, magic, vh, vw, ALIGN: tl.constexpr, SHIFT: tl.constexpr):
    """MASKED: whether each element an apply tile writes lies in its sample's valid region:
    (1, BLOCK_S) over positions j, or with SHIFT per element, the end blocks' neighbouring-row
    elements at their own row's position (``_row_side``), as their own tiles test them. Those
    rows are always the same sample's: shifted windows run only where every sample's C * S
    elements are whole ALIGN blocks (``triton_launch._tiles``), so a sample's first row starts a
    block (no previous row's elements) and its last row ends one (no next row's)."""
    if SHIFT:
        pos = j[None, :] - (row_start % ALIGN).to(tl.int32)[:, None]
        side = (pos >= S).to(tl.int32) - (pos < 0).to(tl.int32)
        inside = _inside(pos - side * S, width, magic, vh, vw)
    else:
        inside = _inside(j[None, :], width, magic, vh, vw)
    return inside


# ------------------------------------------------------------ split reduction: forward

@triton.jit
def _lane_count(exact, j, split_end, ALIGN: tl.constexpr, SHIFT: tl.constexpr):
    """1 where a tile's element counts: per lane, (1, BLOCK_S), when every row sees the same
    positions, else (SHIFT) per element."""
    count = _below(j, split_end, ALIGN).to(tl.float32)[None, :]
    if SHIFT:
        count = exact.to(tl.float32)
    return count


@triton.jit(do_not_specialize=["S", "split_tiles", "n_splits", "n_cblocks", "width"])
def _stats_partial_kernel(
    X,  # standard (module docstring: "Kernel arguments"), as are C, S, CHANNELS_LAST .. BLOCK_S, VALID .. MASKED
    PART_MEAN,  # out: records: each (n, split, channel)'s mean, (N, n_splits, C) float32
    PART_M2,  # out: records: each (n, split, channel)'s M2 (squared deviations summed), (N, n_splits, C) float32
    C, S,
    split_tiles,  # tiles per split (each split whole BLOCK_S tiles; the last may be short)
    n_splits,  # splits per row block: the grid is N * n_cblocks * n_splits
    n_cblocks,
    CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, SHIFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """Per (n, channel block, spatial split): each channel's mean and M2 over the split's
    positions (MASKED: those in the sample's valid region; tiles past its last row are not
    read), one record each (forward step 1)."""
    pid_n, pid_k, c_offs, c_mask = _split_program(tl.program_id(0), C, n_splits, n_cblocks, BLOCK_C)
    row_start = _row_starts(pid_n, c_offs, C, S, CHANNELS_LAST, ALIGN, SHIFT)
    s_start, split_end, loop_end, vh, vw, magic = _split_range(pid_n, pid_k, split_tiles, S, VALID, width, BLOCK_S,
                                                               MASKED)
    # Per-lane Welford accumulators, carried across the loop with no reduction inside it (so
    # nothing waits on the tile's other warps while the next loads are in flight); the
    # lanes are merged once, after the loop, by Chan's exact formula. On x - shift, shift the
    # first tile's mean of the channel: the running means stay small, so a mean large against
    # the spread is rounded once (adding the shift back), not at every update. A lane's
    # count is the same for every row, (1, BLOCK_S), or with SHIFT (rows see different
    # positions) per element.
    j = s_start + tl.arange(0, BLOCK_S)
    offs, access, exact = _window(row_start, c_mask, j, s_start, split_end, C, CHANNELS_LAST, ALIGN, SHIFT)
    if MASKED:  # (the loads keep their masks, uniform over ALIGN blocks: still vectorised)
        inside = _window_inside(row_start, j, width, magic, vh, vw, ALIGN, SHIFT)
        exact = exact & inside
    x = tl.where(exact, tl.load(X + offs, mask=access, other=0.0).to(tl.float32), 0.0)
    lane_count = _lane_count(exact, j, split_end, ALIGN, SHIFT)
    if MASKED:
        if not SHIFT:  # (with SHIFT the count is the exact mask's: the region's already)
            lane_count = tl.where(inside, lane_count, 0.0)
    shift = tl.sum(x, axis=1) / tl.maximum(tl.sum(lane_count, axis=1), 1.0)
    lane_mean = tl.where(exact, x - shift[:, None], 0.0)
    lane_m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s0 in range(s_start + BLOCK_S, loop_end + SHIFT * (ALIGN - 1), BLOCK_S):
        j = s0 + tl.arange(0, BLOCK_S)
        offs, access, exact = _window(row_start, c_mask, j, s_start, split_end, C, CHANNELS_LAST, ALIGN, SHIFT)
        x = tl.load(X + offs, mask=access, other=0.0).to(tl.float32) - shift[:, None]
        count = _lane_count(exact, j, split_end, ALIGN, SHIFT)
        if MASKED:
            inside = _window_inside(row_start, j, width, magic, vh, vw, ALIGN, SHIFT)
            exact = exact & inside
            if SHIFT:
                count = exact.to(tl.float32)
            else:
                count = tl.where(inside, count, 0.0)
        lane_count += count
        delta = tl.where(exact, x - lane_mean, 0.0)
        lane_mean += delta / tl.maximum(lane_count, 1.0)
        lane_m2 += delta * tl.where(exact, x - lane_mean, 0.0)
    counts = tl.broadcast_to(lane_count, (BLOCK_C, BLOCK_S))
    mean, m2, _ = tl.reduce((lane_mean, lane_m2, counts), 1, _welford_combine)
    mean += shift
    out = (pid_n.to(tl.int64) * n_splits + pid_k) * C + c_offs
    tl.store(PART_MEAN + out, mean, mask=c_mask)
    tl.store(PART_M2 + out, m2, mask=c_mask)


@triton.jit
def _partials_tile(k0, c0, row0, g, C, S, cpg, chunk_s, n_splits, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr,
                   width=None, magic=None, vh=None, vw=None, MASKED: tl.constexpr = False):
    """Offsets, mask and split counts of a (BLOCK_K splits, BLOCK_CG channels) tile of one
    group's (n, split, channel) partials (MASKED: counts in the valid region, ``_record_counts``)."""
    k_offs = k0 + tl.arange(0, BLOCK_K)
    cg_offs = c0 + tl.arange(0, BLOCK_CG)
    mask = (k_offs < n_splits)[:, None] & (cg_offs < cpg)[None, :]
    offs = (row0 + k_offs)[:, None] * C + (g * cpg + cg_offs)[None, :]
    return offs, mask, _record_counts(k_offs, S, chunk_s, width, magic, vh, vw, MASKED)


@triton.jit(do_not_specialize=["S", "G", "cpg", "chunk_s", "n_splits", "width"])
def _stats_finalize_kernel(
    PART_MEAN,  # records: each (n, split, channel)'s mean, (N, n_splits, C) float32
    PART_M2,  # records: each (n, split, channel)'s M2 (squared deviations summed), (N, n_splits, C) float32
    MEAN, RSTD,  # out (standard, as are C, S, G, cpg, eps, VALID .. MASKED)
    C, S, G, cpg,
    chunk_s,  # positions per split of the partial-sums kernel: each record's count follows from it
    n_splits,  # splits of the partial-sums kernel: records per (n, channel)
    eps,
    BLOCK_K: tl.constexpr,  # splits per record tile (FINALIZE_BLOCK_K)
    BLOCK_CG: tl.constexpr,  # channels per record tile (FINALIZE_BLOCK_CG)
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """Per (n, group): its channels' records merged -> mean, rstd (a launch of its own where the
    forward apply's programs would each merge too many: ``_stats_merge``)."""
    pid = tl.program_id(0)  # n * G + g
    pid_n = pid // G
    g = pid % G
    total = tl.cast(cpg, tl.float32) * tl.cast(S, tl.float32)  # (no int32 product: groups of 2^31+)
    magic, vh, vw = None, None, None
    if MASKED:  # counts and total of the sample's valid region
        vh, vw, _rows_end = _region(VALID, pid_n, width)
        magic = _width_magic(width)
        total = _region_size(cpg, vh, vw)
    row0 = pid_n.to(tl.int64) * n_splits
    # Pass 1: the group's mean, from the partial means weighted by their counts.
    acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    for k0 in range(0, n_splits, BLOCK_K):
        for c0 in range(0, cpg, BLOCK_CG):
            offs, mask, counts = _partials_tile(k0, c0, row0, g, C, S, cpg, chunk_s, n_splits, BLOCK_K, BLOCK_CG,
                                                width, magic, vh, vw, MASKED)
            acc += tl.load(PART_MEAN + offs, mask=mask, other=0.0) * counts[:, None]
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    # Pass 2: M2 = sum of partial M2 + count * (partial mean - mean)^2 (exact merge).
    acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    for k0 in range(0, n_splits, BLOCK_K):
        for c0 in range(0, cpg, BLOCK_CG):
            offs, mask, counts = _partials_tile(k0, c0, row0, g, C, S, cpg, chunk_s, n_splits, BLOCK_K, BLOCK_CG,
                                                width, magic, vh, vw, MASKED)
            part_mean = tl.load(PART_MEAN + offs, mask=mask, other=0.0)
            part_m2 = tl.load(PART_M2 + offs, mask=mask, other=0.0)
            delta = part_mean - mean
            acc += tl.where(mask, part_m2 + counts[:, None] * delta * delta, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, _rstd(var, eps))


@triton.jit
def _as_pairs(lanes, BLOCK_L: tl.constexpr, LEVEL: tl.constexpr):
    """(BLOCK_L,) lanes as (pairs, 2, 2^LEVEL): adjacent runs of 2^LEVEL lanes side by side."""
    return tl.reshape(lanes, (BLOCK_L // (2 << LEVEL), 2, 1 << LEVEL))


@triton.jit
def _to_both_runs(merged, BLOCK_L: tl.constexpr, LEVEL: tl.constexpr):
    """A (pairs, 2^LEVEL) value of each pair of runs back on the lanes of both runs, (BLOCK_L,)."""
    return tl.reshape(tl.broadcast_to(merged[:, None, :], (BLOCK_L // (2 << LEVEL), 2, 1 << LEVEL)), (BLOCK_L,))


@triton.jit
def _merge_lane_runs(ref, delta, m2, count, cpg, BLOCK_L: tl.constexpr):
    """Chan's merge of each lane's statistics (mean = ref + delta, M2, count) with the other
    lanes of its run: runs of ``cpg`` consecutive lanes, cpg a power of two dividing BLOCK_L.
    log2(BLOCK_L) steps, step l merging adjacent runs of 2^l lanes where 2^l < cpg (reshapes
    of constant shape: cpg is a runtime value, so one compilation serves every group size),
    relative to the first run's ref; every lane ends with its run's statistics, the same bits
    in each."""
    tl.static_assert(BLOCK_L <= 4096, "_merge_lane_runs merges up to 4096 lanes (12 steps)")
    for level in tl.static_range(12):
        if (2 << level) <= BLOCK_L:
            ref_pair = _as_pairs(ref, BLOCK_L, level)
            first = tl.sum(tl.where(tl.arange(0, 2)[None, :, None] == 0, ref_pair, 0.0), 1)
            first_lanes = _to_both_runs(first, BLOCK_L, level)
            # (unpacked, not indexed: triton 3.2 cannot index a tuple a function returns)
            merged_delta, merged_m2, merged_count = _merge_along(
                _as_pairs(delta + (ref - first_lanes), BLOCK_L, level), _as_pairs(m2, BLOCK_L, level),
                _as_pairs(count, BLOCK_L, level), 1)
            merge = (1 << level) < cpg
            ref = tl.where(merge, first_lanes, ref)
            delta = tl.where(merge, _to_both_runs(merged_delta, BLOCK_L, level), delta)
            m2 = tl.where(merge, _to_both_runs(merged_m2, BLOCK_L, level), m2)
            count = tl.where(merge, _to_both_runs(merged_count, BLOCK_L, level), count)
    return ref, delta, m2, count


@triton.jit
def _group_mean_rstd(PART_MEAN, PART_M2, MEAN, RSTD, row, lane_mask, C, S, G, cpg, chunk_s, n_splits, eps,
                     STATS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
                     width=None, magic=None, vh=None, vw=None, MASKED: tl.constexpr = False):
    """The mean and rstd of the group of each lane's row (``row`` = n * C + channel, (BLOCK_L,)),
    from ``_stats_partial_kernel``'s (n, split, channel) mean/M2 records, merged by Chan's
    formula in a fixed order (every program that needs a group computes the same bits),
    relative to each lane's first record (exact when the mean is large against the spread).

    STATS_BY_LANES (the lanes are BLOCK_L consecutive channels from a multiple of BLOCK_L,
    holding whole groups: cpg a power of two up to BLOCK_L): each lane merges its own
    channel's records over the splits, (BLOCK_L, BLOCK_K) at a time, then the lanes of each
    group are merged (``_merge_lane_runs``). STATS_GATHERED: each lane merges its group's
    cpg x n_splits records itself (any group size, groups across channel blocks, a shifted
    window's neighbouring rows). STATS_FINALIZED: read from MEAN / RSTD, where
    ``_stats_finalize_kernel`` stored them. MASKED: each record counts the valid region's
    positions of its split (``_record_counts``), by the region (vh, vw) of the lanes' sample."""
    lane_n = (row // C).to(tl.int64)
    channel = row % C
    if STATS == 2:  # finalized
        grp = lane_n * G + channel // cpg
        return (tl.load(MEAN + grp, mask=lane_mask, other=0.0), tl.load(RSTD + grp, mask=lane_mask, other=0.0))
    first = channel // cpg * cpg  # the group's first channel
    if STATS == 0:  # by lanes
        first = channel
    records = n_splits if STATS == 0 else n_splits * cpg  # by lanes
    ref = tl.load(PART_MEAN + lane_n * n_splits * C + first, mask=lane_mask, other=0.0)
    delta = tl.zeros([BLOCK_L], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_L], dtype=tl.float32)
    count = tl.zeros([BLOCK_L], dtype=tl.float32)
    for t0 in range(0, records, BLOCK_K):
        t = t0 + tl.arange(0, BLOCK_K)
        if STATS == 0:  # by lanes
            k = t
            ch = channel[:, None]
        else:  # record t of a group: split t // cpg, channel t % cpg of the group
            k = t // cpg
            ch = first[:, None] + (t - k * cpg)[None, :]
        valid = lane_mask[:, None] & (t < records)[None, :]
        offs = (lane_n[:, None] * n_splits + k[None, :]) * C + ch
        part_delta = tl.where(valid, tl.load(PART_MEAN + offs, mask=valid, other=0.0) - ref[:, None], 0.0)
        part_m2 = tl.load(PART_M2 + offs, mask=valid, other=0.0)
        # Counts as one row for every lane (fewer registers; a masked lane's zero deltas and M2
        # make its count moot).
        part_count = tl.where(t < records, _record_counts(k, S, chunk_s, width, magic, vh, vw, MASKED), 0.0)[None, :]
        tile_delta, tile_m2, tile_count = _merge_along(part_delta, part_m2, part_count, 1)
        delta, m2, count = _welford_combine(delta, m2, count, tile_delta, tile_m2, tile_count)
    if STATS == 0:  # by lanes
        ref, delta, m2, count = _merge_lane_runs(ref, delta, m2, count, cpg, BLOCK_L)
    return ref + delta, _rstd(m2 / tl.maximum(count, 1.0), eps)


@triton.jit(do_not_specialize=["S", "G", "cpg", "n_rows", "n_cblocks", "chunk_s", "stat_splits", "split_tiles",
                               "n_splits", "n_sblocks", "ACT", "width"])
def _forward_apply_kernel(
    X, Y, W, B,  # standard, as are C, S, G, cpg, eps, n_rows, n_cblocks, n_sblocks, ACT, CHANNELS_LAST .. BLOCK_S,
    # VALID .. MASKED
    PART_MEAN,  # records: each (n, split, channel)'s mean, (N, n_splits, C) float32
    PART_M2,  # records: each (n, split, channel)'s M2 (squared deviations summed), (N, n_splits, C) float32
    MEAN, RSTD,  # out, or in with STATS_FINALIZED
    R,
    C, S, G, cpg, eps, n_rows, n_cblocks,
    chunk_s,  # positions per split of the partial-sums kernel: each record's count follows from it
    stat_splits,  # splits of the partial-sums kernel: records per (n, channel)
    split_tiles,  # tiles per split of this kernel's own grid
    n_splits,  # this kernel's splits per row block: the grid is N * n_cblocks * n_splits
    n_sblocks,
    ACT,  # a runtime value here: one compilation serves every activation
    RES: tl.constexpr,  # RESIDUAL_NONE or RESIDUAL_ADD
    CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, SHIFT: tl.constexpr,
    STATS: tl.constexpr,  # how the groups' statistics are got: STATS_BY_LANES, STATS_GATHERED, STATS_FINALIZED
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,  # records per lane per merge step (_STATS_TILE_ELEMENTS // BLOCK_C)
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """y = act(GN(x) [+ R]) over one (n, channel block, spatial split): the statistics of its
    rows' groups (and, with SHIFT, of the neighbouring rows') from ``_stats_partial_kernel``'s
    records (``_group_mean_rstd``; unless finalized, the programs of split 0 store them for
    backward), then a loop over the split's tiles (``_window`` over [0, S), ``n_sblocks`` in
    all). MASKED: 0 written outside the valid region (``_apply_inside``)."""
    # By lanes, a lane's neighbouring row is another lane's: not with shifted windows.
    tl.static_assert(not (SHIFT and STATS == 0), "STATS_BY_LANES with SHIFT")  # by lanes
    pid_n, pid_k, c_offs, c_mask = _split_program(tl.program_id(0), C, n_splits, n_cblocks, BLOCK_C)
    row = pid_n * C + c_offs
    magic, vh, vw = None, None, None
    if MASKED:  # the sample's valid region (every lane's here)
        magic = _width_magic(width)
        vh, vw, _rows_end = _region(VALID, pid_n, width)
    mean, rstd = _group_mean_rstd(PART_MEAN, PART_M2, MEAN, RSTD, row, c_mask, C, S, G, cpg, chunk_s, stat_splits,
                                  eps, STATS, BLOCK_C, BLOCK_K, width, magic, vh, vw, MASKED)
    if STATS != 2:  # not finalized
        # One lane per group stores its statistics, in split 0 (pid_k's test is a block, not a
        # scalar: triton 3.9's interpreter rejects a mask made of a block & a scalar).
        first = c_mask & (c_offs % cpg == 0) & (c_offs * 0 + pid_k == 0)
        tl.store(MEAN + pid_n * G + c_offs // cpg, mean, mask=first)
        tl.store(RSTD + pid_n * G + c_offs // cpg, rstd, mask=first)
    w = tl.load(W + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(B + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    mean_p, rstd_p, w_p, b_p, mean_n, rstd_n, w_n, b_n = mean, rstd, w, b, mean, rstd, w, b
    if SHIFT:  # the neighbouring rows' parameters, for their elements in the end blocks
        prev, nxt = _neighbour_rows(row, n_rows)
        # (MASKED: the same sample's region: ``_apply_inside``. A lane whose neighbouring row is another
        # sample's, clamped or across samples, has no element of that row in its windows.)
        mean_p, rstd_p = _group_mean_rstd(PART_MEAN, PART_M2, MEAN, RSTD, prev, c_mask, C, S, G, cpg, chunk_s,
                                          stat_splits, eps, STATS, BLOCK_C, BLOCK_K, width, magic, vh, vw, MASKED)
        mean_n, rstd_n = _group_mean_rstd(PART_MEAN, PART_M2, MEAN, RSTD, nxt, c_mask, C, S, G, cpg, chunk_s,
                                          stat_splits, eps, STATS, BLOCK_C, BLOCK_K, width, magic, vh, vw, MASKED)
        w_p = tl.load(W + prev % C, mask=c_mask, other=0.0).to(tl.float32)
        b_p = tl.load(B + prev % C, mask=c_mask, other=0.0).to(tl.float32)
        w_n = tl.load(W + nxt % C, mask=c_mask, other=0.0).to(tl.float32)
        b_n = tl.load(B + nxt % C, mask=c_mask, other=0.0).to(tl.float32)
    row_start = _row_starts(pid_n, c_offs, C, S, CHANNELS_LAST, ALIGN, SHIFT)
    for tile in range(pid_k * split_tiles, tl.minimum(pid_k * split_tiles + split_tiles, n_sblocks)):
        j = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        offs, mask, _ = _window(row_start, c_mask, j, 0, S, C, CHANNELS_LAST, ALIGN, SHIFT)
        side = 0
        if SHIFT:
            side = _row_side(row_start, j, S, ALIGN)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        z = _activation_input(x, _by_side(mean, mean_p, mean_n, side, SHIFT), _by_side(rstd, rstd_p, rstd_n, side, SHIFT),
                              _by_side(w, w_p, w_n, side, SHIFT), _by_side(b, b_p, b_n, side, SHIFT), R, offs, mask, RES)
        if MASKED:  # 0 outside the region (the stores keep their masks: still vectorised), as act(0): z's select
            # comes before the activation (selecting y after it spilled 8 bytes on sm_86/sm_89 at 64 registers)
            y = _activation(tl.where(_apply_inside(row_start, j, S, width, magic, vh, vw, ALIGN, SHIFT), z, 0.0), ACT)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        else:  # (as written before MASKED: the same code)
            tl.store(Y + offs, _activation(z, ACT).to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------- split reduction: backward

@triton.jit(do_not_specialize=["S", "G", "cpg", "split_tiles", "n_splits", "n_cblocks", "width"])
def _backward_partial_kernel(
    X, DY, W, B, MEAN, RSTD, R,  # standard, as are C .. cpg, n_cblocks, ACT .. BLOCK_S, VALID .. MASKED
    PART_DS,  # out: partials: sum of dz * xhat per (n, split, channel), (N, n_splits, C) float32
    PART_DB,  # out: partials: sum of dz per (n, split, channel), (N, n_splits, C) float32
    C, S, G, cpg,
    split_tiles,  # tiles per split (each split whole BLOCK_S tiles; the last may be short)
    n_splits,  # splits per row block: the grid is N * n_cblocks * n_splits
    n_cblocks,
    ACT: tl.constexpr, RES: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """Per (n, channel block, spatial split): each channel's sums of dz * xhat and dz over the
    split's positions (MASKED: those in the sample's valid region; tiles past its last row are
    not read), dz = d act(z)/dz * dy with z recomputed (backward step 1)."""
    pid_n, pid_k, c_offs, c_mask = _split_program(tl.program_id(0), C, n_splits, n_cblocks, BLOCK_C)
    grp = pid_n * G + c_offs // cpg
    mean, rstd, w, b = _channel_params(MEAN, RSTD, W, B, grp, c_offs, c_mask)
    row_start = _row_starts(pid_n, c_offs, C, S, CHANNELS_LAST, ALIGN, SHIFT)
    s_start, split_end, loop_end, vh, vw, magic = _split_range(pid_n, pid_k, split_tiles, S, VALID, width, BLOCK_S,
                                                               MASKED)
    # Per-lane sums, reduced once after the loop.
    ds = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    db = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s0 in range(s_start, loop_end + SHIFT * (ALIGN - 1), BLOCK_S):
        j = s0 + tl.arange(0, BLOCK_S)
        offs, access, exact = _window(row_start, c_mask, j, s_start, split_end, C, CHANNELS_LAST, ALIGN, SHIFT)
        x = tl.load(X + offs, mask=access, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=access, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        z = _activation_input(x, mean, rstd, w, b, R, offs, access, RES)
        if MASKED:  # only the region's positions count, whatever the padding holds (no 0 * inf)
            if RES == 2:  # R is the masked forward's ReLU output, 0 outside the region: so is dz already
                xhat = tl.where(z > 0.0, xhat, 0.0)  # (ptxas spilled at sm_75/sm_80 with the region test here)
            else:
                inside = _window_inside(row_start, j, width, magic, vh, vw, ALIGN, SHIFT)
                exact = exact & inside
                xhat = tl.where(inside, xhat, 0.0)
        dz = tl.where(exact, _activation_grad(z, dy, ACT), 0.0)
        if SHIFT:  # a neighbouring row's element may be inf or huge against this row's statistics: 0 * inf
            xhat = tl.where(exact, xhat, 0.0)
        ds += dz * xhat
        db += dz
    out = (pid_n.to(tl.int64) * n_splits + pid_k) * C + c_offs
    tl.store(PART_DS + out, tl.sum(ds, axis=1), mask=c_mask)
    tl.store(PART_DB + out, tl.sum(db, axis=1), mask=c_mask)


@triton.jit
def _dx_coefficients(PART_DS, PART_DB, W, RSTD, COEF_XHAT, COEF_CONST, pid, C, S, G, cpg, n_splits,
                     BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr, VALID=None, MASKED: tl.constexpr = False):
    """dx's two coefficients of one (n, group) ``pid``:
    dx = rstd * (gamma*dz - (sum(gamma*dz) + xhat * sum(gamma*dz*xhat)) / M), M = cpg*S
    (MASKED: cpg * vh * vw, the group's positions in the valid region, at least 1)."""
    pid_n = pid // G
    g = pid % G
    row0 = pid_n.to(tl.int64) * n_splits
    acc_ds = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float32)
    for c0 in range(0, cpg, BLOCK_CG):
        cg_offs = c0 + tl.arange(0, BLOCK_CG)
        cg_mask = cg_offs < cpg
        w = tl.load(W + g * cpg + cg_offs, mask=cg_mask, other=0.0).to(tl.float32)
        for k0 in range(0, n_splits, BLOCK_K):
            k_offs = k0 + tl.arange(0, BLOCK_K)
            mask = (k_offs < n_splits)[:, None] & cg_mask[None, :]
            offs = (row0 + k_offs)[:, None] * C + (g * cpg + cg_offs)[None, :]
            acc_ds += tl.load(PART_DS + offs, mask=mask, other=0.0) * w[None, :]
            acc_db += tl.load(PART_DB + offs, mask=mask, other=0.0) * w[None, :]
    sum_ds = tl.sum(tl.sum(acc_ds, axis=1), axis=0)
    sum_db = tl.sum(tl.sum(acc_db, axis=1), axis=0)
    rstd = tl.load(RSTD + pid)
    if MASKED:
        inv_m = 1.0 / _region_size(cpg, tl.load(VALID + 2 * pid_n), tl.load(VALID + 2 * pid_n + 1))
    else:
        inv_m = 1.0 / (tl.cast(cpg, tl.float32) * tl.cast(S, tl.float32))
    tl.store(COEF_XHAT + pid, -rstd * sum_ds * inv_m)
    tl.store(COEF_CONST + pid, -rstd * sum_db * inv_m)


@triton.jit(do_not_specialize=["S", "G", "cpg", "n_splits", "n_groups", "n_partials"])
def _backward_finalize_kernel(
    PART_DS,  # partials: sum of dz * xhat per (n, split, channel), (N, n_splits, C) float32
    PART_DB,  # partials: sum of dz per (n, split, channel), (N, n_splits, C) float32
    W, RSTD,  # standard, as are DW, DB, C .. cpg
    COEF_XHAT,  # out: each (n, group)'s coefficient of xhat in dx, (N, G) float32
    COEF_CONST,  # out: each (n, group)'s constant term of dx, (N, G) float32
    DW, DB,  # out
    C, S, G, cpg,
    n_splits,  # splits per (n, channel) of the partials
    n_groups,  # N * G: programs below it compute dx's coefficients, the rest dgamma/dbeta
    n_partials,  # partial vectors of C to sum for dgamma/dbeta: N * n_splits
    BLOCK_K: tl.constexpr,  # splits per partials tile (FINALIZE_BLOCK_K)
    BLOCK_CG: tl.constexpr,  # channels per partials tile (FINALIZE_BLOCK_CG)
    BLOCK_R: tl.constexpr,  # partial vectors per step of the dgamma/dbeta sums (PARAM_BLOCK_R)
    BLOCK_C: tl.constexpr,  # channels per dgamma/dbeta program (PARAM_BLOCK_C)
    VALID=None,  # standard, as is MASKED (no width: only the regions' sizes count here)
    MASKED: tl.constexpr = False,
):
    """Programs [0, N*G): dx's coefficients of one (n, group) each. Programs from N*G on:
    dgamma and dbeta of BLOCK_C channels each. Both read only the partial sums, so they share
    one launch."""
    pid = tl.program_id(0)
    if pid < n_groups:
        _dx_coefficients(PART_DS, PART_DB, W, RSTD, COEF_XHAT, COEF_CONST, pid, C, S, G, cpg, n_splits,
                         BLOCK_K, BLOCK_CG, VALID, MASKED)
    else:
        _param_sums(PART_DS, PART_DB, DW, DB, pid - n_groups, n_partials, C, BLOCK_R, BLOCK_C)


@triton.jit
def _apply_tile(MEAN, RSTD, W, B, C, S, G, cpg, n_rows, n_cblocks, n_sblocks, CHANNELS_LAST: tl.constexpr,
                ALIGN: tl.constexpr, SHIFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """An apply kernel's tile (``_window`` over [0, S)): element offsets and access mask; the
    groups of its rows, of the rows before and after and each element's side (for
    ``_row_values``; ``n_rows`` = N * C); each element's group mean and rstd, gamma and beta
    (columns, or per element with SHIFT). With SHIFT a tile also writes the neighbouring rows'
    elements in its end blocks, with those rows' parameters: the values their own tiles write.
    Then (for MASKED's ``_apply_inside``) the tile's sample, channel offsets, row starts and
    window positions."""
    pid = tl.program_id(0)
    pid_s = pid % n_sblocks
    rest = pid // n_sblocks
    pid_n = rest // n_cblocks
    c_offs = (rest % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    j = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_start = _row_starts(pid_n, c_offs, C, S, CHANNELS_LAST, ALIGN, SHIFT)
    offs, mask, _ = _window(row_start, c_mask, j, 0, S, C, CHANNELS_LAST, ALIGN, SHIFT)
    grp = pid_n * G + c_offs // cpg
    if SHIFT:
        side = _row_side(row_start, j, S, ALIGN)
        prev, nxt = _neighbour_rows(pid_n * C + c_offs, n_rows)
        c_prev, c_next = prev % C, nxt % C
        grp_prev, grp_next = (prev // C) * G + c_prev // cpg, (nxt // C) * G + c_next // cpg
    else:
        side, c_prev, c_next, grp_prev, grp_next = 0, c_offs, c_offs, grp, grp
    mean = _row_values(MEAN, grp, grp_prev, grp_next, side, c_mask, SHIFT)
    rstd = _row_values(RSTD, grp, grp_prev, grp_next, side, c_mask, SHIFT)
    w = _row_values(W, c_offs, c_prev, c_next, side, c_mask, SHIFT)
    b = _row_values(B, c_offs, c_prev, c_next, side, c_mask, SHIFT)
    return grp, grp_prev, grp_next, side, c_mask, offs, mask, mean, rstd, w, b, pid_n, c_offs, row_start, j


@triton.jit(do_not_specialize=["S", "G", "cpg", "n_rows", "n_cblocks", "n_sblocks", "ACT", "width"])
def _backward_apply_kernel(
    X, DY, DX, W, B, MEAN, RSTD,  # standard, as are R, DR, C .. cpg, n_rows .. n_sblocks, ACT .. BLOCK_S, VALID .. MASKED
    COEF_XHAT,  # each (n, group)'s coefficient of xhat in dx, (N, G) float32
    COEF_CONST,  # each (n, group)'s constant term of dx, (N, G) float32
    R, DR,
    C, S, G, cpg, n_rows, n_cblocks, n_sblocks,
    ACT,  # a runtime value here: one compilation serves every activation
    RES: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """dx (and dR) over one (n, channel block, spatial tile), from the (n, group) coefficients
    (backward step 3); with SHIFT, the end blocks' neighbouring-row elements with their own rows'.
    MASKED: 0 outside the valid region (``_apply_inside``)."""
    grp, grp_prev, grp_next, side, c_mask, offs, mask, mean, rstd, w, b, pid_n, c_offs, row_start, j = _apply_tile(
        MEAN, RSTD, W, B, C, S, G, cpg, n_rows, n_cblocks, n_sblocks, CHANNELS_LAST, ALIGN, SHIFT, BLOCK_C, BLOCK_S)
    coef_xhat = _row_values(COEF_XHAT, grp, grp_prev, grp_next, side, c_mask, SHIFT)
    coef_const = _row_values(COEF_CONST, grp, grp_prev, grp_next, side, c_mask, SHIFT)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    dz = _activation_grad(_activation_input(x, mean, rstd, w, b, R, offs, mask, RES), dy, ACT)
    if MASKED:  # 0 outside the region (the stores keep their masks: still vectorised)
        vh, vw, _rows_end = _region(VALID, pid_n, width)
        inside = _apply_inside(row_start, j, S, width, _width_magic(width), vh, vw, ALIGN, SHIFT)
        dz = tl.where(inside, dz, 0.0)
    dx = (rstd * w) * dz + coef_xhat * xhat + coef_const
    if MASKED:
        dx = tl.where(inside, dx, 0.0)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if RES != 0:  # a residual
        tl.store(DR + offs, dz.to(DR.dtype.element_ty), mask=mask)


# --------------------------------------------------------------- one program per group

@triton.jit
def _group_tile(pid, C, S, G, cpg, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, BLOCK_CG: tl.constexpr,
                BLOCK_S: tl.constexpr):
    """The whole of one (n, group) as a (BLOCK_CG channels, BLOCK_S positions) tile:
    (n, channel offsets, channel mask, element offsets, element mask). ALIGN divides S in
    NCHW (accesses run along S) and channels per group in channels_last (accesses run along C)."""
    pid_n = pid // G
    g = pid % G
    cg = tl.arange(0, BLOCK_CG)
    s_offs = tl.arange(0, BLOCK_S)
    if CHANNELS_LAST:
        c_mask = _below(cg, cpg, ALIGN)
        c_offs = tl.max_contiguous(tl.multiple_of(g * cpg + cg, ALIGN), BLOCK_CG)
        mask = c_mask[:, None] & (s_offs < S)[None, :]
    else:
        c_mask = cg < cpg
        c_offs = g * cpg + cg
        mask = c_mask[:, None] & _below(s_offs, S, ALIGN)[None, :]
    offs = _offsets(_row_starts(pid_n, c_offs, C, S, CHANNELS_LAST, ALIGN), s_offs, C, CHANNELS_LAST)
    return pid_n, c_offs, c_mask, offs, mask


@triton.jit(do_not_specialize=["S", "G", "cpg", "width"])
def _group_forward_kernel(
    X, Y, W, B,  # standard, as are R, C .. eps, ACT .. ALIGN, VALID .. MASKED
    MEAN, RSTD,  # out
    R,
    C, S, G, cpg, eps,
    ACT: tl.constexpr, RES: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_CG: tl.constexpr,  # channels of a group per tile (next power of two of cpg)
    BLOCK_S: tl.constexpr,  # positions per tile: next power of two of S (the whole group in one tile)
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """One program per (n, group) that fits in registers: x is read once, statistics are an
    exact two-pass over the registers, y is written once, in a single launch (MASKED:
    statistics over the valid region, 0 written outside it)."""
    pid = tl.program_id(0)
    pid_n, c_offs, c_mask, offs, mask = _group_tile(pid, C, S, G, cpg, CHANNELS_LAST, ALIGN, BLOCK_CG, BLOCK_S)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    count = tl.cast(cpg * S, tl.float32)  # tl.cast: Triton folds integer arguments equal to 1 to constants
    keep = mask
    if MASKED:  # (the loads and stores keep their masks: still vectorised)
        vh, vw, _rows_end = _region(VALID, pid_n, width)
        inside = _inside(tl.arange(0, BLOCK_S)[None, :], width, _width_magic(width), vh, vw)
        x = tl.where(inside, x, 0.0)
        count = _region_size(cpg, vh, vw)
        keep = mask & inside
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    dev = tl.where(keep, x - mean, 0.0)
    var = tl.sum(tl.sum(dev * dev, axis=1), axis=0) / count
    rstd = _rstd(var, eps)
    w = tl.load(W + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(B + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    # Per-row copies of the scalars (the same values): ptxas allocates the broadcast scalars
    # worse (64 registers and a spill at the sequence shape, fp32 SiLU).
    mean_c = (tl.zeros([BLOCK_CG], dtype=tl.float32) + mean)[:, None]
    rstd_c = (tl.zeros([BLOCK_CG], dtype=tl.float32) + rstd)[:, None]
    y = _activation(_activation_input(x, mean_c, rstd_c, w[:, None], b[:, None], R, offs, mask, RES), ACT)
    if MASKED:
        y = tl.where(inside, y, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)


@triton.jit
def _group_backward_inputs(X, DY, W, B, MEAN, RSTD, pid, offs, mask, w_offs, w_mask):
    """What a one-program-per-group backward reads: x and dy at ``offs`` (float32), the
    group's mean and rstd, gamma and beta at ``w_offs`` (per channel of a tile's rows, or per
    element of a flat tile)."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    b = tl.load(B + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    return x, dy, tl.load(MEAN + pid), tl.load(RSTD + pid), w, b


@triton.jit
def _group_backward_dz(x, dy, mean, rstd, w, b, R, DR, offs, mask, ACT: tl.constexpr, RES: tl.constexpr, keep=None):
    """A one-program-per-group backward's xhat and dz = d act(z) / dz * dy (0 outside the
    group, and outside ``keep`` where given: MASKED's mask & valid region; z recomputed as in
    forward), dR = dz stored with a residual. gamma and beta (w, b) come broadcastable to x's
    tile: (BLOCK_CG, 1) columns, or per element of a flat tile."""
    xhat = (x - mean) * rstd
    dz = _activation_grad(_activation_input(x, mean, rstd, w, b, R, offs, mask, RES), dy, ACT)
    if keep is None:
        dz = tl.where(mask, dz, 0.0)
    else:
        dz = tl.where(keep, dz, 0.0)
    if RES != 0:  # a residual
        tl.store(DR + offs, dz.to(DR.dtype.element_ty), mask=mask)
    return xhat, dz


@triton.jit(do_not_specialize=["S", "G", "cpg", "width"])
def _group_backward_kernel(
    X, DY, DX, W, B, MEAN, RSTD,  # standard, as are R, DR, C .. cpg, ACT .. ALIGN, VALID .. MASKED
    PART_DS,  # out: sum of dz * xhat per (n, channel), (N, C) float32
    PART_DB,  # out: sum of dz per (n, channel), (N, C) float32
    R, DR,
    C, S, G, cpg,
    ACT: tl.constexpr, RES: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_CG: tl.constexpr,  # channels of a group per tile (next power of two of cpg)
    BLOCK_S: tl.constexpr,  # positions per tile: next power of two of S (the whole group in one tile)
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """One program per (n, group) that fits in registers: x and dy are read once, dx written
    once; the per-(n, channel) sums of dz * xhat and dz go out for dgamma and dbeta (MASKED:
    over the valid region; dx and dR 0 outside it)."""
    pid = tl.program_id(0)
    pid_n, c_offs, c_mask, offs, mask = _group_tile(pid, C, S, G, cpg, CHANNELS_LAST, ALIGN, BLOCK_CG, BLOCK_S)
    x, dy, mean, rstd, w, b = _group_backward_inputs(X, DY, W, B, MEAN, RSTD, pid, offs, mask, c_offs, c_mask)
    keep = None
    if MASKED:  # (the loads and stores keep their masks: still vectorised)
        vh, vw, _rows_end = _region(VALID, pid_n, width)
        inside = _inside(tl.arange(0, BLOCK_S)[None, :], width, _width_magic(width), vh, vw)
        x = tl.where(inside, x, 0.0)  # (the padding's values reach nothing: no 0 * inf)
        keep = mask & inside
    xhat, dz = _group_backward_dz(x, dy, mean, rstd, w[:, None], b[:, None], R, DR, offs, mask, ACT, RES, keep)
    ds = tl.sum(dz * xhat, axis=1)  # per channel: dgamma's share of this (n, group)
    db = tl.sum(dz, axis=1)
    part = pid_n.to(tl.int64) * C + c_offs
    tl.store(PART_DS + part, ds, mask=c_mask)
    tl.store(PART_DB + part, db, mask=c_mask)
    if MASKED:
        scale = rstd / _region_size(cpg, vh, vw)
    else:
        scale = rstd / tl.cast(cpg * S, tl.float32)
    sum_ds = tl.sum(ds * w, axis=0)
    sum_db = tl.sum(db * w, axis=0)
    dx = (rstd * w)[:, None] * dz - scale * (xhat * sum_ds + sum_db)
    if MASKED:
        dx = tl.where(inside, dx, 0.0)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_partials"])
def _param_grad_kernel(
    PART_DS,  # sum of dz * xhat per (n, channel), (N, C) float32
    PART_DB,  # sum of dz per (n, channel), (N, C) float32
    DW, DB,  # out (standard, as is C)
    n_partials,  # partial vectors of C to sum: N
    C,
    BLOCK_R: tl.constexpr,  # partial vectors per step (PARAM_BLOCK_R)
    BLOCK_C: tl.constexpr,  # channels per program (PARAM_BLOCK_C)
):
    """dgamma, dbeta from the one-program-per-group backward's per-(n, channel) sums."""
    _param_sums(PART_DS, PART_DB, DW, DB, tl.program_id(0), n_partials, C, BLOCK_R, BLOCK_C)


# --------------------------------------------------------- one program per group, flat

@triton.jit
def _flat_group_tile(pid, S, G, cpg, ALIGN: tl.constexpr, BLOCK_F: tl.constexpr):
    """The whole of one NCHW (n, group), one contiguous run of cpg * S elements, as a flat
    tile: (element offsets, mask, each element's channel). ALIGN divides cpg * S, so every
    group starts aligned and the accesses are as wide as ALIGN, however narrow S is."""
    i = tl.arange(0, BLOCK_F)
    size = cpg * S
    mask = _below(i, size, ALIGN)
    offs = tl.multiple_of(pid.to(tl.int64) * size, ALIGN) + i  # (n * C + g * cpg) * S, as C = G * cpg
    channel = (pid % G) * cpg + i // S
    return offs, mask, channel


@triton.jit
def _flat_inside(VALID, pid, S, G, cpg, width, BLOCK_F: tl.constexpr):
    """MASKED: whether each element of a flat tile (``_flat_group_tile``) lies in its sample's
    valid region, by its position in its row, per element: (inside, its region's size cpg * vh * vw)."""
    i = tl.arange(0, BLOCK_F)
    vh, vw, _rows_end = _region(VALID, pid // G, width)
    inside = _inside(i - i // S * S, width, _width_magic(width), vh, vw)
    return inside, _region_size(cpg, vh, vw)


@triton.jit(do_not_specialize=["S", "G", "cpg", "width"])
def _group_forward_flat_kernel(
    X, Y, W, B,  # standard (x and y contiguous, NCHW), as are R, S .. eps, ACT, RES, VALID .. MASKED
    MEAN, RSTD,  # out
    R,
    S, G, cpg, eps,
    ACT: tl.constexpr, RES: tl.constexpr,
    ALIGN: tl.constexpr,  # elements a group's size cpg * S (and so every group's start) is a multiple of
    BLOCK_F: tl.constexpr,  # elements per tile: next power of two of cpg * S (the whole group)
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """``_group_forward_kernel`` for NCHW groups whose rows (S elements) are too narrowly
    aligned for wide accesses (the box head's 7 x 7): the group tiled flat, gamma and beta
    gathered per element."""
    pid = tl.program_id(0)
    offs, mask, channel = _flat_group_tile(pid, S, G, cpg, ALIGN, BLOCK_F)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    count = tl.cast(cpg * S, tl.float32)
    keep = mask
    if MASKED:  # statistics over the valid region, 0 written outside it
        inside, count = _flat_inside(VALID, pid, S, G, cpg, width, BLOCK_F)
        x = tl.where(inside, x, 0.0)
        keep = mask & inside
    mean = tl.sum(x, axis=0) / count
    dev = tl.where(keep, x - mean, 0.0)
    rstd = _rstd(tl.sum(dev * dev, axis=0) / count, eps)
    w = tl.load(W + channel, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + channel, mask=mask, other=0.0).to(tl.float32)
    z = _activation_input(x, mean, rstd, w, b, R, offs, mask, RES)
    if MASKED:
        tl.store(Y + offs, tl.where(inside, _activation(z, ACT), 0.0).to(Y.dtype.element_ty), mask=mask)
    else:  # (as written before MASKED: the same code)
        tl.store(Y + offs, _activation(z, ACT).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)


@triton.jit(do_not_specialize=["S", "G", "cpg", "width"])
def _group_backward_flat_kernel(
    X, DY, DX, W, B, MEAN, RSTD,  # standard (x, dy, dx contiguous, NCHW), as are R, DR, C .. cpg, ACT, RES,
    # VALID .. MASKED
    PART_DS,  # out: sum of dz * xhat per (n, channel), (N, C) float32
    PART_DB,  # out: sum of dz per (n, channel), (N, C) float32
    R, DR,
    C, S, G, cpg,
    ACT: tl.constexpr, RES: tl.constexpr,
    ALIGN: tl.constexpr,  # elements a group's size cpg * S (and so every group's start) is a multiple of
    BLOCK_F: tl.constexpr,  # elements per tile: next power of two of cpg * S (the whole group)
    BLOCK_CG: tl.constexpr,  # channels of the per-channel sums' (BLOCK_F, BLOCK_CG) mask: next power of two of cpg
    VALID=None, width=None, MASKED: tl.constexpr = False,
):
    """``_group_backward_kernel`` on ``_group_forward_flat_kernel``'s flat tile: the
    per-channel sums for dgamma and dbeta are taken over a (BLOCK_F, BLOCK_CG) channel mask."""
    pid = tl.program_id(0)
    offs, mask, channel = _flat_group_tile(pid, S, G, cpg, ALIGN, BLOCK_F)
    x, dy, mean, rstd, w, b = _group_backward_inputs(X, DY, W, B, MEAN, RSTD, pid, offs, mask, channel, mask)
    keep = None
    if MASKED:  # sums over the valid region, dx and dR 0 outside it
        inside, count = _flat_inside(VALID, pid, S, G, cpg, width, BLOCK_F)
        x = tl.where(inside, x, 0.0)  # (the padding's values reach nothing: no 0 * inf)
        keep = mask & inside
    xhat, dz = _group_backward_dz(x, dy, mean, rstd, w, b, R, DR, offs, mask, ACT, RES, keep)
    cg = tl.arange(0, BLOCK_CG)
    first = (pid % G) * cpg
    mine = (channel - first)[:, None] == cg[None, :]  # element -> its channel within the group
    ds = tl.sum(tl.where(mine, (dz * xhat)[:, None], 0.0), axis=0)  # per channel: dgamma's share
    db = tl.sum(tl.where(mine, dz[:, None], 0.0), axis=0)
    part = (pid // G).to(tl.int64) * C + first + cg
    tl.store(PART_DS + part, ds, mask=cg < cpg)
    tl.store(PART_DB + part, db, mask=cg < cpg)
    if MASKED:
        scale = rstd / count
    else:
        scale = rstd / tl.cast(cpg * S, tl.float32)
    sum_ds = tl.sum(dz * xhat * w, axis=0)
    sum_db = tl.sum(dz * w, axis=0)
    dx = (rstd * w) * dz - scale * (xhat * sum_ds + sum_db)
    if MASKED:
        dx = tl.where(inside, dx, 0.0)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
