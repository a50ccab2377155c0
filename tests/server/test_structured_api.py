"""Structured outputs and prompt scoring over HTTP: response_format, vLLM's structured_outputs, the real
`openai` client's .parse(), echo with logprobs (and max_tokens 0) as evaluation harnesses send it."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from kvpilot.engine import LLM, SamplingParams
from pydantic import BaseModel, Field

from tests.server.conftest import SMALL_ENGINE, RunningServer


class Verdict(BaseModel):
    answer: Literal["yes", "no", "unsure"]
    score: int = Field(ge=0, le=100)
    final: bool


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["city", "rank", "tags"], "additionalProperties": False}


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_parse_returns_the_pydantic_object(server: RunningServer) -> None:
    for seed in range(3):
        out = client(server).chat.completions.parse(
            model="demo", messages=[{"role": "user", "content": "Is it?"}], response_format=Verdict,
            max_completion_tokens=120, seed=seed, temperature=1.0)
        parsed = out.choices[0].message.parsed
        assert isinstance(parsed, Verdict) and 0 <= parsed.score <= 100
    server.wait_idle()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_response_format_json_schema_and_object(server: RunningServer, path: str) -> None:
    base = {"model": "demo", "max_tokens": 150, "temperature": 0.8}
    base |= {"prompt": "JSON:"} if "chat" not in path else {"messages": [{"role": "user", "content": "JSON"}]}
    formats = [{"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}},
               {"type": "json_object"}]
    for i, fmt in enumerate(formats * 2):
        r = httpx.post(server.url + path, json={**base, "seed": i, "response_format": fmt}, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["text"] if "chat" not in path else choice["message"]["content"]
        if choice["finish_reason"] == "length":
            continue  # an unbounded json_object string on random weights; the schema's fields are bounded
        value = json.loads(text)
        if fmt["type"] == "json_schema":
            jsonschema.validate(value, SCHEMA)
        assert isinstance(value, dict)


def test_vllm_structured_outputs_regex_and_choice(server: RunningServer) -> None:
    c = client(server)
    for seed in range(4):
        out = c.completions.create(model="demo", prompt="IP:", max_tokens=30, seed=seed, temperature=1.0,
                                   extra_body={"structured_outputs": {"regex": r"\d{1,3}(\.\d{1,3}){3}"}})
        assert re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", out.choices[0].text)
        chat = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "?"}], seed=seed,
                                         extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
        assert chat.choices[0].message.content in {"red", "green", "blue"}
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="demo", prompt="x", max_tokens=10, stream=True, seed=seed,
            extra_body={"structured_outputs": {"choice": ["alpha beta", "gamma"]}}) if ch.choices)
        assert streamed in {"alpha beta", "gamma"}
    server.wait_idle()


def test_bad_schema_is_a_400_in_openai_shape(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}})
    body = err.value.body
    assert body["type"] == "invalid_request_error" and "invalid JSON schema" in body["message"]


def _loglikelihood_payload(prompts: list[list[int]]) -> dict[str, object]:
    """Exactly what lm-evaluation-harness's local-completions model sends for log-likelihood requests
    (lm_eval/models/openai_completions.py, 0.4.13): token-id prompts, echo, logprobs 1, one token."""
    return {"model": "demo", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}


def _parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval 0.4.13's parse_logprobs: the continuation's summed logprob and whether it was greedy."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens, strict=True):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(tok == max(top.values()) for tok, top in zip(lps, tops, strict=True))))
    return res


def test_echo_logprobs_equal_the_offline_engines_prompt_logprobs(server: RunningServer) -> None:
    """The request shape lm-eval's multiple-choice tasks send, scored against the offline engine."""
    context = [5, 17, 99, 230, 41, 8]
    continuations = [[300, 301], [12], [400, 2, 77, 9]]
    prompts = [context + c for c in continuations]
    r = httpx.post(f"{server.url}/v1/completions", json=_loglikelihood_payload(prompts), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    for choice, prompt in zip(body["choices"], prompts, strict=True):
        lps = choice["logprobs"]
        assert len(lps["token_logprobs"]) == len(prompt) + 1 and lps["token_logprobs"][0] is None
        assert lps["top_logprobs"][0] is None
    got = _parse_logprobs(body, [len(context)] * 3)
    llm = LLM(**{**SMALL_ENGINE, "max_num_batched_tokens": 4})
    for (total, _), prompt in zip(got, prompts, strict=True):
        ref = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs
        assert abs(total - sum(lp.logprob for lp in ref[len(context):])) < 1e-4
    zero = httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={**_loglikelihood_payload([prompts[0]]), "max_tokens": 0}).json()["choices"][0]
    assert len(zero["logprobs"]["token_logprobs"]) == len(prompts[0]) and zero["finish_reason"] == "length"
    assert zero["logprobs"]["token_logprobs"][1:] == body["choices"][0]["logprobs"]["token_logprobs"][1:-1]
    server.wait_idle()


def test_metrics_count_constrained_requests_compiles_and_jump_forward(server: RunningServer) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r'^kvpilot:(\w+?)(_total)?\{(.*)\} (\S+)$', line)
            if m and ("grammar" in m[1] or "jump" in m[1] or ("structured" in m[1] and 'kind="regex"' in m[3])):
                values[m[1]] = float(m[4])
        return values

    before = scrape()
    body = {"model": "demo", "prompt": "x", "max_tokens": 40,
            "structured_outputs": {"regex": "metrics-test-fixed-prefix-[0-9]{2}"}}
    for _ in range(2):
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    after = scrape()
    assert after["structured_requests"] - before.get("structured_requests", 0) == 2
    assert after["grammar_compiles"] - before["grammar_compiles"] == 1
    assert after["grammar_cache_hits"] - before["grammar_cache_hits"] == 1
    assert after["grammar_compile_seconds"] > before["grammar_compile_seconds"]
    assert after["jump_forward_tokens"] - before["jump_forward_tokens"] >= 2 * 10  # the fixed prefix, twice
