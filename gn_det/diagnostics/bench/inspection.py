"""What gn_det's Triton kernels are, measured without a GPU: the launches a layer call makes,
the specialisations they compile to, the width of their global memory accesses in PTX, and
their occupancy on each GPU architecture (``occupancy.ARCHITECTURES``).
tools/compile_kernels.py drives this; nothing here runs on the import path of the layers.

Launches are recorded by running the launchers (``triton_group_norm_forward`` / ``_backward``)
on ``meta`` tensors with a stand-in for Triton's GPU driver: every Triton launch goes through
the kernel's ``JITFunction.run``, which binds and specialises its arguments exactly as on a GPU
and then calls the JIT's cache hook, which stops it before compiling or launching. torch ops
the launchers might run on the side (none today: dgamma/dbeta are summed by the kernels) are
recorded by a dispatch mode.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.compiler
from torch.utils._python_dispatch import TorchDispatchMode
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from ...ops import triton_launch as kernels
from ...ops.occupancy import ARCHITECTURES, H100, GPULimits, blocks_per_sm, limit_violations

try:  # triton 3.8 and 3.9 keep their settings and hooks in triton.knobs; 3.3 and older have none:
    from triton import knobs  # their JIT cache hook is a class attribute of JITFunction
except ImportError:
    knobs = None

# The kernels' pointer parameters that address activation-sized tensors (x, y, dy, dx, and a
# block end's residual and its gradient); the others address per-channel gamma/beta,
# per-group statistics or partial sums.
ACTIVATION_POINTERS = frozenset({"X", "Y", "DY", "DX", "R", "DR"})

# aten ops that launch no kernel: allocations and views.
_NO_KERNEL_OPS = ("empty", "empty_like", "empty_strided", "detach", "view", "as_strided", "alias", "t", "expand")


@dataclass
class Launch:
    """One launch a layer call makes: a Triton kernel (with its grid and specialisation key)
    or a torch op that launches a kernel of its own."""

    kernel: str
    grid: Tuple[int, ...] = ()
    key: Optional[str] = None
    compile: Optional[dict] = field(default=None, repr=False)
    fn: object = field(default=None, repr=False)

    @property
    def programs(self) -> int:
        total = 1
        for size in self.grid:
            total *= size
        return total

    @property
    def is_triton(self) -> bool:
        return self.compile is not None


class CompileOnlyDriver:
    """What Triton's JIT asks of its driver before it compiles; launching is never reached."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


class _TorchLaunches(TorchDispatchMode):
    def __init__(self, launches: List[Launch]):
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_KERNEL_OPS:
            self.launches.append(Launch(kernel=f"torch {func.overloadpacket.__name__}"))
        return func(*args, **(kwargs or {}))


def jit_kernels() -> Dict[str, triton.runtime.JITFunction]:
    """name -> JITFunction of every kernel the launchers launch."""
    return {name: obj for name, obj in vars(kernels).items()
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}


