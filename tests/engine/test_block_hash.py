"""Block names are a stable, process-independent function, and they are the names the KV cache uses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kvpilot.engine.block_hash import HASH_SCHEME, chain_hash, prefix_block_hashes
from kvpilot.engine.kv_cache import KVCacheManager
from kvpilot.engine.request import Sequence

# Pinned: a change of the encoding must change HASH_SCHEME too, or routers would compute other names.
GOLDEN = {(None, (1, 2, 3, 4)): 0x1ABB22C4A799D10B, (0x0123456789ABCDEF, (7,)): 0x23FBB017365C44F7}


def test_scheme_is_pinned_to_its_values() -> None:
    assert HASH_SCHEME == "blake2b-64/u32le-v1"
    for (parent, tokens), value in GOLDEN.items():
        assert chain_hash(parent, tokens) == value


@pytest.mark.parametrize("seed", ["0", "1", "random"])
def test_same_value_in_other_processes(seed: str) -> None:
    code = "from kvpilot.engine.block_hash import prefix_block_hashes as p; print(p(list(range(100, 164)), 16))"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str(prefix_block_hashes(list(range(100, 164)), 16))


def test_chained_names_tell_prefixes_apart() -> None:
    a = prefix_block_hashes([1] * 16 + [2] * 16, 16)
    b = prefix_block_hashes([3] * 16 + [2] * 16, 16)
    assert len(a) == len(b) == 2
    assert a[1] != b[1], "the same block after another parent has another name"
    assert chain_hash(None, [5, 6]) != chain_hash(0, [5, 6]), "a first block differs from a child of parent 0"
    assert prefix_block_hashes(list(range(40)), 16) == prefix_block_hashes(list(range(32)), 16)
    assert prefix_block_hashes(list(range(64)), 16, max_blocks=2) == prefix_block_hashes(list(range(32)), 16)
    assert prefix_block_hashes(list(range(15)), 16) == []


def test_out_of_range_token_ids_raise() -> None:
    with pytest.raises(OverflowError):
        chain_hash(None, [-1])
    with pytest.raises(OverflowError):
        chain_hash(None, [2**32])


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def stored(self, block_hash: int) -> None:
        self.events.append(("stored", block_hash))

    def evicted(self, block_hash: int) -> None:
        self.events.append(("evicted", block_hash))


def test_kv_cache_names_blocks_as_prefix_block_hashes_and_reports_store_and_evict() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    kv.listener = recorder = _Recorder()
    tokens = list(range(10, 22))  # three full blocks

    def run(token_ids: list[int]) -> Sequence:
        seq = Sequence(request=None, index=0, token_ids=list(token_ids), num_prompt_tokens=len(token_ids))  # type: ignore[arg-type]
        kv.allocate(seq, len(token_ids))
        seq.num_computed_tokens = len(token_ids)
        kv.cache_full_blocks(seq)
        kv.free_seq(seq)
        return seq

    run(tokens)
    names = prefix_block_hashes(tokens, 4)
    assert recorder.events == [("stored", h) for h in names]
    recorder.events.clear()
    run(list(range(50, 66)))  # four new blocks: the pool must evict all three named ones
    evicted = [h for kind, h in recorder.events if kind == "evicted"]
    assert sorted(evicted) == sorted(names)
    assert set(kv.cached) == {h for kind, h in recorder.events if kind == "stored"}
