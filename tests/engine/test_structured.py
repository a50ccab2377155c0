"""Constrained decoding in the engine: every output keeps to its grammar, in any batch, under preemption,
chunked prefill, prefix caching and n > 1; grammars compile once and off the step loop; jump-forward."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import jsonschema
import pytest
from kvpilot.engine import LLM, RequestRejected, SamplingParams, StructuredOutputs
from kvpilot.engine.structured import grammar

sys.path.insert(0, str(Path(__file__).parent))
from schemas import closing_bias, random_object_schema

ENGINE = {"device": "cpu", "max_model_len": 1024, "num_kv_blocks": 1024, "max_num_seqs": 32}
REGEXES = [r"[a-z]{3}-\d{2,4}", r"(yes|no)!?", r"\d{1,3}(\.\d{1,3}){3}", r"[A-Z][a-z]{1,8} [A-Z][a-z]{1,8}",
           r"0x[0-9a-f]{2,8}", r"(ab|cd){1,4}e"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", **ENGINE)


def _schema_params(llm: LLM, schema: dict, seed: int, temperature: float = 1.0, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=600, temperature=temperature, seed=seed, logit_bias=closing_bias(llm.tokenizer),
                          structured_outputs=StructuredOutputs(json=schema), **kw)


def test_random_schemas_always_validate(llm: LLM) -> None:
    schemas = [random_object_schema(seed) for seed in range(200)]
    params = [_schema_params(llm, s, seed, temperature=0.0 if seed % 4 == 0 else 1.0)
              for seed, s in enumerate(schemas)]
    outs = llm.generate(["Reply in JSON:"] * len(schemas), params)
    for schema, out in zip(schemas, outs, strict=True):
        sample = out.outputs[0]
        assert sample.finish_reason == "stop", (schema, sample.text)
        jsonschema.validate(json.loads(sample.text), schema)


def test_regex_and_choice_always_match(llm: LLM) -> None:
    choices = ["yes", "no", "maybe so", 'say "hi"', "ünïcode"]
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=i,
                             structured_outputs=StructuredOutputs(regex=REGEXES[i % len(REGEXES)]))
              for i in range(36)]
    params += [SamplingParams(max_tokens=16, temperature=1.0, seed=i,
                              structured_outputs=StructuredOutputs(choice=choices)) for i in range(24)]
    outs = llm.generate(["Answer:"] * len(params), params)
    seen = set()
    for p, out in zip(params, outs, strict=True):
        text, spec = out.outputs[0].text, p.structured_outputs
        assert out.outputs[0].finish_reason == "stop", (spec, text)
        if spec.regex is not None:
            assert re.fullmatch(spec.regex, text), (spec.regex, text)
        else:
            assert text in choices
            seen.add(text)
    assert len(seen) > 1


def test_json_object_is_an_object(llm: LLM) -> None:
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=5, logit_bias=closing_bias(llm.tokenizer),
                            structured_outputs=StructuredOutputs(json_object=True))
    for out in llm.generate(["{}"] * 8, [params.model_copy(update={"seed": i}) for i in range(8)]):
        assert out.outputs[0].finish_reason == "stop"
        assert isinstance(json.loads(out.outputs[0].text), dict)


def _mixed_requests(llm: LLM) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(7)
    reqs = []
    for i in range(14):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(5, 90))]
        if i % 5 == 0:
            prompt = list(range(3, 70)) + prompt[:5]  # a shared prefix: prefix-cache hits
        if i % 3 == 0:
            params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        elif i % 3 == 1:
            params = _schema_params(llm, random_object_schema(100 + i), i, temperature=0.0, n=1 + i % 2)
            params = params.model_copy(update={"max_tokens": 150})
        else:
            params = SamplingParams(max_tokens=30, temperature=0.0,
                                    structured_outputs=StructuredOutputs(regex=REGEXES[i % len(REGEXES)]))
        reqs.append((prompt, params))
    return reqs


def test_mixed_batches_under_preemption_match_alone(llm: LLM) -> None:
    """Constrained and free requests together, in a pool small enough to preempt, with chunked prefill,
    prefix caching and n=2 samples: greedy outputs equal those each request gets alone."""
    reqs = _mixed_requests(llm)
    alone = [[o.token_ids for o in llm.generate([p], params)[0].outputs] for p, params in reqs]
    tight = LLM("demo", **{**ENGINE, "num_kv_blocks": 24, "max_num_batched_tokens": 48})
    outs = tight.generate([p for p, _ in reqs], [params for _, params in reqs])
    assert tight.core.stats().num_preemptions > 0, "the pool was meant to be too small to hold every request"
    assert tight.core.stats().prefix_cache_hits > 0
    assert [[o.token_ids for o in out.outputs] for out in outs] == alone
    stats = tight.core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not tight.core.has_unfinished


def test_n_samples_each_follow_the_grammar(llm: LLM) -> None:
    schema = random_object_schema(3)
    out = llm.generate(["x"], _schema_params(llm, schema, 11, n=4))[0]
    texts = [o.text for o in out.outputs]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1


def test_grammars_compile_once_per_content(llm: LLM) -> None:
    compiler = llm.core.grammars.compiler
    schema = {"type": "object", "properties": {"unique_key_for_cache_test": {"type": "boolean"}},
              "required": ["unique_key_for_cache_test"]}
    before, hits = compiler.num_compiles, compiler.num_cache_hits
    params = SamplingParams(max_tokens=40, structured_outputs=StructuredOutputs(json=schema))
    llm.generate(["a", "b", "c"], params)
    llm.generate(["d"], params.model_copy(update={"structured_outputs": StructuredOutputs(json=json.dumps(schema))}))
    assert compiler.num_compiles == before + 1
    assert compiler.num_cache_hits == hits + 3


def test_bad_grammars_are_refused_at_submission(llm: LLM) -> None:
    bad = [StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}),
           StructuredOutputs(json="{not json"), StructuredOutputs(json={"type": "integr"}),
           StructuredOutputs(regex="(ab"), StructuredOutputs(grammar='root ::= "a'),
           StructuredOutputs(grammar="start: undefined_rule"), StructuredOutputs(structural_tag="{"),
           StructuredOutputs(structural_tag='{"type": "structural_tag", "format": {"type": "tag"}}'),
           StructuredOutputs(structural_tag=_tag({"type": "json_schema", "json_schema": {"type": "integr"}})),
           StructuredOutputs(structural_tag='{"structures": [{"begin": "<a>"}], "triggers": ["<a"]}')]
    for spec in bad:
        with pytest.raises(RequestRejected) as err:
            llm.add_request("x", SamplingParams(structured_outputs=spec))
        assert err.value.param == "structured_outputs" and str(err.value).startswith("invalid ")
    assert not llm.core.has_unfinished
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["a"])


def _tag(content: dict) -> str:
    return json.dumps({"type": "structural_tag", "format": {"type": "tag", "begin": "<r>", "content": content,
                                                            "end": "</r>"}})


def test_structural_tag_contents_are_compact_json_like_a_json_constraint(llm: LLM) -> None:
    """vLLM's structural_tag: a JSON-schema content is generated as `json` would be, with no free whitespace."""
    params = [SamplingParams(max_tokens=400, temperature=1.0, seed=seed, logit_bias=closing_bias(llm.tokenizer),
                             structured_outputs=StructuredOutputs(structural_tag=_tag(
                                 {"type": "json_schema", "json_schema": random_object_schema(seed)})))
              for seed in range(12)]
    for p, out in zip(params, llm.generate(["Tagged:"] * len(params), params), strict=True):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop" and text.startswith("<r>") and text.endswith("</r>"), text
        value = json.loads(text[3:-4])
        schema = json.loads(p.structured_outputs.structural_tag)["format"]["content"]["json_schema"]
        jsonschema.validate(value, schema)
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text[3:-4])
        assert re.fullmatch(r"(?:[^\s]|(?<=[,:]) )*", outside_strings), text  # json.dumps spacing only


