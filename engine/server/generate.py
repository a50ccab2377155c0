"""The part completions and chat share: stream SSE events or collect final outputs, errors made explicit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable

from kvpilot.engine.errors import EngineDead, RequestFailed
from kvpilot.engine.outputs import RequestOutput
from kvpilot.engine.server import errors
from kvpilot.engine.server.deltas import Delta, DeltaTracker, RequestAborted, check_not_aborted
from kvpilot.engine.server.responses import UsageInfo
from kvpilot.engine.server.streams import SSE_DONE, ServingContext, TrackedStream, merge, sse, unless_disconnected
from pydantic import BaseModel
from starlette.requests import Request

log = logging.getLogger(__name__)


def _error_event(error: errors.APIError) -> str:
    return sse(error.body.model_dump_json())


async def event_stream(
    ctx: ServingContext,
    streams: list[TrackedStream],
    tracker: DeltaTracker,
    chunks: Callable[[list[Delta]], Iterable[BaseModel]],
    usage_chunk: Callable[[UsageInfo], BaseModel] | None,
) -> AsyncIterator[str]:
    """SSE events ending in `data: [DONE]`; a request the server could not finish ends in an error event."""
    try:
        async for prompt_index, out in merge(streams):
            for chunk in chunks(tracker.update(prompt_index, out)):
                yield sse(chunk.model_dump_json())
        if usage_chunk is not None:
            yield sse(usage_chunk(tracker.usage()).model_dump_json())
    except RequestAborted:
        yield _error_event(errors.aborted(ctx.lifecycle.drain_expired))
    except (EngineDead, RequestFailed) as exc:
        yield _error_event(errors.from_engine(exc))
    except Exception as exc:
        log.exception("stream failed")
        yield _error_event(errors.internal(exc))
    finally:
        for s in streams:
            s.close()
    yield SSE_DONE


async def _collect(streams: list[TrackedStream]) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async for prompt_index, out in merge(streams):
        finals[prompt_index] = out
    return [finals[i] for i in range(len(streams))]


async def collect(ctx: ServingContext, request: Request, streams: list[TrackedStream]) -> list[RequestOutput]:
    """Final outputs in prompt order; the client leaving aborts them, a server abort is an error."""
    try:
        outputs = await unless_disconnected(request, _collect(streams))
        check_not_aborted(outputs)
    except RequestAborted as exc:
        raise errors.aborted(ctx.lifecycle.drain_expired) from exc
    except (EngineDead, RequestFailed) as exc:
        raise errors.from_engine(exc) from exc
    finally:
        for s in streams:
            s.close()
    return outputs
