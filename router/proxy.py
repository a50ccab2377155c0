"""One request through the router: choose an engine, forward, retry elsewhere until the first byte is sent.

Retried on another engine: a refused connection, a connection dropped before an answer (the pod vanished),
a 429 (full) or 503 (draining, dead), and a stream that ends before its first event, because the client has
seen nothing yet. Not retried: anything else the engine answers, 400s first (the client's to fix), and a
silence past `upstream_timeout_s` (504: the work may still be running). After the first byte the engine is
committed: events are relayed whole, and a stream the engine cuts ends with an error event in OpenAI's
shape and `[DONE]`, never mid-event and never by hanging. Non-streaming answers are read whole first, so
they are retried on any failure.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from kvpilot.router.admission import Admission
from kvpilot.router.backends import BackendState
from kvpilot.router.config import RouterConfig
from kvpilot.router.errors import RouterError
from kvpilot.router.keys import RouteKey, route_key
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.pool import BackendPool, Choice
from kvpilot.router.tokenizer import PromptTokenizer
from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
_NOT_RELAYED = _HOP_BY_HOP | {"date", "server"}
_DONE = b"data: [DONE]\n\n"
_CONNECT_PAUSE_S = 1.0  # an engine that refused a connection is skipped this long (or until it answers again)
_REFUSAL_PAUSE_MAX_S = 10.0
_REFUSALS = ("overloaded", "unavailable")  # an engine's 429 and 503: it may have room later, unlike a lost connection


@dataclass
class RouterContext:
    config: RouterConfig
    pool: BackendPool
    admission: Admission
    metrics: RouterMetrics
    session: aiohttp.ClientSession
    tokenizer: PromptTokenizer | None

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s,
                                     sock_read=self.config.upstream_timeout_s)


class _Retry(Exception):
    """This engine did not take the request; another may. `answer` is what to pass on if none does."""

    def __init__(self, reason: str, answer: web.Response | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


def _timeout(ctx: RouterContext, state: BackendState) -> RouterError:
    """A silent engine: not retried, since the work may still be running there."""
    return RouterError(504, f"engine {state.name} sent nothing for {ctx.config.upstream_timeout_s:g} s",
                       type="timeout_error", code="upstream_timeout")


def _forward_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP)


def _relayed_headers(headers: CIMultiDictProxy[str], state: BackendState, choice: Choice) -> CIMultiDict[str]:
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _NOT_RELAYED)
    out["x-kvpilot-engine"] = state.name
    out["x-kvpilot-route"] = choice.pick.reason
    return out


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None


def _retry_after_s(headers: CIMultiDictProxy[str]) -> float:
    try:
        return min(max(float(headers.get("Retry-After", "1")), 0.0), _REFUSAL_PAUSE_MAX_S)
    except ValueError:
        return 1.0


async def handle(ctx: RouterContext, request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    if request.method == "POST":  # a completion: demand, whether it is served, waits or is refused
        ctx.metrics.received.inc()
    body = await request.read()
    parsed = _parse(body)
    key = route_key(request.path, parsed, ctx.tokenizer)
    stream = isinstance(parsed, dict) and parsed.get("stream") is True
    deadline = arrival + ctx.config.queue_timeout_s
    tried: set[str] = set()
    last: _Retry | None = None
    attempts, attempt, first = ctx.config.max_attempts, 0, True
    while attempt < attempts:
        choice = await ctx.admission.acquire(key, tried, deadline)
        if first:
            ctx.metrics.queue_time.observe(time.monotonic() - arrival)
            first = False
        _count_pick(ctx, key, choice)
        try:
            return await _exchange(ctx, request, choice, body, stream, arrival)
        except _Retry as exc:
            last = exc
            if exc.reason in _REFUSALS and time.monotonic() < deadline:
                # A full or draining engine rests for its Retry-After (refused_until) and the request waits for
                # room, on it or another, until its queue deadline: an engine that has just started (scale from
                # zero) and cannot take all that waited for it yet takes the rest a moment later.
                ctx.metrics.retries.labels(exc.reason).inc()
                continue
            tried.add(choice.state.name)
            attempt += 1
            if attempt < attempts:
                ctx.metrics.retries.labels(exc.reason).inc()
                log.info("retrying on another engine: %s %s", choice.state.name, exc.reason)
    if last is not None and last.answer is not None:
        return last.answer
    raise RouterError(503, f"no engine could take the request in {attempts} attempts (last: {last}): retry later",
                      type="service_unavailable", code="no_engine", retry_after=ctx.config.retry_after_s)


def _count_pick(ctx: RouterContext, key: RouteKey, choice: Choice) -> None:
    state, pick = choice.state, choice.pick
    ctx.metrics.picks.labels(pick.reason).inc()
    if key.token_ids is not None:
        ctx.metrics.prompt_tokens.inc(key.num_tokens)
        ctx.metrics.predicted_tokens.inc(pick.cached_blocks * (state.block_size or ctx.config.block_size))
    ctx.pool.index.note_route(state.name, choice.block_hashes, time.monotonic(), ctx.config.recent_route_ttl_s)
    state.pending_blocks += max(0, len(choice.block_hashes) - pick.cached_blocks)


async def _open(ctx: RouterContext, request: web.Request, state: BackendState, body: bytes) -> aiohttp.ClientResponse:
    """Send the request and get the answer's head, or say why another engine should get it."""
    url = state.backend.url + request.path_qs
    try:
        upstream = await ctx.session.request(request.method, url, data=body or None,
                                             headers=_forward_headers(request.headers), timeout=ctx.timeout)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        state.down_until = time.monotonic() + _CONNECT_PAUSE_S
        ctx.metrics.upstream_errors.labels("connect").inc()
        raise _Retry("connect") from exc
    except aiohttp.SocketTimeoutError as exc:
        ctx.metrics.upstream_errors.labels("timeout").inc()
        raise _timeout(ctx, state) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        ctx.metrics.upstream_errors.labels("disconnected").inc()
        raise _Retry("disconnected") from exc
    if upstream.status in (429, 503):
        reason = "overloaded" if upstream.status == 429 else "unavailable"
        ctx.metrics.upstream_errors.labels(reason).inc()
        state.refused_until = time.monotonic() + _retry_after_s(upstream.headers)
        try:
            answer = web.Response(body=await upstream.read(), status=upstream.status,
                                  headers=CIMultiDict((k, v) for k, v in upstream.headers.items()
                                                      if k.lower() not in _NOT_RELAYED))
        except (aiohttp.ClientError, TimeoutError):
            answer = None
        finally:
            upstream.release()
        raise _Retry(reason, answer)
    return upstream


