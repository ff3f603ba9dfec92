"""The byte-level tokeniser as a transformers tokenizer: a text's UTF-8 bytes are its token ids, exactly as
``titans_compose.train.data.encode`` / ``decode`` make them (invalid UTF-8 decodes to U+FFFD).

The byte vocabulary has no special tokens. Tools that need one (padding a batch, an end-of-text string to stop at,
a prefix for an empty context) get byte 0 (NUL), which text does not contain: its token string is ``"\\x00"`` itself,
so a NUL in a text encodes to id 0 either way and the ids always equal the bytes.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizer

NUL = "\x00"
VOCAB = 256


class ByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes as token ids 0..255; each token's string is the byte read as Latin-1 (one character)."""

    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012 (transformers reads the class attribute)

    def __init__(self, eos_token: str = NUL, pad_token: str = NUL, **kwargs: Any) -> None:
        super().__init__(eos_token=eos_token, pad_token=pad_token, **kwargs)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """The ids as they are: the model was trained on bytes alone, with no tokens added around a text."""
        return token_ids_0 + (token_ids_1 or [])

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(VOCAB)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return list(text.encode("utf-8").decode("latin-1"))

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) >= VOCAB:
            raise ValueError(f"{token!r} is not a byte token (one character below U+0100)")
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < VOCAB:
            raise ValueError(f"token id {index} is not a byte (0..255)")
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).encode("latin-1").decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 bytes: nothing to save
