"""Pure pieces without a server: request models, error mapping, metric observation, the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
from kvpilot.engine.config import EngineConfig, SamplingParams
from kvpilot.engine.errors import EngineDead, EngineOverloaded, RequestRejected
from kvpilot.engine.messages import EngineStats
from kvpilot.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvpilot.engine.server import errors
from kvpilot.engine.server.metrics import ServerMetrics
from kvpilot.engine.server.protocol import ChatCompletionRequest, CompletionRequest, Unsupported
from pydantic import ValidationError

from tests.server.conftest import RunningServer, dashboard_exprs


def test_prompt_shapes() -> None:
    def prompts(p: object) -> list[object]:
        return CompletionRequest(model="m", prompt=p).prompts()  # type: ignore[arg-type]

    assert prompts("hi") == ["hi"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ("", [], [[]], [-1]):
        with pytest.raises(ValidationError):
            prompts(bad)


def test_sampling_fields_map_to_sampling_params() -> None:
    req = CompletionRequest(model="m", prompt="x", temperature=0.5, top_p=0.0, stop="END", seed=3, n=2)
    params = SamplingParams(**req.sampling_fields(), max_tokens=4)
    assert params.temperature == 0.0 and params.top_p == 1.0  # top_p 0 means argmax, as OpenAI allows
    assert params.stop == ["END"] and params.seed == 3 and params.n == 2
    assert SamplingParams(**CompletionRequest(model="m", prompt="x", logit_bias={"1": 2.0}).sampling_fields(),
                          max_tokens=1).logit_bias == {1: 2.0}
    with pytest.raises(Unsupported):
        CompletionRequest(model="m", prompt="x", best_of=3).check_supported()
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", stream_options={"include_usage": True})
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                    {"type": "text", "text": "b"}]}],
                                 max_tokens=3, max_completion_tokens=5)
    assert chat.messages_for_template() == [{"role": "user", "content": "ab"}] and chat.output_limit == 5
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "a"}], top_logprobs=2)


def test_engine_errors_map_to_statuses() -> None:
    rejected = errors.from_engine(RequestRejected("too long: 300 > 256", param="max_tokens"))
    assert rejected.status == 400 and rejected.body.error.param == "max_tokens"
    overloaded = errors.from_engine(EngineOverloaded("full"))
    assert overloaded.status == 429 and overloaded.retry_after == 1
    assert errors.from_engine(EngineDead("x")).status == 503
    assert errors.draining().status == 503 and errors.draining().retry_after == 1
    response = errors.aborted(drain_expired=True).response()
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert json.loads(response.body)["error"]["code"] == "drain_timeout"


def test_validation_errors_name_the_field() -> None:
    try:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 9, "zzz": 1})
    except ValidationError as exc:
        first = errors.validation_error(exc.errors())
        assert first.status == 400 and first.body.error.param in {"temperature", "zzz"}
    malformed = errors.validation_error([{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON decode error",
                                          "ctx": {"error": "Expecting value"}}])
    assert malformed.status == 400 and "malformed JSON" in malformed.body.error.message


def _output(tokens: list[int], new: int, t: dict[str, float], finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", "p", [1, 2, 3], [CompletionOutput(0, tokens, finish_reason=finish)],
                         RequestMetrics(**t), finished=finish is not None, new_token_counts=[new])


def test_request_observer_records_latencies() -> None:
    stats = EngineStats(num_running=1, num_waiting=2, kv_cache_usage=0.25, num_free_blocks=3, num_total_blocks=4,
                        num_empty_blocks=2, prefix_cache_hits=5, prefix_cache_queries=10, num_preemptions=1)
    m = ServerMetrics(EngineConfig(model="demo", revision="r1"), "r1", lambda: stats)
    obs = m.observer()
    times = {"arrival_time": 10.0, "first_scheduled_time": 10.5, "first_token_time": 11.0, "last_token_time": 11.0}
    obs.on_output(_output([7], 1, times))
    obs.on_output(_output([7, 8, 9], 2, {**times, "last_token_time": 11.4}))
    obs.on_output(_output([7, 8, 9, 4], 1, {**times, "last_token_time": 11.5, "finished_time": 11.6}, "length"))
    labels = {"model_name": "demo", "revision": "r1"}

    def value(name: str, **extra: str) -> float | None:
        return m.registry.get_sample_value(name, {**labels, **extra})

    assert value("kvpilot:time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert value("kvpilot:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value("kvpilot:inter_token_latency_seconds_count") == 3  # two tokens in one step: two gaps of 0.2
    assert value("kvpilot:inter_token_latency_seconds_sum") == pytest.approx(0.5)
    assert value("kvpilot:inter_token_latency_seconds_bucket", le="0.15") == 1
    assert value("kvpilot:inter_token_latency_seconds_bucket", le="0.25") == 3
    assert value("kvpilot:e2e_request_latency_seconds_sum") == pytest.approx(1.6)
    assert value("kvpilot:prompt_tokens_total") == 3 and value("kvpilot:generation_tokens_total") == 4
    assert value("kvpilot:request_success_total", finished_reason="length") == 1
    assert value("kvpilot:kv_cache_usage_perc") == 0.25 and value("kvpilot:num_requests_waiting") == 2
    assert value("kvpilot:prefix_cache_hits_total") == 5 and value("kvpilot:num_preemptions_total") == 1
    assert value("kvpilot:num_empty_kv_blocks") == 2 and value("kvpilot:num_free_kv_blocks") == 3
    info = [s for metric in m.registry.collect() for s in metric.samples if s.name == "kvpilot:engine_config_info"]
    assert len(info) == 1 and info[0].value == 1
    expected = {"model": "demo", "block_size": "16", "revision": "r1", "model_name": "demo"}
    assert expected.items() <= info[0].labels.items()
    abandoned = m.observer()
    abandoned.abandoned()
    assert value("kvpilot:request_success_total", finished_reason="abort") == 1


def test_dashboard_uses_only_exported_metrics(server: RunningServer) -> None:
    httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2})
    exported = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                if line.startswith("kvpilot:")}
    used = {name for expr in dashboard_exprs() for name in re.findall(r"kvpilot:[a-z0-9_:]+", expr)}
    assert used and used <= exported, used - exported
    wanted = {"time_to_first_token", "inter_token_latency", "generation_tokens", "kv_cache_usage_perc",
              "num_requests_waiting", "num_preemptions", "prefix_cache_hits"}
    assert all(any(w in name for name in used) for w in wanted)


def test_load_generator_imports_no_torch() -> None:
    code = ("import sys, kvpilot.engine.server.loadgen, kvpilot.engine.server.bench_cli; "
            "assert not {'torch', 'transformers', 'kvpilot.engine.async_engine'} & set(sys.modules), 'heavy import'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).returncode == 0