def test_vllms_first_structural_tag_form_is_the_triggered_tags_it_means() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}}
    legacy = {"structures": [{"begin": "<r>", "schema": schema, "end": "</r>"}], "triggers": ["<r"]}
    current = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<r"], "tags": [
        {"type": "tag", "begin": "<r>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</r>"}]}}
    built = [str(grammar.build(StructuredOutputs(structural_tag=json.dumps(t)))) for t in (legacy, current)]
    assert built[0] == built[1] and "TagDispatch" in built[0]


def test_abort_while_compiling_frees_everything(llm: LLM) -> None:
    schema = random_object_schema(999)
    request_id = llm.add_request("x", SamplingParams(structured_outputs=StructuredOutputs(json=schema)))
    assert request_id in llm.core.requests
    llm.abort(request_id)
    while llm.core.has_unfinished:
        llm.step()
    assert len(llm.core.grammars) == 0 and not llm.core.scheduler.has_work


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_jump_forward_appends_forced_tokens_without_steps(llm: LLM, async_scheduling: bool) -> None:
    keys = [f"configuration_parameter_number_{i}_value" for i in range(6)]
    schema = {"type": "object", "properties": {k: {"type": "boolean"} for k in keys}, "required": keys,
              "additionalProperties": False}
    params = SamplingParams(max_tokens=300, temperature=0.0, structured_outputs=StructuredOutputs(json=schema))
    counts = {}
    for jump in (True, False):
        engine = LLM("demo", **ENGINE, jump_forward=jump, async_scheduling=async_scheduling)
        request_id = engine.add_request("Settings:", params)
        steps, final = 0, None
        while engine.core.has_unfinished:
            steps += 1
            final = next((o for o in engine.step() if o.request_id == request_id), final)
        counts[jump] = (steps, engine.core.jump_forward_tokens, final.outputs[0])
    (steps_on, saved, out_on), (steps_off, none_saved, out_off) = counts[True], counts[False]
    assert none_saved == 0 and saved > 50
    # One step per sampled token (the prefill samples the first), plus a few waiting for the compile. With
    # async scheduling a step is already computing the sampled token when its grammar's jump is found: it
    # samples nothing, and the forced tokens go in the step after it.
    sampled = len(out_on.token_ids) - saved
    assert sampled <= steps_on <= (2 if async_scheduling else 1) * sampled + 5
    assert steps_off >= len(out_off.token_ids) > 5 * steps_on
    assert json.loads(out_on.text).keys() == set(keys) and json.loads(out_off.text).keys() == set(keys)


