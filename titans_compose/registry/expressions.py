"""Registration's check of a rule's Triton expressions against its torch forms.

An activation or a loss states its maths twice: as torch code (``fn``, ``grad``, ``grad2``), which the PyTorch
paths run, and as Triton expression strings (``triton_*``), which the kernel generator inlines. This module
evaluates each expression on a grid of float64 values, with the ``tl`` names it may use mapped onto torch
functions (:class:`_TorchTl`), and compares it with its torch form, so that a rule whose two forms disagree is
refused when it is registered rather than found by the kernel tests (or not at all). It takes milliseconds and
never imports triton.

The torch forms need torch, which registering must not import (the spec commands stay light). When torch is not
yet imported, the registry defers the check to the first lookup of the rule after torch is imported
(:meth:`~titans_compose.registry.core.Registry.get`), i.e. before anything runs it. A loss's expressions are checked
at its params model's defaults (a loss with a parameter without a default is left to ``check_rule``).
:func:`titans_compose.testing.check_rule` remains the complete check of a rule: through the reference, the chunked
path and the generated kernel.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from titans_compose.errors import Diagnostic, SpecError
from titans_compose.registry.slopes import elementwise_slope

#: (Triton expression field, torch form, variable) per kind; a torch form ``grad2`` falls back to autograd when the
#: rule gives none (as the chunked path does).
FIELDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "activation": (("triton_fn", "fn", "x"), ("triton_grad", "grad", "x"), ("triton_grad2", "grad2", "x")),
    "loss": (("triton_grad", "grad", "e"), ("triton_grad2", "grad2", "e")),
}

#: agreement required in float64: the two forms may be written differently (a sigmoid by hand, a power through
#: exp and log), which costs ~1e-15 relative; a wrong formula is off by far more.
RTOL = 1e-7
ATOL = 1e-9

#: ``triton.language.standard``'s ``@triton.jit`` helpers: the generated code must not call them (they cannot run
#: under the CPU interpreter in a process that imported triton first; docs/kernels.md section 2.2).
_STANDARD_JIT = frozenset(
    {
        "sigmoid",
        "softmax",
        "sum",
        "max",
        "min",
        "argmax",
        "argmin",
        "cdiv",
        "zeros",
        "zeros_like",
        "ravel",
        "swizzle2d",
        "xor_sum",
        "cumsum",
        "cumprod",
        "sort",
        "flip",
        "interleave",
        "reduce_or",
    }
)


def _grid() -> Any:
    """The values each expression is compared at: a fine grid over [-8, 8], and the points where rules have kinks
    (0, +-1)."""
    import torch

    points = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64)
    return torch.cat([points, torch.tensor([0.0, 1.0, -1.0, 1e-3, -1e-3], dtype=torch.float64)])


class _TorchTl:
    """The ``tl`` names a rule's expression may use, on float64 torch tensors. An unknown name falls back to the
    torch function of that name; a standard-library ``@triton.jit`` helper is refused."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.math = self

    def _tensor(self, value: Any) -> Any:
        return value if isinstance(value, self._torch.Tensor) else self._torch.tensor(value, dtype=self._torch.float64)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self._torch.where(self._tensor(cond), self._tensor(a), self._tensor(b))

    def maximum(self, a: Any, b: Any) -> Any:
        return self._torch.maximum(self._tensor(a), self._tensor(b))

    def minimum(self, a: Any, b: Any) -> Any:
        return self._torch.minimum(self._tensor(a), self._tensor(b))

    def fma(self, a: Any, b: Any, c: Any) -> Any:
        return self._tensor(a) * self._tensor(b) + self._tensor(c)

    def __getattr__(self, name: str) -> Any:
        if name in _STANDARD_JIT:
            raise NameError(
                f"tl.{name} is a triton.language.standard @triton.jit helper, which the CPU interpreter cannot always "
                "run; write it with core builtins (tl.exp, tl.where, ...)"
            )
        torch = self.__dict__["_torch"]
        for namespace in (torch, torch.special):
            fn = getattr(namespace, name, None)
            if callable(fn):
                return lambda *args: fn(*(self._tensor(a) for a in args))
        raise NameError(f"tl.{name} is not a Triton builtin the check knows")


