"""Chained block hashes for prefix caching: the one place Tandem hashes tokens.

A block's hash covers its parent's hash and its own token ids, so equal hashes
mean equal prefixes. The scheme is fixed (xxh64, fixed seed, explicit byte
order), never Python's salted ``hash()``: the context worker, the generation
worker and the cluster block index compute the same value in different
processes and must agree. Changing anything here changes every hash in the
cluster; the known-value test in tests/kvtransfer/test_block_hash.py guards it.

Bytes hashed per block: parent hash as 8 bytes little-endian (``_NO_PARENT``
for the first block) followed by each token id as a little-endian uint32.
"""

import sys
from array import array
from collections.abc import Sequence
from typing import NewType

import xxhash

BlockHash = NewType("BlockHash", int)  # unsigned 64-bit: in [0, 2**64)

_SEED = 0x7A4E_D3E5  # fixed forever: part of the hash scheme
_NO_PARENT = 0x9E37_79B9_7F4A_7C15  # stands in for the parent of a first block

if array("I").itemsize != 4:  # pragma: no cover - every supported platform has 4-byte "I"
    raise ImportError("array('I') is not 32-bit on this platform; block hashes need uint32 tokens")


def _tokens_le_u32(token_ids: Sequence[int]) -> bytes:
    """Token ids as packed little-endian uint32 (OverflowError outside [0, 2**32))."""
    packed = array("I", token_ids)
    if sys.byteorder == "big":  # pragma: no cover - little-endian hosts only in CI
        packed.byteswap()
    return packed.tobytes()


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one block given its parent's hash (None for the first block)."""
    parent_value = _NO_PARENT if parent is None else parent
    data = parent_value.to_bytes(8, "little") + _tokens_le_u32(token_ids)
    return BlockHash(xxhash.xxh64_intdigest(data, seed=_SEED))


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, parent: BlockHash | None = None
) -> list[BlockHash]:
    """Chained hashes of every full block of ``token_ids``; a trailing partial block is skipped."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