@contextlib.contextmanager
def recording_launches(target: Optional[GPUTarget] = None, sm_count: Optional[int] = None,
                       occupancy: bool = True) -> Iterator[List[Launch]]:
    """Within it, the launchers record their launches into the yielded list instead of
    launching (call them on meta tensors). The split kernels' grids are sized, as on a GPU
    with ``sm_count`` SMs (default: ``limits_of(target)``'s), by the occupancy of their
    partial-sums kernel compiled for ``target`` (``compile_specialisation``); with
    ``occupancy=False`` by a stand-in of two programs per SM, compiling nothing (for counting
    specialisations, which grids don't change). ``target`` defaults to sm_90 (the H100/H200)."""
    if target is None:
        target = GPUTarget("cuda", 90, 32)
    if sm_count is None:
        sm_count = limits_of(target).sms
    launches: List[Launch] = []
    current: List[Launch] = []

    def hook(*, key, fn, compile, **_):
        current[-1].key = f"{fn.jit_function.fn.__name__}:{key}:{compile['num_warps']}"
        current[-1].compile = compile
        current[-1].fn = fn.jit_function
        return True  # do not compile or launch

    def wrap(name, run):
        def recorded(*args, grid, warmup, **kwargs):
            # The launchers pass a tuple grid; the one they compute is the one recorded. A
            # warmup (the launcher asking for the compiled kernel) is no launch.
            current.append(Launch(kernel=name, grid=tuple(grid)))
            if not warmup:
                launches.append(current[-1])
            return run(*args, grid=grid, warmup=warmup, **kwargs)
        return recorded

    def resident_programs(kernel, x, args, kwargs):
        if not occupancy:
            return 2 * sm_count
        buffer = torch.empty(4, dtype=torch.float32, device="meta")  # for the buffers the launch allocates
        kernel.warmup(*(buffer if a is None else a for a in args), grid=(1,), **kwargs)  # the hook records it
        return max(1, compile_specialisation(current[-1], target)["blocks_per_sm"]) * sm_count

    saved_resident, saved_hook = kernels._resident_programs, _cache_hook()
    saved_driver = getattr(driver, "_active", None)  # (reset_active() would look for a GPU driver)
    jits = jit_kernels()
    driver.set_active(CompileOnlyDriver(target))
    kernels._resident_programs = resident_programs
    _set_cache_hook(hook)
    for name, jit in jits.items():
        jit.run = wrap(name, jit.run)
    try:
        with _TorchLaunches(launches):
            yield launches
    finally:
        for jit in jits.values():
            del jit.run  # back to the class's method
        _set_cache_hook(saved_hook)
        kernels._resident_programs = saved_resident
        driver.set_active(saved_driver)


def _cache_hook():
    return knobs.runtime.jit_cache_hook if knobs is not None else triton.runtime.JITFunction.cache_hook


def _set_cache_hook(hook) -> None:
    if knobs is not None:
        knobs.runtime.jit_cache_hook = hook
    else:
        triton.runtime.JITFunction.cache_hook = hook


def limits_of(target: GPUTarget) -> GPULimits:
    """The per-SM limits (and SM count) compile_kernels sizes grids and occupancy by for this
    target: ``occupancy.ARCHITECTURES``' entry, or an H100's for an architecture not listed."""
    return ARCHITECTURES.get(target.arch, H100)


def ptxas_path(arch: int) -> str:
    """The ptxas triton itself runs for this compute capability (x 10): its backend's
    ``get_ptxas`` (triton >= 3.3: which of its bundled ptxas serves which architecture changes
    between versions: 3.9 takes the newer one from sm_90 on) or, before that, its one ptxas."""
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):
        tool = nvidia.get_ptxas(arch)
        return tool.path if hasattr(tool, "path") else tool[0]  # knobs.NvidiaTool (>= 3.4), or (path, version)
    return nvidia._path_to_binary("ptxas")[0]


_COMPILED: Dict[Tuple[str, str], dict] = {}


