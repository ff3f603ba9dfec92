"""The derivative of an elementwise function by autograd: the second-order term of a rule that states no ``grad2``
(the chunked path's backward, registration's checks, ``check_rule``). Imports torch only when called."""

from __future__ import annotations

from typing import Any


def elementwise_slope(values: Any, x: Any) -> Any:
    """d values / d x by autograd, for ``values`` an elementwise function of ``x`` (which requires grad); 0 where
    ``values`` has no graph in ``x`` (a piecewise-constant derivative, as ReLU's or l1's)."""
    import torch  # deferred: registering the built-ins must not import torch

    if not values.requires_grad:
        return torch.zeros_like(x)
    (slope,) = torch.autograd.grad(values.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if slope is None else slope
