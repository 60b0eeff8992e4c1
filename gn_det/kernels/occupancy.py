"""How many programs of a compiled kernel a GPU holds at once, from the kernel's registers,
warps and shared memory against the GPU's per-SM limits. The split kernels size their grids
by it (one full wave, no partial tail); tools/compile_kernels.py reports it for an H100
compiled on a machine without one."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPULimits:
    """Per-SM limits that bound how many blocks (programs) of a kernel an SM holds."""

    sms: int = 132  # H100 SXM
    registers: int = 65536
    shared_bytes: int = 228 * 1024
    shared_reserved_per_block: int = 1024  # the CUDA runtime's share of each block's shared memory
    warps: int = 64
    blocks: int = 32


H100 = GPULimits()

# Resident blocks per SM by compute capability (CUDA programming guide's table): 32 on the
# data-centre parts (sm_80, sm_90, sm_100), 16 or 24 on the others.
_MAX_BLOCKS_PER_SM = {(7, 5): 16, (8, 0): 32, (8, 6): 16, (8, 7): 16, (8, 9): 24, (9, 0): 32, (10, 0): 32}


@functools.lru_cache(maxsize=None)
def device_limits(device_index: int) -> GPULimits:
    """A CUDA device's limits, as torch reports them (blocks per SM from the table above,
    16 for a capability it does not list)."""
    p = torch.cuda.get_device_properties(device_index)
    reserved = 1024 if p.major >= 8 else 0
    return GPULimits(sms=p.multi_processor_count, registers=p.regs_per_multiprocessor,
                     shared_bytes=p.shared_memory_per_multiprocessor, shared_reserved_per_block=reserved,
                     warps=p.max_threads_per_multi_processor // 32,
                     blocks=_MAX_BLOCKS_PER_SM.get((p.major, p.minor), 16))


def blocks_per_sm(registers: int, warps: int, shared: int, limits: GPULimits = H100) -> int:
    """Blocks (programs) of a kernel an SM holds at once: registers are allocated per warp in
    units of 256, shared memory per block with the runtime's reserve, and warps and blocks per
    SM are capped."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = limits.registers // (per_warp * warps) if per_warp else limits.blocks
    by_shared = limits.shared_bytes // (shared + limits.shared_reserved_per_block) if shared else limits.blocks
    return max(0, min(limits.blocks, by_registers, limits.warps // warps, by_shared))


def waves(programs: int, blocks: int, limits: GPULimits = H100) -> float:
    """Programs over the blocks the whole GPU holds at once: 1.0 is one full wave."""
    return programs / (blocks * limits.sms) if blocks else float("inf")


def one_wave_splits(rows: int, tiles: int, resident: int, max_splits: int) -> int:
    """How many programs share each of ``rows`` reductions of ``tiles`` tiles so that the grid
    (rows x splits) is at most one full wave of ``resident`` programs and as close to it as
    whole splits allow: no partial tail wave, each program looping over its tiles. At least
    one split (more rows than a wave holds: the grid is as many waves as the rows need), at
    most one tile each."""
    return max(1, min(tiles, max_splits, resident // max(rows, 1)))
