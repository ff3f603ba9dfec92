"""A single-file titans_compose plug-in: the log-cosh associative loss.

    titans-compose --plugin examples/plugins/log_cosh.py validate spec.yaml --set update.loss=log_cosh

log(cosh(e)) per feature, summed: e^2 / 2 near zero and |e| - log 2 far from it, with the bounded gradient
tanh(e). Written as |e| + softplus(-2|e|) - log 2, which stays finite for large errors.
"""

from __future__ import annotations

import math
from typing import Any

from titans_compose.registry.rules import Loss


def log_cosh_value(err: Any, params: Any) -> Any:
    import torch.nn.functional as F

    a = err.abs()
    return (a + F.softplus(-2 * a) - math.log(2.0)).sum(-1)


def log_cosh_grad(err: Any, params: Any) -> Any:
    return err.tanh()


def register(registry: Any) -> None:
    registry.register(
        "loss",
        "log_cosh",
        Loss(value=log_cosh_value, grad=log_cosh_grad),
        description="sum log(cosh(M(k) - v)): quadratic near 0, linear beyond, gradient tanh",
    )