def _run_recording_overlap(engine: LLM, reqs: list[tuple[list[int], SamplingParams]]) -> tuple[list, list[bool]]:
    """Outputs, and for each collected step whether a later forward was already queued when it was read back."""
    core, runs, launched_at, overlapped = engine.core, [0], {}, []
    run, launch, collect = core.runner.run, core._launch, core._collect

    def counting_run(*args, **kwargs):
        runs[0] += 1
        return run(*args, **kwargs)

    def recording_launch(*args, **kwargs):
        flight = launch(*args, **kwargs)
        if flight is not None:
            launched_at[id(flight)] = runs[0]
        return flight

    def recording_collect(flight):
        overlapped.append(runs[0] > launched_at[id(flight)])
        return collect(flight)

    core.runner.run, core._launch, core._collect = counting_run, recording_launch, recording_collect
    ids = [engine.add_request(p, sp) for p, sp in reqs]
    done = {}
    while core.has_unfinished:
        done.update((o.request_id, o) for o in engine.step())
    return [[s.token_ids for s in done[i].outputs] for i in ids], overlapped


def test_grammars_keep_async_scheduling_and_its_outputs(llm: LLM) -> None:
    """A matcher needs only the last token, at sampling time: it is read back while the next forward runs, so
    constrained steps overlap like free ones, and outputs (jump-forward included) equal the synchronous
    engine's."""
    reqs = _mixed_requests(llm)
    outs = {on: _run_recording_overlap(LLM("demo", **ENGINE, async_scheduling=on), reqs)[0] for on in (True, False)}
    assert outs[True] == outs[False]
    constrained = [(p, sp.model_copy(update={"n": 1})) for p, sp in reqs if sp.structured_outputs is not None]
    _, overlapped = _run_recording_overlap(LLM("demo", **ENGINE, jump_forward=False), constrained)
    assert sum(overlapped) >= 0.8 * len(overlapped)
    _, overlapped = _run_recording_overlap(LLM("demo", **ENGINE, jump_forward=False, async_scheduling=False),
                                           constrained)
    assert not any(overlapped)
