"""Group Normalization with a fused activation in PyTorch operations: the CPU path.

It mirrors the Triton kernels' contract (same arguments, same saved tensors: x and the
per-group statistics, the activation's input recomputed in backward).

- NCHW (and every rank without a channels_last format): ATen's native GroupNorm kernels,
  so CPU speed matches ``nn.GroupNorm``.
- channels_last / channels_last_3d: computed in that layout, with no conversion to NCHW
  (a strided transpose costs several times the op on CPU). ATen's own CPU GroupNorm
  forward on channels_last float32 input loses accuracy badly when the mean is large
  against the standard deviation (20% to 165% relative error at mean/std >= 1e3 in torch
  2.14), so the statistics are computed here: per channel an exact two-pass (mean, then
  the sum of squared deviations), merged over each group's channels with Chan's formula.
  The affine is one ``addcmul`` in the input's layout, and the backward is ATen's native
  one, fed these accurate statistics.

Half-precision input is computed in float32 (statistics and arithmetic) and cast back.

With ``valid`` (``(N, 2)`` int32: each image's valid height and width in a zero-padded batch,
``gn_det.padding``) each (n, group)'s statistics are over the image's top-left region only and
the output, dx and d(residual) are 0 elsewhere (``_masked_forward`` / ``_masked_backward``:
exact two-pass statistics over the region, in the compute dtype, either layout).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .activation import ACT_NONE, RESIDUAL_ADD, RESIDUAL_OUTPUT, activation_grad_, apply_activation
from .layout import memory_format_of


# Below this rstd (groups whose values reach ~1e18), ATen's GroupNorm backward is fed a
# rescaled group instead (torch_group_norm_backward).
_SMALLEST_RSTD_ATEN_BACKWARD_TAKES = 2.0 ** -60


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 (float64 for float64 x): the dtype of GN's statistics, and of this path's arithmetic."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channels_last_moments(x: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, m2), each ``(N, G)``: the mean and the sum of squared deviations of each group of a
    channels_last-dense x ``(N, C, *)``."""
    n, c = x.shape[:2]
    rows = x.movedim(1, -1).reshape(n, -1, c)  # (N, S, C): a view, channels innermost
    s = rows.shape[1]
    channel_mean = rows.mean(dim=1, keepdim=True)  # (N, 1, C)
    channel_m2 = torch.sub(rows, channel_mean).square_().sum(dim=1)  # (N, C), exact two-pass
    # Chan's merge of the group's channels, which all hold S values.
    channel_mean = channel_mean.view(n, num_groups, c // num_groups)
    mean = channel_mean.mean(dim=-1)
    m2 = channel_m2.view(n, num_groups, -1).sum(dim=-1)
    m2 += (channel_mean - mean.unsqueeze(-1)).square_().sum(dim=-1) * s
    return mean, m2


def _channels_last_stats(x: torch.Tensor, num_groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), each ``(N, G)``, of a channels_last-dense x ``(N, C, *)``."""
    n, c = x.shape[:2]
    mean, m2 = _channels_last_moments(x, num_groups)
    return mean, torch.rsqrt(m2 / (x.numel() // (n * num_groups)) + eps)


def _rescaled_stats(x: torch.Tensor, num_groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), each ``(N, G)``, of x ``(N, C, *)`` (NCHW or channels_last), measured on x
    divided by each group's largest magnitude, so no square overflows."""
    n, c = x.shape[:2]
    count = x.numel() // (n * num_groups)
    scale = x.abs().amax(dim=tuple(range(2, x.dim()))).view(n, num_groups, -1).amax(dim=-1)  # (N, G)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    xs = x / scale.repeat_interleave(c // num_groups, dim=1).view((n, c) + (1,) * (x.dim() - 2))
    if memory_format_of(x) is torch.contiguous_format:
        groups = xs.reshape(n, num_groups, -1)
        mean = groups.mean(dim=-1)
        m2 = (groups - mean.unsqueeze(-1)).square_().sum(dim=-1)
    else:
        mean, m2 = _channels_last_moments(xs, num_groups)
    # var = scale^2 var(xs): rstd = 1 / (scale sqrt(var(xs) + eps / scale^2)); eps / scale^2 may be 0.
    return mean * scale, torch.rsqrt(m2 / count + eps / scale.square()) / scale


def no_zero(t: torch.Tensor) -> bool:
    """Whether the CPU tensor t holds no 0 (NaN counts as not 0, as in ``t.all()``): its count of
    nonzeros read on the host, ~1.2 us against ``bool(t.all())``'s ~2.8."""
    return t.count_nonzero().item() == t.numel()


def _overflow_guarded(x: torch.Tensor, num_groups: int, eps: float, mean: torch.Tensor,
                      rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean, rstd, remeasured). Squared deviations beyond ~1.8e19 overflow float32: the sum of
    squares is inf, rstd = rsqrt(inf) = 0, and the output would be beta, finite and wrong. On
    CPU such groups are measured again, scaled (accurate; the extra passes only then); on other
    devices, where looking would synchronise with the host, their rstd is NaN: non-finite."""
    on_cpu = x.device.type == "cpu"
    if on_cpu and no_zero(rstd):  # (no zero rstd, no overflow: the usual case)
        return mean, rstd, False
    overflowed = (rstd == 0) & torch.isfinite(mean)  # rsqrt(var + eps) is 0 only for an infinite var
    if not on_cpu:
        return mean, rstd.masked_fill(overflowed, float("nan")), False
    if not bool(overflowed.any()):
        return mean, rstd, False
    scaled_mean, scaled_rstd = _rescaled_stats(x, num_groups, eps)
    return torch.where(overflowed, scaled_mean, mean), torch.where(overflowed, scaled_rstd, rstd), True


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """z = x * scale + shift per (n, channel), in x's layout (the formula of ATen's kernels:
    scale = gamma * rstd, shift = beta - mean * scale). Deterministic, so the backward's
    recomputed z is bit-identical to the forward's and ReLU's mask agrees."""
    n, c = x.shape[:2]
    g = mean.shape[1]
    scale = (rstd.unsqueeze(-1) * weight.view(g, -1)).view(n, c)
    shift = bias - (mean.unsqueeze(-1) * scale.view(n, g, -1)).view(n, c)
    per_channel = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(per_channel), x, scale.view(per_channel), out=torch.empty_like(x))


def _activation_input(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
    mean: torch.Tensor, rstd: torch.Tensor, residual: Optional[torch.Tensor],
) -> torch.Tensor:
    """z = GN(x) [+ residual] in the compute dtype, recomputed in backward by the forward's own
    kernels: bit-identical to the forward's, so ReLU's mask agrees with it."""
    n, c = x.shape[:2]
    z = None
    if memory_format_of(x) is torch.contiguous_format:
        z, _, native_rstd = torch.native_group_norm(x, weight, bias, n, c, x.numel() // (n * c), num_groups, eps)
        if x.device.type == "cpu" and not torch.equal(native_rstd, rstd):  # the forward remeasured (overflow)
            z = None
    if z is None:
        z = _affine(x, weight, bias, mean, rstd)
    return z if residual is None else z.add_(residual)


def region_mask(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` bool: position (h, w) of image n lies in its region (h < valid[n, 0] and
    w < valid[n, 1]), for x ``(N, C, H, W)``."""
    h, w = x.shape[2], x.shape[3]
    rows = torch.arange(h, device=x.device).view(1, h, 1) < valid[:, 0].view(-1, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) < valid[:, 1].view(-1, 1, 1)
    return (rows & cols).unsqueeze(1)


