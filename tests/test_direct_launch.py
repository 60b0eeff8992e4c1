"""Direct kernel launches (gn_det.ops.direct_launch), on a stand-in GPU (no GPU needed: Triton
compiles for sm_90 offline and its launcher is a no-op; gn_det.diagnostics.bench.host): a direct
launch hands the launcher exactly what Triton's public path hands it; a call Triton would
specialise differently, active launch hooks or a launcher convention that does not fit take the
public path; a repeat GN call launches nothing through the public path."""
import functools

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.jit import JITFunction

import gn_det
from gn_det.diagnostics.bench.host import stand_in_gpu
from gn_det.ops import direct_launch, triton_kernels
from gn_det.ops.activation import ACT_RELU, RESIDUAL_ADD
from gn_det.ops.direct_launch import KernelLaunch, _direct_call, _recorded, _same
from gn_det.ops.triton_launch import TritonPlans

# (shape, memory format, groups, residual, masked): one case per kernel set a model reaches
CASES = {
    "flat tiles": ((8, 64, 7, 7), torch.contiguous_format, 32, False, False),
    "one program per group": ((4, 64, 14, 14), torch.contiguous_format, 32, False, False),
    "split reduction NCHW, block end": ((2, 256, 32, 32), torch.contiguous_format, 32, True, False),
    "split reduction channels_last": ((2, 256, 32, 32), torch.channels_last, 32, False, False),
    "split reduction, masked": ((2, 256, 32, 32), torch.contiguous_format, 32, False, True),
    "one program per group, masked": ((4, 64, 14, 14), torch.contiguous_format, 32, False, True),
}


@pytest.fixture(scope="module")
def stand_in():
    with stand_in_gpu():
        yield


def _sites_with_arguments(plans_call):
    """Run ``plans_call`` twice (the first launch of each site records it, the second is direct),
    then once more catching each site's arguments: {site: (args, VALID)}."""
    plans_call()
    plans_call()
    seen = {}
    originals = {}
    for site in direct_launch.sites():
        if site.direct:
            originals[site] = site.run

            def spy(*args, VALID=None, _site=site, _run=site.run):
                seen[_site] = (args, VALID)
                return _run(*args, VALID=VALID)
            site.run = spy
    try:
        plans_call()
    finally:
        for site, run in originals.items():
            site.run = run
    return seen


def _launcher_arguments(site, args, valid):
    """(what the public path passes the launcher, what the direct call passes it) for one launch."""
    kwargs = site.options if valid is None else dict(site.options, VALID=valid)
    compiled = site.kernel.warmup(*args, grid=site.grid, **kwargs)
    public = _recorded(compiled, lambda: site.public(*args, VALID=valid))
    namespace = site.run.__globals__
    launcher, got = namespace["launcher"], []
    namespace["launcher"] = lambda *a: got.append(a)
    try:
        site.run(*args, VALID=valid)
    finally:
        namespace["launcher"] = launcher
    return public, got[0]


