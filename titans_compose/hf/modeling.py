"""``TitansComposeForCausalLM``: a titans_compose :class:`~titans_compose.nn.model.TitansLM` as a transformers
causal language model (``forward`` with labels and a cache, ``generate``, ``save_pretrained``, ``Trainer``).

Every row of a batch is one stream with one recurrent state, which a padding token must not enter. An attention mask
says which positions belong to each row's stream: a row's stream is its unmasked tokens, in order, wherever the
masked ones lie (left padding, right padding, or gaps), so each row computes exactly what that row alone, unpadded,
computes. A batch whose mask leaves positions out runs row by row, each with its own state (the cache then holds
one state per row); a batch without masked positions runs as one. Masked positions get zero logits.
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
from titans_compose.nn.model import ModelState

#: what transformers calls the cache in model outputs and ``forward``: ``cache`` from 5.x releases that renamed it
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
#: ``forward`` arguments transformers may pass that carry nothing for this model: positions follow from the cache
IGNORED = frozenset({"position_ids", "cache_position", "token_type_ids", "output_attentions", "output_hidden_states"})


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

    def _mask(self, mask: Tensor | None, input_ids: Tensor, past: int) -> Tensor | None:
        """Which of this call's positions belong to each row's stream ([B, T] bool), or None when all do. The mask
        may cover the past positions too ([B, past + T], as generate passes it) or only these ([B, T])."""
        if mask is None:
            return None
        batch, new = input_ids.shape
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in (new, past + new):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; expected [{batch}, {past + new}] (the past {past} "
                f"positions and these {new}) or [{batch}, {new}]"
            )
        current = mask[:, mask.shape[1] - new :].bool()
        return None if bool(current.all()) else current

    def _by_rows(
        self, input_ids: Tensor, keep: Tensor | None, rows: list[ModelState | None]
    ) -> tuple[Tensor, list[ModelState]]:
        """Each row's unmasked tokens through its own stream: logits [B, T, V] (zero where masked) and the states."""
        outputs = []
        for b, state in enumerate(rows):
            tokens = input_ids[b : b + 1] if keep is None else input_ids[b : b + 1, keep[b]]
            outputs.append(self.model(tokens, state))
        first = outputs[0].logits
        logits = first.new_zeros(*input_ids.shape, first.shape[-1])
        for b, out in enumerate(outputs):
            if keep is None:
                logits[b] = out.logits[0]
            else:
                logits[b, keep[b]] = out.logits[0]
        return logits, [out.state for out in outputs]

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
        past = 0 if given is None else given.seen
        keep = self._mask(attention_mask, input_ids, past)
        if given is not None and given.rows is None and keep is not None and given.state is not None:
            raise ValueError(
                "attention_mask leaves positions out of rows whose stream ran as one batch: the cache holds one state "
                "for the whole batch, which cannot be split into rows; pass the mask from the stream's first call"
            )
        if keep is None and (given is None or given.rows is None):
            out = self.model(input_ids, None if given is None else given.state)
            full, state, rows = out.logits, out.state, None
        else:
            before = given.rows if given is not None and given.rows is not None else [None] * input_ids.shape[0]
            if len(before) != input_ids.shape[0]:
                raise ValueError(f"the cache holds {len(before)} rows, input_ids has {input_ids.shape[0]}")
            full, rows = self._by_rows(input_ids, keep, before)
            state = None
        logits = full if logits_to_keep == 0 else full[:, -logits_to_keep:]
        loss = None if labels is None else next_token_loss(full, labels, num_items_in_batch)
        new_cache = None
        if use_cache is not False:
            new_cache = given if given is not None else TitansCache()
            new_cache.state, new_cache.rows, new_cache.seen = state, rows, past + input_ids.shape[1]
        if return_dict is False:
            return tuple(v for v in (loss, logits, new_cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: new_cache})
