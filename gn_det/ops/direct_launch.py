"""Kernel launches at the launcher's cost: ``KernelLaunch``, one launch site of a plan.

Triton's public launch (``kernel[grid](*args)``) binds the arguments, specialises each one,
hashes the key and looks the compiled kernel up before it calls the compiled kernel's launcher:
about 6-12 us of host time per launch on a 2-core CPU, against about 1 us for the launcher. A
plan's launches repeat with the same kernel, grid, constexprs and specialisation (the call's
signature fixes them: ``gn_det.policy.calls.call_key``), so that lookup has one answer, and a
site can call the launcher itself.

What keeps it the public launch's equal:
- A site's first launch goes through the public path with the compiled kernel's launcher
  wrapped, recording the call that path makes. The site builds the same call from its own
  arguments (the kernel's signature, defaults applied) and compares the two, value by value
  (tensors by identity). Only an exact match, with no launch hooks, turns the direct call on;
  anything else (a Triton whose launcher takes other arguments: versions this does not fit)
  keeps the public path for the site. Two conventions are known (every parameter, triton >= 3.3;
  the non-constexpr ones, 3.2); Triton 3.2-3.9 are supported either way.
- Each direct call checks what Triton specialises on and a caller could change: every tensor
  argument's dtype and, where it was 16-byte aligned at the record, its alignment; every
  integer's value; the arguments that were None. A call that differs goes through the public
  path, which finds (or compiles) the kernel for it.
- Launch hooks (a profiler's ``triton.knobs.runtime.launch_enter_hook``) or a kernel's
  ``pre_run_hooks`` present at a call send it through the public path, which calls them;
  without any, the direct call passes the launcher no hooks and no launch metadata (which only
  hooks read).
- Under the interpreter (``TRITON_INTERPRET=1``), whose kernels are not JIT functions, every
  launch is public.

The per-call keyword argument is ``VALID`` (the masked kernels' image regions); the other
keyword arguments (constexprs, launch options) are the site's own.
"""
from __future__ import annotations

import functools
import inspect
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction

__all__ = ["KernelLaunch", "enabled", "sites"]

enabled = True
"""Whether sites recorded from now on may launch directly (tests turn it off to compare)."""

# The launcher's leading arguments before the kernel's own: grid x, y, z, stream, function,
# packed metadata, launch metadata, enter hook, exit hook (Triton's JITFunction.run).
_HEAD = 9

_SITES: "weakref.WeakSet[KernelLaunch]" = weakref.WeakSet()


def sites() -> List["KernelLaunch"]:
    """The live launch sites (for tools that time a call without its launches)."""
    return list(_SITES)


def _active(hook) -> bool:
    """Whether a launch hook would do anything: set, and (Triton >= 3.5's ``HookChain``, always
    set) holding a function."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> Callable[[], bool]:
    """A test of whether launch hooks are active, where this Triton keeps them."""
    try:
        from triton import knobs

        runtime = knobs.runtime
        runtime.launch_enter_hook  # noqa: B018 (older knobs have no such attribute)
        return lambda: _active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook)
    except (ImportError, AttributeError):  # older Triton: class attributes of CompiledKernel
        from triton.compiler.compiler import CompiledKernel

        return lambda: (_active(getattr(CompiledKernel, "launch_enter_hook", None))
                        or _active(getattr(CompiledKernel, "launch_exit_hook", None)))


hooks_set = _hooks_set()


class KernelLaunch:
    """One launch site of a plan: ``kernel`` over ``grid`` with ``options`` (its constexprs and
    launch options) fixed; ``site.run(*args, VALID=None)`` launches it (module docstring).

    Args:
        kernel: a ``@triton.jit`` function (or, under the interpreter, its stand-in).
        grid: the programs, a tuple of 1-3 ints.
        options: keyword arguments of every launch (constexprs, ``num_warps``, ...).
    """

    __slots__ = ("kernel", "grid", "options", "run", "direct", "__weakref__")

    def __init__(self, kernel, grid: Tuple[int, ...], options: Dict[str, Any]) -> None:
        self.kernel, self.grid, self.options = kernel, tuple(grid), options
        self.direct: Optional[bool] = None  # None: not recorded yet; then whether the site launches directly
        self.run: Callable[..., Any] = self._first
        _SITES.add(self)

    def _kwargs(self, VALID) -> Dict[str, Any]:
        """A launch's keyword arguments: the site's options, and VALID where given."""
        return self.options if VALID is None else dict(self.options, VALID=VALID)

    def public(self, *args, VALID=None):
        """The launch through Triton's public path."""
        return self.kernel[self.grid](*args, **self._kwargs(VALID))

    def _first(self, *args, VALID=None):
        if hooks_set():  # (a profiler's hooks: the public path calls them; the record waits)
            return self.public(*args, VALID=VALID)
        self.direct = False
        # Not direct: ``kernel[grid]`` with the options bound (a partial adds no Python frame;
        # callers pass VALID exactly to the kernels that take it).
        self.run = functools.partial(self.kernel[self.grid], **self.options)
        if not (enabled and isinstance(self.kernel, JITFunction)):
            return self.public(*args, VALID=VALID)
        kwargs = self._kwargs(VALID)
        compiled = self.kernel.warmup(*args, grid=self.grid, **kwargs)  # (compiles or finds; no launch)
        if compiled is None:  # (a tool that stands in for Triton's launches: nothing to record)
            return self.public(*args, VALID=VALID)
        record = _recorded(compiled, lambda: self.public(*args, VALID=VALID))
        direct = _direct_call(self, compiled, record, args, kwargs, VALID is not None)
        if direct is not None:
            self.run, self.direct = direct, True
        return None

    def __repr__(self) -> str:
        name = getattr(getattr(self.kernel, "fn", None), "__name__", type(self.kernel).__name__)
        return f"KernelLaunch({name}, grid={self.grid}, direct={self.direct})"


