"""The choice of an engine for one request: a pure function of the engines' state and the request's key.

1. Only engines with room: never an overloaded one while another has room; none at all means wait.
2. Of those, only engines within the load bound of consistent hashing with bounded loads (Mirrokni et
   al.), plus an absolute slack: load + 1 <= ceil(load_factor * (total load + 1) / engines) + load_slack.
   The least loaded always qualifies. The slack is there because at low load the relative bound alone
   moves requests off the engine holding their prefix over a difference of one request, and recomputing
   a long prefix costs far more than that (SGLang's router has the same absolute threshold).
3. Of those, the cheapest for the KV cache: the blocks the engine must compute (the prompt's blocks past
   its cached prefix) plus `eviction_cost` times the cached blocks it must evict to hold them. Where every
   pool is full, as in the steady state, or engines do not report room, this is the longest cached
   prefix. It differs while some pool has room: a prefix an engine holds less than 2/3 of (at the default
   cost of 2), and must evict to complete, goes to an engine with room instead; otherwise the blocks
   hashing gave one engine beyond its pool are evicted and recomputed in turn, while another pool sits
   empty. An evicted block costs 2 by default, not 1: on an over-full pool it is recomputed later, and
   that recompute evicts another prefix's tail in turn, round after round.
4. Of the cheapest, the one holding the longest cached prefix (`prefix`: by the engines' own events;
   `recent`: counting prefixes this router has just sent), least loaded on ties.
5. None holds any of it: rendezvous hashing of the request's leading blocks (`hash`), so requests that
   share a prefix meet on one engine even before any engine reports it, or when engines publish no
   events at all.
6. Nothing to key (no prompt): the least loaded engine (`load`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvpilot.router.config import EVICTION_COST
from kvpilot.router.index import Match
from kvpilot.router.keys import rendezvous

NO_MATCH = Match(0, 0)
Reason = Literal["prefix", "recent", "hash", "load"]
REASONS: tuple[Reason, ...] = ("prefix", "recent", "hash", "load")


@dataclass(frozen=True)
class Candidate:
    name: str
    load: int  # requests on the engine now: the larger of this router's in flight and the engine's own count
    overloaded: bool
    match: Match = NO_MATCH
    prompt_blocks: int = 0  # the prompt's full blocks, in this engine's block size
    free_blocks: int | None = None  # blocks it can fill without evicting a cached one (None: unknown)

    def cost(self, eviction_cost: float = EVICTION_COST) -> float:
        """Blocks computed, plus `eviction_cost` per cached block evicted to hold them."""
        need = max(0, self.prompt_blocks - self.match.recent)
        return need + eviction_cost * (0 if self.free_blocks is None else max(0, need - self.free_blocks))


@dataclass(frozen=True)
class Pick:
    name: str
    reason: Reason
    cached_blocks: int  # the prefix the engine is predicted to serve from cache


def load_bound(total_load: int, engines: int, load_factor: float, load_slack: int = 0) -> int:
    return math.ceil(load_factor * (total_load + 1) / engines) + load_slack


def pick(candidates: Sequence[Candidate], hash_key: int | None, load_factor: float,
         load_slack: int = 0, eviction_cost: float = EVICTION_COST) -> Pick | None:
    room = [c for c in candidates if not c.overloaded]
    if not room:
        return None
    bound = load_bound(sum(c.load for c in room), len(room), load_factor, load_slack)
    within = [c for c in room if c.load + 1 <= bound]
    costs = {c.name: c.cost(eviction_cost) for c in within}
    cheapest = min(costs.values())
    pool = [c for c in within if costs[c.name] == cheapest]
    best = max(pool, key=lambda c: (c.match.recent, -c.load, c.name))
    if best.match.recent > 0:
        reason: Reason = "prefix" if best.match.cached == best.match.recent else "recent"
        return Pick(best.name, reason, best.match.recent)
    if hash_key is not None:
        owner = max(pool, key=lambda c: rendezvous(hash_key, c.name))
        return Pick(owner.name, "hash", 0)
    least = min(within, key=lambda c: (c.load, c.name))
    return Pick(least.name, "load", 0)