@pytest.mark.parametrize("case", list(CASES))
def test_a_direct_launch_hands_the_launcher_what_the_public_path_does(stand_in, case):
    shape, fmt, groups, with_residual, masked = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(shape).to(memory_format=fmt)
    c = shape[1]
    weight, bias = torch.randn(c), torch.randn(c)
    residual = torch.randn(shape).to(memory_format=fmt) if with_residual else None
    valid = torch.tensor([[shape[2] - 3, shape[3]], [shape[2], shape[3] - 5]] * (shape[0] // 2),
                         dtype=torch.int32) if masked else None
    plans = TritonPlans()

    def forward_and_backward():
        y, mean, rstd = plans.forward(x, weight, bias, residual, groups, 1e-5, ACT_RELU, valid)
        plans.backward(torch.ones_like(y), x, weight, bias, mean, rstd, residual, groups, 1e-5, ACT_RELU,
                       RESIDUAL_ADD, valid)

    seen = _sites_with_arguments(forward_and_backward)
    mine = [site for plan in (plans.masked_forward_plan if masked else plans.forward_plan,
                              *plans.backward_plans.values()) for site in plan.launches]
    assert mine and all(site in seen for site in mine), [repr(s) for s in mine if s not in seen]
    for site in mine:
        args, v = seen[site]
        public, direct = _launcher_arguments(site, args, v)
        assert direct[:6] == public[:6], site  # grid, stream, function, packed metadata
        assert direct[6:9] == (None, None, None)  # no hooks active: no metadata, no hooks
        assert len(direct) == len(public) and all(_same(a, b) for a, b in zip(direct[9:], public[9:])), site


def _partial_sums():
    """A split-reduction plan's first launch site (its partial sums) and that launch's arguments."""
    x = torch.randn(2, 256, 32, 32)
    plans = TritonPlans()
    plans.forward(x, torch.ones(256), torch.zeros(256), None, 32, 1e-5, ACT_RELU)
    plan = plans.forward_plan
    part = torch.empty(2, plan.splits, 256)
    site = plan.launches[0]
    assert site.kernel is triton_kernels._stats_partial_kernel
    return site, (x, part, torch.empty_like(part), 256, 1024, plan.split_tiles, plan.splits, plan.n_cblocks)


def _direct_site():
    """A recorded (direct) partial-sums site of the split reduction, and its arguments."""
    site, args = _partial_sums()
    site = KernelLaunch(site.kernel, site.grid, site.options)
    site.run(*args)
    assert site.direct
    return site, args


def _calls_to(site, name, through=True):
    """Count the calls the site's direct launch makes to ``name`` (its "public" path or its
    "launcher"), passing them on if ``through``; returns (calls, restore)."""
    namespace = site.run.__globals__
    original, calls = namespace[name], []

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs) if through else None
    namespace[name] = counting
    return calls, lambda: namespace.__setitem__(name, original)


@pytest.mark.parametrize("change", ["misaligned tensor", "dtype", "integer", "None", "VALID given"])
def test_a_call_triton_would_specialise_otherwise_takes_the_public_path(stand_in, change):
    site, args = _direct_site()
    changed, valid = list(args), None
    if change == "misaligned tensor":
        changed[1] = torch.empty(args[1].numel() + 1)[1:].view(args[1].shape)  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        changed[0] = args[0].to(torch.float16)
    elif change == "integer":
        changed[4] = 1000  # S: a multiple of 16 at the record, not now
    elif change == "None":
        changed[1] = None
    else:
        valid = torch.zeros(2, 2, dtype=torch.int32)  # regions for a site recorded without
    publics, restore_public = _calls_to(site, "public", through=False)
    launches, restore_launcher = _calls_to(site, "launcher", through=False)
    try:
        site.run(*args)
        assert (len(publics), len(launches)) == (0, 1)  # the recorded kind of call: direct
        site.run(*changed, VALID=valid)
        assert (len(publics), len(launches)) == (1, 1)  # this one: the public path
    finally:
        restore_public(), restore_launcher()


def _set_enter_hook(hook):
    """Set (or, with None, clear) a launch enter hook where this Triton keeps it; returns the
    previous setting's restorer."""
    try:
        from triton import knobs

        chain = knobs.runtime.launch_enter_hook
    except (ImportError, AttributeError):  # triton < 3.4: a class attribute of CompiledKernel
        from triton.compiler.compiler import CompiledKernel

        previous = CompiledKernel.launch_enter_hook
        CompiledKernel.launch_enter_hook = hook
        return lambda: setattr(CompiledKernel, "launch_enter_hook", previous)
    if hasattr(chain, "add"):  # a chain of hooks (triton >= 3.5)
        chain.add(hook)
        return lambda: chain.remove(hook)
    knobs.runtime.launch_enter_hook = hook
    return lambda: setattr(knobs.runtime, "launch_enter_hook", chain)


