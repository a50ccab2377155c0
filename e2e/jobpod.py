"""One Job pod on the local node: its single container run once as a local process (`restartPolicy: Never`).

What the kubelet does for such a pod, and only that: start the container, never restart it, stop it on
deletion (SIGTERM, then SIGKILL once the pod's grace period is over) and, when it exits, record how:
exit code (128+N for a signal, as container runtimes report it), reason `Completed` or `Error`, and the
termination message.

The termination message is the kubelet's mount emulated: in a cluster the kubelet mounts a fresh file at
the container's `terminationMessagePath` (default /dev/termination-log) and, once the container exits,
copies its first 4096 bytes into `state.terminated.message`. A local process cannot own
/dev/termination-log, so that path is replaced, wherever it appears as an argument (`PATH` or
`--flag=PATH`) or an env value, by a file of this pod's own beside its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import signal
from pathlib import Path
from typing import Any

from e2e.pod import container_command, container_env

log = logging.getLogger(__name__)
TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4096  # the kubelet's cap per container
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048  # FallbackToLogsOnError: the log's tail, as the kubelet takes it
START_ERROR_EXIT = 128  # what a runtime reports for a container it could not start


def rfc3339(moment: dt.datetime | None = None) -> str:
    return (moment or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code(returncode: int) -> int:
    """asyncio reports death by signal N as -N; a container runtime reports 128+N (SIGKILL: 137)."""
    return 128 - returncode if returncode < 0 else returncode


def substitute_path(values: list[str], path: str, local: str) -> list[str]:
    """`path` as a whole value, or as the value of `--flag=path`, becomes `local`."""
    out = []
    for value in values:
        flag, sep, rest = value.partition("=")
        if value == path:
            value = local
        elif sep and rest == path and flag.startswith("-"):
            value = f"{flag}={local}"
        out.append(value)
    return out


@dataclasses.dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str  # Completed | Error | StartError
    message: str
    started_at: str
    finished_at: str

    def state(self) -> dict[str, Any]:
        """The container's `state.terminated`, as the kubelet writes it (an empty message is omitted)."""
        state: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.message:
            state["message"] = self.message
        return state


class JobPodRunner:
    """Call `start()` once; `terminated` is set when the container has exited (or could not start)."""

    def __init__(self, name: str, template_spec: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        self.container: dict[str, Any] = (template_spec.get("containers") or [{}])[0]
        self.grace_s = float(template_spec.get("terminationGracePeriodSeconds", 30))
        self.log_path = log_dir / f"{name}.log"
        self.message_path = log_dir / f"{name}.termination-log"
        self.created_at = rfc3339()
        self.started_at: str | None = None
        self.terminated: Terminated | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self.command: list[str] = []
        self.env: dict[str, str] = {}
        self.start_error: str | None = None
        try:
            self._translate(template_spec)
        except (ValueError, KeyError, TypeError) as exc:  # the pod fails, as one whose container cannot start
            self.start_error = f"the local node cannot run this container: {exc}"

    def _translate(self, spec: dict[str, Any]) -> None:
        if len(spec.get("containers") or []) != 1 or spec.get("initContainers"):
            raise ValueError("a Job pod here has exactly one container and no init containers")
        if spec.get("restartPolicy") != "Never":
            raise ValueError(f"restartPolicy {spec.get('restartPolicy')!r}: only Never is emulated")
        path = self.container.get("terminationMessagePath") or TERMINATION_LOG
        local = str(self.message_path)
        self.command = substitute_path(container_command(self.container, spec.get("volumes") or [], None), path, local)
        self.env = {k: local if v == path else v for k, v in container_env(self.container).items()}

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.terminated is None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"job pod {self.name}")

    async def _run(self) -> None:
        self.started_at = rfc3339()
        if self.start_error is None:
            try:
                self.message_path.write_bytes(b"")  # the kubelet's fresh, empty file
                with self.log_path.open("ab") as out:
                    self.process = await asyncio.create_subprocess_exec(
                        *self.command, stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **self.env}
                    )
            except OSError as exc:
                self.start_error = f"could not start the container: {exc}"
        if self.process is None:
            log.warning("job pod %s: %s", self.name, self.start_error)
            message = (self.start_error or "")[:MESSAGE_LIMIT]
            self.terminated = Terminated(START_ERROR_EXIT, "StartError", message, self.started_at, rfc3339())
            return
        code = exit_code(await self.process.wait())
        reason = "Completed" if code == 0 else "Error"
        self.terminated = Terminated(code, reason, self._message(code), self.started_at, rfc3339())
        log.info("job pod %s: container exited %d", self.name, code)

    def _message(self, code: int) -> str:
        """The first 4096 bytes of the file; with FallbackToLogsOnError and a failed, silent container,
        the log's last 80 lines (at most 2048 bytes) instead."""
        try:
            data = self.message_path.read_bytes()[:MESSAGE_LIMIT]
        except OSError:
            data = b""
        if not data.strip() and code != 0 and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                data = b"".join(self.log_path.read_bytes().splitlines(keepends=True)[-FALLBACK_LINES:])
                data = data[-FALLBACK_BYTES:]
        return data.decode(errors="replace")

    async def terminate(self) -> None:
        """Pod deletion: SIGTERM, SIGKILL after the grace period; returns once the container is gone."""
        while self._task is not None and not self._task.done() and self.process is None:
            await asyncio.sleep(0.01)  # being spawned: stop it, not a process that never was
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), max(self.grace_s, 0.0))
            except TimeoutError:
                log.warning("job pod %s: still running after its grace period: SIGKILL", self.name)
                process.kill()
        if self._task is not None:
            await self._task
