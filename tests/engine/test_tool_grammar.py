"""tool_choice "required" and named functions as grammars: on random weights, every output is one or more calls in
the model's format whose arguments parse and validate against the function's schema, for random schemas."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import jsonschema
import pytest
from kvpilot.engine import LLM, SamplingParams, StructuredOutputs
from kvpilot.engine.tools.formats import HERMES, LLAMA3_JSON, constrained_tag
from kvpilot.engine.tools.parser import parse

sys.path.insert(0, str(Path(__file__).parent))
from schemas import closing_bias, random_object_schema

ENGINE = {"device": "cpu", "max_model_len": 1024, "num_kv_blocks": 1024, "max_num_seqs": 32}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", **ENGINE)


def test_constrained_calls_always_parse_and_validate(llm: LLM) -> None:
    cases = []
    for seed in range(120):
        rng = random.Random(seed)
        functions = [(f"fn_{i}", random_object_schema(seed * 7 + i)) for i in range(rng.randint(1, 3))]
        named = rng.random() < 0.4
        offered = [rng.choice(functions)] if named else functions
        cases.append((HERMES if seed % 2 else LLAMA3_JSON, functions, offered, not named and seed % 3 != 0))
    bias = {**closing_bias(llm.tokenizer), llm.tokenizer.eos_token_id: 4.0}  # EOS is allowed only after a call
    params = [SamplingParams(max_tokens=900, temperature=0.0 if seed % 5 == 0 else 1.0, seed=seed, logit_bias=bias,
                             structured_outputs=StructuredOutputs(structural_tag=constrained_tag(fmt, offered, par)))
              for seed, (fmt, _, offered, par) in enumerate(cases)]
    outs = llm.generate(["Call a tool:"] * len(cases), params)
    formats_seen, most_calls = set(), 0
    for (fmt, functions, offered, parallel), out in zip(cases, outs, strict=True):
        sample = out.outputs[0]
        assert sample.finish_reason == "stop", (fmt.name, sample.text)
        msg = parse(fmt, [name for name, _ in functions], sample.text, constrained=True)
        assert msg.content == "" and msg.calls, (fmt.name, sample.text)
        assert parallel or len(msg.calls) == 1
        schemas = dict(offered)
        for name, arguments in msg.calls:
            jsonschema.validate(json.loads(arguments), schemas[name])
        formats_seen.add(fmt.name)
        most_calls = max(most_calls, len(msg.calls))
    assert formats_seen == {"hermes", "llama3_json"} and most_calls > 1


def test_required_calls_follow_the_format_the_chat_template_renders_back(llm: LLM) -> None:
    """The constrained output is exactly what the demo template renders for the same calls in the next turn."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{2,6}$"}},
              "required": ["city"], "additionalProperties": False}
    tag = constrained_tag(HERMES, [("get_weather", schema)], parallel=False)
    messages = [{"role": "user", "content": "Weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    prompt = llm.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=60, temperature=1.0, seed=3,
                                                   structured_outputs=StructuredOutputs(structural_tag=tag)))
    (name, arguments), = parse(HERMES, ["get_weather"], out.outputs[0].text, constrained=True).calls
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.loads(arguments)}}
    history = llm.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "", "tool_calls": [call]}],
                                                tools=tools, tokenize=False)
    assert history == prompt + out.outputs[0].text + "<|im_end|>\n"
