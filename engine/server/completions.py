"""POST /v1/completions: prompts (text, token ids, or batches of either) to OpenAI text completions."""

from __future__ import annotations

from collections.abc import Iterable

from kvpilot.engine.config import SamplingParams
from kvpilot.engine.outputs import TokenLogprob
from kvpilot.engine.server.deltas import Delta, DeltaTracker, final_usage
from kvpilot.engine.server.generate import collect, event_stream
from kvpilot.engine.server.protocol import CompletionRequest
from kvpilot.engine.server.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
    new_id,
    now_s,
)
from kvpilot.engine.server.streams import EventStream, ServingContext, open_streams
from starlette.requests import Request
from starlette.responses import Response


def _logprobs(ctx: ServingContext, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in lps:
        token = ctx.token_text(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({ctx.token_text(t): v for t, v in lp.top.items()})
        out.text_offset.append(offset)
        offset += len(token)
    return out


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    body.check_supported()
    params = SamplingParams(**body.sampling_fields(), max_tokens=body.max_tokens or 16, logprobs=body.logprobs)
    request_id, created = new_id("cmpl"), now_s()
    streams = await open_streams(ctx, body.prompts(), params, request_id)

    def response(choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionResponse:
        return CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                  usage=usage)

    def choice(d: Delta) -> CompletionChoice:
        lps = _logprobs(ctx, d.logprobs, d.text_offset) if body.logprobs is not None else None
        return CompletionChoice(index=d.index, text=d.text, logprobs=lps, finish_reason=d.finish_reason,
                                stop_reason=d.stop_reason)

    if body.stream:
        def chunks(deltas: list[Delta]) -> Iterable[CompletionResponse]:
            return [response([choice(d) for d in deltas], None)] if deltas else []

        usage_chunk = (lambda usage: response([], usage)) if body.include_usage else None
        tracker = DeltaTracker(body.n, len(streams))
        return EventStream(event_stream(ctx, streams, tracker, chunks, usage_chunk))

    outputs = await collect(ctx, request, streams)
    choices = [
        choice(Delta(p * body.n + o.index, o.text, o.logprobs or [], 0, o.finish_reason, o.stop_reason, True))
        for p, out in enumerate(outputs)
        for o in out.outputs
    ]
    return Response(response(choices, final_usage(outputs)).model_dump_json(), media_type="application/json")
