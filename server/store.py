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
``ttl_seconds`` expire: an access never returns an expired sequence, and :meth:`StoreBackend.expire`
drops every expired one (the server runs it periodically, so totals and metrics follow the TTL
without traffic; reading the totals never expires anything).

Two backends keep to this contract (:class:`StoreBackend`): :class:`SequenceStore`, this
process's memory (the embedded default), and :class:`svdq_server.store_redis.RedisSequenceStore`,
which keeps every sequence in Redis so that several replicas serve one fleet and a restart
loses nothing acknowledged. Both take their limits from one :class:`StorePolicy` and choose
eviction victims with one function, :func:`plan_eviction`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import torch

from svdq.api.types import Profile
from svdq.codec import CompressedKeys, CostLimits, append
from svdq.errors import InvalidInputError, NotFoundError, ResourceExhaustedError, UnavailableError
from svdq.values import append_values

log = logging.getLogger(__name__)

EVICTION_POLICIES = ("lru", "none")


@dataclass(frozen=True)
class AppendDelta:
    """The raw tensors of the append that made a state from its predecessor (on the CPU), so
    that a backend can persist the append instead of the whole sequence again."""

    keys: torch.Tensor
    values: torch.Tensor | None
    positions: torch.Tensor | None


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
    delta: AppendDelta | None = field(default=None, compare=False, repr=False)

    def appended(self, keys: torch.Tensor, values: torch.Tensor | None, positions: torch.Tensor | None,
                 last_append: tuple[int, int, bytes] | None, limits: CostLimits | None = None) -> SequenceState:
        """This state with ``keys`` (and ``values``) [layers, new_tokens, kv_heads, head_dim]
        appended to every layer, on the device of the stored tensors. Deterministic: a replica
        replaying a persisted append rebuilds byte-identical layers. ``limits`` bound the work
        (:func:`svdq.codec.check_cost`); None keeps the codec's defaults."""
        device = self.keys[0].codes.device
        device_keys = keys.to(device)
        device_positions = positions.to(device) if positions is not None else None
        new_keys = tuple(append(layer, device_keys[index], device_positions, limits=limits) for index, layer in enumerate(self.keys))
        new_values = None
        if values is not None:
            device_values = values.to(device)
            new_values = tuple(append_values(layer, device_values[index]) for index, layer in enumerate(self.values))
        delta = AppendDelta(keys.cpu(), values.cpu() if values is not None else None,
                            positions.cpu() if positions is not None else None)
        return SequenceState(new_keys, new_values, last_append, delta)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].num_tokens

    # The serialized sizes are computed once per state (each layer's ``nbytes`` walks its
    # format, ~0.1 ms a layer): every Describe, Append reply and charge reads them.
    @functools.cached_property
    def key_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.keys)

    @functools.cached_property
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
    # Identifies the committed state; a shared backend's compare-and-set checks it.
    version: int = 0
    # (version of the stored blobs, appends after them) a shared backend loaded: what a
    # replica must read to catch up with another one's appends.
    log_position: tuple[int, int] = (0, 0)

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.sequence_id)

    @property
    def version_tag(self) -> str:
        """Names the committed state for clients (a resumed Fetch): the upload and the version
        within it, so a sequence uploaded again never matches its predecessor's tag."""
        return f"{self.upload_id}.{self.version}"


