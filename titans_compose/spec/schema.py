"""The JSON Schema of the spec language, for editors (e.g. the YAML language server) and other tools."""

from __future__ import annotations

import json
from typing import Any

from titans_compose.registry.core import Registry
from titans_compose.spec.models import spec_model

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema(registry: Registry) -> dict[str, Any]:
    """The schema of a spec file for ``registry``'s names (plug-ins included)."""
    schema = spec_model(registry).model_json_schema(mode="validation")
    schema["title"] = "titans_compose model spec"
    return {"$schema": SCHEMA_DIALECT, **schema}


def json_schema_text(registry: Registry) -> str:
    """The schema as stable, pretty-printed JSON text (what ``specs/titans_compose.schema.json`` holds)."""
    return json.dumps(json_schema(registry), indent=2, sort_keys=True) + "\n"
