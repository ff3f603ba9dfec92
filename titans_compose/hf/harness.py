"""lm-evaluation-harness support: the ``titans_compose`` model type, registered with lm-eval when this module is
imported (:mod:`titans_compose.hf.lm_eval_cli` runs lm-eval's command line with it).

The model is lm-eval's Hugging Face model with two differences: it always loads a causal model, and batched
generation, which lm-eval left-pads, runs row by row (a titans_compose row is one stream: padding would enter its
memory; see :mod:`titans_compose.hf.modeling`). Log-likelihoods need nothing
more: lm-eval right-pads them and reads only the positions before the padding, which a causal model computes
exactly.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import titans_compose.hf  # noqa: F401  (registers the model type with transformers' Auto classes)
from titans_compose.hf.extra import require

require("lm_eval", "titans_compose.hf.harness")

from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

NAME = "titans_compose"


@register_model(NAME)
class TitansComposeLM(HFLM):
    """lm-eval's model for a ``--format hf`` export. ``plugins``: the plug-in files or modules the model was made
    with, separated by ``os.pathsep`` (``:`` on Linux), as ``--model_args pretrained=DIR,plugins=cauchy.py``."""

    def __init__(self, pretrained: str, plugins: str | None = None, **kwargs: Any) -> None:
        kwargs["backend"] = "causal"
        if plugins:
            kwargs["plugins"] = [p for p in plugins.split(os.pathsep) if p]
        super().__init__(pretrained=pretrained, **kwargs)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        """Generate for a batch that lm-eval left-padded: each row alone from its own tokens, then laid out as lm-eval
        expects (the row's padding before it, the pad token after its continuation)."""
        mask = kwargs.pop("attention_mask", None)
        if mask is None or bool(mask.all()):
            return super()._model_generate(context, max_length, stop, **kwargs)
        width = context.shape[1]
        rows = []
        for tokens, keep in zip(context, mask.bool(), strict=True):
            own = tokens[keep][None]
            pad = width - own.shape[1]
            out = super()._model_generate(own, max_length - pad, stop, **kwargs)[0]
            rows.append(torch.cat([tokens[:pad], out]))
        pad_id = self.tokenizer.pad_token_id
        longest = max(row.shape[0] for row in rows)
        return torch.stack([torch.cat([row, row.new_full((longest - row.shape[0],), pad_id)]) for row in rows])
