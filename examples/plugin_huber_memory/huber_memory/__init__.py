"""A titans_compose plug-in package: a robust associative loss and a retention rule for the memory's inner update.

- loss ``pseudo_huber`` (parameter ``delta``): delta^2 (sqrt(1 + (e/delta)^2) - 1) per feature, summed. Quadratic
  (e^2 / 2) for small errors and linear (delta |e|) for large ones like the Huber loss, but smooth everywhere, so
  the memory's gradient is continuous in its error: e / sqrt(1 + (e/delta)^2).
- retention ``proximal_decay``: the implicit (proximal) form of weight decay, M_t = M_{t-1} / (1 + alpha_t) + S_t.
  Close to the paper's (1 - alpha_t) for small alpha, but it keeps at least half of the memory per token even when
  the forget gate saturates. Its per-token log factor, -log(1 + alpha), is what the chunked form accumulates.

Installed, it is found through the ``titans_compose.plugins`` entry point; then ``update.loss: {name: pseudo_huber,
delta: 0.5}`` and ``update.forget.rule: proximal_decay`` validate in specs, and both appear in ``titans-compose ls``
and the schema. ``titans_compose.testing.check_rule`` checks them against the sequential reference. The loss also
gives its gradient and that gradient's derivative as Triton expressions, so memories using it run on the generated
kernels on a GPU.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from titans_compose import RuleParams
from titans_compose.registry.rules import Loss, Retention


class PseudoHuberParams(RuleParams):
    delta: float = Field(1.0, gt=0.0, description="scale where the loss turns from quadratic to linear")


def pseudo_huber_value(err: Any, params: PseudoHuberParams) -> Any:
    d = params.delta
    return (d * d * ((1 + (err / d).square()).sqrt() - 1)).sum(-1)


def pseudo_huber_grad(err: Any, params: PseudoHuberParams) -> Any:
    return err * (1 + (err / params.delta).square()).rsqrt()


def proximal_keep(w: Any, alpha: Any, params: Any) -> Any:
    return w / (1 + alpha)


def proximal_log_keep(alpha: Any) -> Any:
    return -alpha.log1p()


def register(registry: Any) -> None:
    """Add the loss and the retention rule (called once by titans_compose when the plug-in loads)."""
    registry.register(
        "loss",
        "pseudo_huber",
        Loss(
            value=pseudo_huber_value,
            grad=pseudo_huber_grad,
            # the same gradient and its derivative for the generated Triton kernels ({delta} is substituted)
            triton_grad="e / tl.sqrt(1.0 + (e / {delta}) * (e / {delta}))",
            triton_grad2="1.0 / ((1.0 + (e / {delta}) * (e / {delta})) * tl.sqrt(1.0 + (e / {delta}) * (e / {delta})))",
        ),
        params=PseudoHuberParams,
        description="delta^2 (sqrt(1 + (e/delta)^2) - 1): smooth Huber, quadratic near 0 and linear beyond delta",
    )
    registry.register(
        "retention",
        "proximal_decay",
        Retention(keep=proximal_keep, log_keep=proximal_log_keep),
        description="M_t = M_{t-1} / (1 + alpha_t) + S_t: implicit weight decay, keeps at least half per token",
    )
