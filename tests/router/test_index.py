"""The prefix index: engines' reports, resets and removal, leading runs only, recent routes that expire."""

from __future__ import annotations

from kvpilot.router.feeds import apply_events
from kvpilot.router.index import Match, PrefixIndex


def test_match_counts_leading_blocks_only() -> None:
    index = PrefixIndex()
    index.stored("a", [1, 2, 3])
    index.stored("b", [1, 3, 4])
    assert index.match([1, 2, 3, 4], ["a", "b", "c"], 0.0) == {"a": Match(3, 3), "b": Match(1, 1), "c": Match(0, 0)}
    assert index.match([9, 1], ["a"], 0.0) == {"a": Match(0, 0)}, "a gap ends the prefix"


def test_events_apply_in_order_and_a_reset_replaces() -> None:
    index = PrefixIndex()
    apply_events(index, "a", [["stored", 1], ["stored", 2], ["evicted", 1], ["stored", 1], ["evicted", 2]])
    assert index.match([1, 2], ["a"], 0.0)["a"] == Match(1, 1)
    assert index.blocks_held("a") == 1
    index.reset("a", [5, 6])
    assert index.match([1], ["a"], 0.0)["a"] == Match(0, 0)
    assert index.match([5, 6], ["a"], 0.0)["a"] == Match(2, 2)


def test_removed_engine_leaves_no_trace_and_its_bit_is_reused() -> None:
    index = PrefixIndex()
    index.stored("a", [1, 2])
    index.note_route("a", [1, 2, 3], now=0.0, ttl_s=10.0)
    index.stored("b", [1])
    index.remove("a")
    index.stored("c", [7])  # takes a's bit: must not inherit a's blocks or routes
    assert index.match([1, 2, 3], ["b", "c"], 1.0) == {"b": Match(1, 1), "c": Match(0, 0)}
    assert index.match([7], ["c"], 1.0)["c"] == Match(1, 1)


def test_recent_routes_count_until_they_expire() -> None:
    index = PrefixIndex()
    index.stored("a", [1])
    index.note_route("b", [1, 2, 3], now=0.0, ttl_s=5.0)
    assert index.match([1, 2, 3], ["a", "b"], 1.0) == {"a": Match(1, 1), "b": Match(0, 3)}
    assert index.match([1, 2, 3], ["a", "b"], 6.0) == {"a": Match(1, 1), "b": Match(0, 0)}
    index.prune(6.0)
    assert not index._recent


def test_recent_routes_extend_a_reported_prefix() -> None:
    index = PrefixIndex()
    index.stored("a", [1, 2])
    index.note_route("a", [1, 2, 3, 4], now=0.0, ttl_s=5.0)
    assert index.match([1, 2, 3, 4, 5], ["a"], 1.0)["a"] == Match(2, 4)


def test_an_eviction_ends_a_recent_route_of_that_block_on_that_engine() -> None:
    index = PrefixIndex()
    index.note_route("a", [1, 2, 3], now=0.0, ttl_s=10.0)
    index.note_route("b", [1, 2, 3], now=0.0, ttl_s=10.0)
    index.stored("a", [1, 2, 3])
    index.evicted("a", [3, 2])  # tail first, as engines evict
    assert index.match([1, 2, 3], ["a", "b"], 1.0) == {"a": Match(1, 1), "b": Match(0, 3)}
    index.stored("b", [1, 2, 3])
    index.evicted("b", [3, 2, 1])
    assert index.match([1, 2, 3], ["a", "b"], 1.0)["b"] == Match(0, 0), "within the TTL, yet gone"
    assert index._recent == {1: {index._bits["a"]: 10.0}}, "only a's route of the block a still holds is left"
