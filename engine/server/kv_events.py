"""GET /kv/events: the prefix blocks this engine holds, as numbered store/evict events (long-polled).

A router asks with the `epoch` and `seq` of the last answer it applied (none at first). The answer holds
the events after it, or, when `reset` is true, `blocks`: every block held now, to replace what the router
had for this engine. With `wait_s` the request waits until there is something new, so a router hears a
store within milliseconds without polling hard. Block names are `kvpilot.engine.block_hash` over
`block_size`-token blocks; `hash_scheme` names that function so a router can refuse names it cannot compute.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query
from kvpilot.engine.async_engine import AsyncEngine
from kvpilot.engine.block_hash import HASH_SCHEME
from kvpilot.engine.kv_events import Kind
from pydantic import BaseModel, Field


class KVEvents(BaseModel):
    epoch: str = Field(description="changes when the engine restarts: a reader from another epoch gets a reset")
    seq: int = Field(description="number of the last event in this answer (or of the snapshot): send it back")
    reset: bool = Field(description="true: `blocks` replaces everything the reader held for this engine")
    blocks: list[int] = Field(default_factory=list, description="with reset: every block held now")
    events: list[tuple[Kind, int]] = Field(default_factory=list, description="[kind, block hash], in order")
    block_size: int
    hash_scheme: str
    prefix_caching: bool = Field(description="false: this engine names no blocks; route it by other means")


def mount(app: FastAPI, engine: AsyncEngine) -> None:
    """Route GET /kv/events over the engine's event log (the core's block events, numbered on this side)."""
    log = engine.kv_events

    @app.get("/kv/events", response_model=KVEvents)
    async def kv_events(
        epoch: str | None = None,
        seq: Annotated[int, Query(ge=0)] = 0,
        wait_s: Annotated[float, Query(ge=0.0, le=60.0)] = 0.0,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    ) -> KVEvents:
        if wait_s > 0:
            await log.wait(epoch, seq, wait_s)
        batch = log.read(epoch, seq, limit)
        return KVEvents(
            epoch=batch.epoch,
            seq=batch.seq,
            reset=batch.snapshot is not None,
            blocks=batch.snapshot or [],
            events=batch.events,
            block_size=engine.config.block_size,
            hash_scheme=HASH_SCHEME,
            prefix_caching=engine.config.enable_prefix_caching,
        )
