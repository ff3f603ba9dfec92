"""lm-evaluation-harness support: the ``titans_compose`` model type, registered with lm-eval when this module is
imported (:mod:`titans_compose.hf.lm_eval_cli` runs lm-eval's command line with it).

The model is lm-eval's Hugging Face model, always loading a causal model. Batches need nothing more: lm-eval
left-pads batched generation with an attention mask, which the model honours exactly (row by row, see
:mod:`titans_compose.hf.modeling`), and right-pads log-likelihood batches without one, reading only the positions
before the padding, which a causal model computes exactly.
"""

from __future__ import annotations

import os
from typing import Any

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