def _torch_form(kind: str, rule: Any, form: str, values: Any, params: Any) -> Any:
    """The torch form ``form`` of ``rule`` at ``values`` (float64), the second derivative by autograd where the rule
    gives none."""
    if kind == "activation":
        if form == "fn":
            return rule.fn(values)
        if form == "grad":
            return rule.grad(values)
        return rule.curvature(values.new_ones(values.shape), values)
    if form == "grad":
        return rule.grad(values, params)
    if rule.grad2 is not None:
        return rule.grad2(values, params)
    x = values.detach().clone().requires_grad_()
    return elementwise_slope(rule.grad(x, params), x)


def _loss_params(params_model: Any) -> tuple[Any, dict[str, str] | None]:
    """The params instance at the model's defaults and its fields as float literals, or (None, None) when a
    field has no default."""
    if params_model is None:
        return None, {}
    try:
        instance = params_model()
    except Exception:  # a required field: the expressions cannot be formatted without the spec's value
        return None, None
    return instance, {name: repr(float(value)) for name, value in instance.model_dump().items()}


def mismatch(kind: str, name: str, rule: Any, params_model: Any = None) -> str | None:
    """Why ``rule``'s Triton expressions disagree with its torch forms (the field, the worst point and both values),
    or None when they agree or the rule gives none. Needs torch."""
    import torch

    fields = [f for f in FIELDS.get(kind, ()) if getattr(rule, f[0], None) is not None]
    if not fields:
        return None
    params, literals = _loss_params(params_model) if kind == "loss" else (None, {})
    if literals is None:
        return None  # parameters without defaults: check_rule checks the rule with real values
    with torch.device("cpu"):  # on the CPU even inside a caller's device context (transformers builds on "meta")
        return _compare(kind, name, rule, fields, params, literals)


def _compare(kind: str, name: str, rule: Any, fields: list[Any], params: Any, literals: dict[str, Any]) -> str | None:
    """:func:`mismatch` for ``rule``'s ``fields`` (on the default device)."""
    import torch

    values = _grid()
    tl = _TorchTl(torch)
    for field, form, var in fields:
        text = getattr(rule, field)
        try:
            expr = text.format(**literals) if kind == "loss" else text
        except (KeyError, IndexError, ValueError) as exc:
            return f"its {field} {text!r} names a parameter it does not have ({exc})"
        try:
            code = compile(expr, f"<{kind} {name} {field}>", "eval")
            with torch.no_grad():
                got = eval(code, {"__builtins__": {}, "tl": tl}, {var: values})
                got = torch.broadcast_to(torch.as_tensor(got, dtype=torch.float64), values.shape)
        except Exception as exc:
            return f"its {field} {expr!r} cannot be evaluated: {type(exc).__name__}: {exc}"
        with torch.enable_grad():
            want = _torch_form(kind, rule, form, values, params)
        want = torch.broadcast_to(torch.as_tensor(want).detach().to(torch.float64), values.shape)
        bad = ~torch.isclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)
        if bool(bad.any()):
            err = torch.where(bad, (got - want).abs().nan_to_num(nan=math.inf), 0.0)
            worst = int(err.argmax())
            return (
                f"its {field} {expr!r} disagrees with its torch {form}: worst at {var} = {float(values[worst]):g}, "
                f"where the expression gives {float(got[worst]):.10g} and {form} gives {float(want[worst]):.10g}"
            )
    return None


def torch_ready() -> bool:
    """Whether torch is imported already (the check then costs milliseconds; it never imports torch itself)."""
    return "torch" in sys.modules


#: rules found to agree (a fresh registry registers the same built-in objects again)
_AGREED: set[tuple[str, Any, Any]] = set()


def check(kind: str, name: str, rule: Any, params_model: Any = None) -> None:
    """Raise :class:`SpecError` (TC504) when ``rule``'s Triton expressions disagree with its torch forms."""
    try:
        memo: tuple[str, Any, Any] | None = (kind, rule, params_model)
        if memo in _AGREED:
            return
    except TypeError:  # an unhashable rule: checked every time
        memo = None
    problem = mismatch(kind, name, rule, params_model)
    if problem is None:
        if memo is not None:
            _AGREED.add(memo)
        return
    raise SpecError(
        [
            Diagnostic(
                "TC504",
                f"{kind} '{name}': {problem}",
                hint="the kernel would compute something else than the PyTorch paths: fix the expression or "
                "the torch form (titans_compose.testing.check_rule checks the whole rule)",
            )
        ]
    )
