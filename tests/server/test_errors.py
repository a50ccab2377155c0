"""Error statuses in OpenAI's shape, and fuzzing: client input never yields a 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import RunningServer


def post(server: RunningServer, path: str, content: bytes | str, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, timeout=30,
                      headers={"content-type": "application/json", **headers})


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return dict(body["error"])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_400(server: RunningServer, path: str) -> None:
    r = post(server, path, b'{"model": "demo", "prompt": ')
    assert r.status_code == 400 and "malformed JSON" in error_of(r)["message"]


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "demo", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "demo", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "demo", "prompt": "x", "n": "many"}, "n"),
    ({"model": "demo", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "demo", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"model": "demo"}, "prompt"),
    ({"model": "demo", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "demo", "prompt": "x", "structured_outputs": {"regex": "(ab"}}, "structured_outputs"),
    ({"model": "demo", "prompt": "x", "structured_outputs": {"json": {"type": "integr"}}}, "structured_outputs"),
    ({"model": "demo", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"model": "demo", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}}}},
     "structured_outputs"),
    ({"model": "demo", "prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"model": "demo", "prompt": "x", "logit_bias": {"5": 1000.0}}, "logit_bias"),
    ({"model": "demo", "prompt": "x", "logit_bias": {"five": 1.0}}, "logit_bias"),
    ({"model": "demo", "prompt": [1, 2, 10**6]}, "prompt"),
])
def test_invalid_field_is_400_naming_it(server: RunningServer, body: dict[str, Any], field: str) -> None:
    r = post(server, "/v1/completions", json.dumps(body))
    err = error_of(r)
    assert r.status_code == 400, err
    assert err["param"] == field or field in err["message"], err


def test_chat_invalid_message_is_400(server: RunningServer) -> None:
    r = post(server, "/v1/chat/completions", json.dumps({"model": "demo", "messages": [{"role": "wizard"}]}))
    assert r.status_code == 400 and "messages.0.role" in error_of(r)["param"]


def test_unknown_model_is_404(server: RunningServer) -> None:
    r = post(server, "/v1/completions", json.dumps({"model": "gpt-7", "prompt": "x"}))
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


def test_too_long_is_400_with_both_numbers(server: RunningServer) -> None:
    r = post(server, "/v1/completions", json.dumps({"model": "demo", "prompt": [5] * 200, "max_tokens": 100}))
    message = error_of(r)["message"]
    assert r.status_code == 400 and "256" in message and "300" in message and "100" in message


def test_body_over_limit_is_413(server: RunningServer) -> None:
    limit = server.app.state.options.max_body_bytes
    big = json.dumps({"model": "demo", "prompt": "x" * (limit + 10)})
    assert post(server, "/v1/completions", big).status_code == 413

    def chunked() -> Any:  # no Content-Length: the limit is enforced on the streamed body
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    r = httpx.post(f"{server.url}/v1/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_openapi_document_served(server: RunningServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"} <= set(
        doc["paths"])


_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=3),
    st.lists(st.integers(min_value=-5, max_value=600), max_size=5),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_small_max_tokens = st.one_of(st.integers(min_value=-2, max_value=4), _values)
_fields = ["prompt", "n", "temperature", "top_p", "stop", "seed", "logprobs", "stream", "presence_penalty",
           "frequency_penalty", "repetition_penalty",
           "top_k", "min_p", "min_tokens", "stream_options", "user", "best_of", "echo", "logit_bias",
           "stop_token_ids", "ignore_eos", "messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
           "parallel_tool_calls", "x"]
_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.just("demo"), _values), "max_tokens": _small_max_tokens},
    optional={f: (_values if f != "messages" else st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": _values}), max_size=3))
              for f in _fields},
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.one_of(_bodies.map(lambda b: json.dumps(b).encode()), st.binary(max_size=64)))
def test_fuzz_never_5xx(server: RunningServer, path: str, body: bytes) -> None:
    r = post(server, path, body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        error_of(r)


def test_healthy_after_fuzz(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200
    r = post(server, "/v1/completions", json.dumps({"model": "demo", "prompt": "ok", "max_tokens": 2}))
    assert r.status_code == 200
    server.wait_idle()
