"""The backward's one description (codegen/backward.py): both emitters render every step, in its order."""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import make_cfg
from titans_compose.ops.memory.codegen import backward, tiling
from titans_compose.ops.memory.codegen.emit import TiledGenerator, WholeGenerator
from titans_compose.ops.memory.codegen.emit_tiled import PHASES
from titans_compose.ops.memory.codegen.key import kernel_key

STEP_NAMES = [step.name for step in backward.BACKWARD]


def key_for(monkeypatch, tiled: bool, **kw):
    monkeypatch.setattr(tiling, "hidden_tile", lambda shapes, chunk: 16 if tiled and len(shapes) == 2 else 0)
    cfg = make_cfg(depth=2, d=16, hidden=40, momentum=True, forget=True, **kw)
    return kernel_key(dataclasses.replace(cfg, names=("silu", "l2")), "float32")


def rendered_steps(monkeypatch, generator, key) -> list[tuple[str, str]]:
    """(phase suffix, step) of every backward method the emitter's source was rendered through, in order."""
    calls = []
    real = backward.render_backward

    def spy(emitter, code, phases):
        for phase in phases:
            for name in STEP_NAMES:
                method = getattr(emitter, f"{name}_backward{phase.suffix}", None)
                if method is not None:
                    monkeypatch.setattr(
                        emitter,
                        f"{name}_backward{phase.suffix}",
                        lambda code, m=method, s=phase.suffix, n=name: (calls.append((s, n)), m(code)),
                    )
        real(emitter, code, phases)

    monkeypatch.setattr(f"{generator.__module__}.render_backward", spy)
    generator(key).module()
    return calls


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_whole_matrix_emitter_renders_every_step_in_order(monkeypatch, grad_clip):
    calls = rendered_steps(monkeypatch, WholeGenerator, key_for(monkeypatch, False, grad_clip=grad_clip))
    assert calls == [("", name) for name in STEP_NAMES]


def test_tiled_emitter_renders_every_step_in_order_within_each_phase(monkeypatch):
    calls = rendered_steps(monkeypatch, TiledGenerator, key_for(monkeypatch, True, grad_clip=1.0))
    assert {name for _, name in calls} == set(STEP_NAMES)
    suffixes = [phase.suffix for phase in PHASES]
    assert [s for s, _ in calls] == sorted((s for s, _ in calls), key=suffixes.index)  # phase by phase
    for suffix in suffixes:
        names = [n for s, n in calls if s == suffix]
        assert names == sorted(names, key=STEP_NAMES.index)  # each phase in the described order


def test_an_emitter_missing_a_step_is_refused(monkeypatch):
    class Partial:
        def retrieval_backward(self, code):
            pass

    with pytest.raises(TypeError, match="Partial renders no backward step fold, theta"):
        backward.render_backward(Partial(), None, (backward.Phase(),))


def test_fold_terms_follow_momentum():
    assert [t.coef for t in backward.fold_terms(False)] == ["c"]
    assert [(t.incoming, t.coef, t.grad_coef) for t in backward.fold_terms(True)] == [
        ("gnw", "c", "gc"),
        ("gns", "e", "ge"),
    ]
