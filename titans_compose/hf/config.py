"""The transformers configuration of a titans_compose model: the resolved spec it is rebuilt from, and its records.

The spec is carried whole (every default written out, as ``titans-compose validate --resolved`` prints it), so the
model is rebuilt by the same builder that made it, and ``spec_sha256`` (the builder's hash of the resolved spec)
checks that this titans_compose reads the spec as the one that exported it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from transformers import PretrainedConfig

from titans_compose.spec import LoadedSpec

MODEL_TYPE = "titans_compose"
#: the tokeniser of byte-level models: UTF-8 bytes are the token ids (titans_compose.train.data.encode)
BYTES = {"kind": "bytes"}


class TitansComposeConfig(PretrainedConfig):
    """``spec``: the resolved spec as JSON data; ``spec_sha256``: its hash; ``seed``: the seed the initial weights
    were drawn with; ``plugin_records``: the plug-ins the model was made with, as a build's manifest records them;
    ``tokenizer``: the tokeniser the model reads (``{"kind": "bytes"}`` or ``{"kind": "tokenizers", "file": ...}``).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        spec: dict[str, Any] | None = None,
        spec_sha256: str | None = None,
        seed: int = 0,
        plugin_records: Sequence[dict[str, Any]] = (),
        tokenizer: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.spec = spec
        self.spec_sha256 = spec_sha256
        self.seed = seed
        self.plugin_records = [dict(r) for r in plugin_records]
        self.tokenizer = dict(tokenizer or BYTES)
        if spec is not None:
            self.vocab_size = spec["model"]["vocab_size"]
            self.hidden_size = spec["model"]["dim"]
            self.num_hidden_layers = sum(block.get("repeat", 1) for block in spec["blocks"])
        # the model ties its own embeddings (spec model.tie_embeddings): transformers must not tie anything
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @classmethod
    def from_loaded(cls, loaded: LoadedSpec, *, seed: int, plugin_records: Sequence[dict[str, Any]], **kwargs: Any):
        """The configuration of a model of ``loaded`` whose initial weights were drawn with ``seed``."""
        from titans_compose.builder import spec_hash

        data = loaded.spec.model_dump(mode="json", exclude={"extends"})
        return cls(spec=data, spec_sha256=spec_hash(loaded), seed=seed, plugin_records=plugin_records, **kwargs)

    def loaded_spec(self, plugins: Sequence[str] = ()) -> LoadedSpec:
        """The spec validated again with the built-ins, installed plug-ins and ``plugins``, checked against
        ``spec_sha256``. Raises ``ValueError`` if the configuration holds no spec, names a plug-in file or module not
        among ``plugins`` (none is imported on the configuration's word), or resolves to another spec here."""
        from titans_compose.builder import spec_hash
        from titans_compose.registry import default_registry
        from titans_compose.spec.loader import resolve_blocks
        from titans_compose.spec.source import parse_yaml
        from titans_compose.spec.validate import validate_document

        if not isinstance(self.spec, dict):
            raise ValueError("this titans_compose configuration holds no spec: export a model with titans-compose")
        check_plugin_records(self.plugin_records, plugins)
        registry, problems = default_registry(plugins)
        if problems:
            from titans_compose.errors import SpecError

            raise SpecError(problems)
        source = "config.json (spec)"
        doc = parse_yaml(yaml.safe_dump(self.spec, sort_keys=False), source)
        sections = {e.name: e.obj.sections for e in registry.entries("block")}
        loaded = validate_document(resolve_blocks(doc, sections), registry, source)
        if self.spec_sha256 is not None and spec_hash(loaded) != self.spec_sha256:
            raise ValueError(
                "config.json: its spec no longer resolves to the spec that was exported (spec_sha256 differs): this "
                "titans-compose reads the spec differently; export the model again with it"
            )
        return loaded


def check_plugin_records(records: Sequence[dict[str, Any]], plugins: Sequence[str]) -> None:
    """Refuse a model made with a plug-in file or module that is not among ``plugins`` (see
    :func:`titans_compose.builder.check_plugins`), naming it."""
    from pathlib import Path

    from titans_compose.builder import check_plugins

    try:
        check_plugins(Path("."), {"plugins": list(records)}, plugins, "exported model", ValueError)
    except ValueError as exc:  # the builder names a manifest; here the records are in config.json
        raise ValueError(f"config.json: {str(exc).split(': ', 1)[1]}") from None
