"""kvpilot.engine: the inference engine. Heavy modules load on first use so light importers stay light."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "kvpilot.engine.llm",
    "AsyncEngine": "kvpilot.engine.async_engine",
    "EngineConfig": "kvpilot.engine.config",
    "SamplingParams": "kvpilot.engine.config",
    "StructuredOutputs": "kvpilot.engine.structured.params",
    "RequestOutput": "kvpilot.engine.outputs",
    "CompletionOutput": "kvpilot.engine.outputs",
    "RequestRejected": "kvpilot.engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvpilot.engine' has no attribute {name!r}")