def masked_moments(xc: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor, num_groups: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centred, mean, var) of each group's region of xc ``(N, C, H, W)`` (``inside``: its
    ``region_mask``): centred ``(N, G, C/G * H * W)`` is xc less its group's region mean, mean and
    var ``(N, G, 1)`` (two passes: the mean, then the squared deviations); an empty region's are
    0. Standard operators only (ONNX export records them: ``functional.export_group_norm``)."""
    n, c = xc.shape[:2]
    count = (valid[:, 0] * valid[:, 1]).to(xc.dtype).mul(c // num_groups).clamp(min=1).view(n, 1, 1)
    groups = (n, num_groups, -1)
    mask, xg = inside.expand(xc.shape).reshape(groups), xc.reshape(groups)
    mean = torch.where(mask, xg, 0.0).sum(-1, keepdim=True) / count
    centred = xg - mean
    var = torch.where(mask, centred, 0.0).square().sum(-1, keepdim=True) / count
    return centred, mean, var


def _masked_stats(xc: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor, num_groups: int,
                  eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) ``(N, G)`` of each group's region (``masked_moments``); a group with an empty
    region gets mean 0, rstd 1 / sqrt(eps)."""
    _, mean, var = masked_moments(xc, inside, valid, num_groups)
    return mean.squeeze(-1), torch.rsqrt(var + eps).squeeze(-1)


