"""Deprecated: moved to :mod:`titans_compose.ops.memory.codegen` (this name keeps old imports working)."""

from titans_compose._moved import alias_package

alias_package(__name__, "titans_compose.ops.memory.codegen")
