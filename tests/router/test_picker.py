"""The picker: affinity within the load bound, consistent hashing as the fallback, never an overloaded engine
while another has room."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from kvpilot.router.index import Match
from kvpilot.router.keys import rendezvous
from kvpilot.router.picker import Candidate, load_bound, pick


def c(name: str, load: int = 0, overloaded: bool = False, cached: int = 0, recent: int | None = None) -> Candidate:
    return Candidate(name, load, overloaded, Match(cached, cached if recent is None else recent))


def test_longest_cached_prefix_wins_within_the_bound() -> None:
    chosen = pick([c("a", 1, cached=2), c("b", 1, cached=5), c("c", 0)], hash_key=7, load_factor=1.25)
    assert chosen is not None and (chosen.name, chosen.reason, chosen.cached_blocks) == ("b", "prefix", 5)


def test_a_prefix_only_this_router_sent_is_recent() -> None:
    chosen = pick([c("a", cached=1, recent=4), c("b", cached=3)], hash_key=7, load_factor=1.25)
    assert chosen is not None and (chosen.name, chosen.reason, chosen.cached_blocks) == ("a", "recent", 4)


def test_affinity_gives_way_past_the_load_bound() -> None:
    # total 6 over 3 engines: bound ceil(1.25 * 7 / 3) = 3, so an engine at 3 cannot take one more.
    assert load_bound(6, 3, 1.25) == 3
    chosen = pick([c("a", 3, cached=8), c("b", 2, cached=2), c("c", 1)], hash_key=7, load_factor=1.25)
    assert chosen is not None and (chosen.name, chosen.reason) == ("b", "prefix")
    chosen = pick([c("a", 3, cached=8), c("b", 2), c("c", 1)], hash_key=7, load_factor=1.25)
    assert chosen is not None and chosen.reason == "hash" and chosen.name in ("b", "c")
    roomier = pick([c("a", 3, cached=8), c("b", 2), c("c", 1)], hash_key=7, load_factor=2.0)
    assert roomier is not None and roomier.name == "a", "a larger factor keeps more affinity"


def test_slack_keeps_affinity_over_a_small_absolute_difference() -> None:
    engines = [c("a", 2, cached=60), c("b", 0), c("c", 0)]  # bound ceil(1.25 * 3 / 3) = 2: a is at it
    tight = pick(engines, hash_key=7, load_factor=1.25, load_slack=0)
    assert tight is not None and tight.name != "a"
    slack = pick(engines, hash_key=7, load_factor=1.25, load_slack=4)
    assert slack is not None and (slack.name, slack.reason) == ("a", "prefix")
    far = pick([c("a", 12, cached=60), c("b", 0), c("c", 0)], hash_key=7, load_factor=1.25, load_slack=4)
    assert far is not None and far.name != "a"


def test_without_any_cached_prefix_consistent_hashing_keeps_keys_together() -> None:
    engines = [c(n) for n in "abcd"]
    owners = {key: pick(engines, key, 1.25) for key in range(200)}
    assert all(p is not None and p.reason == "hash" for p in owners.values())
    assert all(pick(engines, key, 1.25) == owners[key] for key in range(200)), "the same key, the same engine"
    spread = Counter(p.name for p in owners.values() if p is not None)
    assert len(spread) == 4 and min(spread.values()) > 20
    fewer = [e for e in engines if e.name != "d"]
    moved = [k for k in range(200) if owners[k] is not None and owners[k].name != "d"
             and pick(fewer, k, 1.25) != owners[k]]
    assert not moved, "removing an engine moves only the keys it owned"
    for key, owner in owners.items():
        assert owner is not None and owner.name == max("abcd", key=lambda n: rendezvous(key, n))


def pooled(name: str, free: int | None, cached: int = 0, blocks: int = 56, load: int = 0) -> Candidate:
    return Candidate(name, load, False, Match(cached, cached), blocks, free)


def test_a_new_prefix_is_hashed_over_the_pools_with_room_while_any_has_it() -> None:
    names = "abc"
    for key in range(50):
        owner = max(names, key=lambda n: rendezvous(key, n))
        chosen = pick([pooled(n, 0 if n == owner else 100) for n in names], key, 1.25)
        assert chosen is not None and chosen.reason == "hash"
        assert chosen.name == max((n for n in names if n != owner), key=lambda n: rendezvous(key, n))
        full = pick([pooled(n, 0) for n in names], key, 1.25)
        assert full == pick([c(n) for n in names], key, 1.25), "every pool full: the hash alone, as when unknown"
        roomier = pick([pooled(n, 30 if n == owner else 10) for n in names], key, 1.25)
        assert roomier is not None and roomier.name == owner, "the least eviction"


def test_a_prefix_held_in_part_on_a_full_pool_moves_when_completing_it_evicts_too_much() -> None:
    # Computing the rest there, and evicting as much, each evicted block weighed `eviction_cost`, against all of
    # it on an empty pool: at a weight of 1 a prefix moves when less than half is held, at the default of 2 when
    # less than two thirds is.
    for held, cost, where in ((27, 1.0, "b"), (29, 1.0, "a"), (29, 2.0, "b"), (37, 2.0, "b"), (38, 2.0, "a"),
                              (50, 2.0, "a"), (56, 2.0, "a"), (1, 0.0, "a")):
        chosen = pick([pooled("a", 0, cached=held), pooled("b", 200)], 7, 1.25, eviction_cost=cost)
        assert chosen is not None and chosen.name == where, (held, cost, chosen)
    partial = pick([pooled("a", 0, cached=20), pooled("b", 0), pooled("c", 0)], 7, 1.25)
    assert partial is not None and (partial.name, partial.reason) == ("a", "prefix"), "no room anywhere: the match"
    rest_fits = pick([pooled("a", 40, cached=20), pooled("b", 200)], 7, 1.25)
    assert rest_fits is not None and rest_fits.name == "a", "the rest fits beside the prefix: no eviction"


def test_nothing_to_key_goes_to_the_least_loaded() -> None:
    chosen = pick([c("a", 4), c("b", 1), c("c", 2)], hash_key=None, load_factor=1.25)
    assert chosen is not None and (chosen.name, chosen.reason) == ("b", "load")


def test_overloaded_engines_are_never_picked_and_none_left_means_wait() -> None:
    chosen = pick([c("a", 0, overloaded=True, cached=9), c("b", 40)], hash_key=7, load_factor=1.25)
    assert chosen is not None and chosen.name == "b"
    assert pick([c("a", overloaded=True), c("b", overloaded=True)], 7, 1.25) is None
    assert pick([], 7, 1.25) is None


@given(st.lists(st.tuples(st.integers(0, 50), st.booleans(), st.integers(0, 20), st.integers(0, 20),
                          st.one_of(st.none(), st.integers(0, 60))), min_size=1, max_size=8),
       st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.floats(1.0, 4.0), st.integers(0, 8), st.integers(0, 30),
       st.sampled_from([0.0, 1.0, 2.0, 3.5]))
def test_properties(specs: list[tuple[int, bool, int, int, int | None]], key: int | None, factor: float, slack: int,
                    blocks: int, eviction_cost: float) -> None:
    candidates = [Candidate(f"e{i}", load, over, Match(cached, max(cached, recent)), blocks, free)
                  for i, (load, over, cached, recent, free) in enumerate(specs)]
    chosen = pick(candidates, key, factor, slack, eviction_cost)
    room = [x for x in candidates if not x.overloaded]
    if not room:
        assert chosen is None
        return
    assert chosen is not None
    picked = next(x for x in candidates if x.name == chosen.name)
    assert not picked.overloaded, "never an overloaded engine while another has room"
    bound = load_bound(sum(x.load for x in room), len(room), factor, slack)
    assert picked.load + 1 <= bound, "within the load bound"
    within = [x for x in room if x.load + 1 <= bound]
    assert picked.cost(eviction_cost) == min(x.cost(eviction_cost) for x in within), "the least cost in bound"
    assert picked.match.recent == max(x.match.recent for x in within
                                      if x.cost(eviction_cost) == picked.cost(eviction_cost)), \
        "of those, the longest prefix"
    if all(x.free_blocks is None for x in within):
        assert picked.match.recent >= min(blocks, max(x.match.recent for x in within)), \
            "pool sizes unknown: the longest prefix, as far as the prompt goes"
