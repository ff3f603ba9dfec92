"""Hugging Face interoperability (the ``hf`` extra: ``pip install -e ".[hf]"``): titans_compose models as
transformers models and lm-evaluation-harness models.

Importing this package registers the ``titans_compose`` model type with ``AutoConfig``, ``AutoModelForCausalLM``
and ``AutoTokenizer``, so a directory written by ``titans-compose export ... --format hf`` loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'titans_compose.hf needs transformers, part of the hf extra: pip install "titans_compose[hf]" (in a source '
        f'checkout: pip install -e ".[hf]") ({exc})'
    ) from exc

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from titans_compose.hf.cache import TitansCache
from titans_compose.hf.config import MODEL_TYPE, TitansComposeConfig
from titans_compose.hf.modeling import TitansComposeForCausalLM
from titans_compose.hf.tokenizer import ByteTokenizer

AutoConfig.register(MODEL_TYPE, TitansComposeConfig, exist_ok=True)
AutoModelForCausalLM.register(TitansComposeConfig, TitansComposeForCausalLM, exist_ok=True)
AutoTokenizer.register(TitansComposeConfig, slow_tokenizer_class=ByteTokenizer, exist_ok=True)

__all__ = ["ByteTokenizer", "TitansCache", "TitansComposeConfig", "TitansComposeForCausalLM"]
