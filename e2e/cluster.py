"""The whole local cluster, started and stopped together: API server, node (Deployments and Jobs), proxy,
Prometheus, operator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import kmock
from kvpilot.tuner.prometheus import free_port

from e2e.apiserver import ApiServer, write_kubeconfig
from e2e.jobs import JobController
from e2e.kube import Kube
from e2e.node import Node
from e2e.prometheus import SCRAPE_INTERVAL_S, Prometheus
from e2e.proxy import ServiceProxy

log = logging.getLogger(__name__)
NAMESPACE = "default"
T = TypeVar("T")


class OperatorProcess:
    """`kvpilot operator` as its own process, as in a cluster; kill() is SIGKILL, no goodbye."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "kvpilot",
            "operator",
            f"--liveness=http://127.0.0.1:{free_port()}/healthz",
        ]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    def __init__(self, workdir: Path, time_scale: float) -> None:
        self.workdir, self.time_scale = workdir, time_scale
        self.api = ApiServer()
        self.api.setup()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Cluster:
        await self._stack.__aenter__()
        await self._stack.enter_async_context(self.api)
        server = await self._stack.enter_async_context(kmock.Server(self.api))
        url = str(server.url).rstrip("/")
        self.kube = Kube(url, NAMESPACE)
        self._stack.push_async_callback(self.kube.close)
        self.prometheus = Prometheus(self.workdir)
        await self.prometheus.start()
        self._stack.callback(self.prometheus.stop)
        self.kubeconfig = kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", url, NAMESPACE)
        self.node = Node(self.kube, self.workdir, self.time_scale, self._on_pods, kubeconfig)
        self.node.start()
        self._stack.push_async_callback(self.node.stop)
        self.jobs = JobController(self.kube, self.workdir)
        self.jobs.start()
        self._stack.push_async_callback(self.jobs.stop)
        self.proxy = ServiceProxy(self.kube)
        await self.proxy.start()
        self._stack.push_async_callback(self.proxy.stop)
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        env.update(
            KUBECONFIG=str(kubeconfig),
            KVPILOT_SERVICE_URL_TEMPLATE=f"http://127.0.0.1:{self.proxy.port}/{{namespace}}/{{name}}",
            KVPILOT_RESYNC_SECONDS="1",
            KVPILOT_SLO_REFRESH_SECONDS="2",
            KVPILOT_SLO_WINDOW_SECONDS="30",
            KVPILOT_AUTOSCALE_REFRESH_SECONDS="1",
            KVPILOT_SCRAPE_INTERVAL_SECONDS=str(SCRAPE_INTERVAL_S),
            KVPILOT_PROMETHEUS_URL=self.prometheus.url,  # the operator's own: a user's spec may not pick one
        )
        self.operator = OperatorProcess(env, self.workdir / "operator.log")
        self.operator.start()
        self._stack.callback(self.operator.kill)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)

    def _on_pods(self, runners: list[Any]) -> None:
        self.prometheus.write_targets(runners, self.node.labels, NAMESPACE)

    async def isvc(self, name: str) -> dict[str, Any]:
        body = await self.kube.get("InferenceService", name)
        if body is None:
            raise AssertionError(f"InferenceService {name} is gone")
        return body

    async def status(self, name: str) -> dict[str, Any]:
        return (await self.isvc(name)).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c.get("type") == kind), {})


async def wait_for(
    check: Callable[[], Awaitable[T | None]],
    timeout_s: float,
    what: str,
    detail: Callable[[], Awaitable[str]] | None = None,
) -> tuple[T, float]:
    """Poll until `check` returns something truthy; returns it and the seconds it took."""
    started = time.monotonic()
    while True:
        value = await check()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            extra = f"\n{await detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{extra}")
        await asyncio.sleep(0.2)
