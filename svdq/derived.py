"""Tensors that attention derives from compressed keys and keeps between calls, under one budget.

Attention over a stored sequence is much faster when some derived tensors survive from one
call to the next: the unpacked codes (``r`` bytes per body token), the dequantized score
channels of the sparse selection (``4 * (m + 1)`` bytes per token), the kernels' launch
layout, and, only while the budget has room (:meth:`DerivedCache.admits`: from their first use
on up to :data:`FIRST_ASK_BYTES` each, larger ones from their second), the rotated keys a
dense call reconstructed (``2 * C`` bytes per token in float16, ``4 * C`` in float32), the selection score's
rotated low-rank keys (``4 * C`` bytes per token) and SVDq latent values' dequantized latent
(``4 * (r + 1)`` bytes per token, a row of ones included, for dense sums; ``4 * r``, row-major,
for sparse sums over the selected tokens' union). Together they can outweigh the compressed keys themselves (1.5-bit keys of an
8 x 128 model take 192 bytes per token), so a server cannot let them grow with its store.

:data:`DERIVED` is the process's cache. The tensors live on each
:class:`~svdq.codec.CompressedKeys` (its ``_cache`` dict, which dies with it); the budget
keeps a least-recently-used order over the objects that hold some and, past
``limit_bytes``, clears the oldest objects' caches (they are recomputed when next needed).
``limit_bytes=None`` (the library default) keeps everything; a server sets a limit
(``svdq-server --attention-cache-bytes``, and :class:`svdq_client.hf.LocalOffload`'s
``attention_cache_bytes``; both 1 GiB by default). The object being served is never cleared while it
is in use, so one sequence's layer may exceed a limit smaller than its own cache.

Required tensors (what a call cannot run without, e.g. the unpacked codes) come before
optional ones (those admitted through :meth:`DerivedCache.admits` and put with
``optional=True``): an optional tensor is kept only in the room that the required ones
leave, and an optional put never clears a required tensor (it drops older optional tensors,
least recently used owner first, or itself). A required put past the limit drops optional
tensors first, every owner's, least recently used owner first, and only then clears owners
whole from the least recently used (never the most recent). An owner cleared whole while it
is still attended puts its required tensors back on its next call; when the least recently
used owner is the next one attended (a batch decoded in turns), each such put cleared the
next owner whole again, a cascade that made every call rebuild its required tensors while
other sequences' optional ones stayed (docs/attention.md, round 11: 91 owners cleared
whole in one 32k-token, batch-16 bench run).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    return 0


#: Optional tensors up to this size (16 MiB: a 4k-token layer's float32 keys at 8 KV heads x
#: 128) are kept from a sequence's first call, larger ones from its second (measured:
#: docs/attention.md, round 12).
FIRST_ASK_BYTES = 16 << 20


class DerivedCache:
    """Byte-bounded LRU over the ``_cache`` dicts of compressed objects (thread-safe), optional
    tensors evicted before required ones.

    Args:
        limit_bytes: most bytes kept over all objects; ``None`` for no limit.
        first_ask_bytes: optional tensors up to this many bytes are kept from their first
            ask, larger ones from their second (:meth:`admits`).
    """

    def __init__(self, limit_bytes: int | None = None, first_ask_bytes: int = FIRST_ASK_BYTES) -> None:
        # Re-entrant: a weakref callback may run (garbage collection) while the lock is held.
        self._lock = threading.RLock()
        # id -> [weakref, bytes charged, {optional name: its bytes}]
        self._owners: OrderedDict[int, list] = OrderedDict()
        self._bytes = 0
        self._optional_bytes = 0
        self._limit = limit_bytes
        #: optional tensors up to this size are admitted on their first ask (:meth:`admits`)
        self.first_ask_bytes = first_ask_bytes
        self.evictions = 0
        #: optional tensors dropped to make room (each one, whether for a required or an optional put)
        self.optional_evictions = 0

    @property
    def nbytes(self) -> int:
        """Bytes currently kept (required and optional)."""
        return self._bytes

    @property
    def optional_bytes(self) -> int:
        """Bytes of the optional tensors among :attr:`nbytes`."""
        return self._optional_bytes

    @property
    def limit_bytes(self) -> int | None:
        """Most bytes kept over all owners (``None``: no limit); setting it trims at once."""
        return self._limit

    @limit_bytes.setter
    def limit_bytes(self, limit: int | None) -> None:
        with self._lock:
            self._limit = limit
            self._trim_locked()

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit under a set limit without clearing anything: for
        optional tensors that are worth keeping only while the budget has room (``False``
        without a limit, so that library use without a budget never keeps them)."""
        with self._lock:
            return self._limit is not None and self._bytes + nbytes <= self._limit

    def admits(self, owner: Any, name: Any, nbytes: int) -> bool:
        """Whether to keep an optional tensor ``name`` of ``nbytes`` for ``owner`` now: the
        budget has room (:meth:`has_room`) and either the tensor is at most
        :attr:`first_ask_bytes` (kept from its first ask) or ``owner`` asks for it a second time
        (a larger tensor's first ask is only noted, in its ``_cache``, uncharged).

        Up to that size, building a kept tensor costs what the call that does not keep it costs
        (the same dequantization and products, into one tensor instead of reused blocks), so
        keeping it from the first call saves the second call's rebuild; a one-off call's tensor
        is the least recently used one and goes first when room is needed. Larger tensors cost a
        one-off call more to build than to skip (1.3-1.7x at 32k tokens, docs/attention.md,
        round 12), so they wait for a second ask. Put what it admits with ``optional=True``."""
        if not self.has_room(nbytes):
            return False
        if nbytes <= self.first_ask_bytes:
            return True
        marker = _asked(name)
        if owner._cache.get(marker):
            return True
        owner._cache[marker] = True
        return False

    def get(self, owner: Any, name: Any) -> Any:
        """``owner``'s cached ``name`` or None; marks the owner recently used (and, past the
        limit, clears the least recently used others)."""
        value = owner._cache.get(name)
        if value is not None:
            with self._lock:
                if id(owner) in self._owners:
                    self._owners.move_to_end(id(owner))
                    self._trim_locked()
        return value

    def put(self, owner: Any, name: Any, value: Any, *, optional: bool = False) -> Any:
        """Keep ``value`` as ``owner``'s ``name`` and charge its bytes; past the limit, make room
        as the module docstring says. ``optional``: a tensor :meth:`admits` admitted, said at the
        call (a marker in ``owner._cache`` could be cleared by another thread's eviction between
        the two). Returns ``value`` (an optional one is dropped again at once when older optional
        tensors do not make room for it)."""
        key = id(owner)
        with self._lock:
            entry = self._owners.get(key)
            if entry is None or entry[0]() is not owner:
                entry = [weakref.ref(owner, lambda ref, key=key: self._forget(key, ref)), 0, {}]
                self._owners[key] = entry
            # Two threads may both compute a missing tensor: the second replaces the first.
            nbytes = tensor_bytes(value) - tensor_bytes(owner._cache.get(name))
            owner._cache[name] = value
            entry[1] += nbytes
            self._bytes += nbytes
            if optional:
                self._optional_bytes += tensor_bytes(value) - entry[2].get(name, 0)
                entry[2][name] = tensor_bytes(value)
            self._owners.move_to_end(key)
            self._trim_locked(required=not optional)
        return value

    def _trim_locked(self, required: bool = True) -> None:
        """Until within the limit: drop optional tensors, least recently used owners first (the
        most recent one's too); with ``required``, then clear owners whole, least recently used
        first, never the most recent."""
        if self._limit is None or self._bytes <= self._limit:
            return
        for entry in list(self._owners.values()):
            if self._bytes <= self._limit:
                return
            owner = entry[0]()
            for name, nbytes in list(entry[2].items()):
                if self._bytes <= self._limit:
                    return
                if owner is not None:
                    owner._cache.pop(name, None)
                del entry[2][name]
                entry[1] -= nbytes
                self._bytes -= nbytes
                self._optional_bytes -= nbytes
                self.optional_evictions += 1
        if not required:
            return
        most_recent = next(reversed(self._owners))
        for key, entry in list(self._owners.items()):
            if self._bytes <= self._limit:
                return
            if key != most_recent:
                owner = entry[0]()
                del self._owners[key]
                self._uncharge_locked(entry[1], entry[2])
                self.evictions += 1
                if owner is not None:
                    owner._cache.clear()

    def _uncharge_locked(self, charged: int, optional: dict) -> None:
        self._bytes -= charged
        self._optional_bytes -= sum(optional.values())

    def discard(self, owner: Any) -> None:
        """Drop everything ``owner`` keeps (its whole ``_cache``) and its charge: the state of
        an object just read from its blob (a cold call; ``bench/attention.py`` times one)."""
        with self._lock:
            entry = self._owners.get(id(owner))
            if entry is not None and entry[0]() is owner:
                del self._owners[id(owner)]
                self._uncharge_locked(entry[1], entry[2])
            owner._cache.clear()

    def clear(self) -> None:
        """Drop every kept tensor."""
        with self._lock:
            while self._owners:
                _, (ref, charged, optional) = self._owners.popitem(last=False)
                self._uncharge_locked(charged, optional)
                owner = ref()
                if owner is not None:
                    owner._cache.clear()

    def _forget(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._owners.get(key)
            if entry is not None and entry[0] is ref:
                del self._owners[key]
                self._uncharge_locked(entry[1], entry[2])


def _asked(name: Any) -> tuple:
    """The key, in an owner's ``_cache``, that notes an ask for optional tensor ``name``."""
    return ("asked", name)


#: The process's derived-tensor cache (no limit until a server or an in-process offload sets one).
DERIVED = DerivedCache()

#: The limit ``svdq-server --attention-cache-bytes`` and :class:`svdq_client.hf.LocalOffload`
#: set by default: 1 GiB.
DEFAULT_LIMIT_BYTES = 1 << 30

__all__ = ["DEFAULT_LIMIT_BYTES", "DERIVED", "FIRST_ASK_BYTES", "DerivedCache", "tensor_bytes"]