@dataclass(frozen=True)
class StorePolicy:
    """Limits every backend applies the same way.

    Attributes:
        budget_bytes: upper bound of the stored bytes (serialized keys and values), > 0.
        eviction: ``"lru"`` or ``"none"``.
        ttl_seconds: idle time after which a sequence expires; 0 disables expiry.
        quotas: tenant -> its byte quota (from the tokens file).
        default_quota: quota of every tenant not in ``quotas``; None = no quota (the store
            budget bounds it, and its eviction share is an equal part of the budget).
    """

    budget_bytes: int
    eviction: str = "lru"
    ttl_seconds: float = 0.0
    quotas: Mapping[str, int] = field(default_factory=dict)
    default_quota: int | None = None

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise InvalidInputError(f"store budget must be > 0 bytes, got {self.budget_bytes}")
        if self.eviction not in EVICTION_POLICIES:
            raise InvalidInputError(f"eviction must be one of {EVICTION_POLICIES}, got {self.eviction!r}")
        if self.ttl_seconds < 0:
            raise InvalidInputError(f"ttl_seconds must be >= 0 (0 = no expiry), got {self.ttl_seconds}")
        for owner, quota in [*self.quotas.items(), ("every other tenant", self.default_quota)]:
            if quota is not None and (not isinstance(quota, int) or quota <= 0):
                raise InvalidInputError(f"the quota of {owner!r} must be a byte count > 0, got {quota!r}")
        object.__setattr__(self, "quotas", dict(self.quotas))

    def quota_for(self, tenant: str) -> int | None:
        """The tenant's byte quota; None when it has none."""
        return self.quotas.get(tenant, self.default_quota)

    def share(self, owner: str, requester: str, tenant_bytes: Mapping[str, int]) -> int:
        """The bytes ``owner`` may hold before its sequences become eviction candidates for
        other tenants: its quota, else an equal part of the budget among the tenants that
        store something (the requester included)."""
        quota = self.quota_for(owner)
        if quota is not None:
            return quota
        return self.budget_bytes // len(tenant_bytes.keys() | {requester})


def plan_eviction(policy: StorePolicy, tenant_bytes: Mapping[str, int], stored_bytes: int,
                  candidates: Iterable[tuple[Hashable, str, int]], tenant: str, needed: int, freed: int,
                  protect: Hashable, what: str) -> list[Hashable]:
    """The sequences to evict so that ``needed`` bytes of ``tenant`` fit its quota and the
    budget, counting ``freed`` bytes that the caller's own old version gives back.

    ``candidates`` are ``(key, tenant, charged_bytes)`` in least recently used order; they are
    consumed only as far as needed. Eviction takes from tenants over their share first, then
    the requester's own sequences, never ``protect``. Raises ResourceExhaustedError (and the
    caller changes nothing) when that cannot make room.
    """
    if needed > policy.budget_bytes:
        raise ResourceExhaustedError(
            f"{what} needs {needed} bytes compressed, more than the whole store budget of "
            f"{policy.budget_bytes} bytes (--store-bytes)"
        )
    quota = policy.quota_for(tenant)
    holds = tenant_bytes.get(tenant, 0) - freed
    if quota is not None and holds + needed > quota:
        raise ResourceExhaustedError(
            f"{what} needs {needed} bytes but tenant {tenant!r} already holds {holds} of its {quota}-byte quota "
            "(quota_bytes in --tokens-file, or --tenant-quota-bytes); delete some of its sequences"
        )
    available = policy.budget_bytes - stored_bytes + freed
    if needed <= available:
        return []
    victims: dict[Hashable, None] = {}
    if policy.eviction == "lru":
        # Bytes each tenant holds above its share, the requester's with the new version in.
        excess = {owner: held - policy.share(owner, tenant, tenant_bytes) for owner, held in tenant_bytes.items()}
        excess[tenant] = holds + needed - policy.share(tenant, tenant, tenant_bytes)
        # Two passes over the LRU order: kept in a list only as far as the first pass read it.
        seen: list[tuple[Hashable, str, int]] = []
        source = iter(candidates)

        def ordered():
            yield from seen
            for candidate in source:
                seen.append(candidate)
                yield candidate

        for over_share_only in (True, False):
            for key, owner, charged in ordered():
                if needed <= available:
                    break
                if key == protect or key in victims:
                    continue
                if over_share_only and excess.get(owner, 0) <= 0:
                    continue
                if not over_share_only and owner != tenant:
                    continue
                victims[key] = None
                available += charged
                excess[owner] = excess.get(owner, 0) - charged
    if needed > available:
        detail = ("the other tenants' sequences are within their shares" if policy.eviction == "lru"
                  else f"eviction is {policy.eviction!r}")
        raise ResourceExhaustedError(
            f"{what} needs {needed} bytes but only {policy.budget_bytes - stored_bytes + freed} of the "
            f"{policy.budget_bytes}-byte store budget are free and {detail}; delete sequences or raise --store-bytes"
        )
    return list(victims)


