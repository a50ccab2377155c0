"""The front's handle on the engine core: started in a process of its own (the default, as vLLM v1 does, so
HTTP, tokenization and streaming never take the GIL from the step loop), or in a thread (tests that reach
into the core). Either way the front only sends messages and reads outputs (core_loop.py).

The core process ignores SIGINT and SIGTERM: the front drains first, then tells it to stop. It stops by
itself when the front's end of the pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
from typing import Any

from kvpilot.engine.config import EngineConfig
from kvpilot.engine.core_loop import FAILED, READY, SHUTDOWN, ChannelClosed, PipeChannel, QueueChannel, serve_core
from kvpilot.engine.engine_core import EngineCore
from kvpilot.engine.messages import CoreInfo
from kvpilot.engine.model_info import resolve

log = logging.getLogger(__name__)


class EngineStartFailed(ValueError):
    """The engine core could not load (no such model, unsupported architecture, no GPU, out of memory)."""


class CoreClient:
    """Common surface of both kinds: send, receive, stop."""

    info: CoreInfo
    core: EngineCore | None = None  # only when it runs in this process
    pid: int | None = None

    def __init__(self, inbox: PipeChannel | QueueChannel, outbox: PipeChannel | QueueChannel) -> None:
        self._to_core = inbox
        self._from_core = outbox

    def send(self, msg: tuple[Any, ...]) -> None:
        self._to_core.send(msg)

    def recv(self, timeout: float | None) -> Any | None:
        return self._from_core.recv(timeout)

    def close(self, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(ChannelClosed):
            self._to_core.send((SHUTDOWN,))
        self._join(timeout_s)

    def _join(self, timeout_s: float) -> None:
        raise NotImplementedError


class ProcessCore(CoreClient):
    def __init__(self, config: EngineConfig, eos_token_ids: tuple[int, ...], startup_timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        req_r, req_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_core_main, name="kvpilot-engine-core",
                                args=(config.model_dump_json(), eos_token_ids, req_r, out_w, log.getEffectiveLevel()))
        self.proc.start()
        req_r.close()  # the child's ends: closing ours lets each side see EOF when the other dies
        out_w.close()
        super().__init__(PipeChannel(req_w), PipeChannel(out_r))
        self.pid = self.proc.pid
        try:
            msg = self.recv(startup_timeout_s)
        except ChannelClosed:
            self.proc.join(5)
            raise EngineStartFailed(f"the engine core exited during start-up (code {self.proc.exitcode})") from None
        if msg is None:
            self._join(0)
            raise EngineStartFailed(f"the engine core did not start within {startup_timeout_s:.0f} s")
        if msg[0] == FAILED:
            self.proc.join(10)
            raise EngineStartFailed(msg[1])
        self.info = msg[1]
        log.info("engine core: process %d, %d KV blocks", self.pid, self.info.num_kv_blocks)

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def _join(self, timeout_s: float) -> None:
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class ThreadCore(CoreClient):
    def __init__(self, config: EngineConfig, eos_token_ids: tuple[int, ...]) -> None:
        self.core = EngineCore(resolve(config), eos_token_ids)
        self.info = self.core.info
        super().__init__(QueueChannel(), QueueChannel())
        self._thread = threading.Thread(target=self._run, name="kvpilot-engine-core", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.core is not None
        with contextlib.suppress(Exception):  # reported to the front as ("dead", reason) already
            serve_core(self.core, self._to_core, self._from_core)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        self._from_core.close()  # wakes the front's reader
        if self.core is not None:
            self.core.close()


def start_core(config: EngineConfig, eos_token_ids: tuple[int, ...], in_process: bool = False,
               startup_timeout_s: float = 1800.0) -> CoreClient:
    if in_process:
        return ThreadCore(config, eos_token_ids)
    return ProcessCore(config, eos_token_ids, startup_timeout_s)


def _core_main(config_json: str, eos_token_ids: tuple[int, ...], req_conn: Any, out_conn: Any, level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=level or logging.INFO, stream=sys.stderr,
                        format="%(asctime)s core %(levelname)s %(name)s: %(message)s")
    inbox, outbox = PipeChannel(req_conn), PipeChannel(out_conn)
    _leave_a_core_to_the_front()
    try:
        core = EngineCore(resolve(EngineConfig.model_validate_json(config_json)), eos_token_ids)
    except BaseException as exc:
        log.exception("the engine core could not start")
        with contextlib.suppress(ChannelClosed):
            outbox.send((FAILED, f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    try:
        outbox.send((READY, core.info))
        serve_core(core, inbox, outbox)
    except BaseException:
        core.close()
        os._exit(1)  # a device fault may leave CUDA unable to tear down cleanly
    core.close()


def _leave_a_core_to_the_front() -> None:
    """On CPU, torch's intra-op threads default to every core, and their spinning starves the front process
    (HTTP, detokenization) beside them. Unless OMP_NUM_THREADS says otherwise (engine pods get it from their
    CPU request), the core keeps one core free."""
    import torch

    cores = os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in os.environ and cores > 1 and not torch.cuda.is_available():
        torch.set_num_threads(cores - 1)
