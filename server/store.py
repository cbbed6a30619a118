"""In-memory store of compressed sequences under a byte budget.

Each tenant has its own namespace of sequence ids. A stored sequence's contents
(:class:`SequenceState`) are immutable: an append builds a new state and swaps it in, so a
reader (attention, fetch) always sees one consistent version and a failed update leaves the
old one in place. Writers of one sequence serialise on its ``write_lock``; different
sequences never wait for each other except for the short store-wide bookkeeping lock.

Tenants cannot push each other out. A tenant may have a byte quota (a hard limit: an
insert or append that would take it over answers RESOURCE_EXHAUSTED naming the quota, and
evicts nothing). When a new or grown sequence would exceed the store budget,
``eviction="lru"`` evicts least recently used sequences, but only of tenants holding more
than their share (their quota, or else an equal part of the budget among the tenants that
store something), then the requesting tenant's own; a tenant within its share never loses a
sequence to another tenant. What cannot be freed that way, and everything under
``eviction="none"``, fails with RESOURCE_EXHAUSTED. Sequences idle longer than
``ttl_seconds`` expire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
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
        quotas: tenant -> its byte quota (from the tokens file).
        default_quota: quota of every tenant not in ``quotas``; None = no quota (the store
            budget bounds it, and its eviction share is an equal part of the budget).
    """

    def __init__(self, budget_bytes: int, eviction: str = "lru", ttl_seconds: float = 0.0,
                 on_evict: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 quotas: Mapping[str, int] | None = None, default_quota: int | None = None) -> None:
        if budget_bytes <= 0:
            raise InvalidInputError(f"store budget must be > 0 bytes, got {budget_bytes}")
        if eviction not in EVICTION_POLICIES:
            raise InvalidInputError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")
        if ttl_seconds < 0:
            raise InvalidInputError(f"ttl_seconds must be >= 0 (0 = no expiry), got {ttl_seconds}")
        for owner, quota in [*(quotas or {}).items(), ("every other tenant", default_quota)]:
            if quota is not None and (not isinstance(quota, int) or quota <= 0):
                raise InvalidInputError(f"the quota of {owner!r} must be a byte count > 0, got {quota!r}")
        self.budget_bytes = budget_bytes
        self.quotas = dict(quotas or {})
        self.default_quota = default_quota
        self.eviction = eviction
        self.ttl_seconds = ttl_seconds
        self._on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._sequences: OrderedDict[tuple[str, str], StoredSequence] = OrderedDict()
        self._stored_bytes = 0
        self._stored_key_bytes = 0
        self._stored_fp16 = {"keys": 0, "values": 0}
        # Per tenant, kept with the totals: quota checks run on every insert and append.
        self._tenant_bytes: defaultdict[str, int] = defaultdict(int)
        self._tenant_evictions: defaultdict[str, int] = defaultdict(int)
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

    def quota_for(self, tenant: str) -> int | None:
        """The tenant's byte quota; None when it has none."""
        return self.quotas.get(tenant, self.default_quota)

    def tenant_totals(self, tenant: str) -> dict[str, int]:
        """What :meth:`totals` gives, for one tenant's sequences, plus its ``evictions``."""
        with self._lock:
            self._expire_locked()
            entries = [entry for entry in self._sequences.values() if entry.tenant == tenant]
            fp16 = sum(fp16_bytes(entry.profile, entry.state.num_tokens) * (2 if entry.state.values is not None else 1)
                       for entry in entries)
            return {"bytes": self._tenant_bytes.get(tenant, 0), "fp16_bytes": fp16, "sequences": len(entries),
                    "evictions": self._tenant_evictions.get(tenant, 0)}

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
            self._make_room_locked(entry.tenant, entry.state.nbytes, freed, protect=entry.key,
                                   what=f"sequence {entry.sequence_id!r}")
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
            self._make_room_locked(entry.tenant, new_state.nbytes, entry.charged_bytes, protect=entry.key,
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
        self._tenant_bytes[entry.tenant] += entry.charged_bytes
        fp16 = fp16_bytes(entry.profile, state.num_tokens)
        self._stored_fp16["keys"] += fp16
        self._stored_fp16["values"] += fp16 if state.values is not None else 0

    def _uncharge_locked(self, entry: StoredSequence) -> None:
        state = entry.state
        self._stored_bytes -= entry.charged_bytes
        self._stored_key_bytes -= entry.charged_key_bytes
        self._tenant_bytes[entry.tenant] -= entry.charged_bytes
        if not self._tenant_bytes[entry.tenant]:
            del self._tenant_bytes[entry.tenant]  # the share count is over tenants that store something
        fp16 = fp16_bytes(entry.profile, state.num_tokens)
        self._stored_fp16["keys"] -= fp16
        self._stored_fp16["values"] -= fp16 if state.values is not None else 0

    def _remove_locked(self, entry: StoredSequence) -> None:
        self._uncharge_locked(entry)
        entry.deleted = True
        del self._sequences[entry.key]

    def _make_room_locked(self, tenant: str, needed: int, freed: int, protect: tuple[str, str], what: str) -> None:
        """Make ``needed`` bytes of ``tenant`` fit its quota and the budget, counting ``freed``
        bytes that the caller's own old version gives back; evicts as the module docstring
        says (never ``protect``), or raises ResourceExhaustedError and changes nothing."""
        if needed > self.budget_bytes:
            raise ResourceExhaustedError(
                f"{what} needs {needed} bytes compressed, more than the whole store budget of "
                f"{self.budget_bytes} bytes (--store-bytes)"
            )
        quota = self.quota_for(tenant)
        holds = self._tenant_bytes.get(tenant, 0) - freed
        if quota is not None and holds + needed > quota:
            raise ResourceExhaustedError(
                f"{what} needs {needed} bytes but tenant {tenant!r} already holds {holds} of its {quota}-byte quota "
                "(quota_bytes in --tokens-file, or --tenant-quota-bytes); delete some of its sequences"
            )
        available = self.budget_bytes - self._stored_bytes + freed
        if needed <= available:
            return
        victims: dict[tuple[str, str], StoredSequence] = {}
        if self.eviction == "lru":
            # Bytes each tenant holds above its share, the requester's with the new version in.
            excess = {owner: held - self._share_locked(owner, tenant) for owner, held in self._tenant_bytes.items()}
            excess[tenant] = holds + needed - self._share_locked(tenant, tenant)
            for over_share_only in (True, False):
                for key, candidate in self._sequences.items():
                    if needed <= available:
                        break
                    if key == protect or key in victims:
                        continue
                    if over_share_only and excess[candidate.tenant] <= 0:
                        continue
                    if not over_share_only and candidate.tenant != tenant:
                        continue
                    victims[key] = candidate
                    available += candidate.charged_bytes
                    excess[candidate.tenant] -= candidate.charged_bytes
        if needed > available:
            detail = ("the other tenants' sequences are within their shares" if self.eviction == "lru"
                      else f"eviction is {self.eviction!r}")
            raise ResourceExhaustedError(
                f"{what} needs {needed} bytes but only {self.budget_bytes - self._stored_bytes + freed} of the "
                f"{self.budget_bytes}-byte store budget are free and {detail}; delete sequences or raise --store-bytes"
            )
        for victim in victims.values():
            log.info("evicting sequence %r of tenant %r (lru, %d bytes)", victim.sequence_id, victim.tenant,
                     victim.charged_bytes)
            self._remove_locked(victim)
            self._tenant_evictions[victim.tenant] += 1
            self._evicted("lru")

    def _share_locked(self, owner: str, requester: str) -> int:
        """The bytes ``owner`` may hold before its sequences become eviction candidates for
        other tenants: its quota, else an equal part of the budget among the tenants that
        store something (the requester included)."""
        quota = self.quota_for(owner)
        if quota is not None:
            return quota
        tenants = len(self._tenant_bytes.keys() | {requester})
        return self.budget_bytes // tenants

    def _expire_locked(self) -> int:
        if not self.ttl_seconds:
            return 0
        deadline = self._clock() - self.ttl_seconds
        expired = [entry for entry in self._sequences.values() if entry.last_access < deadline]
        for entry in expired:
            log.info("expiring sequence %r of tenant %r (idle > %ss)", entry.sequence_id, entry.tenant,
                     self.ttl_seconds)
            self._remove_locked(entry)
            self._tenant_evictions[entry.tenant] += 1
            self._evicted("ttl")
        return len(expired)

    def _evicted(self, reason: str) -> None:
        self.evictions += 1
        if self._on_evict is not None:
            self._on_evict(reason)


def fp16_bytes(profile: Profile, tokens: int) -> int:
    """Bytes of ``tokens`` tokens of one tensor kind (keys or values) of every layer in float16."""
    return 2 * tokens * profile.num_layers * profile.channels
