"""POST /v1/chat/completions: messages through the tokenizer's chat template to OpenAI chat completions."""

from __future__ import annotations

from collections.abc import Iterable

from kvpilot.engine.config import SamplingParams
from kvpilot.engine.errors import RequestRejected
from kvpilot.engine.outputs import TokenLogprob
from kvpilot.engine.server import errors
from kvpilot.engine.server.deltas import Delta, DeltaTracker, final_usage
from kvpilot.engine.server.errors import APIError
from kvpilot.engine.server.generate import collect, event_stream
from kvpilot.engine.server.protocol import ChatCompletionRequest
from kvpilot.engine.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    TopLogprob,
    UsageInfo,
    new_id,
    now_s,
)
from kvpilot.engine.server.streams import EventStream, ServingContext, open_streams
from starlette.requests import Request
from starlette.responses import Response


def render_prompt(ctx: ServingContext, body: ChatCompletionRequest) -> list[int]:
    """Token ids of the templated conversation (special tokens come from the template, not added twice).

    CPU work that grows with the conversation: the handler runs it on the engine's input threads.
    """
    tokenizer = ctx.engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            body.messages_for_template(), tokenize=False, add_generation_prompt=body.add_generation_prompt
        )
    except Exception as exc:  # template errors (jinja raise_exception, bad role order) are client input
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
    try:
        return ctx.engine.inputs.tokenize_rendered(text, "messages")
    except RequestRejected as exc:
        raise errors.from_engine(exc) from exc
    except (TypeError, ValueError) as exc:
        raise APIError(400, f"the rendered conversation cannot be tokenized: {exc}", param="messages") from exc


def _room_left(ctx: ServingContext, num_prompt_tokens: int) -> int:
    """OpenAI's default output limit: whatever the context, and here also the whole KV pool, leaves."""
    stats = ctx.engine.stats()
    context_room = (ctx.engine.config.max_model_len or 0) - num_prompt_tokens
    pool_room = stats.num_total_blocks * ctx.engine.config.block_size + 1 - num_prompt_tokens
    return max(1, min(context_room, pool_room))


def _logprobs(ctx: ServingContext, lps: list[TokenLogprob], top: int) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = ctx.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for lp in lps:
        chosen = entry(lp.token_id, lp.logprob)
        alternatives = sorted(lp.top.items(), key=lambda kv: -kv[1])[:top]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[entry(t, v) for t, v in alternatives]))
    return ChatLogprobs(content=content)


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    body.check_supported()
    prompt = await ctx.engine.run_input(render_prompt, ctx, body)
    max_tokens = body.output_limit or _room_left(ctx, len(prompt))
    top = body.top_logprobs or 0
    params = SamplingParams(**body.sampling_fields(), max_tokens=max_tokens,
                            logprobs=top if body.logprobs else None)
    request_id, created = new_id("chatcmpl"), now_s()
    streams = await open_streams(ctx, [prompt], params, request_id)

    def logprobs(d: Delta) -> ChatLogprobs | None:
        return _logprobs(ctx, d.logprobs, top) if body.logprobs else None

    if body.stream:
        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                       usage=usage)

        def chunks(deltas: list[Delta]) -> Iterable[ChatCompletionChunk]:
            if not deltas:
                return []
            return [chunk([
                ChatStreamChoice(index=d.index, delta=ChatDelta(role="assistant" if d.first else None,
                                                                content=d.text),
                                 logprobs=logprobs(d), finish_reason=d.finish_reason)
                for d in deltas
            ])]

        usage_chunk = (lambda usage: chunk([], usage)) if body.include_usage else None
        return EventStream(event_stream(ctx, streams, DeltaTracker(body.n, 1), chunks, usage_chunk))

    (out,) = await collect(ctx, request, streams)
    choices = [
        ChatChoice(index=o.index, message=AssistantMessage(content=o.text),
                   logprobs=logprobs(Delta(o.index, o.text, o.logprobs or [], 0, None, None, True)),
                   finish_reason=o.finish_reason, stop_reason=o.stop_reason)
        for o in out.outputs
    ]
    body_out = ChatCompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                      usage=final_usage([out]))
    return Response(body_out.model_dump_json(), media_type="application/json")