async def _exchange(ctx: RouterContext, request: web.Request, choice: Choice, body: bytes, stream: bool,
                    arrival: float) -> web.StreamResponse:
    state = choice.state
    state.in_flight += 1
    ctx.metrics.in_flight.inc()
    try:
        upstream = await _open(ctx, request, state, body)
        try:
            if stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
                return await _relay_events(ctx, request, upstream, choice, arrival)
            try:
                data = await upstream.read()
            except TimeoutError as exc:
                ctx.metrics.upstream_errors.labels("timeout").inc()
                raise _timeout(ctx, state) from exc
            except aiohttp.ClientError as exc:
                ctx.metrics.upstream_errors.labels("disconnected").inc()
                raise _Retry("disconnected") from exc
            ctx.metrics.first_byte.observe(time.monotonic() - arrival)
            return web.Response(body=data, status=upstream.status,
                                headers=_relayed_headers(upstream.headers, state, choice))
        finally:
            upstream.release()
    finally:
        state.in_flight -= 1
        ctx.metrics.in_flight.dec()
        ctx.pool.notify()


async def _read(upstream: aiohttp.ClientResponse) -> bytes | BaseException:
    """The next bytes of the answer (b'' at its end), or the failure that cut it."""
    try:
        return await upstream.content.readany()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return exc


async def _relay_events(ctx: RouterContext, request: web.Request, upstream: aiohttp.ClientResponse, choice: Choice,
                        arrival: float) -> web.StreamResponse:
    pending = b""
    while (cut := pending.rfind(b"\n\n")) < 0:  # commit only once a whole first event is here
        chunk = await _read(upstream)
        if isinstance(chunk, TimeoutError):
            ctx.metrics.upstream_errors.labels("timeout").inc()
            raise _timeout(ctx, choice.state)
        if isinstance(chunk, BaseException) or not chunk:
            ctx.metrics.upstream_errors.labels("disconnected").inc()
            raise _Retry("disconnected")
        pending += chunk
    response = web.StreamResponse(status=200, headers=_relayed_headers(upstream.headers, choice.state, choice))
    await response.prepare(request)
    ctx.metrics.first_byte.observe(time.monotonic() - arrival)
    events, pending = pending[: cut + 2], pending[cut + 2 :]
    await response.write(events)
    ended = events.endswith(_DONE)
    sent = events.count(b"\n\n")
    while True:
        chunk = await _read(upstream)
        if isinstance(chunk, BaseException) or not chunk:
            failure = chunk if isinstance(chunk, BaseException) else None
            break
        pending += chunk
        cut = pending.rfind(b"\n\n")
        if cut >= 0:
            events, pending = pending[: cut + 2], pending[cut + 2 :]
            await response.write(events)
            ended = events.endswith(_DONE)
            sent += events.count(b"\n\n")
    if not ended:
        ctx.metrics.upstream_errors.labels("stream_cut").inc()
        why = f"{type(failure).__name__}: {failure}" if failure is not None else "it closed the stream"
        log.warning("engine %s cut a stream after %d events (%s)", choice.state.name, sent, why)
        error = RouterError(502, f"the engine serving this request stopped mid-stream after {sent} events ({why}); "
                            "retry the request", type="upstream_error", code="stream_cut")
        await response.write(error.sse())
    await response.write_eof()
    return response