def compile_specialisation(launch: Launch, target: GPUTarget, limits: Optional[GPULimits] = None) -> dict:
    """Compile one recorded specialisation to a cubin for ``target`` (once per process):
    registers and spill bytes (ptxas -v, the ptxas triton uses for the target), shared memory,
    warps, blocks per SM against ``limits`` (default ``limits_of(target)``) and what exceeds
    them, and the narrowest global load and store of each pointer (PTX)."""
    limits = limits or limits_of(target)
    cache_key = (launch.key, str(target))
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    c = launch.compile
    source = triton.compiler.ASTSource(launch.fn, c["signature"], c["constants"], c["configs"][0])
    options = {"num_warps": c["num_warps"], "num_stages": c["num_stages"], "num_ctas": c["num_ctas"]}
    maxnreg = json.loads(c.get("specialization_data") or "{}").get("options", {}).get("maxnreg")
    if maxnreg:  # a register cap the launcher asked for (group_norm_triton._BACKWARD_PARTIAL_MAXNREG_BY_ARCH)
        options["maxnreg"] = maxnreg
    compiled = triton.compile(source, target=target, options=options)
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
    ptxas = ptxas_path(target.arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    widths = access_widths(global_accesses(ptx, pointer_params(c["signature"])))
    shared = compiled.metadata.shared
    blocks = blocks_per_sm(registers, c["num_warps"], shared, limits)
    out = _COMPILED[cache_key] = {
        "kernel": launch.kernel, "warps": c["num_warps"], "registers": registers, "spills": spills, "shared": shared,
        "blocks_per_sm": blocks, "warps_per_sm": blocks * c["num_warps"],
        "over_limits": limit_violations(registers, c["num_warps"], shared, limits),
        "load_bytes_min": activation_min(widths["load"]), "store_bytes_min": activation_min(widths["store"]),
        "load_bytes_by_pointer": widths["load"], "store_bytes_by_pointer": widths["store"]}
    return out


def layer_launches(shape: Sequence[int], dtype: torch.dtype, memory_format: torch.memory_format, activation: int,
                   num_groups: int = 32, residual_mode: int = 0, **recording) -> Tuple[List[Launch], List[Launch]]:
    """The launches of one GN layer's forward and of its backward at this shape (recorded,
    not run); with ``residual_mode`` (``activation.RESIDUAL_*``), a block end's: GN + residual."""
    x = torch.empty(tuple(shape), dtype=dtype, device="meta").contiguous(memory_format=memory_format)
    w = torch.empty(shape[1], device="meta")
    r = torch.empty_like(x) if residual_mode else None
    with recording_launches(**recording) as launches:
        _, mean, rstd = kernels.triton_group_norm_forward(x, w, w, r, num_groups, 1e-5, activation)
        forward = list(launches)
        del launches[:]
        kernels.triton_group_norm_backward(torch.empty_like(x), x, w, w, mean, rstd, r, num_groups, 1e-5, activation,
                                           residual_mode)
        backward = list(launches)
    return forward, backward


def memory_formats(rank: int) -> List[Tuple[str, torch.memory_format]]:
    """(layout name, memory format) of the layouts the kernels take at this rank."""
    formats = [("nchw", torch.contiguous_format)]
    if rank == 4:
        formats.append(("channels_last", torch.channels_last))
    elif rank == 5:
        formats.append(("channels_last", torch.channels_last_3d))
    return formats


# ----------------------------------------------------------------------------------- PTX

_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?);\s*$")
_REGISTER = re.compile(r"%\w+")
_PARAM = re.compile(r"_param_(\d+)\]")
_WIDTH = re.compile(r"^[bsuf](8|16|32|64)$")


