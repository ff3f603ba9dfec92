"""Checks for plug-in authors: :func:`check_rule` runs an update-rule part through the sequential reference and the
chunked dual form and says precisely where they disagree.

The chunked form computes a loss's error with ``grad`` and an activation's backward with ``grad`` (or its fused
``backward``), and decays the weights by ``exp(log_keep(alpha))``; the reference differentiates ``value`` / ``fn``
by autograd and decays with ``keep(W, alpha)``. So a rule whose parts disagree with each other gives two different
memories, and this check finds it before a model silently trains on one of them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from titans_compose.ops.memory.chunked import chunked_memory
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.reference import reference_memory
from titans_compose.ops.memory.state import MemoryState
from titans_compose.registry import Registry, default_registry
from titans_compose.registry.rules import (
    ACTIVATIONS,
    LOSSES,
    OPTIMIZERS,
    RETENTIONS,
    Activation,
    Loss,
    Retention,
    elementwise_slope,
)

F64 = torch.float64
#: float64 tolerances, relative to the largest magnitude compared (the core's own tests reach 1e-10 / 1e-8)
FORWARD_TOL = 1e-9
GRADIENT_TOL = 1e-7
#: (rows N, tokens T, head dim d, hidden width, chunk size): odd sizes, a partial last chunk, b = 1 and b > T
SHAPES = ((3, 11, 5, 7, 4), (2, 9, 3, 6, 1), (1, 7, 4, 5, 16))
KINDS = {"loss": Loss, "activation": Activation, "retention": Retention}
#: the generated-kernel stage: float32 kernel vs float64 chunked path, relative to the largest magnitude compared;
#: or within KERNEL_ERROR_RATIO times the float32 chunked path's own error (ill-conditioned rules)
KERNEL_TOL = 1e-4
KERNEL_ERROR_RATIO = 4.0
#: (rows, tokens, head dim, hidden width, chunk): a partial last chunk, widths the kernel pads to its blocks
KERNEL_SHAPES = ((2, 21, 16, 24, 8),)


def _resolve(kind: str, rule: Any, params: Any, registry: Registry | None) -> tuple[str, Any, Any]:
    """(label, rule object, params instance) from a registered name or a rule object."""
    if kind not in KINDS:
        raise ValueError(f"check_rule checks a {', '.join(KINDS)}; got kind {kind!r}")
    if isinstance(rule, str):
        registry = registry or default_registry()[0]
        entry = registry.get(kind, rule)
        if entry.params is not None:
            params = entry.params.model_validate(params or {}) if not isinstance(params, entry.params) else params
        return f"{kind} '{rule}'", entry.obj, params
    if not isinstance(rule, KINDS[kind]):
        raise TypeError(f"check_rule({kind!r}, ...) needs a {KINDS[kind].__name__}, got {type(rule).__name__}")
    return f"the {kind} rule", rule, params


def _assert_close(label: str, what: str, got: Tensor, want: Tensor, tol: float, where: str) -> None:
    got, want = got.detach(), want.detach()
    scale = max(float(want.abs().max()), 1e-30) if want.numel() else 1.0
    err = float((got - want).abs().max()) / scale if want.numel() else 0.0
    if not err <= tol:  # also catches NaN
        raise AssertionError(
            f"{label}: {what} differs between the sequential reference and the chunked path ({where}): relative "
            f"error {err:.3g} > {tol:g}"
        )


def _check_parts(label: str, kind: str, rule: Any, params: Any) -> None:
    """The rule's parts against each other: the derivative it states against autograd's, the decay factors."""
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(5, 7, generator=g, dtype=F64)).requires_grad_()
    if kind == "loss":
        (auto,) = torch.autograd.grad(rule.value(x, params).sum(), x)
        _require(
            label, "grad(err) is not the derivative of value(err) summed over features", rule.grad(x, params), auto
        )
        if rule.grad2 is not None:
            _require(
                label,
                "grad2(err) is not the derivative of grad(err)",
                rule.grad2(x, params),
                elementwise_slope(rule.grad(x, params), x),
            )
    elif kind == "activation":
        (auto,) = torch.autograd.grad(rule.fn(x).sum(), x)
        _require(label, "grad(x) is not the derivative of fn(x)", rule.grad(x), auto)
        up = torch.randn(5, 7, generator=g, dtype=F64)
        _require(label, "backward(g, x) is not g * grad(x)", rule.backward(up, x), up * auto)
        if rule.grad2 is not None:
            slope = elementwise_slope(rule.grad(x), x)
            _require(label, "grad2(x) is not the derivative of grad(x)", rule.grad2(x), slope)
    else:
        alpha = torch.rand(5, 7, generator=g, dtype=F64) * 0.98 + 0.01
        w = torch.randn(5, 7, generator=g, dtype=F64)
        kept = rule.keep(w, alpha, params)
        _require(label, "keep(W, alpha) is not exp(log_keep(alpha)) * W", kept, rule.log_keep(alpha).exp() * w)


def _require(label: str, message: str, got: Tensor, want: Tensor) -> None:
    got = torch.as_tensor(got, dtype=want.dtype)  # grad2 may return a scalar that broadcasts against err
    if got.dim() < want.dim():
        got = got.expand_as(want)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=1e-12):
        diff = float((got - want).abs().max().detach()) if got.shape == want.shape else f"shape {tuple(got.shape)}"
        raise AssertionError(f"{label}: {message} (max difference {diff} on random float64 inputs)")


def _configs(
    kind: str,
    rule: Any,
    params: Any,
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
    retrievals: tuple[str, ...] = ("after", "before"),
) -> Iterator[tuple[MemoryConfig, tuple[int, ...], str]]:
    """Memory configurations exercising the rule: depth 1 and 2, momentum on/off, the given retrievals."""
    for (n, t, d, hidden, b), depth, momentum, retrieval in itertools.product(
        shapes, (1, 2), (True, False), retrievals
    ):
        shapes = ((d, d),) if depth == 1 else ((hidden, d), (d, hidden))
        loss, loss_params = (rule, params) if kind == "loss" else (LOSSES["l2"][0], None)
        cfg = MemoryConfig(
            layer_shapes=shapes,
            activation=rule if kind == "activation" else ACTIVATIONS["silu"][0],
            loss=loss,
            loss_params=loss_params,
            residual=depth == 2,
            output_norm=depth == 2,
            momentum=momentum,
            forget=True,
            chunk_size=b,
            retrieval=retrieval,
            retention=rule if kind == "retention" else RETENTIONS["decay"][0],
            optimizer=OPTIMIZERS["momentum"][0],
        )
        where = f"depth {depth}, N={n} T={t} d={d} chunk {b}, momentum {'on' if momentum else 'off'}, {retrieval}"
        yield cfg, (n, t, d), where


def _inputs(cfg: MemoryConfig, n: int, t: int, d: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    leaves = [
        F.normalize(rand(n, t, d), dim=-1),
        F.normalize(rand(n, t, d), dim=-1),
        rand(n, t, d),
        0.3 * torch.rand(n, t, generator=g, dtype=F64),
        F.logsigmoid(rand(n, t) + 2.0),
        F.logsigmoid(rand(n, t) + 1.0),  # alpha from about 0.05 to 0.6: the retention rule matters
        *(rand(n, o, i) / i**0.5 for o, i in cfg.layer_shapes),
    ]
    if not cfg.momentum:
        leaves[4] = torch.zeros(0)
    return [x.requires_grad_() for x in leaves]


def _run(fn: Any, cfg: MemoryConfig, leaves: list[Tensor]) -> tuple[Tensor, ...]:
    q, k, v, theta, log_eta, log_keep, *weights = leaves
    state = MemoryState.initial(weights, cfg.momentum)
    y, end = fn(q, k, v, theta, log_eta if cfg.momentum else None, log_keep, state, cfg)
    return (y, *end.weights)


def kernel_unavailable() -> str | None:
    """Why the generated Triton kernels cannot run in this process (None when they can: a CUDA device, or the CPU
    under Triton's interpreter switched on before triton was imported)."""
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device, and TRITON_INTERPRET=1 is not set (Triton's CPU interpreter)"
    return None


def _triton_ready(kind: str, rule: Any) -> bool:
    """Whether the generated kernel can run the rule: a loss or activation must give every Triton expression the
    generator inlines; a retention rule always can (the kernel takes its per-token log factor as an input)."""
    fields = {"loss": ("triton_grad", "triton_grad2"), "activation": ("triton_fn", "triton_grad", "triton_grad2")}
    return all(getattr(rule, f) is not None for f in fields.get(kind, ()))


def _check_kernel(label: str, kind: str, rule: Any, params: Any, seed: int) -> int:
    """The generated kernel (float32) against the chunked path (float64) with the rule in place, forward and every
    gradient; within KERNEL_TOL, or KERNEL_ERROR_RATIO times the float32 chunked path's own error where the rule is
    ill-conditioned. Returns the number of configurations checked."""
    from titans_compose.ops.memory.codegen.runtime import triton_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = (label if kind == "activation" else "silu", label if kind == "loss" else "l2")
    checked = 0
    for cfg, (n, t, d), where in _configs(kind, rule, params, shapes=KERNEL_SHAPES, retrievals=("after", "per_chunk")):
        if not cfg.momentum:
            continue
        cfg = dataclasses.replace(cfg, names=names)
        leaves = _inputs(cfg, n, t, d, seed)
        want = _run(chunked_memory, cfg, leaves)
        g = torch.Generator().manual_seed(seed + 2)
        cotangents = [torch.randn(x.shape, generator=g, dtype=F64) for x in want]
        used = [x for x in leaves if x.numel()]
        want_grads = torch.autograd.grad(want, used, cotangents)
        errors = {}
        for impl, dtype in ((triton_memory, torch.float32), (chunked_memory, torch.float32)):
            cast = [x.to(device, dtype) if x.numel() else x for x in leaves]
            got = _run(impl, cfg, cast)
            grads = torch.autograd.grad(got, used, [c.to(device, dtype) for c in cotangents])
            errors[impl] = [_relative(a, b) for a, b in zip((*got, *grads), (*want, *want_grads), strict=True)]
        for i, (kernel_err, chunked_err) in enumerate(zip(errors[triton_memory], errors[chunked_memory], strict=True)):
            if not kernel_err <= max(KERNEL_TOL, KERNEL_ERROR_RATIO * chunked_err):
                what = "an output" if i < len(want) else f"the gradient of input {i - len(want)}"
                raise AssertionError(
                    f"{label}: the generated kernel differs from the chunked path in {what} ({where}): relative error "
                    f"{kernel_err:.3g} (the float32 chunked path: {chunked_err:.3g})"
                    + ("" if kind == "retention" else "; check its Triton expressions")
                )
        checked += 1
    return checked


def _relative(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach()
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
    return err if err == err else float("inf")  # NaN counts as a failure


def check_rule(
    kind: str,
    rule: Any,
    params: Any = None,
    *,
    registry: Registry | None = None,
    seed: int = 0,
    kernel: bool | None = None,
) -> int:
    """Check an update-rule part for use in the memory: ``kind`` is ``"loss"``, ``"activation"`` or
    ``"retention"``; ``rule`` is the :class:`~titans_compose.registry.rules.Loss` / ``Activation`` / ``Retention``
    or its registered name (looked up in ``registry``, default: the process-wide one with installed plug-ins);
    ``params`` is its params model instance, or for a name a mapping of its parameters.

    First the rule's parts are checked against each other (a stated derivative against autograd's, ``keep``
    against ``exp(log_keep)``); then, in float64, the rule runs through the sequential reference and the chunked
    dual form for depth 1 and 2 memories, odd shapes, chunk sizes 1, 4 and 16 (a partial last chunk), momentum on
    and off and both retrievals, comparing the outputs, the final weights and the gradients of all of them with
    respect to every input (queries, keys, values, gates, initial weights). Raises an ``AssertionError`` that names
    the rule, the quantity and the configuration on the first disagreement; returns the number of configurations
    checked.

    A rule the generated kernel can run (a retention rule, or a loss or activation that gives its Triton
    expressions) is also run through that kernel (float32, on CUDA or in Triton's CPU interpreter) and compared
    with the chunked path, outputs and every gradient. ``kernel``: None runs that stage when the kernel can run the
    rule and :func:`kernel_unavailable` says nothing; True requires it (an error says why it cannot run); False
    skips it.
    """
    label, obj, params = _resolve(kind, rule, params, registry)
    _check_parts(label, kind, obj, params)
    names = ["queries", "keys", "values", "theta", "log eta", "log(1 - alpha)"]
    checked = 0
    for cfg, (n, t, d), where in _configs(kind, obj, params):
        ref_leaves = _inputs(cfg, n, t, d, seed)
        fast_leaves = [x.detach().clone().requires_grad_() for x in ref_leaves]
        ref, fast = _run(reference_memory, cfg, ref_leaves), _run(chunked_memory, cfg, fast_leaves)
        outputs = ["retrieved values", *(f"final weights of layer {i + 1}" for i in range(cfg.depth))]
        for what, got, want in zip(outputs, fast, ref, strict=True):
            _assert_close(label, what, got, want, FORWARD_TOL, where)
        g = torch.Generator().manual_seed(seed + 1)
        cotangents = [torch.randn(x.shape, generator=g, dtype=F64) for x in ref]
        used = [i for i, x in enumerate(ref_leaves) if x.numel()]
        inputs = [*names, *(f"initial weights of layer {i + 1}" for i in range(cfg.depth))]
        want = torch.autograd.grad(ref, [ref_leaves[i] for i in used], cotangents, allow_unused=True)
        got = torch.autograd.grad(fast, [fast_leaves[i] for i in used], cotangents, allow_unused=True)
        for i, a, b in zip(used, got, want, strict=True):
            a = torch.zeros_like(ref_leaves[i]) if a is None else a
            b = torch.zeros_like(ref_leaves[i]) if b is None else b
            _assert_close(label, f"the gradient with respect to the {inputs[i]}", a, b, GRADIENT_TOL, where)
        checked += 1
    if kernel is None:
        kernel = _triton_ready(kind, obj) and kernel_unavailable() is None
    if kernel:
        if not _triton_ready(kind, obj):
            raise ValueError(f"{label} gives no Triton expressions: there is no generated kernel to check")
        if kernel_unavailable() is not None:
            raise RuntimeError(f"cannot run the generated kernel: {kernel_unavailable()}")
        checked += _check_kernel(label, kind, obj, params, seed)
    return checked
