"""Tool-call parsers on both formats: well-formed calls, malformed output (always content, as written), and the
property the stream relies on: any split of the text into pieces parses to the same message as the whole."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpilot.engine.demo import CHAT_TEMPLATE
from kvpilot.engine.tools import formats
from kvpilot.engine.tools.formats import HERMES, LLAMA3_JSON
from kvpilot.engine.tools.parser import ParsedMessage, ToolCallParser, parse

NAMES = ("get_weather", "search")
WEATHER = '{"city": "Paris", "days": 3}'


def pieces(fmt: formats.ToolFormat, text: str, sizes: list[int], constrained: bool = False,
           max_calls: int | None = None) -> ParsedMessage:
    parser, msg, at = ToolCallParser(fmt, NAMES, max_calls, constrained), ParsedMessage(), 0
    for size in sizes:
        msg.add(parser.feed(text[at:at + size]))
        at += size
    msg.add(parser.feed(text[at:]))
    return msg.add(parser.finish())


@pytest.mark.parametrize("constrained", [False, True])
def test_hermes_calls_with_text_before_and_between(constrained: bool) -> None:
    text = (f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
            '<tool_call>{"name":"search","parameters":{"q":["}{", "a\\"]"]}}</tool_call>')
    msg = parse(HERMES, NAMES, text, constrained=constrained)
    assert msg.content == "Let me check."
    assert msg.calls == [("get_weather", WEATHER), ("search", '{"q":["}{", "a\\"]"]}')]
    assert json.loads(msg.calls[1][1]) == {"q": ["}{", 'a"]']}


def test_llama3_json_calls_separated_by_semicolons() -> None:
    text = f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; {{"name": "search", "arguments": {{}}}}'
    assert parse(LLAMA3_JSON, NAMES, text).calls == [("get_weather", WEATHER), ("search", "{}")]
    assert parse(LLAMA3_JSON, NAMES, ' {"name": "search", "parameters": {"q": 1}}\nDone.').content == "Done."


@pytest.mark.parametrize("fmt, text", [
    (HERMES, "Plain text, no calls at all.\n"),
    (HERMES, "a <tool_call tag that never opens, and <tool_ at the end"),
    (HERMES, "<tool_call>not JSON at all</tool_call> then text"),
    (HERMES, '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>'),  # not a request tool
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": NaN}}\n</tool_call>'),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": ["a"]}\n</tool_call>'),
    (HERMES, '<tool_call>\n{"arguments": {}, "name": "get_weather"}\n</tool_call>'),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"a": 1,,}}\n</tool_call>'),
    (LLAMA3_JSON, 'The answer is {"name": "get_weather"}.'),
    (LLAMA3_JSON, '{"answer": 42}'),
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": }}'),
    (LLAMA3_JSON, "   "),
])
def test_malformed_output_is_content_exactly_as_written(fmt: formats.ToolFormat, text: str) -> None:
    msg = parse(fmt, NAMES, text)
    assert msg == ParsedMessage(content=text)
    assert pieces(fmt, text, [1] * len(text)) == msg


def test_a_constrained_call_cut_off_keeps_its_arguments_so_far() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert parse(HERMES, NAMES, text, constrained=True) == ParsedMessage("", [("get_weather", '{"city": "Par')])


def test_parallel_tool_calls_false_leaves_later_calls_as_content() -> None:
    second = '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>'
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n{second}'
    assert parse(HERMES, NAMES, text, max_calls=1) == ParsedMessage(second, [("get_weather", WEATHER)])


def test_streamed_arguments_come_piece_by_piece_when_constrained_and_whole_when_free() -> None:
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
    for constrained, expected in ((True, len(WEATHER)), (False, 1)):
        parser = ToolCallParser(HERMES, NAMES, constrained=constrained)
        events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
        assert type(events[0]).__name__ == "CallStart"
        assert sum(type(e).__name__ == "CallArguments" for e in events) == expected


_FRAGMENTS = ["<tool_call>", "</tool_call>", "\n", " ", "Hello", "{", "}", '"', ",", ":", ";", "<tool", "\\",
              '{"name": "get_weather", "arguments": ', '{"name": "search", "parameters": ', '{"name": "nope", ',
              '"city": "x"', '"n": [1, {"a": "}"}]', "NaN", "<|python_tag|>", '"arguments"', "{}", "; ",
              HERMES.call_text("get_weather", WEATHER), HERMES.call_text("search", '{"q": "}\\"{"}'),
              LLAMA3_JSON.call_text("search", '{"q": ["]"]}'), LLAMA3_JSON.call_text("get_weather", WEATHER)]


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(st.sampled_from(_FRAGMENTS), max_size=16), cut=st.integers(0, 400),
       seed=st.integers(0, 2**16), fmt=st.sampled_from([HERMES, LLAMA3_JSON]), constrained=st.booleans(),
       max_calls=st.sampled_from([None, 1]))
def test_any_split_parses_like_the_whole(parts: list[str], cut: int, seed: int, fmt: formats.ToolFormat,
                                         constrained: bool, max_calls: int | None) -> None:
    text = "".join(parts)[:cut]  # output may end anywhere (max_tokens)
    whole = parse(fmt, NAMES, text, max_calls, constrained)
    rng = random.Random(seed)
    assert pieces(fmt, text, [rng.randint(0, 5) for _ in range(len(text))], constrained, max_calls) == whole
    if not whole.calls:
        assert whole.content == text
    if not constrained:
        assert all(isinstance(json.loads(arguments), dict) for _, arguments in whole.calls)


@settings(max_examples=200, deadline=None)
@given(args=st.lists(st.dictionaries(st.text(max_size=6), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6), max_size=4), min_size=1, max_size=3), fmt=st.sampled_from([HERMES, LLAMA3_JSON]),
       constrained=st.booleans())
def test_calls_as_the_format_writes_them_parse_back_exactly(args: list[dict], fmt: formats.ToolFormat,
                                                            constrained: bool) -> None:
    calls = [(NAMES[i % 2], json.dumps(a, ensure_ascii=i % 2 == 0)) for i, a in enumerate(args)]
    text = fmt.separator.join(fmt.call_text(name, arguments) for name, arguments in calls)
    assert parse(fmt, NAMES, text, constrained=constrained) == ParsedMessage("", calls)


QWEN_LIKE = '{%- for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\n{"name": <function-name>, ...'
LLAMA_LIKE = ('{%- if tools %}Given the following functions, respond with a JSON for a function call: '
              '{"name": function name, "parameters": dictionary of argument name and its value}{% endif %}'
              '<|python_tag|>')


def test_the_format_is_read_from_the_chat_template_unless_named() -> None:
    assert formats.detect(CHAT_TEMPLATE) is HERMES
    assert formats.detect(QWEN_LIKE) is HERMES
    assert formats.detect(LLAMA_LIKE) is LLAMA3_JSON
    assert formats.detect("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}") is None
    assert formats.detect(None) is None
    assert formats.resolve("auto", LLAMA_LIKE) is LLAMA3_JSON
    assert formats.resolve("llama3_json", CHAT_TEMPLATE) is LLAMA3_JSON