def _operands(text: str) -> List[str]:
    """Top-level comma-separated operands (vectors in braces and addresses in brackets kept whole)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    return out + [text[start:].strip()] if text.strip() else out


@dataclass(frozen=True)
class GlobalAccess:
    """One ld.global / st.global in a kernel's PTX: its width and the pointer parameters its
    address derives from."""

    kind: str  # "load" or "store"
    bytes: int
    pointers: frozenset


def global_accesses(ptx: str, param_names: Sequence[str]) -> List[GlobalAccess]:
    """Every global load and store in ``ptx`` with its width in bytes (vector count times type
    width: ``ld.global.v4.b32`` is 16) and the pointer parameters its address derives from.

    ``param_names`` are the kernel's non-constexpr parameters in order (PTX's ``_param_<i>``);
    those starting with ``*`` in their Triton type are pointers, passed as ``name`` here only
    when they are pointers (others as None). Derivation is a flow-insensitive data flow over
    PTX's virtual registers: a register derives from a pointer parameter when any instruction
    writing it reads a register that does (``ld.param`` of that parameter starts it), iterated
    to a fixed point so that loop-carried addresses are covered. Loaded values carry nothing:
    the kernels never load an address."""
    params = dict(enumerate(param_names))
    instructions = []
    for line in ptx.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            instructions.append((m.group(1), _operands(m.group(2))))
    derives: Dict[str, set] = {}
    for op, ops in instructions:
        if op.startswith("ld.param") and len(ops) == 2:
            m = _PARAM.search(ops[1])
            name = params.get(int(m.group(1))) if m else None
            if name:
                derives.setdefault(ops[0], set()).add(name)
    flows = [(_REGISTER.findall(ops[0]), [r for o in ops[1:] for r in _REGISTER.findall(o)])
             for op, ops in instructions
             if ops and not op.startswith(("ld.", "st.", "atom", "red", "bra", "ret"))]
    changed = True
    while changed:
        changed = False
        for dests, sources in flows:
            came = set().union(*(derives.get(r, ()) for r in sources)) if sources else set()
            for d in dests:
                if not came <= derives.setdefault(d, set()):
                    derives[d] |= came
                    changed = True
    out = []
    for op, ops in instructions:
        parts = op.split(".")
        if len(parts) < 2 or parts[0] not in ("ld", "st") or parts[1] != "global":
            continue
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next(int(m.group(1)) for p in reversed(parts) for m in [_WIDTH.match(p)] if m)
        address = ops[1] if parts[0] == "ld" else ops[0]
        pointers = set().union(*(derives.get(r, ()) for r in _REGISTER.findall(address)))
        out.append(GlobalAccess("load" if parts[0] == "ld" else "store", vector * bits // 8, frozenset(pointers)))
    return out


def pointer_params(signature: Dict[str, str]) -> List[Optional[str]]:
    """A compile signature's PTX parameters in order: the name of each pointer, None for the
    other scalars (constexprs are not parameters in PTX)."""
    return [name if ty.startswith("*") else None for name, ty in signature.items() if ty != "constexpr"]


def access_widths(accesses: Sequence[GlobalAccess]) -> Dict[str, Dict[str, int]]:
    """{"load"|"store": {pointer: narrowest access in bytes}}; an access whose address derives
    from no single pointer is listed under "?"."""
    out: Dict[str, Dict[str, int]] = {"load": {}, "store": {}}
    for a in accesses:
        name = next(iter(a.pointers)) if len(a.pointers) == 1 else "?"
        table = out[a.kind]
        table[name] = min(table.get(name, a.bytes), a.bytes)
    return out


def activation_min(widths: Dict[str, int]) -> Optional[int]:
    """The narrowest access to an activation tensor (x, y, dy, dx), None if the kernel makes none."""
    found = [b for name, b in widths.items() if name in ACTIVATION_POINTERS]
    return min(found) if found else None


# ------------------------------------------------------------------------------- replay

def replay_compiles(iterations: int = 300, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    activations: Sequence[int] = (0, 1), **recording) -> dict:
    """Distinct kernel compilations of detectron2 multi-scale training of a GN Mask R-CNN
    R50-FPN (gn_det.diagnostics.bench.layer_shapes.multiscale_training_batches: short side 640-800 in steps
    of 32, aspect 1.2-1.8, padding to 32, 1-200 mask-head ROIs), every GN layer's forward and
    backward in both layouts and with each of ``activations``: the distinct specialisation
    keys of the Triton JIT (what it compiles once per process), counted without compiling.
    ``model_activations`` counts the same with each layer's own activation only (ReLU where
    the model's GN is followed by one, none before a residual add or in the FPN)."""
    from .layer_shapes import mask_rcnn_gn_layers, multiscale_training_batches

    layers = set()
    calls = 0
    for n, height, width, rois, mask_rois in multiscale_training_batches(iterations, seed):
        found = mask_rcnn_gn_layers(n, height, width, rois, mask_rois)
        calls += len(found)
        layers.update(found)
    keys: Dict[str, str] = {}
    model_keys = set()
    with recording_launches(**recording, occupancy=False) as launches:  # keys only: grids change none
        for shape, relu in sorted(layers):
            for _, fmt in memory_formats(len(shape)):
                x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)
                w = torch.empty(shape[1], device="meta")
                for act in activations:
                    del launches[:]
                    _, mean, rstd = kernels.triton_group_norm_forward(x, w, w, None, 32, 1e-5, act)
                    kernels.triton_group_norm_backward(torch.empty_like(x), x, w, w, mean, rstd, None, 32, 1e-5, act)
                    found = {launch.key: launch.kernel for launch in launches if launch.key}
                    keys.update(found)
                    if act == (1 if relu else 0):
                        model_keys.update(found)
    by_kernel: Dict[str, int] = {}
    for kernel in keys.values():
        by_kernel[kernel] = by_kernel.get(kernel, 0) + 1
    return {"compiles": len(keys), "model_activations": len(model_keys), "by_kernel": dict(sorted(by_kernel.items())),
            "iterations": iterations, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
            "layouts": ["nchw", "channels_last"], "activations": list(activations),
            "gn_layer_calls": calls, "distinct_layer_shapes": len({s for s, _ in layers})}