def _crops(x: torch.Tensor, valid: torch.Tensor):
    """(n, (vh, vw), crop) per image: ``crop(t)`` is the image's region of t ``(N, C, H, W)`` as a
    dense ``(1, C, vh, vw)`` tensor in x's layout (a view where the region is the whole map). CPU
    only: the sizes are read on the host, at no cost there."""
    fmt = memory_format_of(x)
    h, w = x.shape[2], x.shape[3]
    for n, (vh, vw) in enumerate(valid.tolist()):
        if (vh, vw) == (h, w):
            yield n, (vh, vw), lambda t, n=n: t[n:n + 1].contiguous(memory_format=fmt)
        else:
            yield n, (vh, vw), lambda t, n=n, vh=vh, vw=vw: t[n:n + 1, :, :vh, :vw].contiguous(memory_format=fmt)


def _pasted(out: torch.Tensor, n: int, vh: int, vw: int, region: Optional[torch.Tensor]) -> None:
    """out[n] = region in its top-left (vh, vw) corner, 0 elsewhere (``region`` None: all 0)."""
    if region is None or vh == 0 or vw == 0:
        out[n].zero_()
        return
    out[n, :, :vh, :vw] = region[0]
    out[n, :, vh:].zero_()
    out[n, :, :vh, vw:].zero_()


def _masked_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
                    num_groups: int, eps: float, activation: int, valid: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.dim() != 4:
        raise ValueError(f"group_norm with valid regions takes (N, C, H, W) input; got {tuple(x.shape)}")
    if x.device.type == "cpu":  # each image's region by the unmasked path (ATen's kernels), 0 around it
        y = torch.empty_like(x)
        mean = x.new_zeros((x.shape[0], num_groups), dtype=compute_dtype(x))
        rstd = torch.full_like(mean, eps ** -0.5)  # (an empty region's: finite, its output is 0 anyway)
        for n, (vh, vw), crop in _crops(x, valid):
            region = None
            if vh and vw:
                region, mean[n:n + 1], rstd[n:n + 1] = torch_group_norm_forward(
                    crop(x), weight, bias, None if residual is None else crop(residual), num_groups, eps, activation)
            _pasted(y, n, vh, vw, region)
        return y, mean, rstd
    dtype = compute_dtype(x)
    fmt = memory_format_of(x)
    xc = x.to(dtype)
    inside = region_mask(x, valid)
    mean, rstd = _masked_stats(xc, inside, valid, num_groups, eps)
    mean, rstd, _ = _overflow_guarded_masked(xc, inside, valid, num_groups, eps, mean, rstd)
    y = _affine(xc, weight.to(dtype), bias.to(dtype), mean, rstd)
    if residual is not None:
        y += residual
    y = apply_activation(y, activation)
    y = torch.where(inside, y, y.new_zeros(()))
    return y.to(dtype=x.dtype, memory_format=fmt), mean, rstd


