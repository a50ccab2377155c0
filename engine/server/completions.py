"""POST /v1/completions: prompts (text, token ids, or batches of either) to OpenAI text completions.

`echo` puts the prompt before the completion, and with `logprobs` the prompt's tokens come first in the
logprobs lists (the first token's logprob is null, as OpenAI and vLLM return it); `max_tokens: 0` with echo
scores the prompt alone, which is what evaluation harnesses send for log-likelihoods.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvpilot.engine.config import SamplingParams
from kvpilot.engine.outputs import RequestOutput, TokenLogprob
from kvpilot.engine.server.deltas import Delta, DeltaTracker, final_usage
from kvpilot.engine.server.generate import collect, event_stream
from kvpilot.engine.server.protocol import CompletionRequest
from kvpilot.engine.server.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptLogprob,
    UsageInfo,
    new_id,
    now_s,
)
from kvpilot.engine.server.streams import EventStream, ServingContext, open_streams
from starlette.requests import Request
from starlette.responses import Response


def _logprobs(ctx: ServingContext, lps: list[TokenLogprob | None], offset: int,
              out: CompletionLogprobs | None = None) -> CompletionLogprobs:
    out = out or CompletionLogprobs()
    for lp in lps:
        if lp is None:  # the prompt's first token: nothing predicts it
            continue
        token = ctx.token_text(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({ctx.token_text(t): v for t, v in lp.top.items()})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def _prompt_text(ctx: ServingContext, out: RequestOutput) -> str:
    if out.prompt is not None:
        return out.prompt
    return str(ctx.engine.tokenizer.decode(out.prompt_token_ids)) if ctx.engine.tokenizer is not None else ""


def _echoed_logprobs(ctx: ServingContext, out: RequestOutput) -> CompletionLogprobs:
    """The prompt's tokens as logprob entries: the first with a null logprob, the rest as the model scored them."""
    lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    first = ctx.token_text(out.prompt_token_ids[0])
    head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return _logprobs(ctx, lps, len(first), head)


def _vllm_prompt_logprobs(ctx: ServingContext, out: RequestOutput) -> list[dict[str, PromptLogprob] | None]:
    entries: list[dict[str, PromptLogprob] | None] = []
    for lp in out.prompt_logprobs or []:
        if lp is None:
            entries.append(None)
            continue
        entry = {str(lp.token_id): PromptLogprob(logprob=lp.logprob, decoded_token=ctx.token_text(lp.token_id))}
        for t, v in lp.top.items():
            entry.setdefault(str(t), PromptLogprob(logprob=v, decoded_token=ctx.token_text(t)))
        entries.append(entry)
    return entries


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    body.check_supported()
    fields = body.sampling_fields()
    echo_logprobs = body.echo and body.logprobs is not None
    if echo_logprobs:
        fields["prompt_logprobs"] = max(body.logprobs or 0, body.prompt_logprobs or 0)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    params = SamplingParams(**fields, max_tokens=max_tokens, logprobs=body.logprobs)
    request_id, created = new_id("cmpl"), now_s()
    streams = await open_streams(ctx, body.prompts(), params, request_id)

    def response(choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionResponse:
        return CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                  usage=usage)

    echo_chars: dict[int, int] = {}  # choice index -> length of its echoed prompt

    def choice(d: Delta) -> CompletionChoice:
        prompt = d.prompt if body.echo else None  # a choice's first delta carries its request
        echoed = _prompt_text(ctx, prompt) if prompt is not None else ""
        if prompt is not None:
            echo_chars[d.index] = len(echoed)
        lps = None
        if body.logprobs is not None:
            lps = _echoed_logprobs(ctx, prompt) if prompt is not None and echo_logprobs else None
            lps = _logprobs(ctx, d.logprobs, d.text_offset + echo_chars.get(d.index, 0), lps)
        vllm_lps = None
        if d.prompt is not None and body.prompt_logprobs is not None:
            vllm_lps = _vllm_prompt_logprobs(ctx, d.prompt)
        return CompletionChoice(index=d.index, text=echoed + d.text, logprobs=lps, finish_reason=d.finish_reason,
                                stop_reason=d.stop_reason, prompt_logprobs=vllm_lps)

    if body.stream:
        def chunks(deltas: list[Delta]) -> Iterable[CompletionResponse]:
            return [response([choice(d) for d in deltas], None)] if deltas else []

        usage_chunk = (lambda usage: response([], usage)) if body.include_usage else None
        tracker = DeltaTracker(body.n, len(streams))
        return EventStream(event_stream(ctx, streams, tracker, chunks, usage_chunk))

    outputs = await collect(ctx, request, streams)
    choices = [
        choice(Delta(p * body.n + o.index, o.text, o.logprobs or [], 0, o.finish_reason, o.stop_reason, True, out))
        for p, out in enumerate(outputs)
        for o in out.outputs
    ]
    return Response(response(choices, final_usage(outputs)).model_dump_json(), media_type="application/json")
