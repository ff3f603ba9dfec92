"""``TitansComposeForCausalLM``: a titans_compose :class:`~titans_compose.nn.model.TitansLM` as a transformers
causal language model (``forward`` with labels and a cache, ``generate``, ``save_pretrained``, ``Trainer``).

Every row of a batch is one stream with one recurrent state, so a padded batch cannot be streamed: a padded position
would enter the memory. An attention mask with zeros is therefore accepted only where it changes nothing: trailing
zeros (right padding) in a call that starts a stream and returns no cache (the model is causal, so the positions
before the padding are exact). Left padding, or padding in a call that continues or returns a cache, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from titans_compose.hf.cache import TitansCache
from titans_compose.hf.config import TitansComposeConfig

#: what transformers calls the cache in model outputs and ``forward``: ``cache`` from 5.x releases that renamed it
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
#: ``forward`` arguments transformers may pass that carry nothing for this model: positions follow from the cache
IGNORED = frozenset({"position_ids", "cache_position", "token_type_ids", "output_attentions", "output_hidden_states"})


def _right_padded(mask: Tensor) -> bool:
    """Whether every row of a 0/1 ``mask`` is ones followed by zeros."""
    m = mask.to(torch.int64)
    return bool((m[:, 1:] <= m[:, :-1]).all()) and bool(m[:, 0].all())


def next_token_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Cross-entropy of ``logits`` [B, T, V] at position t against ``labels`` at t + 1 (label -100 is ignored), in
    float32: the mean over the counted tokens, or their sum divided by ``num_items_in_batch`` (what ``Trainer`` passes
    so that gradient accumulation weighs every token alike)."""
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(flat.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets, ignore_index=-100)
    return F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


class TitansComposePreTrainedModel(PreTrainedModel):
    config_class = TitansComposeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []  # noqa: RUF012 (transformers reads the class attribute)
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the model draws its initial weights itself, as the spec says, from the configuration's seed."""


class TitansComposeForCausalLM(TitansComposePreTrainedModel, GenerationMixin):
    """A titans_compose model built from ``config.spec``; ``plugins`` (files or modules) must name every plug-in
    file or module the configuration records (``from_pretrained(DIR, plugins=[...])``): none is imported on the
    configuration's word. ``self.model`` is the :class:`~titans_compose.nn.model.TitansLM`."""

    def __init__(self, config: TitansComposeConfig, plugins: Sequence[str] = ()) -> None:
        super().__init__(config)
        from titans_compose.builder import seeded_module
        from titans_compose.graph import compile_graph

        loaded = config.loaded_spec(plugins)
        graph, _ = compile_graph(loaded)
        self.model = seeded_module(graph, loaded, config.seed)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> TitansComposeForCausalLM:
        """transformers' loading, then every tensor copied out of the memory-mapped weights file into memory of its
        own: a view into the file lies at whatever offset the file gives it, and on the CPU a matmul over unaligned
        memory runs another kernel, whose sums differ from the source model's in the last bits."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: forward makes its own TitansCache

    def get_input_embeddings(self) -> nn.Module:
        return next(m for m in self.model.modules() if isinstance(m, nn.Embedding))

    def get_output_embeddings(self) -> None:
        return None  # the head belongs to the model (tied or not, as its spec says); transformers must not retie it

    def _stream_state(self, cache: Any) -> TitansCache | None:
        """The cache to continue from: ours, or None for a fresh stream (an empty cache of another kind, as some
        transformers releases make before the first call, is taken as a fresh stream)."""
        if cache is None or isinstance(cache, TitansCache):
            return cache
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            return None
        raise TypeError(
            f"titans_compose models carry their state in a TitansCache, got {type(cache).__name__}: pass the cache a "
            "previous call returned, or none"
        )

    def _check_mask(self, mask: Tensor | None, input_ids: Tensor, past: int, use_cache: bool | None) -> bool:
        """Whether the call keeps its cache: False only for a right-padded call that starts a stream without asking
        for a cache. Raises ``ValueError`` for any other mask with zeros (see the module docstring)."""
        if mask is None:
            return use_cache is not False
        batch, new = input_ids.shape
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in (new, past + new):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; expected [{batch}, {past + new}] (the past {past} "
                f"tokens and these {new}) or [{batch}, {new}]"
            )
        if bool(mask.all()):
            return use_cache is not False
        if past == 0 and use_cache is not True and _right_padded(mask):
            return False
        raise ValueError(
            "attention_mask has zeros where titans_compose models cannot honour them: every batch row is one stream "
            "whose recurrent memory would take in its padding. Left padding (as batched generate uses) and padding "
            "in a call that continues or returns a cache are refused; pass rows of equal length, or one row at a "
            "time (right padding is accepted in a call that starts a stream with use_cache=False)"
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits [B, T, vocab] for ``input_ids`` [B, T] continuing ``cache`` (transformers' older name for it,
        ``past_key_values``, works too); with ``labels`` also the next-token loss; the cache after the last token
        unless ``use_cache=False``. ``logits_to_keep`` = n > 0 returns the logits of the last n positions only."""
        unknown = sorted(set(kwargs) - IGNORED)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unexpected arguments: {', '.join(unknown)}")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("titans_compose models read token ids: pass input_ids (inputs_embeds is not supported)")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("titans_compose models do not return attention weights or hidden states")
        given = self._stream_state(cache if cache is not None else past_key_values)
        state = None if given is None else given.state
        keep = self._check_mask(attention_mask, input_ids, 0 if state is None else state.position, use_cache)
        out = self.model(input_ids, state)
        logits = out.logits if logits_to_keep == 0 else out.logits[:, -logits_to_keep:]
        loss = None if labels is None else next_token_loss(out.logits, labels, num_items_in_batch)
        new_cache = None
        if keep:
            new_cache = given if given is not None else TitansCache()
            new_cache.state = out.state
        if return_dict is False:
            return tuple(v for v in (loss, logits, new_cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: new_cache})
