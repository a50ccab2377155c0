"""One pod on the local node: its container is a real `kvpilot serve` process on a loopback port.

What a kubelet does for it, scaled to a laptop: startup, readiness and liveness probes (periods times
`time_scale`, thresholds as written), restarts with a capped back-off when the container exits,
and termination as Kubernetes does it: preStop, then SIGTERM, then SIGKILL once the grace period is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from kvpilot.tuner.prometheus import free_port

log = logging.getLogger(__name__)
BACKOFF_CAP_S = 5.0
MODEL_MOUNT = "/mnt/model"


@dataclasses.dataclass(frozen=True)
class Probe:
    path: str
    period_s: float
    failures: int
    timeout_s: float

    @classmethod
    def of(cls, raw: dict[str, Any] | None, time_scale: float) -> Probe | None:
        if not raw:
            return None
        if "httpGet" not in raw:
            raise ValueError(f"only httpGet probes are supported, got {sorted(raw)}")
        return cls(
            path=raw["httpGet"]["path"],
            period_s=float(raw.get("periodSeconds", 10)) * time_scale,
            failures=int(raw.get("failureThreshold", 3)),
            timeout_s=float(raw.get("timeoutSeconds", 1)),
        )


def container_command(container: dict[str, Any], volumes: list[dict[str, Any]], port: int | None) -> list[str]:
    """The container's command as a local process: `kvpilot` is this interpreter's, host and port are
    loopback, and a hostPath model mount is read where it lies on this machine. `port` None (a Job's
    container, which serves nothing) leaves `--port` and `--host` as written."""
    command = list(container.get("command") or [])
    if command[:1] != ["kvpilot"]:
        raise ValueError(f"the local node runs only `kvpilot ...` containers, got {command!r}")
    args = list(container.get("args") or [])
    host_paths = {v["name"]: v["hostPath"]["path"] for v in volumes if "hostPath" in v}
    mounts = {
        m["mountPath"]: host_paths[m["name"]] for m in container.get("volumeMounts", []) if m["name"] in host_paths
    }
    out: list[str] = []
    for i, arg in enumerate(args):
        flag, joined, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if not joined:  # `--flag value`: the value is this argument, the flag the one before
            flag, value = (args[i - 1] if i else ""), arg
        if flag == "--port" and port is not None:
            value = str(port)
        elif flag == "--host" and port is not None:
            value = "127.0.0.1"
        elif flag == "--model":
            for mount, host in mounts.items():
                if value == mount or value.startswith(mount + "/"):
                    value = host + value[len(mount) :]
        out.append(f"{flag}={value}" if joined else value)
    return [sys.executable, "-m", "kvpilot", *command[1:], *out]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" not in item:
            raise ValueError(f"env {item.get('name')}: only literal values are supported by the local node")
        env[item["name"]] = str(item["value"])
    return env


class PodRunner:
    def __init__(self, name: str, template_spec: dict[str, Any], log_dir: Path, time_scale: float,
                 credentials: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.container = template_spec["containers"][0]
        self.grace_s = float(template_spec.get("terminationGracePeriodSeconds", 30))
        self.command = container_command(self.container, template_spec.get("volumes") or [], self.port)
        self.env = {**container_env(self.container), **(credentials or {})}
        self.startup = Probe.of(self.container.get("startupProbe"), time_scale)
        self.readiness = Probe.of(self.container.get("readinessProbe"), time_scale)
        self.liveness = Probe.of(self.container.get("livenessProbe"), time_scale)
        self.log_path = log_dir / f"{name}.log"
        self.ready = False
        self.restarts = 0
        self.last_exit: int | None = None
        self.terminating = False
        self.finished = False
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"pod {self.name}")

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready

    async def _probe(self, http: httpx.AsyncClient, probe: Probe) -> bool:
        try:
            response = await http.get(self.url + probe.path, timeout=probe.timeout_s)
        except httpx.HTTPError:
            return False
        return 200 <= response.status_code < 400

    async def _run(self) -> None:
        backoff = 0.5
        async with httpx.AsyncClient() as http:
            while not self.terminating:
                started = time.monotonic()
                with self.log_path.open("ab") as out:
                    self.process = await asyncio.create_subprocess_exec(
                        *self.command, stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **self.env}
                    )
                exited = asyncio.ensure_future(self.process.wait())
                probes = asyncio.ensure_future(self._probe_loop(http))
                await asyncio.wait({exited, probes}, return_when=asyncio.FIRST_COMPLETED)
                self._set_ready(False)
                probes.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probes
                if not exited.done():  # liveness failed: the kubelet kills the container
                    await self._stop_process(self.grace_s)
                self.last_exit = await exited
                if self.terminating:
                    break
                self.restarts += 1
                log.warning("pod %s: container exited %s; restart %d", self.name, self.last_exit, self.restarts)
                backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, BACKOFF_CAP_S)
                await asyncio.sleep(backoff)
        self.finished = True

    async def _probe_loop(self, http: httpx.AsyncClient) -> None:
        """Returns only when liveness (or startup) fails its threshold."""
        if self.startup is not None:
            failures = 0
            while not await self._probe(http, self.startup):
                failures += 1
                if failures >= self.startup.failures:
                    return
                await asyncio.sleep(self.startup.period_s)
        readiness = asyncio.ensure_future(self._readiness_loop(http))
        try:
            failures = 0
            while self.liveness is None or failures < self.liveness.failures:
                await asyncio.sleep(self.liveness.period_s if self.liveness else 3600)
                if self.liveness is not None:
                    failures = 0 if await self._probe(http, self.liveness) else failures + 1
            log.warning("pod %s: liveness failed %d times", self.name, failures)
        finally:
            readiness.cancel()

    async def _readiness_loop(self, http: httpx.AsyncClient) -> None:
        if self.readiness is None:
            self._set_ready(True)
            return
        failures = 0
        while True:
            if await self._probe(http, self.readiness):
                failures = 0
                self._set_ready(not self.terminating)
            else:
                failures += 1
                if failures >= self.readiness.failures or not self.ready:
                    self._set_ready(False)
            await asyncio.sleep(self.readiness.period_s)

    async def _stop_process(self, grace_s: float) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), max(grace_s, 0.0))
        except TimeoutError:
            log.warning("pod %s: still running after its grace period: SIGKILL", self.name)
            process.kill()
            await process.wait()

    def kill_container(self) -> None:
        """What a crash (or the OOM killer) does: SIGKILL, no drain; the pod restarts it."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def terminate(self) -> None:
        """Pod deletion: not ready at once (endpoints drop it), preStop, SIGTERM, SIGKILL after the grace."""
        if self.terminating:
            return
        self.terminating = True
        self._set_ready(False)
        deadline = time.monotonic() + self.grace_s
        pre_stop = ((self.container.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command")
        if pre_stop and self.process is not None and self.process.returncode is None:
            hook = await asyncio.create_subprocess_exec(*pre_stop)
            try:
                await asyncio.wait_for(hook.wait(), self.grace_s)
            except TimeoutError:
                hook.kill()
        await self._stop_process(deadline - time.monotonic())
        if self._task is not None:
            await self._task
