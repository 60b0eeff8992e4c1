"""The policy: which implementation runs each GN call, and why. ``calls`` is the one point a
call consults (``call_for``: one lookup per decided input signature; ``group_norm``, the
public functional form); ``paths.decide`` the one place that decides; ``tuning`` (first-use
measurements) and ``routing`` (measured routes) for ATen's GroupNorm where it is faster;
``verification`` (the kernels checked against the PyTorch path at first use); ``support``
(which GPUs and tritons the kernels run on); ``switches`` (the settings, and the decided
calls); ``timing`` (the device timer). The operations themselves are ``gn_det.ops``."""
from ..ops.activation import ACTIVATIONS, activation_code
from .calls import group_norm
from .paths import dispatch_path, triton_enabled_for, triton_on_cpu
from .routing import set_routes
from .switches import backend, backend_from_environment, set_autotune, set_backend, set_verification
from .tuning import autotune_decisions, clear_decisions, decisions, set_tuning_cache, synchronize_decisions

__all__ = ["ACTIVATIONS", "activation_code", "autotune_decisions", "backend", "backend_from_environment",
           "clear_decisions", "decisions", "dispatch_path", "group_norm", "set_autotune", "set_backend", "set_routes",
           "set_tuning_cache", "set_verification", "synchronize_decisions", "triton_enabled_for", "triton_on_cpu"]
