"""Fuzz the OpenAI protocol models over their full value ranges against a live server.

Bodies are generated from the request models' own JSON schemas (hypothesis-jsonschema), so every field
takes values anywhere in its declared range, unbounded integers included; a second strategy narrows the
schema (the served model, small outputs, token ids near the vocabulary) so that many bodies pass
validation and reach the sampler. After every case the server must still be healthy and serve.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from kvpilot.engine.server.protocol import ChatCompletionRequest, CompletionRequest

from tests.server.conftest import RunningServer

VOCAB = 512  # the demo model's


def _narrowed(schema: dict[str, Any]) -> dict[str, Any]:
    """The same schema with the served model, max_tokens <= 4 and token ids in [0, 2 x vocab)."""
    s = copy.deepcopy(schema)
    props = s["properties"]
    props["model"] = {"const": "demo"}
    props["max_tokens"] = {"type": "integer", "minimum": -1, "maximum": 4}
    props.pop("max_completion_tokens", None)
    s["required"] = sorted({*s.get("required", []), "model", "max_tokens"})

    def bound_ints(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer" and "maximum" not in node:
                node["maximum"] = 2 * VOCAB
            for value in node.values():
                bound_ints(value)
        elif isinstance(node, list):
            for value in node:
                bound_ints(value)

    for field in ("prompt", "stop_token_ids", "top_k", "min_tokens"):
        if field in props:
            bound_ints(props[field])
    if "logit_bias" in props:
        props["logit_bias"] = {"anyOf": [{"type": "object", "maxProperties": 3,
                                          "propertyNames": {"pattern": "^[0-9]{1,4}$"},
                                          "additionalProperties": {"type": "number"}}, {"type": "null"}]}
    return s


def _bodies(model: type) -> st.SearchStrategy[dict[str, Any]]:
    schema = model.model_json_schema()
    return st.one_of(from_schema(schema), from_schema(_narrowed(schema)))


@pytest.mark.parametrize(("path", "model"), [("/v1/completions", CompletionRequest),
                                             ("/v1/chat/completions", ChatCompletionRequest)])
def test_full_range_bodies_never_hurt_the_server(server: RunningServer, path: str, model: type) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies(model))
    def case(body: dict[str, Any]) -> None:
        r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert r.status_code in {200, 400, 404}, (body, r.status_code, r.text[:500])
        if r.status_code != 200 and not body.get("stream"):
            assert set(r.json()) == {"error"}
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        ok = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "ok", "max_tokens": 2},
                        timeout=60)
        assert ok.status_code == 200, ok.text

    case()
    server.wait_idle()