# ---------------------------------------------------------------------------- bytes moved

HBM_BYTES_PER_SECOND = 3.0e12  # the H100 figure the model's times are quoted at


def bytes_moved(shape: Sequence[int], element_bytes: int, num_groups: int = 32, channels_last: bool = False,
                sm_count: int = H100.sms) -> dict:
    """DRAM bytes a GN layer's forward and backward move at this shape, by the path the
    launcher takes, against the one-pass ideal (forward reads x and writes y once; backward
    reads x and dy and writes dx once). Activation tensors count at ``element_bytes``; the
    float32 side terms (partial sums per (n, split, channel), statistics per (n, group),
    gamma/beta and their gradients) are counted once per write and once per read, caches
    ignored. Returns bytes per element and totals, with the time each implies at
    ``HBM_BYTES_PER_SECOND``."""
    n, c = shape[0], shape[1]
    s = 1
    for size in shape[2:]:
        s *= size
    numel, g, f32 = n * c * s, num_groups, 4
    stats, params = 2 * n * g * f32, 2 * c * f32  # (mean, rstd) or (coef_xhat, coef_const); gamma and beta
    if kernels._group_resident_blocks(c // g, s) is not None:
        path = "one program per group"
        forward = 2 * numel * element_bytes + params + stats
        partial = 2 * n * c * f32  # per-(n, channel) sums of dz*xhat and dz, then summed over n (_param_grad_kernel)
        backward = 3 * numel * element_bytes + stats + params + partial + partial + params
    else:
        path = "split reduction"
        # The split counts of the launches on that GPU (each partial-sums kernel fills one wave).
        dtype = {2: torch.bfloat16, 4: torch.float32}[element_bytes]
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        fwd, bwd = layer_launches(shape, dtype, fmt, 1, num_groups, sm_count=sm_count)
        assert fwd[0].kernel == "_stats_partial_kernel" and bwd[0].kernel == "_backward_partial_kernel"
        n_row_blocks = n * kernels._tiles(c, s, channels_last, element_bytes)[2]  # grids: row blocks x splits
        partial_fwd = 2 * n * (fwd[0].programs // n_row_blocks) * c * f32  # (n, split, channel) partials, two of them
        partial = 2 * n * (bwd[0].programs // n_row_blocks) * c * f32
        # stats partial reads x, writes its records; apply reads the records (once from DRAM: each
        # program reads its groups', from L2 after the first), reads x, writes y and the statistics.
        forward = 3 * numel * element_bytes + partial_fwd + partial_fwd + stats + params
        # partial reads x, dy; finalize reads the partials, and its dgamma/dbeta programs read them
        # again; apply reads x, dy, writes dx.
        backward = (5 * numel * element_bytes + stats + params + partial + partial + stats + stats + stats
                    + params + partial + params)
    ideal_forward, ideal_backward = 2 * numel * element_bytes, 3 * numel * element_bytes
    out = {"path": path, "elements": numel, "element_bytes": element_bytes}
    for name, got, ideal in (("forward", forward, ideal_forward), ("backward", backward, ideal_backward)):
        out[name] = {"bytes": int(got), "bytes_per_element": got / numel, "ideal_bytes_per_element": ideal / numel,
                     "over_ideal": got / ideal, "us_at_3TBps": got / HBM_BYTES_PER_SECOND * 1e6,
                     "ideal_us_at_3TBps": ideal / HBM_BYTES_PER_SECOND * 1e6}
    return out
