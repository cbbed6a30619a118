"""Paged KV cache layouts and the content-key chain of the vLLM connector, in plain torch.

Kept apart from :mod:`svdq_client.vllm` (which imports vLLM) so that they are tested, and
usable, without vLLM installed.

Layouts: an engine keeps each layer's cache as one tensor of fixed-size blocks; a request owns
a list of block ids, and its token ``t`` lives in block ``block_ids[t // block_size]`` at
offset ``t % block_size``. :class:`BlockLayout` reads and writes the keys and values of a
token range of one request as ``[tokens, kv_heads, head_dim]``, whatever the engine's layout.

Content keys: the chunk of tokens ``[i * chunk_tokens, (i + 1) * chunk_tokens)`` is named by
a hash chain, ``key_i = H(key_{i-1} || token ids of chunk i)`` with ``key_{-1} = H(namespace,
cache_salt, chunk_tokens)``: a key names the whole prefix up to its chunk's end, so equal keys
mean equal prefixes, and two salts (or namespaces) never produce the same key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from svdq.errors import InvalidInputError

#: bytes of one content key's digest (hex-encoded: twice as many characters)
KEY_DIGEST_BYTES = 16


def chunk_keys(token_ids: Sequence[int], chunk_tokens: int, cache_salt: str = "", namespace: str = "",
               count: int | None = None) -> list[str]:
    """Content keys of the full chunks of ``token_ids`` (the first ``count`` of them).

    Args:
        token_ids: the prompt's token ids.
        chunk_tokens: tokens per chunk, > 0.
        cache_salt: the request's salt (vLLM's ``cache_salt``); empty for none.
        namespace: what else must match for a hit (the connector passes the model and profile).
        count: at most this many chunks (default: every full chunk).
    """
    if chunk_tokens < 1:
        raise InvalidInputError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    full = len(token_ids) // chunk_tokens
    count = full if count is None else min(count, full)
    seed = hashlib.blake2b(repr(("svdq-kv-chain-v1", namespace, cache_salt, chunk_tokens)).encode(),
                           digest_size=KEY_DIGEST_BYTES).digest()
    ids = torch.as_tensor(list(token_ids[: count * chunk_tokens]), dtype=torch.int64)
    keys, previous = [], seed
    for index in range(count):
        digest = hashlib.blake2b(previous, digest_size=KEY_DIGEST_BYTES)
        digest.update(ids[index * chunk_tokens:(index + 1) * chunk_tokens].numpy().tobytes())
        previous = digest.digest()
        keys.append(previous.hex())
    return keys


def slot_indices(block_ids: Sequence[int], block_size: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, offset in block), int64 [stop - start] each, of a request's tokens
    ``[start, stop)``; IndexError when its blocks do not cover them."""
    if not 0 <= start <= stop:
        raise InvalidInputError(f"token range [{start}, {stop}) is not a valid range")
    if stop > len(block_ids) * block_size:
        raise IndexError(f"tokens [{start}, {stop}) need {-(-stop // block_size)} blocks, the request has "
                         f"{len(block_ids)}")
    tokens = torch.arange(start, stop)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)[tokens // block_size]
    return blocks, tokens % block_size


@dataclass(frozen=True)
class BlockLayout:
    """How one attention backend lays out a layer's paged cache.

    Attributes:
        name: ``cpu`` or ``flash``.
        block_size: tokens per block.
        kv_heads, head_dim: the layer's KV geometry.
    """

    name: str
    block_size: int
    kv_heads: int
    head_dim: int

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        """The layer cache's shape for ``num_blocks`` blocks.

        * ``cpu`` (vLLM's CPU_ATTN backend, ``vec`` ISA): ``[num_blocks, kv_heads, block_size,
          2 * head_dim]``, where each (block, head) holds the block's keys transposed,
          ``[head_dim, block_size]``, followed by its values ``[block_size, head_dim]``.
        * ``flash`` (FLASH_ATTN): ``[2, num_blocks, block_size, kv_heads, head_dim]``, keys then values.
        """
        if self.name == "cpu":
            return (num_blocks, self.kv_heads, self.block_size, 2 * self.head_dim)
        if self.name == "flash":
            return (2, num_blocks, self.block_size, self.kv_heads, self.head_dim)
        raise InvalidInputError(f"unknown block layout {self.name!r}; known: cpu, flash")

    def check(self, cache: torch.Tensor, what: str) -> None:
        """Refuse a cache tensor whose shape is not this layout's (a wrong layout would load
        and save wrong keys without any error)."""
        num_blocks = cache.shape[0] if self.name == "cpu" else cache.shape[1] if cache.dim() > 1 else 0
        expected = self.shape(num_blocks)
        if tuple(cache.shape) != expected:
            raise InvalidInputError(f"{what}: the {self.name} layout expects a KV cache of shape {list(expected)} "
                                    f"(blocks, heads, block_size, head_dim of this model), got {list(cache.shape)}")

    def _block_views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) views of ``cache`` with the block first and each block's interior as
        stored: cpu ``[block, head, dim, offset]`` / ``[block, head, offset, dim]``, flash
        ``[block, offset, head, dim]`` for both."""
        if self.name == "cpu":
            halves = cache.view(cache.shape[0], self.kv_heads, 2, self.block_size * self.head_dim)
            return (halves[:, :, 0].view(cache.shape[0], self.kv_heads, self.head_dim, self.block_size),
                    halves[:, :, 1].view(cache.shape[0], self.kv_heads, self.block_size, self.head_dim))
        return cache[0], cache[1]

    def _token_views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) views of ``cache`` indexed ``[block, offset, head, dim]``."""
        keys, values = self._block_views(cache)
        if self.name == "cpu":
            return keys.permute(0, 3, 1, 2), values.permute(0, 2, 1, 3)
        return keys, values

    def _to_blocks(self, tensor: torch.Tensor, kind: int) -> torch.Tensor:
        """[n, heads, dim] tokens of whole blocks -> the layout's block interiors (kind 0: keys)."""
        blocks = tensor.reshape(-1, self.block_size, self.kv_heads, self.head_dim)
        if self.name == "cpu":
            return blocks.permute(0, 2, 3, 1) if kind == 0 else blocks.permute(0, 2, 1, 3)
        return blocks

    def _from_blocks(self, blocks: torch.Tensor, kind: int) -> torch.Tensor:
        """The inverse of :meth:`_to_blocks`."""
        if self.name == "cpu":
            blocks = blocks.permute(0, 3, 1, 2) if kind == 0 else blocks.permute(0, 2, 1, 3)
        return blocks.reshape(-1, self.kv_heads, self.head_dim)

    def _whole_blocks(self, block_ids: Sequence[int], start: int, stop: int) -> torch.Tensor | None:
        """Block ids of ``[start, stop)`` when it is made of whole blocks (one copy per block
        then, instead of one gather per token), else None."""
        if start % self.block_size or stop % self.block_size:
            return None
        slot_indices(block_ids, self.block_size, start, stop)  # range checks
        return torch.as_tensor(list(block_ids[start // self.block_size:stop // self.block_size]), dtype=torch.int64)

    def read(self, cache: torch.Tensor, block_ids: Sequence[int], start: int,
             stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[stop - start, kv_heads, head_dim]`` (copies) of tokens ``[start, stop)``."""
        blocks = self._whole_blocks(block_ids, start, stop)
        if blocks is not None:
            keys, values = self._block_views(cache)
            blocks = blocks.to(cache.device)
            return self._from_blocks(keys[blocks], 0), self._from_blocks(values[blocks], 1)
        blocks, offsets = slot_indices(block_ids, self.block_size, start, stop)
        blocks, offsets = blocks.to(cache.device), offsets.to(cache.device)
        keys, values = self._token_views(cache)
        return keys[blocks, offsets], values[blocks, offsets]

    def write(self, cache: torch.Tensor, block_ids: Sequence[int], start: int, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Put keys and values ``[n, kv_heads, head_dim]`` at tokens ``[start, start + n)``."""
        expected = (keys.shape[0], self.kv_heads, self.head_dim)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected:
            raise InvalidInputError(f"keys and values must be {list(expected)}, got {list(keys.shape)} and "
                                    f"{list(values.shape)}")
        keys = keys.to(device=cache.device, dtype=cache.dtype)
        values = values.to(device=cache.device, dtype=cache.dtype)
        stop = start + keys.shape[0]
        blocks = self._whole_blocks(block_ids, start, stop)
        if blocks is not None:
            key_view, value_view = self._block_views(cache)
            blocks = blocks.to(cache.device)
            key_view[blocks] = self._to_blocks(keys, 0)
            value_view[blocks] = self._to_blocks(values, 1)
            return
        blocks, offsets = slot_indices(block_ids, self.block_size, start, stop)
        blocks, offsets = blocks.to(cache.device), offsets.to(cache.device)
        key_view, value_view = self._token_views(cache)
        key_view[blocks, offsets] = keys
        value_view[blocks, offsets] = values


__all__ = ["BlockLayout", "chunk_keys", "slot_indices"]
