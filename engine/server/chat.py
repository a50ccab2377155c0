"""POST /v1/chat/completions: messages (and tools) through the tokenizer's chat template to OpenAI chat
completions, with tool calls read out of each choice (tool_calls.py)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from kvpilot.engine.config import SamplingParams
from kvpilot.engine.errors import RequestRejected
from kvpilot.engine.outputs import TokenLogprob
from kvpilot.engine.server import errors, tool_calls
from kvpilot.engine.server.deltas import Delta, DeltaTracker, final_usage
from kvpilot.engine.server.errors import APIError
from kvpilot.engine.server.generate import collect, event_stream
from kvpilot.engine.server.protocol import ChatCompletionRequest
from kvpilot.engine.server.responses import (
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


def render_prompt(ctx: ServingContext, body: ChatCompletionRequest,
                  tools: tool_calls.ToolPlan) -> list[int]:
    """Token ids of the templated conversation (special tokens come from the template, not added twice).

    CPU work that grows with the conversation: the handler runs it on the engine's input threads.
    """
    tokenizer = ctx.engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            body.messages_for_template(), tools=tools.template_tools, tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
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


def _stream_choices(d: Delta, pieces: list[ChatDelta], finish_reason: str | None,
                    logprobs: ChatLogprobs | None) -> list[ChatStreamChoice]:
    """A choice's delta as stream entries, one per piece: role on the first, logprobs and finish on the last."""
    if not pieces and (d.first or finish_reason or logprobs):
        pieces = [ChatDelta()]
    if pieces and d.first:
        pieces[0].role = "assistant"
    entries = [ChatStreamChoice(index=d.index, delta=p) for p in pieces]
    if entries:
        entries[-1].logprobs, entries[-1].finish_reason = logprobs, finish_reason
    return entries


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    body.check_supported()
    tools = await ctx.engine.run_input(tool_calls.plan, ctx.tool_format, body)
    prompt = await ctx.engine.run_input(render_prompt, ctx, body, tools)
    max_tokens = body.output_limit or _room_left(ctx, len(prompt))
    top = body.top_logprobs or 0
    fields = body.sampling_fields()
    if tools.constraint is not None:
        fields["structured_outputs"] = tools.constraint
    params = SamplingParams(**fields, max_tokens=max_tokens, logprobs=top if body.logprobs else None)
    request_id, created = new_id("chatcmpl"), now_s()
    streams = await open_streams(ctx, [prompt], params, request_id)

    def logprobs(d: Delta) -> ChatLogprobs | None:
        return _logprobs(ctx, d.logprobs, top) if body.logprobs else None

    if body.stream:
        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                       usage=usage)

        choice_streams: dict[int, tool_calls.ChoiceStream] = {}

        def chunks(deltas: list[Delta]) -> Iterable[ChatCompletionChunk]:
            """Piece k of every choice in chunk k: a choice's calls arrive as separate pieces."""
            per_choice = []
            for d in deltas:
                stream = choice_streams.setdefault(d.index, tool_calls.ChoiceStream(tools))
                pieces = stream.pieces(d.text, d.finish_reason is not None)
                reason = tool_calls.finish_reason(d.finish_reason, stream.num_calls)
                per_choice.append(_stream_choices(d, pieces, reason, logprobs(d)))
            rows = itertools.zip_longest(*per_choice)
            return [chunk([c for c in row if c is not None]) for row in rows]

        usage_chunk = (lambda usage: chunk([], usage)) if body.include_usage else None
        return EventStream(event_stream(ctx, streams, DeltaTracker(body.n, 1), chunks, usage_chunk))

    (out,) = await collect(ctx, request, streams)
    choices = []
    for o in out.outputs:
        message, num_calls = tool_calls.message(tools, o.text)
        choices.append(ChatChoice(index=o.index, message=message,
                                  logprobs=logprobs(Delta(o.index, o.text, o.logprobs or [], 0, None, None, True)),
                                  finish_reason=tool_calls.finish_reason(o.finish_reason, num_calls),
                                  stop_reason=o.stop_reason))
    body_out = ChatCompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                      usage=final_usage([out]))
    return Response(body_out.model_dump_json(), media_type="application/json")
