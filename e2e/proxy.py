"""kube-proxy for the harness: `/{namespace}/{service}/...` goes to a ready pod the Service selects, each Service's
pods in turn (round-robin per Service, as IPVS keeps it).

Endpoints are re-read from the API every `refresh_s` (Services' selectors, Pods' labels and Ready
condition), so a selector switch or a pod going unready takes effect as it would in a cluster.
Responses stream through chunk by chunk (SSE); an upstream that dies mid-stream ends the client's
stream with an OpenAI-shaped error event, never a silent cut. Every routed request is counted per pod.
A ready pod that serves nothing (a Job's, whose labels the Service's selector happens to match) is an
endpoint as in a cluster, and requests routed to it fail with 502, as connections refused would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from typing import Any

import aiohttp
import aiohttp.web

from e2e.crdapi import selector_matches
from e2e.kube import ApiError, Kube
from e2e.node import PORT_ANNOTATION

log = logging.getLogger(__name__)
POD_HEADER = "X-E2E-Pod"
PASSED_HEADERS = ("Content-Type", "Retry-After", "Cache-Control", "x-kvpilot-engine", "x-kvpilot-route")


def _error(status: int, message: str, retry_after: int | None = None) -> aiohttp.web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"message": message, "type": "proxy_error", "code": status}}
    return aiohttp.web.json_response(body, status=status, headers=headers)


def _port(pod: dict[str, Any]) -> int | None:
    """The serving port the node gave the pod; None for a pod that serves none (a Job's)."""
    port = (pod["metadata"].get("annotations") or {}).get(PORT_ANNOTATION)
    return int(port) if port is not None else None


class ServiceProxy:
    def __init__(self, kube: Kube, refresh_s: float = 0.2) -> None:
        self.kube, self.refresh_s = kube, refresh_s
        self.endpoints: dict[str, list[tuple[str, int | None]]] = {}  # service -> [(pod, port or None)]
        self.selectors: dict[str, dict[str, str]] = {}
        self.routed: collections.Counter[str] = collections.Counter()  # pod -> requests
        self._warned: set[tuple[str, str]] = set()  # (service, pod) selected though it serves no port
        self._turns: collections.Counter[str] = collections.Counter()  # per Service, as IPVS round-robin keeps it
        self.port = 0
        self._runner: aiohttp.web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_route("*", "/{namespace}/{service}/{tail:.*}", self._handle)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=30)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="proxy endpoints")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.port}/{self.kube.namespace}/{service}"

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except (ApiError, OSError) as exc:
                log.error("endpoint refresh failed: %r", exc)

    async def refresh(self) -> None:
        services = await self.kube.list("Service")
        pods = [
            p
            for p in await self.kube.list("Pod")
            if not p["metadata"].get("deletionTimestamp")
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions", [])
            )
        ]
        endpoints: dict[str, list[tuple[str, int | None]]] = {}
        for service in services:
            selector = (service.get("spec") or {}).get("selector") or {}
            name = service["metadata"]["name"]
            self.selectors[name] = selector
            endpoints[name] = sorted(
                (p["metadata"]["name"], _port(p))
                for p in pods
                if selector and selector_matches(selector, p["metadata"].get("labels"))
            )
            for pod, _ in (e for e in endpoints[name] if e[1] is None and (name, e[0]) not in self._warned):
                self._warned.add((name, pod))
                log.warning("Service %s selects pod %s, which serves no port (a Job's pod?)", name, pod)
        self.endpoints = endpoints

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        service = request.match_info["service"]
        if request.match_info["namespace"] != self.kube.namespace or service not in self.endpoints:
            return _error(404, f"no Service {request.match_info['namespace']}/{service}")
        targets = self.endpoints[service]
        if not targets:
            return _error(503, f"Service {service} has no ready endpoints", retry_after=1)
        pod, port = targets[self._turns[service] % len(targets)]
        self._turns[service] += 1
        self.routed[pod] += 1
        if port is None:
            refused = _error(502, f"pod {pod} serves no port: the Service's selector matches a pod it should not")
            refused.headers[POD_HEADER] = pod
            return refused
        assert self._session is not None
        body = await request.read()
        url = f"http://127.0.0.1:{port}/{request.match_info['tail']}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        try:
            upstream = await self._session.request(request.method, url, data=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            refused = _error(502, f"pod {pod}: {exc!r}")
            refused.headers[POD_HEADER] = pod
            return refused
        async with upstream:
            response = aiohttp.web.StreamResponse(status=upstream.status)
            for key in PASSED_HEADERS:
                if key in upstream.headers:
                    response.headers[key] = upstream.headers[key]
            response.headers[POD_HEADER] = pod
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError):  # the client left first: nothing more to tell it
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if isinstance(exc, ConnectionResetError) and _client_gone(request):
                        raise
                    event = {"error": {"message": f"pod {pod} failed mid-response: {exc!r}", "type": "proxy_error"}}
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
                await response.write_eof()
        return response


def _client_gone(request: aiohttp.web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()
