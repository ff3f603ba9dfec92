"""The built-in update-rule parts: losses, activations, retention and optimiser rules.

Each part is plain tensor arithmetic written with tensor methods only, so this module imports no torch and the
spec tooling stays light. The memory core (sequential reference and chunked form) calls these functions; the
kernel generator pairs each with its Triton expression.

Conventions (docs/memory-math.md): ``err = M(k) - v``; a loss's ``grad`` is dl/d(output) per element, which is all
the inner update needs (section 2: every per-token gradient is a sum of outer products driven by this error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from titans_compose.registry.core import RuleParams

Fn = Callable[..., Any]


@dataclass(frozen=True)
class Loss:
    """A per-token associative loss: ``value(err, params)`` sums over the feature axis (last),
    ``grad(err, params)`` is its elementwise derivative with respect to the memory output."""

    value: Fn
    grad: Fn


@dataclass(frozen=True)
class Activation:
    """An elementwise activation, its derivative, and optionally a fused ``backward(g, x) = g * grad(x)`` (the dual
    form back-propagates through the activation by hand; a fused op saves memory traffic on the hot path)."""

    fn: Fn
    grad: Fn
    fused_backward: Fn | None = None

    def backward(self, g: Any, x: Any) -> Any:
        """``g * fn'(x)``."""
        if self.fused_backward is not None:
            return self.fused_backward(g, x)
        return g * self.grad(x)


@dataclass(frozen=True)
class Retention:
    """How the previous weights are kept before the update is added: ``keep(W, alpha, params)`` (paper eq. 13:
    ``(1 - alpha) * W``). ``log_keep(alpha)`` is the per-step log factor the chunked form accumulates."""

    keep: Fn
    log_keep: Fn


@dataclass(frozen=True)
class Optimizer:
    """How the surprise state accumulates gradients: ``step(S, g, eta, theta, params)`` returns the new state
    that is added to the kept weights (paper eq. 14: ``eta * S - theta * g``)."""

    step: Fn


class LpParams(RuleParams):
    p: float = Field(3.0, ge=1.0, description="exponent p >= 1 of the lp loss sum |M(k) - v|^p")


class HuberParams(RuleParams):
    delta: float = Field(1.0, gt=0.0, description="threshold between the quadratic and the linear part")


def _l2_value(err: Any, params: Any) -> Any:
    return err.square().sum(-1)


def _l2_grad(err: Any, params: Any) -> Any:
    return 2 * err


def _l1_value(err: Any, params: Any) -> Any:
    return err.abs().sum(-1)


def _l1_grad(err: Any, params: Any) -> Any:
    return err.sign()


def _lp_value(err: Any, params: LpParams) -> Any:
    return err.abs().pow(params.p).sum(-1)


def _lp_grad(err: Any, params: LpParams) -> Any:
    return params.p * err.abs().pow(params.p - 1) * err.sign()


def _huber_value(err: Any, params: HuberParams) -> Any:
    a = err.abs()
    d = params.delta
    return (0.5 * a.square()).where(a <= d, d * (a - 0.5 * d)).sum(-1)


def _huber_grad(err: Any, params: HuberParams) -> Any:
    return err.clamp(-params.delta, params.delta)


LOSSES: dict[str, tuple[Loss, type[RuleParams] | None, str]] = {
    "l2": (Loss(_l2_value, _l2_grad), None, "||M(k) - v||^2 summed over features, no 1/2 (the paper's loss)"),
    "l1": (Loss(_l1_value, _l1_grad), None, "sum |M(k) - v| (robust to outlier values)"),
    "lp": (Loss(_lp_value, _lp_grad), LpParams, "sum |M(k) - v|^p, p >= 1 (MIRAS lp attentional bias)"),
    "huber": (
        Loss(_huber_value, _huber_grad),
        HuberParams,
        "Huber: quadratic below delta, linear above (MIRAS robust attentional bias)",
    ),
}


def _silu(x: Any) -> Any:
    import torch.nn.functional as F  # deferred: registering the built-ins must not import torch

    return F.silu(x)


def _silu_grad(x: Any) -> Any:
    s = x.sigmoid()
    return s * (1 + x * (1 - s))


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu(x: Any) -> Any:
    import torch.nn.functional as F

    return F.gelu(x)


def _gelu_backward(g: Any, x: Any) -> Any:
    import torch  # aten's fused GELU backward has a double backward, so outer training stays exact

    return torch.ops.aten.gelu_backward(g, x)


def _gelu_grad(x: Any) -> Any:
    return 0.5 * (1 + (x * _SQRT_HALF).erf()) + x * _INV_SQRT_2PI * (-0.5 * x.square()).exp()


def _relu(x: Any) -> Any:
    return x.clamp_min(0)


def _relu_grad(x: Any) -> Any:
    return (x > 0).to(x.dtype)


def _identity(x: Any) -> Any:
    return x


def _identity_grad(x: Any) -> Any:
    return x.new_ones(()).expand_as(x)


ACTIVATIONS: dict[str, tuple[Activation, str]] = {
    "silu": (Activation(_silu, _silu_grad), "x * sigmoid(x) (the paper's choice)"),
    "gelu": (Activation(_gelu, _gelu_grad, _gelu_backward), "exact (erf) GELU"),
    "relu": (Activation(_relu, _relu_grad), "max(x, 0)"),
    "identity": (Activation(_identity, _identity_grad), "no activation (a deep linear memory)"),
}


def _decay_keep(w: Any, alpha: Any, params: Any) -> Any:
    return (1 - alpha) * w


def _decay_log_keep(alpha: Any) -> Any:
    return (-alpha).log1p()


def _momentum_step(s: Any, g: Any, eta: Any, theta: Any, params: Any) -> Any:
    return eta * s - theta * g


RETENTIONS: dict[str, tuple[Retention, str]] = {
    "decay": (
        Retention(_decay_keep, _decay_log_keep),
        "M_t = (1 - alpha_t) M_{t-1} + S_t: data-dependent weight decay (paper eq. 13)",
    ),
}

OPTIMIZERS: dict[str, tuple[Optimizer, str]] = {
    "momentum": (
        Optimizer(_momentum_step),
        "S_t = eta_t S_{t-1} - theta_t g_t: gradient descent with data-dependent momentum (paper eq. 14)",
    ),
}