def _recorded(compiled, launch: Callable[[], Any]) -> Optional[tuple]:
    """The arguments the public path passes the compiled kernel's launcher during ``launch()``
    (which launches once), or None if it passed none (another compiled kernel served it)."""
    attribute = "_run" if isinstance(getattr(type(compiled), "run", None), property) else "run"
    launcher = compiled.run  # (loads the binary)
    record: List[tuple] = []
    me = threading.get_ident()

    def recording(*args):
        if not record and threading.get_ident() == me:
            record.append(args)
        return launcher(*args)

    setattr(compiled, attribute, recording)
    try:
        launch()
    finally:
        setattr(compiled, attribute, launcher)
    return record[0] if record else None


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _direct_call(site: KernelLaunch, compiled, record: Optional[tuple], args: Sequence[Any], kwargs: Dict[str, Any],
                 valid_given: bool) -> Optional[Callable[..., Any]]:
    """The site's direct launch, if its own binding of ``args`` rebuilds ``record`` exactly."""
    if record is None or len(record) < _HEAD:
        return None
    signature = inspect.signature(site.kernel.fn)
    try:
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
    except TypeError:
        return None
    bound.apply_defaults()
    grid = site.grid + (1,) * (3 - len(site.grid))
    device = driver.active.get_current_device()
    head = record[:_HEAD]
    if not (tuple(head[:3]) == grid and head[3] == driver.active.get_current_stream(device)
            and head[4] == compiled.function and head[5] == compiled.packed_metadata
            and not _active(head[7]) and not _active(head[8])):
        return None
    # The kernel's arguments as the launcher takes them: every parameter (triton >= 3.3), or
    # those that are not constexprs (3.2); whichever rebuilds the record exactly.
    constexpr = {p.name for p in getattr(site.kernel, "params", ()) if getattr(p, "is_constexpr", False)}
    for names in (all_names := list(signature.parameters), [n for n in all_names if n not in constexpr]):
        values = [bound.arguments[name] for name in names]
        if len(record) == _HEAD + len(values) and all(_same(r, v) for r, v in zip(record[_HEAD:], values)):
            break
    else:
        return None
    # Generated, as Triton generates its own binder: one Python call, checks, the launcher.
    namespace: Dict[str, Any] = {"launcher": compiled.run, "compiled": compiled, "function": compiled.function,
                                 "packed": compiled.packed_metadata, "hooks_set": hooks_set, "public": site.public,
                                 "get_device": driver.active.get_current_device,
                                 "get_stream": driver.active.get_current_stream,
                                 # (functions a tool asked the kernel to call before each launch: the public path runs them)
                                 "pre_run_hooks": getattr(site.kernel, "pre_run_hooks", ())}
    params = [f"a{i}" for i in range(len(args))]
    checks = ["hooks_set()", "pre_run_hooks"]
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            namespace[f"dtype{i}"] = arg.dtype
            checks.append(f"a{i}.dtype is not dtype{i}")
            if arg.data_ptr() % 16 == 0:
                checks.append(f"a{i}.data_ptr() & 15")
        elif arg is None:
            checks.append(f"a{i} is not None")
        elif isinstance(arg, bool):
            checks.append(f"a{i} is not {arg!r}")
        elif isinstance(arg, int):
            checks.append(f"a{i} != {arg!r}")
        elif not isinstance(arg, float):  # (floats are not specialised on)
            return None
    if valid_given:
        valid = kwargs["VALID"]
        if not isinstance(valid, torch.Tensor):
            return None
        namespace["dtype_valid"] = valid.dtype
        checks.append("VALID is None or VALID.dtype is not dtype_valid")
        if valid.data_ptr() % 16 == 0:
            checks.append("VALID.data_ptr() & 15")
    else:
        checks.append("VALID is not None")
    positional = {name: i for i, name in enumerate(all_names[:len(args)])}
    passed = []
    for j, name in enumerate(names):
        if name in positional:
            passed.append(f"a{positional[name]}")
        elif name == "VALID" and valid_given:
            passed.append("VALID")
        else:
            namespace[f"c{j}"] = values[j]
            passed.append(f"c{j}")
    kernel_name = getattr(site.kernel.fn, "__name__", "kernel")
    to_public = f"return public({', '.join(params + ['VALID=VALID'])})"
    source = (f"def direct_{kernel_name}({', '.join(params + ['VALID=None'])}):\n"
              f"    try:\n"
              f"        if {' or '.join(checks)}:\n"
              f"            {to_public}\n"
              f"    except AttributeError:  # not a tensor where one was\n"
              f"        {to_public}\n"
              f"    return launcher({grid[0]}, {grid[1]}, {grid[2]}, get_stream(get_device()), function, packed, "
              f"None, None, None, {', '.join(passed)})\n")
    exec(compile(source, f"<gn_det direct launch of {kernel_name}>", "exec"), namespace)
    return namespace[f"direct_{kernel_name}"]
