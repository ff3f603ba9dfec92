"""The backward of one chunk of the memory scan, described once: the reverse steps both Triton emitters render.

A chunk's forward (memory-math.md section 3, docs/kernels.md section 2.2) runs the key path (a_l, z_l, the output
error, delta_l), the clip, the gate tables, the retrieval and the fold. Its backward applies their reverses in the
order of :data:`BACKWARD`: each step needs only gradients that the steps before it have completed. It is the order
of the chunked path's hand-written backward (:class:`titans_compose.ops.memory.chunk_write._ChunkWrite`: the read,
the fold, the error recursion, the output error, the key path), which the kernels port, plus the reverses of the
gate tables and of theta's share in them, which the chunked path leaves to autograd.

An emitter renders the backward with :func:`render_backward`: for each of its phases in turn, it emits every step
in this order through its method ``<step>_backward<phase suffix>``, where it has one. The whole-matrix emitter has
a single phase; the tiled one splits the steps over its passes over the hidden width (terms of hidden width per
tile, the others once). A step that an emitter renders in no phase is an error, so a step added here must be
rendered by both emitters. :func:`fold_terms` describes the fold's outer-product terms that both render per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Step:
    """One reverse step: what forward computation it reverses and which gradients it completes."""

    name: str
    reverses: str
    completes: str


BACKWARD: tuple[Step, ...] = (
    Step(
        "retrieval",
        "the read of the queries, Z_l = diag(A) H W^T + diag(B) H S^T - (C o H a^T) delta_l, and the output transform",
        "the queries' gradient; the read's shares of W^0, S^0, a_l and delta_l; the gradients of A, B and C",
    ),
    Step(
        "fold",
        "the fold W^b = keep W^0 + carry S^0 - sum_t c_t delta_t a_t^T (S^b = decay S^0 - sum_t e_t delta_t a_t^T); "
        "the identity for a partial chunk",
        "the fold's shares of W^0, S^0, a_l and delta_l; the gradients of keep, carry, decay, c and e",
    ),
    Step("theta", "theta's share of the tables (C, c and e)", "the gradient of the (clipped) theta"),
    Step(
        "clip",
        "the per-token clip theta = theta_raw min(1, max_norm / ||g_t||) (nothing without grad_clip)",
        "the gradient of theta_raw; the clip factor's shares of delta_l and a_l",
    ),
    Step(
        "key_path",
        "the error recursion delta_l = act'(z_l) o (W_{l+1}^T delta_{l+1}), the output error (through the loss, "
        "the LayerNorm and the residual) and the key path's forward, last layer first",
        "the keys' and values' gradients; the key path's share of W^0",
    ),
    Step(
        "gates",
        "the gate tables' log-space prefix sums",
        "the gradients of log eta and log keep",
    ),
    Step("stores", "nothing: it writes", "the stored input gradients and the chunk-start state's gradient"),
)


@dataclass(frozen=True)
class Phase:
    """A part of an emitter's backward: it renders the steps' ``<step>_backward<suffix>`` methods."""

    suffix: str = ""
    what: str = ""


def render_backward(emitter: Any, code: Any, phases: Sequence[Phase]) -> None:
    """Emit every step of :data:`BACKWARD` in order, phase by phase, through the emitter's methods; the emitter's
    ``begin_phase`` / ``end_phase`` (when it has them) open and close each phase. Raises ``TypeError`` naming the
    steps the emitter renders in no phase."""
    methods = [[getattr(emitter, f"{step.name}_backward{phase.suffix}", None) for step in BACKWARD] for phase in phases]
    missing = [step.name for n, step in enumerate(BACKWARD) if all(ms[n] is None for ms in methods)]
    if missing:
        raise TypeError(f"{type(emitter).__name__} renders no backward step {', '.join(missing)}")
    for phase, phase_methods in zip(phases, methods, strict=True):
        if hasattr(emitter, "begin_phase"):
            emitter.begin_phase(code, phase)
        for method in phase_methods:
            if method is not None:
                method(code)
        if hasattr(emitter, "end_phase"):
            emitter.end_phase(code, phase)


@dataclass(frozen=True)
class FoldTerm:
    """One state matrix's outer-product term of the fold, ``- sum_t coef_t delta_t a_t^T``, and the names the
    emitters give its reverse: ``incoming`` the gradient of the folded matrix, ``grad_coef`` that of ``coef``,
    ``product`` the [b, out] product a_l incoming^T from which the gradients of delta_l and ``coef`` follow."""

    incoming: str
    coef: str
    grad_coef: str
    product: str


def fold_terms(momentum: bool) -> tuple[FoldTerm, ...]:
    """The fold's terms: W's (coefficients c) and, with momentum, S's (coefficients e)."""
    terms = (FoldTerm("gnw", "c", "gc", "pw"), FoldTerm("gns", "e", "ge", "ps"))
    return terms if momentum else terms[:1]
