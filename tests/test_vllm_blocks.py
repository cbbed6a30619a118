"""The vLLM connector's paged-cache layouts and content-key chain (svdq_client.kv_blocks),
checked against caches built token by token from the layouts' definitions. No vLLM needed."""

import pytest
import torch
from svdq_client.kv_blocks import BlockLayout, chunk_keys, slot_indices

from svdq.errors import InvalidInputError

BLOCK, HEADS, DIM, BLOCKS = 32, 3, 64, 7
# A request owning blocks out of order, as a paged allocator hands them out.
BLOCK_IDS = [5, 2, 6, 0]


def tokens_kv(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(count, HEADS, DIM, generator=generator).bfloat16(),
            torch.randn(count, HEADS, DIM, generator=generator).bfloat16())


def reference_cache(layout, keys, values, start):
    """The paged cache holding tokens [start, start + n) of BLOCK_IDS, written element by
    element from the layout's definition (zeros elsewhere)."""
    cache = torch.zeros(layout.shape(BLOCKS), dtype=torch.bfloat16)
    for index in range(keys.shape[0]):
        token = start + index
        block, offset = BLOCK_IDS[token // BLOCK], token % BLOCK
        for head in range(HEADS):
            if layout.name == "cpu":
                # per (block, head): K transposed [head_dim, block_size], then V [block_size, head_dim]
                flat = cache[block, head].view(-1)
                for dim in range(DIM):
                    flat[dim * BLOCK + offset] = keys[index, head, dim]
                flat[BLOCK * DIM + offset * DIM:BLOCK * DIM + (offset + 1) * DIM] = values[index, head]
            else:
                cache[0, block, offset, head] = keys[index, head]
                cache[1, block, offset, head] = values[index, head]
    return cache


@pytest.mark.parametrize("name", ["cpu", "flash"])
@pytest.mark.parametrize("start, count", [(0, 4 * BLOCK), (BLOCK + 5, 40), (3 * BLOCK - 1, 1)])
def test_layouts_read_and_write_tokens_where_the_backend_keeps_them(name, start, count):
    layout = BlockLayout(name, BLOCK, HEADS, DIM)
    keys, values = tokens_kv(count)
    expected = reference_cache(layout, keys, values, start)
    cache = torch.zeros(layout.shape(BLOCKS), dtype=torch.bfloat16)
    layout.write(cache, BLOCK_IDS, start, keys, values)
    assert torch.equal(cache, expected)
    read_keys, read_values = layout.read(expected, BLOCK_IDS, start, start + count)
    assert torch.equal(read_keys, keys) and torch.equal(read_values, values)


def test_layout_write_converts_dtype_and_checks_shapes():
    layout = BlockLayout("cpu", BLOCK, HEADS, DIM)
    cache = torch.zeros(layout.shape(BLOCKS), dtype=torch.bfloat16)
    keys, values = tokens_kv(10)
    layout.write(cache, BLOCK_IDS, 0, keys.float(), values.float())
    assert torch.equal(layout.read(cache, BLOCK_IDS, 0, 10)[0], keys)
    with pytest.raises(InvalidInputError, match="must be"):
        layout.write(cache, BLOCK_IDS, 0, keys[:, :2], values[:, :2])
    with pytest.raises(IndexError, match="blocks"):
        layout.read(cache, BLOCK_IDS, 0, len(BLOCK_IDS) * BLOCK + 1)
    with pytest.raises(InvalidInputError, match="shape"):
        layout.check(torch.zeros(BLOCKS, HEADS, BLOCK, DIM), "layer 0")
    BlockLayout("flash", BLOCK, HEADS, DIM).check(torch.zeros(2, BLOCKS, BLOCK, HEADS, DIM), "layer 0")
    with pytest.raises(InvalidInputError, match="unknown block layout"):
        BlockLayout("hnd", BLOCK, HEADS, DIM).shape(1)


def test_slot_indices_map_tokens_to_blocks():
    blocks, offsets = slot_indices(BLOCK_IDS, BLOCK, BLOCK - 1, BLOCK + 2)
    assert blocks.tolist() == [5, 2, 2] and offsets.tolist() == [BLOCK - 1, 0, 1]
    with pytest.raises(InvalidInputError):
        slot_indices(BLOCK_IDS, BLOCK, 5, 4)


def test_chunk_keys_name_prefixes():
    tokens = list(range(1000, 1000 + 3 * 64 + 10))
    keys = chunk_keys(tokens, 64)
    assert len(keys) == 3  # the 10 trailing tokens are not a full chunk
    assert len(set(keys)) == 3 and all(len(key) == 32 for key in keys)
    # A prompt sharing the first two chunks shares exactly their keys (a partial prefix hit).
    changed = tokens[:130] + [7] + tokens[131:]
    assert chunk_keys(changed, 64)[:2] == keys[:2] and chunk_keys(changed, 64)[2] != keys[2]
    # A change in the first chunk changes every later key: a key names the whole prefix.
    first_changed = [7] + tokens[1:]
    assert not set(chunk_keys(first_changed, 64)) & set(keys)
    assert chunk_keys(tokens, 64, count=2) == keys[:2]
    # Salts, namespaces and chunk sizes never collide.
    assert not set(chunk_keys(tokens, 64, cache_salt="tenant-x")) & set(keys)
    assert not set(chunk_keys(tokens, 64, namespace="other-profile")) & set(keys)
    assert not set(chunk_keys(tokens, 32)) & set(keys)
    assert chunk_keys(tokens, 64) == keys  # deterministic
    with pytest.raises(InvalidInputError):
        chunk_keys(tokens, 0)
