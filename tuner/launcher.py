"""Starting one engine server per trial on this machine, and telling ready from dead.

`forkserver` (the default) forks each trial's server from a process that imported torch, transformers
and the server once: every trial still gets a fresh process and engine, but starts in about a second
instead of the ~10 s a cold `kvpilot serve` spends importing on two cores. `subprocess` runs the real
`kvpilot serve` command line, nothing shared.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Literal

import httpx

Launcher = Literal["forkserver", "subprocess"]

_PRELOAD = [
    "kvpilot.engine.server.cli", "kvpilot.engine.server.app", "kvpilot.engine.async_engine",
    "kvpilot.engine.models.loader", "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.configuration_llama", "uvicorn",
]
_context: ForkServerContext | None = None


def _serve_child(argv: list[str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from kvpilot.cli import main

    sys.exit(main(argv))


def _forkserver() -> ForkServerContext:
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _context = ctx
    return _context


class ServerProcess:
    """One `kvpilot serve`; `wait_ready` answers None when ready, or why it is not (log tail included)."""

    def __init__(self, serve_args: Sequence[str], log_path: Path, launcher: Launcher = "forkserver") -> None:
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        argv = ["--log-level", "WARNING", "serve", *serve_args, "--uvicorn-log-level", "warning"]
        if launcher == "subprocess":
            with log_path.open("wb") as log:
                self._popen = subprocess.Popen([sys.executable, "-m", "kvpilot", *argv], stdout=log,
                                               stderr=subprocess.STDOUT)
        else:
            self._proc = _forkserver().Process(target=_serve_child, args=(argv, str(log_path)), daemon=False)
            self._proc.start()

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else self._proc.pid if self._proc else None

    def exit_code(self) -> int | None:
        if self._popen is not None:
            return self._popen.poll()
        assert self._proc is not None
        return self._proc.exitcode

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, url: str, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return f"the server exited with code {code} before it was ready:\n{self.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                    return None
            time.sleep(0.1)
        return f"the server was not ready within {timeout_s:.0f} s:\n{self.log_tail()}"

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the server drains and exits 0), then SIGKILL if it lingers; returns the exit code."""
        pid = self.pid
        if pid is None or self.exit_code() is not None:
            return self.exit_code()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.exit_code() is None and time.monotonic() < deadline:
            if self._proc is not None:
                self._proc.join(0.05)
            else:
                time.sleep(0.05)
        if self.exit_code() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self._proc is not None:
                self._proc.join(5)
            elif self._popen is not None:
                self._popen.wait(5)
        return self.exit_code()