def test_active_launch_hooks_take_the_public_path(stand_in):
    site, args = _direct_site()
    publics, restore = _calls_to(site, "public")
    unset = _set_enter_hook(lambda metadata: None)
    try:
        site.run(*args)
    finally:
        unset()
        restore()
    # the public path ran it (whose launcher calls the hooks: the stand-in's launcher is a no-op)
    assert len(publics) == 1
    calls, restore = _calls_to(site, "public")
    try:
        site.run(*args)
    finally:
        restore()
    assert not calls  # the hook gone: direct again


def test_a_kernels_pre_run_hooks_take_the_public_path(stand_in):
    site, args = _direct_site()
    calls, restore = _calls_to(site, "public", through=False)
    seen = []
    site.kernel.pre_run_hooks.append(lambda *a, **k: seen.append(1))
    try:
        site.run(*args)
    finally:
        site.kernel.pre_run_hooks.pop()
        restore()
    assert len(calls) == 1  # the public path, which runs the hooks


def test_a_launcher_convention_that_does_not_fit_keeps_the_public_path(stand_in):
    site, args = _partial_sums()
    compiled = site.kernel.warmup(*args, grid=site.grid, **site.options)
    record = _recorded(compiled, lambda: site.public(*args))
    site = KernelLaunch(site.kernel, site.grid, site.options)
    assert _direct_call(site, compiled, record, args, site.options, False) is not None  # this Triton's: fits
    # The two known conventions (every parameter: triton >= 3.3; the non-constexpr ones: 3.2) fit,
    # whichever this Triton has; a launcher taking anything else does not.
    constexprs = {p.name for p in site.kernel.params if p.is_constexpr}
    names = [p.name for p in site.kernel.params]
    every = record if len(record) == 9 + len(names) else None
    if every is not None:
        others = record[:9] + tuple(a for a, name in zip(record[9:], names) if name not in constexprs)
        assert _direct_call(site, compiled, others, args, site.options, False) is not None
    assert constexprs and len(record) in (9 + len(names), 9 + len(names) - len(constexprs))
    assert _direct_call(site, compiled, record + (0,), args, site.options, False) is None  # one more argument
    assert _direct_call(site, compiled, record[:-1], args, site.options, False) is None  # one fewer
    swapped = record[:9] + (record[10], record[9]) + record[11:]  # two tensors in each other's place
    assert _direct_call(site, compiled, swapped, args, site.options, False) is None
    # an active hook, another grid, no record
    hooked = record[:7] + ((lambda metadata: None),) + record[8:]
    assert _direct_call(site, compiled, hooked, args, site.options, False) is None
    assert _direct_call(site, compiled, (16,) + record[1:], args, site.options, False) is None
    assert _direct_call(site, compiled, None, args, site.options, False) is None
    direct_launch.enabled = False
    try:
        off = KernelLaunch(site.kernel, site.grid, site.options)
        off.run(*args)
        assert off.direct is False and isinstance(off.run, functools.partial)  # kernel[grid] and its options
    finally:
        direct_launch.enabled = True


def test_a_repeat_call_launches_nothing_through_the_public_path(stand_in):
    layer = gn_det.GroupNorm(32, 64, activation="relu")
    for shape in ((2, 64, 32, 32), (8, 64, 7, 7)):
        x = torch.randn(shape, requires_grad=True)
        for _ in range(2):
            torch.autograd.grad(layer(x).sum(), [x] + list(layer.parameters()))
            with torch.no_grad():
                layer(x)
        kernels = [getattr(triton_kernels, name) for name in dir(triton_kernels) if name.endswith("_kernel")]
        kernels = [k for k in kernels if isinstance(k, JITFunction)]
        counted = []
        for kernel in kernels:
            kernel.run = lambda *a, _name=kernel.fn.__name__, _counted=counted, **k: _counted.append(_name)
        try:
            torch.autograd.grad(layer(x).sum(), [x] + list(layer.parameters()))
            with torch.no_grad():
                layer(x)
        finally:
            for kernel in kernels:
                del kernel.run
        assert counted == [], counted
