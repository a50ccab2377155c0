"""The name of a full KV block: a stable chained hash of its tokens, shared by the engine and the router.

The engine names each full block by its parent's name and its own token ids, so equal names mean equal
prefixes. The router computes the same names from a request's token ids to find the engine that already
holds its longest prefix, so the function must give the same value in every process, on every machine
and in every Python version: BLAKE2b over a fixed byte encoding, never Python's salted `hash()`.
Pure and standard-library only: the router imports it without torch.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

# Published beside the names (the engine's /kv/events), so a router can tell that it computes the same ones.
HASH_SCHEME = "blake2b-64/u32le-v1"
_PERSON = b"kvpilot-kvblock1"  # BLAKE2b personalisation: these digests mean nothing to other users of BLAKE2b
_ROOT = b"\x00" + bytes(8)  # a first block has no parent; a flag byte keeps it apart from any parent value
_BIG_ENDIAN = sys.byteorder == "big"
if array("I").itemsize != 4:  # pragma: no cover - a 4-byte C unsigned int on every platform CPython supports
    raise ImportError("block_hash encodes token ids as 4-byte unsigned ints")


def chain_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """The 64-bit name of a block holding `token_ids` after the block named `parent` (None: the first block).

    Raises OverflowError for a token id outside [0, 2**32), which no vocabulary has.
    """
    tokens = array("I", token_ids)
    if _BIG_ENDIAN:  # pragma: no cover - the encoding is little-endian everywhere
        tokens.byteswap()
    head = _ROOT if parent is None else b"\x01" + parent.to_bytes(8, "little")
    digest = hashlib.blake2b(head + tokens.tobytes(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "little")


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Names of the leading full blocks of `token_ids` (at most `max_blocks`), as the engine names them."""
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    count = len(token_ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    hashes: list[int] = []
    parent: int | None = None
    for i in range(count):
        parent = chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
