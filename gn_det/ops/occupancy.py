"""How many programs of a compiled kernel a GPU holds at once, from the kernel's registers,
warps and shared memory against the GPU's per-SM limits. The split kernels size their grids
by it (one full wave, no partial tail); tools/compile_kernels.py reports it, for each
architecture of ``ARCHITECTURES``, compiled on a machine without a GPU."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List

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
    shared_bytes_per_block: int = 227 * 1024  # the most one block may have (opted in)
    registers_per_thread: int = 255
    name: str = "H100 SXM"


H100 = GPULimits()

# Per-SM limits by compute capability x 10 (CUDA programming guide, "Technical Specifications
# per Compute Capability"), each with the SM count of a GPU users train on, for
# tools/compile_kernels.py: compiled without the GPU, grids are sized as on that one.
ARCHITECTURES = {
    70: GPULimits(sms=80, shared_bytes=96 * 1024, shared_reserved_per_block=0, shared_bytes_per_block=96 * 1024,
                  name="V100 SXM2"),
    75: GPULimits(sms=40, shared_bytes=64 * 1024, shared_reserved_per_block=0, shared_bytes_per_block=64 * 1024,
                  warps=32, blocks=16, name="T4"),
    80: GPULimits(sms=108, shared_bytes=164 * 1024, shared_bytes_per_block=163 * 1024, name="A100"),
    86: GPULimits(sms=72, shared_bytes=100 * 1024, shared_bytes_per_block=99 * 1024, warps=48, blocks=16,
                  name="A10"),
    89: GPULimits(sms=58, shared_bytes=100 * 1024, shared_bytes_per_block=99 * 1024, warps=48, blocks=24, name="L4"),
    90: H100,
    100: GPULimits(sms=148, name="B200"),
    120: GPULimits(sms=170, shared_bytes=100 * 1024, shared_bytes_per_block=99 * 1024, warps=48, blocks=32,
                   name="RTX 5090"),
}

# Resident blocks per SM by compute capability (CUDA programming guide's table): 32 on the
# data-centre parts (sm_70, sm_80, sm_90, sm_100) and sm_120, 16 or 24 on the others.
_MAX_BLOCKS_PER_SM = {(7, 0): 32, (7, 5): 16, (8, 0): 32, (8, 6): 16, (8, 7): 16, (8, 9): 24, (9, 0): 32, (10, 0): 32,
                      (12, 0): 32}


@functools.lru_cache(maxsize=None)
def device_limits(device_index: int) -> GPULimits:
    """A CUDA device's limits, as torch reports them (blocks per SM from the table above,
    16 for a capability it does not list)."""
    p = torch.cuda.get_device_properties(device_index)
    reserved = 1024 if p.major >= 8 else 0
    return GPULimits(sms=p.multi_processor_count, registers=p.regs_per_multiprocessor,
                     shared_bytes=p.shared_memory_per_multiprocessor, shared_reserved_per_block=reserved,
                     warps=p.max_threads_per_multi_processor // 32,
                     blocks=_MAX_BLOCKS_PER_SM.get((p.major, p.minor), 16),
                     shared_bytes_per_block=getattr(p, "shared_memory_per_block_optin", p.shared_memory_per_multiprocessor),
                     name=p.name)


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


def limit_violations(registers: int, warps: int, shared: int, limits: GPULimits = H100) -> List[str]:
    """What of a compiled kernel exceeds the GPU's limits (empty: it launches there): registers
    per thread, shared memory per block, threads per block, or not one block fitting an SM."""
    found = []
    if registers > limits.registers_per_thread:
        found.append(f"{registers} registers per thread > {limits.registers_per_thread}")
    if shared > limits.shared_bytes_per_block:
        found.append(f"{shared} bytes of shared memory > {limits.shared_bytes_per_block} per block")
    if warps * 32 > 1024:
        found.append(f"{warps * 32} threads per block > 1024")
    if not found and blocks_per_sm(registers, warps, shared, limits) == 0:
        found.append("not one block fits an SM")
    return found
