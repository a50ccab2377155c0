"""Tool calling over HTTP with the real `openai` client on the demo model (random weights): tool_choice required,
a named function and auto; streamed calls in OpenAI's delta shape that assemble to the non-streamed result;
multi-turn conversations through the chat template; 400s for bad tool specs and unknown names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpilot.engine.server.errors import APIError
from kvpilot.engine.server.protocol import ChatCompletionRequest
from kvpilot.engine.server.tool_calls import plan
from openai.lib.streaming.chat import ChatCompletionStreamState
from pydantic import BaseModel, Field

from tests.server.conftest import RunningServer, serve

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                           "tags": {"type": "array", "items": {"enum": ["news", "web"]},
                                                    "maxItems": 2}},
          "required": ["query"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# The grammar allows the end of the output only after a complete call; random weights get a nudge to take it
# rather than run to max_tokens with call after call.
END = {"logit_bias": {"0": 3.0}}  # <|endoftext|>


@pytest.fixture(scope="module")
def tool_server() -> Iterator[RunningServer]:
    with serve(max_model_len=1024, num_kv_blocks=512) as running:
        yield running


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def check_calls(message: Any, names: set[str]) -> None:
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_parse_and_validate(tool_server: RunningServer) -> None:
    c = client(tool_server)
    for seed in range(4):
        out = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                        seed=seed, temperature=1.0, max_tokens=300, extra_body=END)
        assert out.choices[0].finish_reason == "tool_calls"
        check_calls(out.choices[0].message, set(SCHEMAS))
        single = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=seed, max_tokens=300, extra_body=END)
        assert len(single.choices[0].message.tool_calls) == 1
    tool_server.wait_idle()


class Forecast(BaseModel):
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=5)


def test_named_function_with_the_clients_strict_tool_parse(tool_server: RunningServer) -> None:
    c = client(tool_server)
    for seed in range(3):
        out = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, seed=seed, max_tokens=300,
                                        tool_choice={"type": "function", "function": {"name": "search"}},
                                        extra_body=END)
        assert [t.function.name for t in out.choices[0].message.tool_calls] == ["search"]
        check_calls(out.choices[0].message, {"search"})
        parsed = c.chat.completions.parse(model="demo", messages=MESSAGES, seed=seed, max_tokens=300,
                                          tools=[openai.pydantic_function_tool(Forecast)], extra_body=END,
                                          tool_choice={"type": "function", "function": {"name": "Forecast"}})
        (call,) = parsed.choices[0].message.tool_calls
        assert isinstance(call.function.parsed_arguments, Forecast)
    tool_server.wait_idle()


def _stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 300, "temperature": 1.0,
            "stream": True, **END, **extra}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_assemble_to_the_non_streamed_result(tool_server: RunningServer, choice: Any) -> None:
    c = client(tool_server)
    for seed in range(3):
        body = _stream_body(tool_choice=choice, seed=seed, n=2)
        state = ChatCompletionStreamState()
        firsts: set[tuple[int, int]] = set()
        with httpx.stream("POST", f"{tool_server.url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for ch in chunk["choices"]:
                    for piece in ch["delta"].get("tool_calls") or []:
                        key = (ch["index"], piece["index"])
                        if key not in firsts:  # OpenAI's shape: index, id, type and name first...
                            assert set(piece) == {"index", "id", "type", "function"}, piece
                            assert piece["function"] == {"name": piece["function"]["name"], "arguments": ""}
                            firsts.add(key)
                        else:  # ...then pieces of the arguments
                            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk))
        streamed = state.get_final_completion()
        whole = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice=choice, seed=seed,
                                          n=2, max_tokens=300, temperature=1.0, extra_body=END)
        for s, w in zip(sorted(streamed.choices, key=lambda x: x.index), whole.choices, strict=True):
            assert s.finish_reason == w.finish_reason == "tool_calls"
            assert [(t.function.name, t.function.arguments) for t in s.message.tool_calls] == \
                [(t.function.name, t.function.arguments) for t in w.message.tool_calls]
            assert s.message.content is None
            check_calls(w.message, set(SCHEMAS))
    tool_server.wait_idle()


# With tool_choice auto the model is free; this regex makes it write a Hermes call, so what auto parses is known.
HERMES_CALL = r'<tool_call>\n\{"name": "search", "arguments": \{"query": "[a-z]{1,6}"\}\}\n</tool_call>'


def test_auto_parses_what_the_model_writes_whole_and_streamed(tool_server: RunningServer) -> None:
    c = client(tool_server)
    for seed in range(3):
        free = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, seed=seed, max_tokens=40)
        choice = free.choices[0]
        assert choice.finish_reason in {"stop", "length", "tool_calls"}
        assert all(t.function.name in SCHEMAS for t in choice.message.tool_calls or [])
        forced = {"structured_outputs": {"regex": HERMES_CALL}}
        whole = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, seed=seed,
                                          max_tokens=60, extra_body=forced)
        assert whole.choices[0].finish_reason == "tool_calls"
        check_calls(whole.choices[0].message, {"search"})
        with c.chat.completions.stream(model="demo", messages=MESSAGES, tools=TOOLS, seed=seed, max_tokens=60,
                                       extra_body=forced) as stream:
            streamed = stream.get_final_completion()
        assert streamed.choices[0].message.tool_calls[0].function.arguments == \
            whole.choices[0].message.tool_calls[0].function.arguments
    tool_server.wait_idle()


def test_tool_choice_none_neither_renders_nor_parses_tools(tool_server: RunningServer) -> None:
    c = client(tool_server)
    none = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=60,
                                     extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    auto = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, max_tokens=1)
    plain = c.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content.startswith("<tool_call>")


def test_multi_turn_tool_calls_and_results_go_through_the_template(tool_server: RunningServer) -> None:
    c = client(tool_server)
    first = c.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=1,
                                      max_tokens=300, extra_body=END)
    assistant = first.choices[0].message.model_dump(exclude_none=True)
    results = [{"role": "tool", "tool_call_id": t.id, "content": '{"temperature": 21}'}
               for t in first.choices[0].message.tool_calls]
    conversation = [*MESSAGES, assistant, *results]
    second = c.chat.completions.create(model="demo", messages=conversation, tools=TOOLS, max_tokens=4, seed=2)
    assert second.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    tokenizer = tool_server.engine.tokenizer
    for_template = ChatCompletionRequest(model="demo", messages=conversation).messages_for_template()
    text = tokenizer.apply_chat_template(for_template, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.count('<tool_call>\n{"name": "') == text.count("<tool_response>") == len(results)
    assert second.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False).input_ids)
    tool_server.wait_idle()


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "x"}}}}}]},
     "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
]


@pytest.mark.parametrize("extra, param", BAD_REQUESTS)
def test_bad_tool_specs_are_400s_in_openai_shape(tool_server: RunningServer, extra: dict[str, Any],
                                                  param: str) -> None:
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(f"{tool_server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error


def test_unknown_function_name_is_a_typed_client_error(tool_server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(tool_server).chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS,
                                                    tool_choice={"type": "function", "function": {"name": "x"}})
    assert err.value.body["param"] == "tool_choice" and "'x'" in err.value.body["message"]


def test_a_model_whose_template_shows_no_tool_format_refuses_tools() -> None:
    body = ChatCompletionRequest(model="demo", messages=MESSAGES, tools=TOOLS)
    with pytest.raises(APIError) as err:
        plan(None, body)
    assert err.value.status == 400 and "--tool-call-parser" in str(err.value)
    assert plan(None, ChatCompletionRequest(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="none")).fmt \
        is None


def test_llama3_json_format_by_flag() -> None:
    with serve(max_model_len=1024, num_kv_blocks=256, tool_call_parser="llama3_json") as llama:
        out = client(llama).chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, seed=4,
                                                    tool_choice="required", max_tokens=300, extra_body=END)
        assert out.choices[0].finish_reason == "tool_calls"
        check_calls(out.choices[0].message, set(SCHEMAS))
        llama.wait_idle()


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=6),
                  st.sampled_from(["object", "string", "integer", "array", "number", "[a-", "^a+$", "x"]))
_schemas = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["type", "properties", "required", "items", "enum", "pattern", "minLength",
                                     "maxLength", "minimum", "anyOf", "additionalProperties", "a", "b"]),
                    inner, max_size=4)), max_leaves=10)
_names = st.sampled_from(["get_weather", "search", "f", "get_weather", "search", "bad name"])
_tools = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["function"] * 5 + ["other"]),
     "function": st.fixed_dictionaries({"name": _names}, optional={"parameters": _schemas, "strict": st.booleans(),
                                                                   "description": st.text(max_size=8)})}),
    max_size=3)
_choices = st.one_of(st.sampled_from(["none", "auto", "required", "any", None]), st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": _names})}))
_calls = st.lists(st.fixed_dictionaries({"id": st.text(max_size=4), "type": st.just("function"), "function":
                  st.fixed_dictionaries({"name": _names, "arguments": st.sampled_from(["{}", '{"a": 1}', "[", ""])})}),
                  max_size=2)
_messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=10)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none() | st.text(max_size=5)},
                          optional={"tool_calls": _calls}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": st.text(max_size=5),
                           "tool_call_id": st.sampled_from(["call_1", ""])})), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tools=_tools, choice=_choices, parallel=st.sampled_from([None, True, False]), messages=_messages,
       stream=st.booleans())
def test_fuzzed_tool_requests_never_5xx(tool_server: RunningServer, tools: list, choice: Any, parallel: bool | None,
                                        messages: list, stream: bool) -> None:
    body: dict[str, Any] = {"model": "demo", "messages": messages, "max_tokens": 3, "tools": tools, "stream": stream}
    body |= {"tool_choice": choice} if choice is not None else {}
    body |= {"parallel_tool_calls": parallel} if parallel is not None else {}
    r = httpx.post(f"{tool_server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code < 500, (body, r.text)
    if r.status_code == 200 and stream:
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    elif r.status_code != 200:
        assert r.json()["error"]["message"]
