"""The engine core's own loop, in its process (or, for tests, a thread): take messages between steps, step
while there is work, send each step's outputs and the engine's state.

Messages in (front -> core): ("add", EngineRequest wire), ("abort", [request ids]), ("finish", [(request id,
sample index)]) for samples a stop string ended, ("shutdown",). Messages out: ("outputs", CoreOutputs wire)
and, once, ("dead", reason) if the engine itself fails. Nothing here waits on the front.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import queue
import time
from multiprocessing.connection import Connection
from typing import Any

from kvpilot.engine.engine_core import EngineCore
from kvpilot.engine.errors import RequestRejected
from kvpilot.engine.kv_events import BlockEventBuffer
from kvpilot.engine.messages import CoreOutput, CoreOutputs, EngineRequest

log = logging.getLogger(__name__)

ADD, ABORT, FINISH, SHUTDOWN = "add", "abort", "finish", "shutdown"
OUTPUTS, DEAD, READY, FAILED = "outputs", "dead", "ready", "failed"


class ChannelClosed(Exception):
    """The other side is gone."""


class PipeChannel:
    """One direction of a multiprocessing pipe, pickling with protocol 5."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def send(self, msg: Any) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(msg, protocol=5))
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise ChannelClosed(str(exc)) from exc

    def recv(self, timeout: float | None) -> Any | None:
        """The next message, or None if none came within `timeout` seconds (None waits for ever)."""
        try:
            if not self.conn.poll(timeout):
                return None
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise ChannelClosed(str(exc)) from exc

    def close(self) -> None:
        self.conn.close()


class QueueChannel:
    """The same, in-process: the core runs in a thread (tests that reach into the core use it)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self.closed = False

    def send(self, msg: Any) -> None:
        if self.closed:
            raise ChannelClosed("closed")
        self.queue.put(msg)

    def recv(self, timeout: float | None) -> Any | None:
        try:
            msg = self.queue.get(timeout=timeout) if timeout != 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        if msg is None:
            raise ChannelClosed("closed")
        return msg

    def close(self) -> None:
        self.closed = True
        self.queue.put(None)


def serve_core(core: EngineCore, inbox: PipeChannel | QueueChannel, outbox: PipeChannel | QueueChannel) -> None:
    """Run until told to shut down or the front goes away; an engine fault is reported, then re-raised."""
    received = 0
    block_events = BlockEventBuffer()
    core.kv.listener = block_events
    try:
        while True:
            outputs: list[CoreOutput] = []
            acted = False
            msg = inbox.recv(None if not core.has_unfinished else 0)
            while msg is not None:
                acted = True
                kind = msg[0]
                if kind == SHUTDOWN:
                    return
                if kind == ADD:
                    received += 1
                    outputs += _add(core, EngineRequest.from_wire(msg[1]))
                elif kind == ABORT:
                    outputs += [out for rid in msg[1] if (out := core.abort(rid)) is not None]
                elif kind == FINISH:
                    core.finish_samples(msg[1])
                msg = inbox.recv(0)
            if core.has_unfinished:
                outputs += core.step()
                acted = True
            if acted:
                stats = core.stats()
                batch = CoreOutputs(outputs, stats, time.monotonic(), received, block_events.drain())
                outbox.send((OUTPUTS, batch.to_wire()))
    except ChannelClosed:
        log.info("the front is gone: the engine core stops")
    except BaseException as exc:
        log.exception("engine core failed")
        with contextlib.suppress(ChannelClosed):
            outbox.send((DEAD, f"{type(exc).__name__}: {exc}"))
        raise


def _add(core: EngineCore, req: EngineRequest) -> list[CoreOutput]:
    """The front checked the request against the same limits, so a refusal here is a race or a bug: it is
    answered as that request's failure, never by stopping the loop."""
    try:
        core.add(req)
    except RequestRejected as exc:
        log.error("request %s refused by the core: %s", req.request_id, exc)
        return [CoreOutput(req.request_id, [], True, error=f"RequestRejected: {exc}")]
    return []