def timed(operation: str):
    """Report a store method's duration, and whether the backend failed (UnavailableError),
    to the store's ``observe(operation, seconds, failed)`` callback."""

    def decorate(method):
        @functools.wraps(method)
        def observed(self, *args, **kwargs):
            started = time.perf_counter()
            failed = False
            try:
                return method(self, *args, **kwargs)
            except UnavailableError:
                failed = True
                raise
            finally:
                if self.observe is not None:
                    self.observe(operation, time.perf_counter() - started, failed)

        return observed

    return decorate


class StoreBackend(Protocol):
    """What the engine needs of a store (see the module docstring for the semantics).

    ``get`` marks the sequence as used, ``peek`` does not; both return a
    :class:`StoredSequence` whose ``state`` is one immutable version. Writers of one sequence
    hold its ``write_lock`` around reading ``state`` and calling ``update``. ``profiles()`` is
    the mapping ``(owner, name) -> Profile`` the engine keeps its profiles in, so a shared
    backend shares them too. ``ping()`` raises UnavailableError when the backend cannot serve.
    """

    backend: str
    #: one name per store, the same on every replica that shares it (metrics count it once)
    store_id: str
    #: budget, eviction, TTL and quotas (read them here; the store keeps no copies)
    policy: StorePolicy

    def get(self, tenant: str, sequence_id: str) -> StoredSequence: ...
    def peek(self, tenant: str, sequence_id: str) -> StoredSequence | None: ...
    def insert(self, entry: StoredSequence, replace: bool) -> None: ...
    def update(self, entry: StoredSequence, new_state: SequenceState) -> None: ...
    def delete(self, tenant: str, sequence_id: str) -> None: ...
    def expire(self) -> int: ...
    def totals(self) -> dict[str, int]: ...
    def tenant_totals(self, tenant: str) -> dict[str, int]: ...
    def tensor_bytes(self) -> int: ...
    def count(self, tenant: str | None = None) -> int: ...
    def profiles(self) -> MutableMapping[tuple[str, str], Profile]: ...
    def ping(self) -> None: ...
    def backend_memory_bytes(self) -> int: ...
    def close(self) -> None: ...