def _overflow_guarded_masked(xc, inside, valid, num_groups, eps, mean, rstd):
    """``_overflow_guarded`` for regions: an overflowed group is measured again on x divided by
    its largest magnitude (CPU), or gets a NaN rstd (elsewhere: no host check)."""
    overflowed = (rstd == 0) & torch.isfinite(mean)
    if xc.device.type != "cpu":
        return mean, rstd.masked_fill(overflowed, float("nan")), False
    if not bool(overflowed.any()):
        return mean, rstd, False
    n, c = xc.shape[:2]
    scale = torch.where(inside, xc.abs(), xc.new_zeros(())).amax(dim=(2, 3)).view(n, num_groups, -1).amax(dim=-1)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    xs = xc / scale.repeat_interleave(c // num_groups, dim=1).view(n, c, 1, 1)
    scaled_mean, scaled_rstd = _masked_stats(xs, inside, valid, num_groups, 0.0)
    scaled_rstd = torch.rsqrt(1 / scaled_rstd.square() + eps / scale.square()) / scale  # var = scale^2 var(xs)
    return torch.where(overflowed, scaled_mean * scale, mean), torch.where(overflowed, scaled_rstd, rstd), True


def _masked_backward(grad_y, x, weight, bias, mean, rstd, residual, num_groups, eps, activation, residual_mode,
                     valid):
    if x.device.type == "cpu":  # each image's region by the unmasked path, its gradients 0 around it
        dx = torch.empty_like(x)
        dweight = torch.zeros_like(weight)
        dbias = torch.zeros_like(weight)
        dres = None if residual is None else torch.empty_like(residual, memory_format=memory_format_of(x))
        for n, (vh, vw), crop in _crops(x, valid):
            got = (None,) * 4
            if vh and vw:
                got = torch_group_norm_backward(crop(grad_y), crop(x), weight, bias, mean[n:n + 1], rstd[n:n + 1],
                                                None if residual is None else crop(residual), num_groups, eps,
                                                activation, residual_mode)
                dweight += got[1]
                dbias += got[2]
            _pasted(dx, n, vh, vw, got[0])
            if dres is not None:
                _pasted(dres, n, vh, vw, got[3])
        return dx, dweight, dbias, dres
    n, c = x.shape[:2]
    dtype = compute_dtype(x)
    fmt = memory_format_of(x)
    xc, w = x.to(dtype), weight.to(dtype)
    inside = region_mask(x, valid)
    zeros = xc.new_zeros(())
    grad = torch.where(inside, grad_y.to(dtype), zeros)
    per_channel = (n, c, 1, 1)
    rstd_c = rstd.repeat_interleave(c // num_groups, dim=1).view(per_channel)
    xhat = (xc - mean.repeat_interleave(c // num_groups, dim=1).view(per_channel)) * rstd_c
    if activation != ACT_NONE and residual is not None and residual_mode == RESIDUAL_OUTPUT:
        grad = activation_grad_(residual.to(dtype, copy=True), grad, activation)
    elif activation != ACT_NONE:
        z = torch.addcmul(bias.to(dtype).view(1, c, 1, 1), xhat, w.view(1, c, 1, 1))
        if residual is not None:
            z += residual.to(dtype)
        grad = activation_grad_(z, grad, activation)
    grad = torch.where(inside, grad, zeros)  # (the activation's gradient of z outside: not the op's)
    dres = None if residual is None else grad.to(dtype=residual.dtype, memory_format=fmt, copy=True)
    xhat = torch.where(inside, xhat, zeros)
    dweight = (grad * xhat).sum(dim=(0, 2, 3))
    dbias = grad.sum(dim=(0, 2, 3))
    # dx = rstd * (g - mean_region(g) - xhat * mean_region(g * xhat)), g = dz * gamma
    g = grad * w.view(1, c, 1, 1)
    count = valid.to(dtype).prod(dim=1).mul_(c // num_groups).clamp_(min=1).view(n, 1)
    mean_g = g.reshape(n, num_groups, -1).sum(dim=-1) / count
    mean_gx = (g * xhat).reshape(n, num_groups, -1).sum(dim=-1) / count
    expand = lambda t: t.repeat_interleave(c // num_groups, dim=1).view(per_channel)  # noqa: E731
    dx = (g - expand(mean_g) - xhat * expand(mean_gx)) * rstd_c
    dx = torch.where(inside, dx, zeros)
    return dx.to(dtype=x.dtype, memory_format=fmt), dweight.to(weight.dtype), dbias.to(weight.dtype), dres


def _in(t: torch.Tensor, dtype: torch.dtype, fmt: Optional[torch.memory_format] = None) -> torch.Tensor:
    """t in ``dtype`` (and dense in ``fmt``): t itself when it already is (``Tensor.to`` costs
    ~1 us even then, several times a call)."""
    if t.dtype == dtype and (fmt is None or t.is_contiguous(memory_format=fmt)):
        return t
    return t.to(dtype) if fmt is None else t.to(dtype=dtype).contiguous(memory_format=fmt)


def torch_group_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor], num_groups: int,
    eps: float, activation: int, valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``triton_launch.triton_group_norm_forward``; stats are float32 (float64
    for float64 x)."""
    if valid is not None:
        return _masked_forward(x, weight, bias, residual, num_groups, eps, activation, valid)
    n, c = x.shape[:2]
    dtype = compute_dtype(x)
    fmt = memory_format_of(x)
    xc = _in(x, dtype)  # keeps x's memory format
    w, b = _in(weight, dtype), _in(bias, dtype)
    # (The native GroupNorm ops are on none of autocast's lists: no need to leave autocast.)
    if fmt is torch.contiguous_format:
        y, mean, rstd = torch.native_group_norm(xc, w, b, n, c, x.numel() // (n * c), num_groups, eps)
        mean, rstd, remeasured = _overflow_guarded(xc, num_groups, eps, mean, rstd)
        if remeasured or x.device.type != "cpu":  # (off CPU: a NaN rstd must reach y, without a host check)
            y = _affine(xc, w, b, mean, rstd) if remeasured else y.add_(
                (rstd - rstd).repeat_interleave(c // num_groups, dim=1).view((n, c) + (1,) * (x.dim() - 2)))
    else:
        mean, rstd = _channels_last_stats(xc, num_groups, eps)
        mean, rstd, _ = _overflow_guarded(xc, num_groups, eps, mean, rstd)
        y = _affine(xc, w, b, mean, rstd)
    if residual is not None:
        y += residual  # in the compute dtype, as _activation_input recomputes it
    y = apply_activation(y, activation)
    return _in(y, x.dtype, fmt), mean, rstd


def torch_group_norm_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, residual: Optional[torch.Tensor], num_groups: int, eps: float, activation: int,
    residual_mode: int = RESIDUAL_ADD, valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as ``triton_launch.triton_group_norm_backward``; ``residual`` is what the
    forward saved for the residual (the residual, or with ReLU the output)."""
    if valid is not None:
        return _masked_backward(grad_y, x, weight, bias, mean, rstd, residual, num_groups, eps, activation,
                                residual_mode, valid)
    n, c = x.shape[:2]
    hxw = x.numel() // (n * c)
    dtype = compute_dtype(x)
    fmt = memory_format_of(x)
    xc = _in(x, dtype)
    w = _in(weight, dtype)
    # ATen's backward reads dy in x's layout.
    grad = _in(grad_y, dtype, fmt)
    if activation != ACT_NONE and residual is not None and residual_mode == RESIDUAL_OUTPUT:
        grad = activation_grad_(residual.to(dtype, copy=True), grad, activation)  # ReLU: the output's sign is z's
    elif activation != ACT_NONE:
        res = None if residual is None else _in(residual, dtype)
        grad = activation_grad_(_activation_input(xc, w, _in(bias, dtype), num_groups, eps, mean, rstd, res), grad,
                                activation)
    # d(residual) is the activation's gradient itself (taken before GN's backward reads it).
    dres = None if residual is None else grad.to(dtype=residual.dtype, memory_format=fmt, copy=True)
    if x.device.type != "cpu" and fmt is not torch.contiguous_format:
        # ATen's CUDA GroupNorm backward views its inputs as (N, C, S): contiguous ones only.
        grad, xc = grad.contiguous(), xc.contiguous()
    if x.device.type == "cpu" and rstd.numel() and rstd.min().item() < _SMALLEST_RSTD_ATEN_BACKWARD_TAKES:
        # Groups of huge values (remeasured after their variance overflowed): ATen's backward
        # multiplies powers of rstd, which underflow to a finite, wrong dx. GN's gradient is
        # scale-invariant: dx(x) = rstd * dx(x * rstd) with the scaled group's rstd = 1. (On
        # CUDA such a group's forward is NaN already: no host check there.)
        per_channel = rstd.repeat_interleave(c // num_groups, dim=1).view((n, c) + (1,) * (x.dim() - 2))
        dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
            grad, xc * per_channel, mean * rstd, torch.ones_like(rstd), w, n, c, hxw, num_groups, [True, True, True])
        dx *= per_channel
    else:
        dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
            grad, xc, mean, rstd, w, n, c, hxw, num_groups, [True, True, True]
        )
    return _in(dx, x.dtype, fmt), _in(dweight, weight.dtype), _in(dbias, weight.dtype), dres


class Backend(NamedTuple):
    """A GN implementation, as ``autograd.GroupNormFunction`` and the policy call it: the
    PyTorch path (``TORCH_PATH``), or the Triton kernels (``triton_launch.TritonPlans``, which
    has the same two methods). One signature for both:

    - ``forward(x, weight, bias, residual, num_groups, eps, activation, valid=None) -> (y, mean,
      rstd)``
    - ``backward(grad_y, x, weight, bias, mean, rstd, saved, num_groups, eps, activation,
      residual_mode, valid=None) -> (dx, dweight, dbias, dresidual)``, ``saved`` being what the
      forward kept for the residual (the residual, the ReLU output, or None).

    ``valid``: None, or ``(N, 2)`` int32 on x's device, each image's valid (height, width) in a
    zero-padded 4-D batch: statistics over that region only, 0 outside it (``gn_det.padding``).
    """

    forward: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    backward: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


TORCH_PATH = Backend(torch_group_norm_forward, torch_group_norm_backward)
