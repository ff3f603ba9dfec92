"""The built-in update-rule parts: losses, activations, retention and optimiser rules.

Each part is plain tensor arithmetic written with tensor methods only, so this module imports no torch and the
spec tooling stays light. The memory core (sequential reference and chunked form) calls these functions; the
kernel generator pairs each with its Triton expression.

Conventions (docs/memory-math.md section 1.3): ``err = M(k) - v``; a loss's ``grad`` is dl/d(output) per element,
which is all the inner update needs (section 2: every per-token gradient is a sum of outer products driven by this
error).

Triton expressions (optional fields ``triton_*``): single Python/Triton expressions that the kernel generator
(:mod:`titans_compose.ops.memory.codegen.emit`) inlines as small ``@triton.jit`` helpers. An activation's
expressions are in the variable ``x`` (a float32 block); a loss's are in ``e`` (the error ``M(k) - v``) and may name
the loss's parameters as ``str.format`` fields (``{p}``, ``{delta}``), substituted as float constants from the
kernel key.
Available names: ``tl`` (triton.language), core builtins only (tl.exp, tl.log, tl.where, tl.abs, tl.maximum,
tl.math.erf, ...; not the ``@triton.jit`` helpers of triton.language.standard such as tl.sigmoid, which cannot run
under the CPU interpreter in every process). A rule without them runs on the PyTorch paths only. Registering a rule
evaluates its expressions against its torch forms on a grid (:mod:`titans_compose.registry.expressions`) and refuses
a rule whose two forms disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from titans_compose.registry.core import RuleParams
from titans_compose.registry.slopes import elementwise_slope  # importable from here as before

Fn = Callable[..., Any]


@dataclass(frozen=True)
class Loss:
    """A per-token associative loss: ``value(err, params)`` sums over the feature axis (last),
    ``grad(err, params)`` is its elementwise derivative with respect to the memory output.

    ``grad2(err, params)``, optional: the elementwise derivative of ``grad`` (the loss's diagonal Hessian; a
    tensor or anything that broadcasts against ``err``). The chunked path's hand-written backward uses it for the
    second-order term through the loss; without it, that term comes from autograd on ``grad``, which is slower.

    ``triton_grad`` / ``triton_grad2``: Triton expressions in ``e`` for ``grad`` and its derivative (the generated
    backward needs the second derivative of the loss); parameters as ``{name}`` format fields."""

    value: Fn
    grad: Fn
    triton_grad: str | None = None
    triton_grad2: str | None = None
    grad2: Fn | None = None


@dataclass(frozen=True)
class Activation:
    """An elementwise activation, its derivative, and optionally a fused ``backward(g, x) = g * grad(x)`` (the dual
    form back-propagates through the activation by hand; a fused op saves memory traffic on the hot path), its
    second derivative ``grad2(x)`` (the hand-written backward's second-order term; without it autograd
    differentiates ``backward``, which is slower), and its Triton expressions (module docstring)."""

    fn: Fn
    grad: Fn
    fused_backward: Fn | None = None
    #: Triton expressions in ``x`` for ``fn``, its derivative and its second derivative (all three or none).
    triton_fn: str | None = None
    triton_grad: str | None = None
    triton_grad2: str | None = None
    grad2: Fn | None = None

    def backward(self, g: Any, x: Any) -> Any:
        """``g * fn'(x)``."""
        if self.fused_backward is not None:
            return self.fused_backward(g, x)
        return g * self.grad(x)

    def derivative(self, x: Any) -> Any:
        """``fn'(x)`` through the fused backward where there is one (one pass instead of the formula's several)."""
        if self.fused_backward is not None:
            return self.fused_backward(x.new_ones(x.shape), x)
        return self.grad(x)

    def curvature(self, m: Any, x: Any) -> Any:
        """``m * fn''(x)``: the derivative of ``backward(m, x)`` in ``x``, from ``grad2`` or else by autograd on
        ``backward`` (0 where that has no graph, as for a piecewise-linear activation)."""
        if self.grad2 is not None:
            return m * self.grad2(x)
        import torch  # deferred: registering the built-ins must not import torch

        with torch.enable_grad():
            z = x.detach().requires_grad_()
            return elementwise_slope(self.backward(m, z), z)


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


def _l2_grad2(err: Any, params: Any) -> Any:
    return err.new_full((), 2.0)


def _l1_grad2(err: Any, params: Any) -> Any:
    return err.new_zeros(())


def _lp_grad2(err: Any, params: LpParams) -> Any:
    # p (p - 1) |e|^(p - 2), and 0 at e = 0 like the derivative of grad's sign factor there
    curve = params.p * (params.p - 1) * err.abs().pow(params.p - 2)
    return curve.where(err != 0, 0.0)