class SequenceStore:
    """Tenant-scoped sequences in this process's memory under ``budget_bytes`` (serialized
    sizes of keys and values): the embedded backend.

    Args:
        policy: budget, eviction, TTL and quotas.
        on_evict: called with the reason (``"lru"`` or ``"ttl"``) for every evicted sequence.
        clock: monotonic time source (tests pass a fake one).
        observe: called with ``(operation, seconds, failed)`` after each store operation.
    """

    backend = "memory"

    def __init__(self, policy: StorePolicy, *, on_evict: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 observe: Callable[[str, float, bool], None] | None = None) -> None:
        self.policy = policy
        self.observe = observe
        # This process's memory: a store of its own (a shared backend names its location).
        self.store_id = f"memory:{socket.gethostname()}:{os.getpid()}"
        self._on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._sequences: OrderedDict[tuple[str, str], StoredSequence] = OrderedDict()
        self._stored_bytes = 0
        self._stored_key_bytes = 0
        self._stored_fp16 = {"keys": 0, "values": 0}
        # Per tenant, kept with the totals: quota checks run on every insert and append, and
        # GetServerInfo reads a tenant's figures without visiting its sequences.
        self._tenant_bytes: defaultdict[str, int] = defaultdict(int)
        self._tenant_fp16: defaultdict[str, int] = defaultdict(int)
        self._tenant_sequences: defaultdict[str, int] = defaultdict(int)
        self._tenant_evictions: defaultdict[str, int] = defaultdict(int)
        self._profiles: dict[tuple[str, str], Profile] = {}
        self.evictions = 0

    def profiles(self) -> dict[tuple[str, str], Profile]:
        return self._profiles

    def ping(self) -> None:
        """Always serving: the memory is this process's own."""

    def backend_memory_bytes(self) -> int:
        return self.tensor_bytes()

    def close(self) -> None:
        """Nothing to release."""

    # -- reading -------------------------------------------------------------------------

    @timed("get")
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

    @timed("peek")
    def peek(self, tenant: str, sequence_id: str) -> StoredSequence | None:
        """Like :meth:`get` without touching recency; ``None`` when absent."""
        with self._lock:
            self._expire_locked()
            return self._sequences.get((tenant, sequence_id))

    def totals(self) -> dict[str, int]:
        """Stored bytes (``keys``, ``values``), their float16 equivalents and the count, as of
        the last expiry (:meth:`expire`)."""
        with self._lock:
            return {
                "keys": self._stored_key_bytes,
                "values": self._stored_bytes - self._stored_key_bytes,
                "fp16_keys": self._stored_fp16["keys"],
                "fp16_values": self._stored_fp16["values"],
                "sequences": len(self._sequences),
            }

    def tenant_totals(self, tenant: str) -> dict[str, int]:
        """What :meth:`totals` gives, for one tenant's sequences, plus its ``evictions``."""
        with self._lock:
            return {"bytes": self._tenant_bytes.get(tenant, 0), "fp16_bytes": self._tenant_fp16.get(tenant, 0),
                    "sequences": self._tenant_sequences.get(tenant, 0),
                    "evictions": self._tenant_evictions.get(tenant, 0)}

    def tensor_bytes(self) -> int:
        """Bytes of the torch tensors the stored sequences hold in memory (device memory
        accounting; close to, but not the same as, the serialized sizes)."""
        with self._lock:
            states = [entry.state for entry in self._sequences.values()]
        return states_tensor_bytes(states)

    def count(self, tenant: str | None = None) -> int:
        with self._lock:
            if tenant is None:
                return len(self._sequences)
            return self._tenant_sequences.get(tenant, 0)

    # -- writing -------------------------------------------------------------------------

    @timed("insert")
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
            self._tenant_sequences[entry.tenant] += 1
            # Insertion order is recency order: expiry reads the idle ones from the front.
            entry.last_access = self._clock()
            self._sequences[entry.key] = entry

    @timed("update")
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

    @timed("delete")
    def delete(self, tenant: str, sequence_id: str) -> None:
        """Remove the tenant's sequence; NotFoundError when absent."""
        with self._lock:
            self._expire_locked()
            entry = self._sequences.get((tenant, sequence_id))
            if entry is None:
                raise NotFoundError(f"sequence {sequence_id!r} not found")
            self._remove_locked(entry)

    def expire(self) -> int:
        """Drop every expired sequence now (an access drops the expired ones too); returns how many."""
        with self._lock:
            return self._expire_locked()

    # -- internals (store lock held) -------------------------------------------------------

    def _charge_locked(self, entry: StoredSequence, state: SequenceState) -> None:
        entry.state = replace(state, delta=None) if state.delta is not None else state
        entry.version += 1
        entry.charged_bytes = state.nbytes
        entry.charged_key_bytes = state.key_bytes
        self._stored_bytes += entry.charged_bytes
        self._stored_key_bytes += entry.charged_key_bytes
        self._tenant_bytes[entry.tenant] += entry.charged_bytes
        keys_fp16, values_fp16 = fp16_sizes(entry.profile, entry.state)
        self._stored_fp16["keys"] += keys_fp16
        self._stored_fp16["values"] += values_fp16
        self._tenant_fp16[entry.tenant] += keys_fp16 + values_fp16

    def _uncharge_locked(self, entry: StoredSequence) -> None:
        self._stored_bytes -= entry.charged_bytes
        self._stored_key_bytes -= entry.charged_key_bytes
        self._tenant_bytes[entry.tenant] -= entry.charged_bytes
        if not self._tenant_bytes[entry.tenant]:
            del self._tenant_bytes[entry.tenant]  # the share count is over tenants that store something
        keys_fp16, values_fp16 = fp16_sizes(entry.profile, entry.state)
        self._stored_fp16["keys"] -= keys_fp16
        self._stored_fp16["values"] -= values_fp16
        self._tenant_fp16[entry.tenant] -= keys_fp16 + values_fp16
        if not self._tenant_fp16[entry.tenant]:
            del self._tenant_fp16[entry.tenant]

    def _remove_locked(self, entry: StoredSequence) -> None:
        self._uncharge_locked(entry)
        self._tenant_sequences[entry.tenant] -= 1
        if not self._tenant_sequences[entry.tenant]:
            del self._tenant_sequences[entry.tenant]
        entry.deleted = True
        del self._sequences[entry.key]

    def _make_room_locked(self, tenant: str, needed: int, freed: int, protect: tuple[str, str], what: str) -> None:
        """Evict what :func:`plan_eviction` chooses, or raise and change nothing."""
        candidates = ((key, entry.tenant, entry.charged_bytes) for key, entry in self._sequences.items())
        victims = plan_eviction(self.policy, self._tenant_bytes, self._stored_bytes, candidates, tenant, needed,
                                freed, protect, what)
        for key in victims:
            victim = self._sequences[key]
            log.info("evicting sequence %r of tenant %r (lru, %d bytes)", victim.sequence_id, victim.tenant,
                     victim.charged_bytes)
            self._remove_locked(victim)
            self._tenant_evictions[victim.tenant] += 1
            self._evicted("lru")

    def _expire_locked(self) -> int:
        ttl = self.policy.ttl_seconds
        if not ttl:
            return 0
        deadline = self._clock() - ttl
        # The dict is in recency order (every use moves its entry to the end), so the idle
        # sequences are a prefix: this reads the expired ones and one more, not the store.
        expired = list(itertools.takewhile(lambda entry: entry.last_access < deadline, self._sequences.values()))
        for entry in expired:
            log.info("expiring sequence %r of tenant %r (idle > %ss)", entry.sequence_id, entry.tenant, ttl)
            self._remove_locked(entry)
            self._tenant_evictions[entry.tenant] += 1
            self._evicted("ttl")
        return len(expired)

    def _evicted(self, reason: str) -> None:
        self.evictions += 1
        if self._on_evict is not None:
            self._on_evict(reason)


