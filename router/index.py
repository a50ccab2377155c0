"""Which engine holds which prefix block: block name -> engines, from their events and this router's routes.

Confirmed entries come from each engine's /kv/events (feeds.py): a snapshot replaces an engine's entries,
an event adds or drops one. Recent entries are the blocks this router has just sent to an engine, which
that engine will hold once it has computed them: they keep a burst of one prefix together before the
first event arrives, and expire after a TTL or when the engine reports evicting them. Engines are bits in
an int, so a lookup walks a prompt's names once, intersecting masks, however many engines there are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Match:
    cached: int  # leading blocks the engine reported holding
    recent: int  # leading blocks held, counting those this router sent it lately


def _leading_runs(masks: Iterator[int], bits: dict[str, int]) -> dict[str, int]:
    """For each engine, over how many leading masks its bit is set without a gap (reading no further than
    the last engine still running)."""
    runs: dict[str, int] = {}
    alive = sum(1 << b for b in bits.values())
    count = 0
    for mask in masks:
        still = alive & mask
        dropped = alive & ~still
        if dropped:
            runs.update({name: count for name, bit in bits.items() if dropped >> bit & 1})
        alive = still
        if not alive:
            return runs
        count += 1
    runs.update({name: count for name, bit in bits.items() if alive >> bit & 1})
    return runs


class PrefixIndex:
    def __init__(self) -> None:
        self._bits: dict[str, int] = {}
        self._holders: dict[int, int] = {}  # block name -> mask of engines that reported holding it
        self._held: dict[str, set[int]] = {}  # engine -> the names it reported (for resets and removal)
        self._recent: dict[int, dict[int, float]] = {}  # block name -> engine bit -> expiry (monotonic s)
        self._notes = 0

    def _bit(self, engine: str) -> int:
        bit = self._bits.get(engine)
        if bit is None:
            used = set(self._bits.values())
            bit = self._bits[engine] = next(b for b in range(len(used) + 1) if b not in used)
            self._held[engine] = set()
        return bit

    def blocks_held(self, engine: str) -> int:
        return len(self._held.get(engine, ()))

    def reset(self, engine: str, hashes: Iterable[int]) -> None:
        """Replace what `engine` holds (a snapshot from its feed)."""
        self.evicted(engine, list(self._held.get(engine, ())))
        self.stored(engine, hashes)

    def stored(self, engine: str, hashes: Iterable[int]) -> None:
        flag = 1 << self._bit(engine)
        held = self._held[engine]
        for h in hashes:
            held.add(h)
            self._holders[h] = self._holders.get(h, 0) | flag

    def evicted(self, engine: str, hashes: Iterable[int]) -> None:
        """The engine no longer holds these: a route this router sent there lately no longer vouches for them
        either (else a prefix evicted under a burst of its own requests would count as held for a whole TTL)."""
        if engine not in self._bits:
            return
        bit = self._bits[engine]
        keep = ~(1 << bit)
        held, recent = self._held[engine], self._recent
        for h in hashes:
            held.discard(h)
            mask = self._holders.get(h, 0) & keep
            if mask:
                self._holders[h] = mask
            else:
                self._holders.pop(h, None)
            routed = recent.get(h)
            if routed is not None and routed.pop(bit, None) is not None and not routed:
                del recent[h]

    def remove(self, engine: str) -> None:
        """Forget an engine entirely (it left the pool); its bit may then name another."""
        if engine not in self._bits:
            return
        self.evicted(engine, list(self._held[engine]))
        bit = self._bits.pop(engine)
        del self._held[engine]
        for h in [h for h, routed in self._recent.items() if routed.pop(bit, None) is not None and not routed]:
            del self._recent[h]

    def note_route(self, engine: str, hashes: list[int], now: float, ttl_s: float) -> None:
        """This router just sent a prompt with these block names to `engine`."""
        if ttl_s <= 0 or not hashes:
            return
        bit, expiry = self._bit(engine), now + ttl_s
        for h in hashes:
            self._recent.setdefault(h, {})[bit] = expiry
        self._notes += 1
        if self._notes % 1024 == 0:
            self.prune(now)

    def prune(self, now: float) -> None:
        """Drop expired recent routes (done every 1024 routes, so memory follows the recent traffic)."""
        for h in list(self._recent):
            routed = {bit: t for bit, t in self._recent[h].items() if t > now}
            if routed:
                self._recent[h] = routed
            else:
                del self._recent[h]

    def match(self, hashes: list[int], engines: Iterable[str], now: float) -> dict[str, Match]:
        """Each engine's longest cached prefix of `hashes`: reported, and counting recent routes."""
        bits = {name: self._bit(name) for name in engines}
        holders, recent = self._holders, self._recent

        def reported() -> Iterator[int]:
            for h in hashes:
                yield holders.get(h, 0)

        def with_recent() -> Iterator[int]:
            for h in hashes:
                mask = holders.get(h, 0)
                for bit, expiry in recent.get(h, {}).items():
                    if expiry > now:
                        mask |= 1 << bit
                yield mask

        confirmed = _leading_runs(reported(), bits)
        counted = _leading_runs(with_recent(), bits) if recent else confirmed
        return {n: Match(confirmed.get(n, 0), max(counted.get(n, 0), confirmed.get(n, 0))) for n in bits}
