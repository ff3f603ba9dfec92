"""Hugging Face interoperability (the ``hf`` extra: ``pip install -e ".[hf]"``): titans_compose models as
transformers models and lm-evaluation-harness models.

Importing this package registers the ``titans_compose`` model type with ``AutoConfig``, ``AutoModelForCausalLM``
and ``AutoTokenizer``, so a directory written by ``titans-compose export ... --format hf`` loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``.
"""

from __future__ import annotations

from titans_compose.hf.extra import require

require("transformers", "titans_compose.hf")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from titans_compose.hf.cache import TitansCache  # noqa: E402
from titans_compose.hf.config import MODEL_TYPE, TitansComposeConfig  # noqa: E402
from titans_compose.hf.modeling import TitansComposeForCausalLM  # noqa: E402
from titans_compose.hf.tokenizer import ByteTokenizer  # noqa: E402

AutoConfig.register(MODEL_TYPE, TitansComposeConfig, exist_ok=True)
AutoModelForCausalLM.register(TitansComposeConfig, TitansComposeForCausalLM, exist_ok=True)
AutoTokenizer.register(TitansComposeConfig, slow_tokenizer_class=ByteTokenizer, exist_ok=True)

__all__ = ["ByteTokenizer", "TitansCache", "TitansComposeConfig", "TitansComposeForCausalLM"]
