"""In-memory store of compressed sequences under a byte budget.

Each tenant has its own namespace of sequence ids. A stored sequence's contents
(:class:`SequenceState`) are immutable: an append builds a new state and swaps it in, so a
reader (attention, fetch) always sees one consistent version and a failed update leaves the
old one in place. Writers of one sequence serialise on its ``write_lock``; different
sequences never wait for each other except for the short store-wide bookkeeping lock.

When a new or grown sequence would exceed the budget, the least recently used other
sequences are evicted (``eviction="lru"``) or the request fails with
RESOURCE_EXHAUSTED (``eviction="none"``). Sequences idle longer than ``ttl_seconds`` expire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from svdq_client.types import Profile

from svdq.codec import CompressedKeys
from svdq.errors import InvalidInputError, NotFoundError, ResourceExhaustedError

log = logging.getLogger(__name__)

EVICTION_POLICIES = ("lru", "none")


@dataclass(frozen=True)
class SequenceState:
    """One immutable version of a stored sequence.

    Attributes:
        keys: one :class:`CompressedKeys` per layer (same token count in each).
        values: one ``svdq.values.CompressedValues`` per layer, or ``None`` for keys only.
        last_append: ``(tokens_before, new_tokens, digest)`` of the latest append, so that a
            retried append is recognised instead of applied twice.
    """

    keys: tuple[CompressedKeys, ...]
    values: tuple | None
    last_append: tuple[int, int, bytes] | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys[0].num_tokens

    @property
    def key_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.keys)

    @property
    def value_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.values) if self.values is not None else 0

    @property
    def nbytes(self) -> int:
        return self.key_bytes + self.value_bytes


@dataclass(eq=False)
class StoredSequence:
    """A sequence in the store: identity, profile and the current :class:`SequenceState`."""

    tenant: str
    sequence_id: str
    profile: Profile
    key_space: str
    upload_id: str
    state: SequenceState
    last_access: float = field(default_factory=time.monotonic)
    write_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Charged bytes: kept beside the state so the store's totals never need recomputing.
    charged_bytes: int = 0
    charged_key_bytes: int = 0
    deleted: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.sequence_id)


class SequenceStore:
    """Tenant-scoped sequences under ``budget_bytes`` (serialized sizes of keys and values).

    Args:
        budget_bytes: upper bound of the stored bytes, > 0.
        eviction: ``"lru"`` or ``"none"``.
        ttl_seconds: idle time after which a sequence expires; 0 disables expiry.
        on_evict: called with the reason (``"lru"`` or ``"ttl"``) for every evicted sequence.
        clock: monotonic time source (tests pass a fake one).
    """

    def __init__(self, budget_bytes: int, eviction: str = "lru", ttl_seconds: float = 0.0,
                 on_evict: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if budget_bytes <= 0:
            raise InvalidInputError(f"store budget must be > 0 bytes, got {budget_bytes}")
        if eviction not in EVICTION_POLICIES:
            raise InvalidInputError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")
        if ttl_seconds < 0:
            raise InvalidInputError(f"ttl_seconds must be >= 0 (0 = no expiry), got {ttl_seconds}")
        self.budget_bytes = budget_bytes
        self.eviction = eviction
        self.ttl_seconds = ttl_seconds
        self._on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._sequences: OrderedDict[tuple[str, str], StoredSequence] = OrderedDict()
        self._stored_bytes = 0
        self._stored_key_bytes = 0
        self._stored_fp16 = {"keys": 0, "values": 0}
        self.evictions = 0

    # -- reading -------------------------------------------------------------------------

    def get(self, tenant: str, sequence_id: str) -> StoredSequence:
        """The tenant's sequence (marked as used); NotFoundError when absent or expired.
        Another tenant's sequence of the same id is indistinguishable from an absent one."""
        with self._lock:
            self._expire_locked()
            entry = self._sequences.get((tenant, sequence_id))
            if entry is None:
                raise NotFoundError(f"sequence {sequence_id!r} not found")
            entry.last_access = self._clock()
            self._sequences.move_to_end(entry.key)
            return entry

    def peek(self, tenant: str, sequence_id: str) -> StoredSequence | None:
        """Like :meth:`get` without touching recency; ``None`` when absent."""
        with self._lock:
            self._expire_locked()
            return self._sequences.get((tenant, sequence_id))

    def totals(self) -> dict[str, int]:
        """Stored bytes (``keys``, ``values``), their float16 equivalents and the count
        (expired sequences are dropped first, so scrapes see TTL expiry without traffic)."""
        with self._lock:
            self._expire_locked()
            return {
                "keys": self._stored_key_bytes,
                "values": self._stored_bytes - self._stored_key_bytes,
                "fp16_keys": self._stored_fp16["keys"],
                "fp16_values": self._stored_fp16["values"],
                "sequences": len(self._sequences),
            }

    def tensor_bytes(self) -> int:
        """Bytes of the torch tensors the stored sequences hold in memory (device memory
        accounting; close to, but not the same as, the serialized sizes)."""
        with self._lock:
            states = [entry.state for entry in self._sequences.values()]
        total = 0
        for state in states:
            for layer in state.keys + (state.values or ()):
                total += sum(value.numel() * value.element_size() for value in vars(layer).values()
                             if isinstance(value, torch.Tensor))
        return total

    def count(self, tenant: str | None = None) -> int:
        with self._lock:
            if tenant is None:
                return len(self._sequences)
            return sum(1 for key in self._sequences if key[0] == tenant)

    # -- writing -------------------------------------------------------------------------

    def insert(self, entry: StoredSequence, replace: bool) -> None:
        """Add a new sequence (or replace the tenant's sequence of that id when ``replace``).

        The engine decides about an existing id before it compresses; here the old version is
        simply superseded. ResourceExhaustedError when the budget cannot hold the new one; the
        store is then unchanged.
        """
        with self._lock:
            self._expire_locked()
            old = self._sequences.get(entry.key)
            freed = old.charged_bytes if (old is not None and replace) else 0
            self._make_room_locked(entry.state.nbytes, freed, protect=entry.key, what=f"sequence {entry.sequence_id!r}")
            if old is not None:
                self._remove_locked(old)
            self._charge_locked(entry, entry.state)
            self._sequences[entry.key] = entry

    def update(self, entry: StoredSequence, new_state: SequenceState) -> None:
        """Swap in a new state of a stored sequence (caller holds ``entry.write_lock``).

        ResourceExhaustedError when the growth does not fit; the old state then stays.
        NotFoundError when the sequence was deleted or evicted meanwhile.
        """
        with self._lock:
            if entry.deleted or self._sequences.get(entry.key) is not entry:
                raise NotFoundError(f"sequence {entry.sequence_id!r} not found (deleted or evicted meanwhile)")
            self._make_room_locked(new_state.nbytes, entry.charged_bytes, protect=entry.key,
                                   what=f"sequence {entry.sequence_id!r}")
            self._uncharge_locked(entry)
            self._charge_locked(entry, new_state)
            entry.last_access = self._clock()
            self._sequences.move_to_end(entry.key)

    def delete(self, tenant: str, sequence_id: str) -> None:
        """Remove the tenant's sequence; NotFoundError when absent."""
        with self._lock:
            self._expire_locked()
            entry = self._sequences.get((tenant, sequence_id))
            if entry is None:
                raise NotFoundError(f"sequence {sequence_id!r} not found")
            self._remove_locked(entry)

    def expire(self) -> int:
        """Drop expired sequences now (also done lazily on every access); returns how many."""
        with self._lock:
            return self._expire_locked()

    # -- internals (store lock held) -------------------------------------------------------

    def _charge_locked(self, entry: StoredSequence, state: SequenceState) -> None:
        entry.state = state
        entry.charged_bytes = state.nbytes
        entry.charged_key_bytes = state.key_bytes
        self._stored_bytes += entry.charged_bytes
        self._stored_key_bytes += entry.charged_key_bytes
        fp16 = fp16_bytes(entry.profile, state.num_tokens)
        self._stored_fp16["keys"] += fp16
        self._stored_fp16["values"] += fp16 if state.values is not None else 0

    def _uncharge_locked(self, entry: StoredSequence) -> None:
        state = entry.state
        self._stored_bytes -= entry.charged_bytes
        self._stored_key_bytes -= entry.charged_key_bytes
        fp16 = fp16_bytes(entry.profile, state.num_tokens)
        self._stored_fp16["keys"] -= fp16
        self._stored_fp16["values"] -= fp16 if state.values is not None else 0

    def _remove_locked(self, entry: StoredSequence) -> None:
        self._uncharge_locked(entry)
        entry.deleted = True
        del self._sequences[entry.key]

    def _make_room_locked(self, needed: int, freed: int, protect: tuple[str, str], what: str) -> None:
        """Evict least recently used sequences (never ``protect``) until ``needed`` bytes fit,
        counting ``freed`` bytes that the caller's own old version gives back."""
        if needed > self.budget_bytes:
            raise ResourceExhaustedError(
                f"{what} needs {needed} bytes compressed, more than the whole store budget of "
                f"{self.budget_bytes} bytes (--store-bytes)"
            )
        available = self.budget_bytes - self._stored_bytes + freed
        if needed <= available:
            return
        victims = []
        if self.eviction == "lru":
            for key, candidate in self._sequences.items():
                if needed <= available:
                    break
                if key == protect:
                    continue
                victims.append(candidate)
                available += candidate.charged_bytes
        if needed > available:
            raise ResourceExhaustedError(
                f"{what} needs {needed} bytes but only {self.budget_bytes - self._stored_bytes + freed} of the "
                f"{self.budget_bytes}-byte store budget are free and eviction is {self.eviction!r}; "
                "delete sequences or raise --store-bytes"
            )
        for victim in victims:
            log.info("evicting sequence %r of tenant %r (lru, %d bytes)", victim.sequence_id, victim.tenant,
                     victim.charged_bytes)
            self._remove_locked(victim)
            self._evicted("lru")

    def _expire_locked(self) -> int:
        if not self.ttl_seconds:
            return 0
        deadline = self._clock() - self.ttl_seconds
        expired = [entry for entry in self._sequences.values() if entry.last_access < deadline]
        for entry in expired:
            log.info("expiring sequence %r of tenant %r (idle > %ss)", entry.sequence_id, entry.tenant,
                     self.ttl_seconds)
            self._remove_locked(entry)
            self._evicted("ttl")
        return len(expired)

    def _evicted(self, reason: str) -> None:
        self.evictions += 1
        if self._on_evict is not None:
            self._on_evict(reason)


def fp16_bytes(profile: Profile, tokens: int) -> int:
    """Bytes of ``tokens`` tokens of one tensor kind (keys or values) of every layer in float16."""
    return 2 * tokens * profile.num_layers * profile.channels
