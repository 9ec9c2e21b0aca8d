"""Block hashes: fixed scheme, chaining, full blocks only."""

import struct

import pytest
import xxhash

from tandem.kvtransfer.block_hash import BlockHash, hash_block_tokens, hash_full_blocks


def test_known_values_pin_the_scheme() -> None:
    # Any change of seed, byte order, packing or parent constant changes these.
    assert hash_block_tokens(None, [1, 2, 3, 4]) == 11019104218214922726
    assert hash_full_blocks(list(range(10)), 4) == [17770248122588337987, 3560936001311728584]


def test_bytes_hashed_are_parent_le64_then_tokens_le32() -> None:
    parent = hash_block_tokens(None, [7, 8])
    data = struct.pack("<Q", parent) + struct.pack("<3I", 5, 70_000, 2**32 - 1)
    expected = xxhash.xxh64_intdigest(data, seed=0x7A4ED3E5)
    assert hash_block_tokens(parent, [5, 70_000, 2**32 - 1]) == expected


def test_hash_is_unsigned_64_bit_and_accepts_any_sequence() -> None:
    for tokens in ([0], [1, 2], list(range(100))):
        value = hash_block_tokens(None, tokens)
        assert 0 <= value < 2**64
        assert hash_block_tokens(None, tuple(tokens)) == value


def test_parent_changes_the_hash() -> None:
    tokens = [10, 11, 12, 13]
    first = hash_block_tokens(None, tokens)
    assert hash_block_tokens(first, tokens) != first
    assert hash_block_tokens(BlockHash(0), tokens) != first
    assert hash_block_tokens(BlockHash(1), tokens) != hash_block_tokens(BlockHash(2), tokens)


def test_chain_depends_on_every_earlier_block() -> None:
    a = hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_full_blocks([1, 2, 3, 9, 5, 6, 7, 8], 4)
    assert a[0] != b[0]
    assert a[1] != b[1]  # same tokens in block 1, different parent
    assert a[1] == hash_block_tokens(a[0], [5, 6, 7, 8])


def test_partial_block_is_not_hashed() -> None:
    tokens = list(range(11))
    hashes = hash_full_blocks(tokens, 4)
    assert len(hashes) == 2
    assert hashes == hash_full_blocks(tokens[:8], 4)
    assert hash_full_blocks(tokens[:3], 4) == []
    assert hash_full_blocks([], 4) == []


def test_parent_argument_continues_a_chain() -> None:
    tokens = list(range(12))
    whole = hash_full_blocks(tokens, 4)
    assert hash_full_blocks(tokens[4:], 4, parent=whole[0]) == whole[1:]


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        hash_full_blocks([1, 2], 0)
    with pytest.raises(OverflowError):
        hash_block_tokens(None, [2**32])
    with pytest.raises(OverflowError):
        hash_block_tokens(None, [-1])