def states_tensor_bytes(states: Iterable[SequenceState]) -> int:
    """Bytes of the torch tensors that ``states`` hold in memory."""
    total = 0
    for state in states:
        for layer in state.keys + (state.values or ()):
            total += sum(value.numel() * value.element_size() for value in vars(layer).values()
                         if isinstance(value, torch.Tensor))
    return total


def fp16_bytes(profile: Profile, tokens: int) -> int:
    """Bytes of ``tokens`` tokens of one tensor kind (keys or values) of every layer in float16."""
    return 2 * tokens * profile.num_layers * profile.channels


def fp16_sizes(profile: Profile, state: SequenceState) -> tuple[int, int]:
    """``(keys, values)``: float16 bytes of a sequence's keys and of its values (0 without)."""
    keys = fp16_bytes(profile, state.num_tokens)
    return keys, keys if state.values is not None else 0


def check_store_url(url: str) -> str:
    """``redis://host:port/db`` or ``rediss://...`` without a password in it (it would show
    in process listings and logs; --store-password-file takes it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise InvalidInputError(f"--store must be 'memory' or redis://host:port/db (rediss:// for TLS), got "
                                f"{urlunsplit(parts._replace(netloc=parts.hostname or ''))!r}")
    if parts.password:
        raise InvalidInputError("--store must not contain a password: it would show in process listings and "
                                "logs; put it in a file and pass --store-password-file")
    return url


def open_store(url: str, policy: StorePolicy, *, device: torch.device | str = "cpu",
               on_evict: Callable[[str], None] | None = None,
               observe: Callable[[str, float, bool], None] | None = None, **redis_options) -> StoreBackend:
    """The backend ``url`` names (``memory`` or a Redis URL; see ``svdq-server --help``);
    ``redis_options`` go to :class:`~svdq_server.store_redis.RedisSequenceStore`."""
    if url == "memory":
        return SequenceStore(policy, on_evict=on_evict, observe=observe)
    check_store_url(url)
    # Imported here: the redis client is an optional dependency (the [redis] extra).
    from .store_redis import RedisSequenceStore

    return RedisSequenceStore(url, policy, device=device, on_evict=on_evict, observe=observe, **redis_options)
