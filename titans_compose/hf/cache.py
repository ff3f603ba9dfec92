"""A transformers ``Cache`` holding a titans_compose batch's stream states between calls.

The model's :class:`~titans_compose.nn.model.ModelState` already carries everything a stream needs (the memory
weights and momentum, the attention KV windows, convolution history, MAC segment-start weights), with a size that
does not grow with the stream beyond the attention windows; this cache only hands it from one ``forward`` to the
next, so ``generate`` runs one token per step from the cached state.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import Cache

from titans_compose.nn.model import ModelState


class TitansCache(Cache):
    """The stream state after the positions seen so far: ``state``, one for the whole batch, or, once an attention
    mask has left some positions out of some rows, ``rows``, one state per row (each row's stream holds only its
    unmasked tokens). ``seen`` counts positions, masked ones included, as transformers counts a cache's length.
    ``forward`` updates it in place."""

    def __init__(
        self, state: ModelState | None = None, rows: list[ModelState] | None = None, seen: int | None = None
    ) -> None:
        super().__init__(layers=[])
        self.state, self.rows = state, rows
        self.seen = seen if seen is not None else (0 if state is None else state.position)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Positions seen so far."""
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the state does not grow with the stream

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back

    @property
    def batch_size(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        return -1 if self.state is None else self.state.batch

    def reset(self) -> None:
        self.state, self.rows, self.seen = None, None, 0

    def _unsupported(self, what: str) -> Any:
        raise NotImplementedError(
            f"{what} is not supported by titans_compose models: their recurrent state cannot be reordered, copied "
            "per row or rolled back; use greedy decoding or sampling (num_beams=1, no assisted decoding)"
        )

    def reorder_cache(self, beam_idx: Any) -> None:
        self._unsupported("beam search (reordering the cache)")

    def batch_select_indices(self, indices: Any) -> None:
        self._unsupported("selecting cache rows")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("repeating cache rows")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropping the cache")