def _huber_grad2(err: Any, params: HuberParams) -> Any:
    return (err.abs() <= params.delta).to(err.dtype)


_TL_SIGN = "tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0))"
_TL_LOG_ABS = "tl.log(tl.where(e == 0, 1.0, tl.abs(e)))"  # log|e|, finite at e = 0

LOSSES: dict[str, tuple[Loss, type[RuleParams] | None, str]] = {
    "l2": (
        Loss(_l2_value, _l2_grad, triton_grad="2.0 * e", triton_grad2="2.0 + 0.0 * e", grad2=_l2_grad2),
        None,
        "||M(k) - v||^2 summed over features, no 1/2 (the paper's loss)",
    ),
    "l1": (
        Loss(_l1_value, _l1_grad, triton_grad=_TL_SIGN, triton_grad2="0.0 * e", grad2=_l1_grad2),
        None,
        "sum |M(k) - v| (robust to outlier values)",
    ),
    "lp": (
        Loss(
            _lp_value,
            _lp_grad,
            # |e|^(p-1) as exp((p-1) log|e|); at e = 0 the sign makes it 0 like torch's p * 0^(p-1) * sign(0)
            triton_grad=f"{{p}} * tl.exp(({{p}} - 1.0) * {_TL_LOG_ABS}) * {_TL_SIGN}",
            triton_grad2=f"tl.where(e == 0, 0.0, {{p}} * ({{p}} - 1.0) * tl.exp(({{p}} - 2.0) * {_TL_LOG_ABS}))",
            grad2=_lp_grad2,
        ),
        LpParams,
        "sum |M(k) - v|^p, p >= 1 (MIRAS lp attentional bias)",
    ),
    "huber": (
        Loss(
            _huber_value,
            _huber_grad,
            triton_grad="tl.minimum(tl.maximum(e, -{delta}), {delta})",
            triton_grad2="tl.where(tl.abs(e) <= {delta}, 1.0, 0.0)",
            grad2=_huber_grad2,
        ),
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


def _silu_grad2(x: Any) -> Any:
    s = x.sigmoid()
    return s * (1 - s) * (2 + x * (1 - 2 * s))


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


def _gelu_grad2(x: Any) -> Any:
    square = x.square()
    return (2 - square) * (-0.5 * square).exp() * _INV_SQRT_2PI


def _relu(x: Any) -> Any:
    return x.clamp_min(0)


def _relu_grad(x: Any) -> Any:
    return (x > 0).to(x.dtype)


def _zero_grad2(x: Any) -> Any:
    return x.new_zeros(()).expand_as(x)


def _identity(x: Any) -> Any:
    return x


def _identity_grad(x: Any) -> Any:
    return x.new_ones(()).expand_as(x)


_TL_SIGMOID = "(1.0 / (1.0 + tl.exp(-x)))"
_TL_GAUSS = f"{_INV_SQRT_2PI!r} * tl.exp(-0.5 * x * x)"  # the standard normal density

ACTIVATIONS: dict[str, tuple[Activation, str]] = {
    "silu": (
        Activation(
            _silu,
            _silu_grad,
            triton_fn=f"x * {_TL_SIGMOID}",
            triton_grad=f"{_TL_SIGMOID} * (1.0 + x * (1.0 - {_TL_SIGMOID}))",
            triton_grad2=f"{_TL_SIGMOID} * (1.0 - {_TL_SIGMOID}) * (2.0 + x * (1.0 - 2.0 * {_TL_SIGMOID}))",
            grad2=_silu_grad2,
        ),
        "x * sigmoid(x) (the paper's choice)",
    ),
    "gelu": (
        Activation(
            _gelu,
            _gelu_grad,
            _gelu_backward,
            triton_fn=f"0.5 * x * (1.0 + tl.math.erf(x * {_SQRT_HALF!r}))",
            triton_grad=f"0.5 * (1.0 + tl.math.erf(x * {_SQRT_HALF!r})) + x * {_TL_GAUSS}",
            triton_grad2=f"(2.0 - x * x) * {_TL_GAUSS}",
            grad2=_gelu_grad2,
        ),
        "exact (erf) GELU",
    ),
    "relu": (
        Activation(
            _relu,
            _relu_grad,
            triton_fn="tl.maximum(x, 0.0)",
            triton_grad="tl.where(x > 0, 1.0, 0.0)",
            triton_grad2="0.0 * x",
            grad2=_zero_grad2,
        ),
        "max(x, 0)",
    ),
    "identity": (
        Activation(
            _identity,
            _identity_grad,
            triton_fn="x",
            triton_grad="1.0 + 0.0 * x",
            triton_grad2="0.0 * x",
            grad2=_zero_grad2,
        ),
        "no activation (a deep linear memory)",
    ),
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
