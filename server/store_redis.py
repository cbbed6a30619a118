"""The Redis backend of the sequence store: many replicas serve one fleet, and nothing
acknowledged is lost.

Every stored sequence lives in Redis; a replica keeps decoded sequences in a bounded
read-through cache and loads a sequence from Redis the first time it serves it (or when
another replica changed it). An upload or append is acknowledged only after Redis accepted
its transaction, so with AOF persistence (``appendfsync always`` or ``everysec``, see
docs/operations.md) a replica or Redis restart loses nothing acknowledged.

Layout, with ``m = "<len(tenant)>:<tenant>:<sequence_id>"`` (unambiguous for any names)::

    svdq:seq:<m>       hash    tenant, sequence_id, profile (digest), key_space, upload_id, tokens,
                               version, base_version, nbytes, key_bytes, fp16_keys, fp16_values,
                               last_append, log_len, log_bytes; per layer the blobs k<i> (svdq.format)
                               and v<i> (svdq.values), CRC-checked, as written at base_version.
                               Versions are store-wide commit numbers: never reused, even when a
                               sequence is deleted and uploaded again, or Redis lost its data
    svdq:log:<m>       list    the appends since base_version (svdq.v1.AppendRequest messages)
    svdq:lock:<m>      string  the writer lock of the sequence (redis-py Lock)
    svdq:lru           zset    m -> last access in Redis server time (LRU eviction and TTL)
    svdq:seqbytes      hash    m -> charged bytes (eviction candidates without reading metadata)
    svdq:totals        hash    bytes, key_bytes, fp16_keys, fp16_values, sequences, evictions, and
                               commits: the version of the latest write
    svdq:tenant_bytes  hash    tenant -> bytes, only tenants that store something (the share count)
    svdq:tenant:<t>    hash    fp16, sequences, evictions of one tenant
    svdq:profiles      hash    "<len(owner)>:<owner>:<name>" -> profile digest (tenant profiles)
    svdq:profile:<d>   string  a Profile message by its digest: a sequence keeps the profile it was
                               stored with even when the name is registered again

Concurrency: every write is one WATCH/MULTI/EXEC transaction that watches ``svdq:totals``
(which every write changes) and the sequence's metadata, so accounting decisions (quota,
budget, which sequences to evict, with :func:`~svdq_server.store.plan_eviction`) are made on
exactly the figures the write commits against, across all replicas; a transaction that lost
the race is re-planned. An append is a versioned compare-and-set: it commits only if the
sequence is still at the version it was computed from. Writers of one sequence also take
its Redis lock (short-lived and renewed while held, so a killed replica's lock runs out within
:data:`LOCK_SECONDS`), so appends through two replicas queue instead of failing; an append usually
writes only its new tokens (the log), and the layers are rewritten whole when the log grows
past :data:`LOG_MAX_APPENDS` entries or the sequence's own size.

Not supported: Redis Cluster (the transactions span keys of every sequence); use one primary,
with Sentinel for failover.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import redis
import torch
from redis.exceptions import BusyLoadingError, LockError, ReadOnlyError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from svdq_proto.svdq.v1 import kvcache_pb2 as pb

from svdq.api.types import Profile
from svdq.api.wire import optional_tensor_from_pb, tensor_from_pb, tensor_to_pb
from svdq.codec import CostLimits
from svdq.errors import InvalidInputError, NotFoundError, UnavailableError
from svdq.format import from_bytes, to_bytes
from svdq.values import values_from_bytes, values_to_bytes

from .store import (
    SequenceState,
    StoredSequence,
    StorePolicy,
    fp16_sizes,
    plan_eviction,
    states_tensor_bytes,
    timed,
)

log = logging.getLogger(__name__)
#: what the server accepted once is loaded and replayed whatever the codec's default limits:
#: an operator's raised --max-tokens must not make stored sequences unreadable
_STORED_DATA = CostLimits(max_tokens=1 << 40, max_channels=1 << 20, max_work_bytes=1 << 62)

PREFIX = "svdq"
#: appends kept as a log before the layers are rewritten whole
LOG_MAX_APPENDS = 64
#: transactions that lost a race to another writer are re-planned this many times
MAX_ATTEMPTS = 64
#: a writer lock expires after this long unless its holder renews it (every third of it):
#: a killed replica blocks the sequences it was writing no longer than this
LOCK_SECONDS = 6.0
#: how long a writer waits for another writer of the same sequence (alive: it renews its lock)
LOCK_WAIT_SECONDS = 30.0
#: owner of the operator's profiles (--profiles-file): each replica loads its own file
OPERATOR = ""
#: a replica records a use of a sequence in the LRU order at most this often: the record is a
#: write, and with ``appendfsync always`` every write waits for a disk flush (a read does not)
TOUCH_SECONDS = 1.0

_TOUCH = """
local last = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not last then return false end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local ttl = tonumber(ARGV[2])
if ttl > 0 and now - tonumber(last) > ttl then return {'expired'} end
if ARGV[3] == '1' then redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1]) end
return redis.call('HGET', KEYS[2], 'version')
"""
_CHARGE_FIELDS = ("tenant", "nbytes", "key_bytes", "fp16_keys", "fp16_values")
_META_FIELDS = ("tenant", "sequence_id", "profile", "key_space", "upload_id", "tokens", "version", "base_version",
                "nbytes", "key_bytes", "fp16_keys", "fp16_values", "last_append", "log_len", "log_bytes")
#: errors that mean Redis cannot serve now (down, loading its data, a read-only replica, or
#: refusing writes because it cannot persist them): UNAVAILABLE, the client retries
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError)


def _member(tenant: str, name: str) -> str:
    return f"{len(tenant)}:{tenant}:{name}"


def _split(member: str) -> tuple[str, str]:
    length, _, rest = member.partition(":")
    return rest[:int(length)], rest[int(length) + 1:]


def _text(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


def _encode_last_append(last_append: tuple[int, int, bytes] | None) -> str:
    return "" if last_append is None else f"{last_append[0]}:{last_append[1]}:{last_append[2].hex()}"


def _decode_last_append(text: str) -> tuple[int, int, bytes] | None:
    if not text:
        return None
    before, new, digest = text.split(":")
    return int(before), int(new), bytes.fromhex(digest)


def redacted(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


def _guarded(method):
    """Redis failures -> UnavailableError naming the store (gRPC UNAVAILABLE: retry)."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _UNAVAILABLE as exc:
            raise UnavailableError(f"the store {self.location} is unavailable: {exc}; retry "
                                   "later") from None
        except ResponseError as exc:
            if str(exc).startswith(("MISCONF", "LOADING", "READONLY", "OOM")):
                raise UnavailableError(f"the store {self.location} refused the write: {exc}; retry "
                                       "later") from None
            raise

    return guarded


class _Books:
    """The store-wide accounting as read inside a transaction, and the changes to commit."""

    def __init__(self, pipe) -> None:
        self.tenant_bytes = {key.decode(): int(value) for key, value in pipe.hgetall(f"{PREFIX}:tenant_bytes").items()}
        stored, commits = pipe.hmget(f"{PREFIX}:totals", "bytes", "commits")
        self.stored_bytes = int(stored or 0)
        seconds, microseconds = pipe.time()
        #: Redis's clock: the time of the uses this write records in the LRU order
        self.now = seconds + microseconds / 1e6
        #: the version this transaction's write gets: above the last commit's, and at least Redis's
        #: clock in microseconds, so that versions are not reused even if Redis lost its data
        #: (a replica's cached copy of a lost sequence can never match a new one)
        self.version = max(int(commits or 0) + 1, seconds * 1_000_000 + microseconds)
        self._totals: dict[str, int] = {}
        self._tenants: dict[str, dict[str, int]] = {}

    def _add(self, charge: dict, sign: int) -> None:
        tenant = charge["tenant"]
        for name in ("nbytes", "key_bytes", "fp16_keys", "fp16_values"):
            total = "bytes" if name == "nbytes" else name
            self._totals[total] = self._totals.get(total, 0) + sign * charge[name]
        self._totals["sequences"] = self._totals.get("sequences", 0) + sign
        stats = self._tenants.setdefault(tenant, {})
        stats["fp16"] = stats.get("fp16", 0) + sign * (charge["fp16_keys"] + charge["fp16_values"])
        stats["sequences"] = stats.get("sequences", 0) + sign
        self.tenant_bytes[tenant] = self.tenant_bytes.get(tenant, 0) + sign * charge["nbytes"]
        self.stored_bytes += sign * charge["nbytes"]

    def charge(self, charge: dict) -> None:
        self._add(charge, 1)

    def uncharge(self, charge: dict) -> None:
        self._add(charge, -1)

    def evicted(self, tenant: str) -> None:
        self._totals["evictions"] = self._totals.get("evictions", 0) + 1
        self._tenants.setdefault(tenant, {})["evictions"] = self._tenants[tenant].get("evictions", 0) + 1

    def queue(self, pipe) -> None:
        """Queue the changes (after ``pipe.multi()``); ``commits`` changes on every write, so
        the ``WATCH`` on the totals makes any two writers conflict."""
        pipe.hset(f"{PREFIX}:totals", "commits", self.version)
        for name, delta in self._totals.items():
            if delta:
                pipe.hincrby(f"{PREFIX}:totals", name, delta)
        for tenant, stats in self._tenants.items():
            for name, delta in stats.items():
                if delta:
                    pipe.hincrby(f"{PREFIX}:tenant:{tenant}", name, delta)
            if self.tenant_bytes.get(tenant, 0) > 0:
                pipe.hset(f"{PREFIX}:tenant_bytes", tenant, self.tenant_bytes[tenant])
            else:
                pipe.hdel(f"{PREFIX}:tenant_bytes", tenant)


class _SequenceLock:
    """A sequence's writer lock across replicas: this process's lock, then the sequence's
    Redis lock; on entry the entry is brought to the latest committed version."""

    def __init__(self, store: RedisSequenceStore, entry: StoredSequence) -> None:
        self._store = store
        self._entry = entry
        self._local = threading.Lock()
        self._held = None

    def __enter__(self) -> _SequenceLock:
        self._local.acquire()
        try:
            self._held = self._store._acquire(self._entry)
        except BaseException:
            self._local.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._store._release(self._held, self._entry)
        finally:
            self._held = None
            self._local.release()


class _Profiles(MutableMapping):
    """``(owner, name) -> Profile``: tenant profiles in Redis (every replica sees them), the
    operator's in this process (each replica loads them from its own --profiles-file)."""

    def __init__(self, store: RedisSequenceStore) -> None:
        self._store = store
        self._local: dict[tuple[str, str], Profile] = {}

    def __getitem__(self, key: tuple[str, str]) -> Profile:
        if key[0] == OPERATOR:
            return self._local[key]
        digest = self._store._call(lambda r: r.hget(f"{PREFIX}:profiles", _member(*key)))
        if digest is None:
            raise KeyError(key)
        return self._store._profile(digest.decode())

    def __setitem__(self, key: tuple[str, str], profile: Profile) -> None:
        if key[0] == OPERATOR:
            self._local[key] = profile
            return
        digest = self._store._save_profile(profile)
        self._store._call(lambda r: r.hset(f"{PREFIX}:profiles", _member(*key), digest))

    def __delitem__(self, key: tuple[str, str]) -> None:
        if key[0] == OPERATOR:
            del self._local[key]
        elif not self._store._call(lambda r: r.hdel(f"{PREFIX}:profiles", _member(*key))):
            raise KeyError(key)

    def _shared(self) -> dict[tuple[str, str], str]:
        fields = self._store._call(lambda r: r.hgetall(f"{PREFIX}:profiles"))
        return {_split(field.decode()): digest.decode() for field, digest in fields.items()}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from list(self._local)
        yield from self._shared()

    def __len__(self) -> int:
        return len(self._local) + len(self._shared())

    def items(self):
        shared = [(key, self._store._profile(digest)) for key, digest in self._shared().items()]
        return list(self._local.items()) + shared


class RedisSequenceStore:
    """The store in Redis, shared by every replica that points at it (see the module docstring).

    Args:
        url: ``redis://host:port/db`` or ``rediss://host:port/db`` (TLS), as :func:`~svdq_server.store.open_store`
            checked it (the one check of the URL: no password in it).
        policy: budget, eviction, TTL and quotas; every replica should run the same.
        device: where decoded sequences live (the engine's device).
        password: the Redis password (from --store-password-file), or None.
        tls_ca: PEM CA file that signed the Redis server certificate (rediss://), or None for
            the system roots.
        cache_bytes: serialized bytes of decoded sequences this replica keeps in memory.
        timeout: seconds a Redis command may take before the call answers UNAVAILABLE.
        on_evict: called with the reason (``"lru"`` or ``"ttl"``) for every sequence this
            replica evicts.
        observe: called with ``(operation, seconds, failed)`` after each store operation.
    """

    backend = "redis"

    def __init__(self, url: str, policy: StorePolicy, *, device: torch.device | str = "cpu",
                 password: str | None = None, tls_ca: str | None = None, cache_bytes: int = 1 << 30,
                 timeout: float = 10.0, on_evict: Callable[[str], None] | None = None,
                 observe: Callable[[str, float, bool], None] | None = None) -> None:
        self.location = redacted(url)
        self.store_id = self.location
        self.policy = policy
        self.device = torch.device(device)
        self.observe = observe
        self._on_evict = on_evict
        options = {"password": password, "socket_timeout": timeout, "socket_connect_timeout": timeout,
                   "health_check_interval": 15}
        if url.startswith("rediss://") and tls_ca:
            options["ssl_ca_certs"] = tls_ca
        self._redis = redis.Redis.from_url(url, **options)
        self._touch = self._redis.register_script(_TOUCH)
        self._cache: OrderedDict[str, StoredSequence] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = cache_bytes
        self._cache_lock = threading.Lock()
        self._profiles: dict[str, Profile] = {}
        self._messages: weakref.WeakKeyDictionary[Profile, tuple[str, bytes]] = weakref.WeakKeyDictionary()
        self._profile_map = _Profiles(self)
        self._touched: dict[str, float] = {}
        # writer locks this replica holds, renewed by one thread while they are held
        self._held: set = set()
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._renew_locks, name="svdq-store-locks", daemon=True).start()

    # -- the StoreBackend interface ------------------------------------------------------------

    def profiles(self) -> _Profiles:
        return self._profile_map

    @_guarded
    def ping(self) -> None:
        self._redis.ping()

    @_guarded
    def backend_memory_bytes(self) -> int:
        return int(self._redis.info("memory")["used_memory"])

    def close(self) -> None:
        self._closed.set()
        self._redis.close()

    def _renew_locks(self) -> None:
        """Extend every held writer lock to LOCK_SECONDS again, three times per LOCK_SECONDS, so
        a long write keeps its lock and a dead replica's lock runs out soon. A renewal that fails
        leaves the lock to expire: the write's version check still refuses a conflicting commit."""
        while not self._closed.wait(LOCK_SECONDS / 3):
            with self._held_lock:
                held = list(self._held)
            for lock in held:
                try:
                    lock.extend(LOCK_SECONDS, replace_ttl=True)
                except LockError:
                    pass  # released meanwhile, or already expired
                except (*_UNAVAILABLE, ResponseError) as exc:
                    log.warning("could not renew a writer lock (it expires in at most %.0fs): %s", LOCK_SECONDS, exc)

    @timed("get")
    @_guarded
    def get(self, tenant: str, sequence_id: str) -> StoredSequence:
        """The tenant's sequence at its latest committed version (marked as used)."""
        entry = self._lookup(tenant, sequence_id, touch=True)
        if entry is None:
            raise NotFoundError(f"sequence {sequence_id!r} not found")
        return entry

    @timed("peek")
    @_guarded
    def peek(self, tenant: str, sequence_id: str) -> StoredSequence | None:
        return self._lookup(tenant, sequence_id, touch=False)

    @timed("insert")
    @_guarded
    def insert(self, entry: StoredSequence, replace: bool) -> None:
        """Store a new sequence (superseding the tenant's sequence of that id, whose bytes
        count as freed when ``replace``); committed in one transaction with the evictions it
        needs, or ResourceExhaustedError and nothing changes."""
        self.expire()  # the write path expires, so a full store frees idle sequences before evicting
        member = _member(entry.tenant, entry.sequence_id)
        state = entry.state
        charge = self._charge(entry.tenant, entry.profile, state)
        digest, profile_message = self._profile_message(entry.profile)
        fields = {"tenant": entry.tenant, "sequence_id": entry.sequence_id, "profile": digest,
                  "key_space": entry.key_space,
                  "upload_id": entry.upload_id, "tokens": state.num_tokens,
                  "last_append": _encode_last_append(state.last_append), "log_len": 0, "log_bytes": 0,
                  **{name: charge[name] for name in _CHARGE_FIELDS}, **self._blobs(state)}

        def build(pipe):
            old = self._read_charge(pipe, member)
            # the sequence's profile is committed with it (sent only when Redis lacks it)
            profile_missing = not pipe.exists(f"{PREFIX}:profile:{digest}")
            books = _Books(pipe)
            freed = old["nbytes"] if (old is not None and replace) else 0
            victims = self._plan(pipe, books, entry.tenant, state.nbytes, freed, member,
                                 f"sequence {entry.sequence_id!r}")
            pipe.multi()
            evicted = self._queue_evictions(pipe, books, victims)
            if old is not None:
                self._queue_removal(pipe, books, member, old)
            if profile_missing:
                pipe.set(f"{PREFIX}:profile:{digest}", profile_message)
            pipe.delete(self._meta(member), self._log(member))
            pipe.hset(self._meta(member), mapping={**fields, "version": books.version, "base_version": books.version})
            pipe.zadd(f"{PREFIX}:lru", {member: books.now})
            pipe.hset(f"{PREFIX}:seqbytes", member, state.nbytes)
            books.charge(charge)
            books.queue(pipe)
            return evicted, books.version

        evicted, version = self._transaction(member, build)
        self._after_evictions(evicted, "lru")
        entry.version, entry.log_position = version, (version, 0)
        entry.charged_bytes, entry.charged_key_bytes = state.nbytes, state.key_bytes
        entry.write_lock = _SequenceLock(self, entry)
        self._cache_put(member, entry)

    @timed("update")
    @_guarded
    def update(self, entry: StoredSequence, new_state: SequenceState) -> None:
        """Commit a new state of ``entry`` (the caller holds ``entry.write_lock``) if the
        sequence is still at ``entry.version``; ResourceExhaustedError when the growth does
        not fit, NotFoundError when it was deleted or evicted meanwhile."""
        member = _member(entry.tenant, entry.sequence_id)
        charge = self._charge(entry.tenant, entry.profile, new_state)
        record = None
        if new_state.delta is not None:
            delta = new_state.delta
            message = pb.AppendRequest(sequence_id=entry.sequence_id)
            tensor_to_pb(delta.keys, message.keys)
            if delta.values is not None:
                tensor_to_pb(delta.values, message.values)
            if delta.positions is not None:
                tensor_to_pb(delta.positions, message.positions)
            record = message.SerializeToString()
        blobs = functools.cache(lambda: self._blobs(new_state))

        def build(pipe):
            current = pipe.hmget(self._meta(member), "version", "log_len", "log_bytes", "base_version",
                                 *_CHARGE_FIELDS)
            if current[0] is None:
                raise NotFoundError(f"sequence {entry.sequence_id!r} not found (deleted or evicted meanwhile)")
            if int(current[0]) != entry.version:
                raise UnavailableError(f"sequence {entry.sequence_id!r} changed through another replica while this "
                                       "write was computed (its lock expired); retry")
            old = self._parse_charge(current[4:])
            log_len, log_bytes, base_version = int(current[1]), int(current[2]), int(current[3])
            books = _Books(pipe)
            victims = self._plan(pipe, books, entry.tenant, new_state.nbytes, old["nbytes"], member,
                                 f"sequence {entry.sequence_id!r}")
            compact = record is None or log_len >= LOG_MAX_APPENDS or log_bytes + len(record) > old["nbytes"]
            pipe.multi()
            evicted = self._queue_evictions(pipe, books, victims)
            version = books.version
            fields = {"version": version, "tokens": new_state.num_tokens,
                      "last_append": _encode_last_append(new_state.last_append),
                      **{name: charge[name] for name in _CHARGE_FIELDS}}
            if compact:
                pipe.delete(self._log(member))
                fields.update(blobs(), base_version=version, log_len=0, log_bytes=0)
                position = (version, 0)
            else:
                pipe.rpush(self._log(member), record)
                fields.update(log_len=log_len + 1, log_bytes=log_bytes + len(record))
                position = (base_version, log_len + 1)
            pipe.hset(self._meta(member), mapping=fields)
            pipe.zadd(f"{PREFIX}:lru", {member: books.now})
            pipe.hset(f"{PREFIX}:seqbytes", member, new_state.nbytes)
            books.uncharge(old)
            books.charge(charge)
            books.queue(pipe)
            return evicted, version, position

        evicted, version, position = self._transaction(member, build)
        self._after_evictions(evicted, "lru")
        with self._cache_lock:
            self._set_state(entry, replace(new_state, delta=None), version, position)

    @timed("delete")
    @_guarded
    def delete(self, tenant: str, sequence_id: str) -> None:
        member = _member(tenant, sequence_id)

        def build(pipe):
            old = self._read_charge(pipe, member)
            if old is None:
                raise NotFoundError(f"sequence {sequence_id!r} not found")
            books = _Books(pipe)
            pipe.multi()
            self._queue_removal(pipe, books, member, old)
            books.queue(pipe)

        self._transaction(member, build)
        self._forget(member)

    @_guarded
    def expire(self) -> int:
        """Drop sequences idle longer than the TTL (any replica may do it); returns how many."""
        if not self.policy.ttl_seconds:
            return 0
        deadline = self._now(self._redis) - self.policy.ttl_seconds
        expired = 0
        for raw in self._redis.zrangebyscore(f"{PREFIX}:lru", "-inf", deadline, start=0, num=256):
            member = raw.decode()
            expired += self._expire_member(member, deadline)
        return expired

    @_guarded
    def totals(self) -> dict[str, int]:
        """As of the last expiry: a scrape is a read, not a job (the server expires periodically)."""
        totals = {key.decode(): int(value) for key, value in self._redis.hgetall(f"{PREFIX}:totals").items()}
        return {"keys": totals.get("key_bytes", 0), "values": totals.get("bytes", 0) - totals.get("key_bytes", 0),
                "fp16_keys": totals.get("fp16_keys", 0), "fp16_values": totals.get("fp16_values", 0),
                "sequences": totals.get("sequences", 0)}

    @_guarded
    def tenant_totals(self, tenant: str) -> dict[str, int]:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(f"{PREFIX}:tenant_bytes", tenant)
            pipe.hgetall(f"{PREFIX}:tenant:{tenant}")
            held, stats = pipe.execute()
        stats = {key.decode(): int(value) for key, value in stats.items()}
        return {"bytes": int(held or 0), "fp16_bytes": stats.get("fp16", 0), "sequences": stats.get("sequences", 0),
                "evictions": stats.get("evictions", 0)}

    @property
    def evictions(self) -> int:
        return int(self._call(lambda r: r.hget(f"{PREFIX}:totals", "evictions")) or 0)

    def count(self, tenant: str | None = None) -> int:
        return self.totals()["sequences"] if tenant is None else self.tenant_totals(tenant)["sequences"]

    def tensor_bytes(self) -> int:
        """Bytes of the tensors of the sequences this replica holds decoded."""
        with self._cache_lock:
            states = [entry.state for entry in self._cache.values()]
        return states_tensor_bytes(states)

    # -- reading ---------------------------------------------------------------------------------

    def _lookup(self, tenant: str, sequence_id: str, touch: bool,
                entry: StoredSequence | None = None) -> StoredSequence | None:
        """The sequence at its latest version: the cached entry (or ``entry``, brought up to
        date in place) when there is one, else loaded; None when it is absent or expired."""
        member = _member(tenant, sequence_id)
        if touch:
            now = time.monotonic()
            touch = now - self._touched.get(member, -TOUCH_SECONDS) >= TOUCH_SECONDS
            if touch:
                if len(self._touched) > 100_000:
                    self._touched.clear()
                self._touched[member] = now
        answer = self._touch(keys=[f"{PREFIX}:lru", self._meta(member)],
                             args=[member, self.policy.ttl_seconds, 1 if touch else 0])
        if answer is None:
            self._forget(member)
            return None
        if answer == [b"expired"]:
            self._expire_member(member, self._now(self._redis) - self.policy.ttl_seconds)
            return None
        version = int(answer)
        with self._cache_lock:
            cached = self._cache.get(member)
            if cached is not None:
                self._cache.move_to_end(member)
            entry = entry or cached
        if entry is not None and entry.version == version:
            return entry
        return self._load(member, entry)

    def _load(self, member: str, entry: StoredSequence | None) -> StoredSequence | None:
        """The sequence from Redis into ``entry`` (a new one when None): only the appends
        after ``entry``'s when its blobs are still the stored ones, else everything. None
        when the sequence is gone."""
        meta_key, log_key = self._meta(member), self._log(member)
        if entry is not None:
            # State and position as one pair (another thread may install a newer one between
            # two reads): replaying onto a state newer than its position duplicates tokens.
            with self._cache_lock:
                (base_version, log_len), base_state = entry.log_position, entry.state
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(meta_key, *_META_FIELDS)
                pipe.lrange(log_key, log_len, -1)
                values, records = pipe.execute()
            meta = dict(zip(_META_FIELDS, values, strict=True))
            if meta["version"] is None:
                self._forget(member)
                return None
            if int(meta["base_version"]) == base_version and int(meta["log_len"]) == log_len + len(records):
                state = base_state
                for record in records:
                    state = self._replay(state, record)
                return self._adopt(member, entry, state, meta)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.lrange(log_key, 0, -1)
            fields, records = pipe.execute()
        if not fields:
            self._forget(member)
            return None
        meta = {name: fields.get(name.encode()) for name in _META_FIELDS}
        profile = self._profile(meta["profile"].decode())
        layers = range(profile.num_layers)
        keys = tuple(from_bytes(fields[f"k{layer}".encode()], basis=profile.bases[layer] if profile.bases else None,
                                limits=_STORED_DATA,
                                device=self.device) for layer in layers)
        values = None
        if b"v0" in fields:
            values = tuple(values_from_bytes(fields[f"v{layer}".encode()], device=self.device) for layer in layers)
        state = SequenceState(keys, values)
        for record in records:
            state = self._replay(state, record)
        tenant, sequence_id = _split(member)
        if entry is None or entry.profile is not profile and not entry.profile.same_as(profile):
            entry = StoredSequence(tenant, sequence_id, profile, _text(meta["key_space"]), _text(meta["upload_id"]),
                                   state, version=0)
            entry.write_lock = _SequenceLock(self, entry)
        entry.key_space = _text(meta["key_space"])
        return self._adopt(member, entry, state, meta)

    def _replay(self, state: SequenceState, record: bytes) -> SequenceState:
        message = pb.AppendRequest.FromString(record)
        values = tensor_from_pb(message.values, "values") if message.HasField("values") else None
        positions = optional_tensor_from_pb(message, "positions", "positions")
        return state.appended(tensor_from_pb(message.keys, "keys"), values, positions, None, limits=_STORED_DATA)

    def _adopt(self, member: str, entry: StoredSequence, state: SequenceState, meta: dict) -> StoredSequence:
        """Install a loaded state in ``entry`` (unless a newer one got there first) and cache it."""
        version = int(meta["version"])
        if state.num_tokens != int(meta["tokens"]):
            raise RuntimeError(f"stored sequence {member!r} is inconsistent: its blobs and log rebuild "
                               f"{state.num_tokens} tokens, its metadata says {int(meta['tokens'])}")
        state = replace(state, last_append=_decode_last_append(_text(meta["last_append"])), delta=None)
        position = (int(meta["base_version"]), int(meta["log_len"]))
        with self._cache_lock:
            if version > entry.version:
                self._set_state(entry, state, version, position)
        entry.upload_id = _text(meta["upload_id"])
        self._cache_put(member, entry)
        return entry

    def _set_state(self, entry: StoredSequence, state: SequenceState, version: int,
                   position: tuple[int, int]) -> None:
        """(cache lock held)"""
        if self._cache.get(_member(entry.tenant, entry.sequence_id)) is entry:
            self._cache_bytes += state.nbytes - entry.charged_bytes
        entry.state, entry.version, entry.log_position = state, version, position
        entry.charged_bytes, entry.charged_key_bytes = state.nbytes, state.key_bytes

    def _cache_put(self, member: str, entry: StoredSequence) -> None:
        with self._cache_lock:
            old = self._cache.pop(member, None)
            if old is not None:
                self._cache_bytes -= old.charged_bytes
                if old is not entry:
                    old.deleted = True
            self._cache[member] = entry
            self._cache_bytes += entry.charged_bytes
            while self._cache_bytes > self.cache_limit and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= dropped.charged_bytes

    def _forget(self, member: str) -> None:
        with self._cache_lock:
            entry = self._cache.pop(member, None)
            if entry is not None:
                self._cache_bytes -= entry.charged_bytes
                entry.deleted = True

    # -- writing ---------------------------------------------------------------------------------

    def _acquire(self, entry: StoredSequence):
        """Take the sequence's Redis lock and bring ``entry`` to the latest version."""
        try:
            lock = self._redis.lock(f"{PREFIX}:lock:{_member(entry.tenant, entry.sequence_id)}",
                                    timeout=LOCK_SECONDS, blocking_timeout=LOCK_WAIT_SECONDS, thread_local=False)
            if not lock.acquire():
                raise UnavailableError(f"sequence {entry.sequence_id!r} is being written through another replica "
                                       f"for more than {LOCK_WAIT_SECONDS:.0f}s; retry")
        except _UNAVAILABLE as exc:
            raise UnavailableError(f"the store {self.location} is unavailable: {exc}; retry later") from None
        with self._held_lock:
            self._held.add(lock)
        try:
            if self._lookup(entry.tenant, entry.sequence_id, touch=False, entry=entry) is not entry:
                raise NotFoundError(f"sequence {entry.sequence_id!r} not found (deleted or evicted meanwhile)")
        except BaseException:
            self._release(lock, entry)
            raise
        return lock

    def _release(self, lock, entry: StoredSequence) -> None:
        if lock is None:
            return
        with self._held_lock:
            self._held.discard(lock)
        try:
            lock.release()
        except LockError:
            log.warning("the writer lock of sequence %r expired before it was released", entry.sequence_id)
        except _UNAVAILABLE as exc:
            log.warning("could not release the writer lock of sequence %r (it expires by itself): %s",
                        entry.sequence_id, exc)

    def _transaction(self, member: str, build):
        """Run ``build(pipe)`` (reads in WATCH mode, then ``pipe.multi()`` and the writes) until
        it commits without another writer in between; returns what ``build`` returned."""
        for _ in range(MAX_ATTEMPTS):
            with self._redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(f"{PREFIX}:totals", self._meta(member))
                    result = build(pipe)
                    pipe.execute()
                    return result
                except WatchError:
                    continue
        raise UnavailableError(f"the store {self.location} is too busy: {MAX_ATTEMPTS} attempts of a "
                               "write lost to concurrent writes; retry")

    def _plan(self, pipe, books: _Books, tenant: str, needed: int, freed: int, protect: str, what: str) -> list:
        def candidates():
            start = 0
            while True:
                members = pipe.zrange(f"{PREFIX}:lru", start, start + 255)
                if not members:
                    return
                for raw, size in zip(members, pipe.hmget(f"{PREFIX}:seqbytes", members), strict=True):
                    if size is not None:
                        member = raw.decode()
                        yield member, _split(member)[0], int(size)
                start += len(members)

        victims = plan_eviction(self.policy, books.tenant_bytes, books.stored_bytes, candidates(), tenant, needed,
                                freed, protect, what)
        return [(member, self._read_charge(pipe, member)) for member in victims]

    def _queue_evictions(self, pipe, books: _Books, victims: list) -> list[str]:
        for member, charge in victims:
            self._queue_removal(pipe, books, member, charge)
            books.evicted(charge["tenant"])
        return [member for member, _ in victims]

    def _after_evictions(self, members: list[str], reason: str) -> None:
        for member in members:
            tenant, sequence_id = _split(member)
            log.info("evicted sequence %r of tenant %r (%s)", sequence_id, tenant, reason)
            self._forget(member)
            if self._on_evict is not None:
                self._on_evict(reason)

    def _queue_removal(self, pipe, books: _Books, member: str, charge: dict) -> None:
        pipe.delete(self._meta(member), self._log(member))
        pipe.zrem(f"{PREFIX}:lru", member)
        pipe.hdel(f"{PREFIX}:seqbytes", member)
        books.uncharge(charge)

    def _expire_member(self, member: str, deadline: float) -> int:
        def build(pipe):
            last = pipe.zscore(f"{PREFIX}:lru", member)
            charge = self._read_charge(pipe, member)
            if last is None or last >= deadline or charge is None:
                return False  # used again (or gone) meanwhile
            books = _Books(pipe)
            pipe.multi()
            self._queue_removal(pipe, books, member, charge)
            books.evicted(charge["tenant"])
            books.queue(pipe)
            return True

        try:
            expired = self._transaction(member, build)
        except UnavailableError:
            return 0  # busy: the next access tries again
        if expired:
            self._after_evictions([member], "ttl")
        return int(expired)

    # -- helpers ---------------------------------------------------------------------------------

    def _call(self, command):
        try:
            return command(self._redis)
        except _UNAVAILABLE as exc:
            raise UnavailableError(f"the store {self.location} is unavailable: {exc}; retry later") from None

    @staticmethod
    def _meta(member: str) -> str:
        return f"{PREFIX}:seq:{member}"

    @staticmethod
    def _log(member: str) -> str:
        return f"{PREFIX}:log:{member}"

    @staticmethod
    def _now(client) -> float:
        seconds, microseconds = client.time()
        return seconds + microseconds / 1e6

    @staticmethod
    def _charge(tenant: str, profile: Profile, state: SequenceState) -> dict:
        fp16_keys, fp16_values = fp16_sizes(profile, state)
        return {"tenant": tenant, "nbytes": state.nbytes, "key_bytes": state.key_bytes, "fp16_keys": fp16_keys,
                "fp16_values": fp16_values}

    @staticmethod
    def _parse_charge(values) -> dict | None:
        if values[0] is None:
            return None
        return {"tenant": values[0].decode(), **{name: int(value) for name, value in
                                                 zip(_CHARGE_FIELDS[1:], values[1:], strict=True)}}

    def _read_charge(self, pipe, member: str) -> dict | None:
        return self._parse_charge(pipe.hmget(self._meta(member), *_CHARGE_FIELDS))

    @staticmethod
    def _blobs(state: SequenceState) -> dict[str, bytes]:
        blobs = {f"k{layer}": to_bytes(keys) for layer, keys in enumerate(state.keys)}
        for layer, values in enumerate(state.values or ()):
            blobs[f"v{layer}"] = values_to_bytes(values)
        return blobs

    def _profile_message(self, profile: Profile) -> tuple[str, bytes]:
        """(digest, serialized Profile) of ``profile``, computed once per object."""
        known = self._messages.get(profile)
        if known is None:
            message = profile.to_pb().SerializeToString(deterministic=True)
            known = self._messages[profile] = (hashlib.sha256(message).hexdigest()[:32], message)
            self._profiles.setdefault(known[0], profile)
        return known

    def _save_profile(self, profile: Profile) -> str:
        """Store ``profile`` under its digest (idempotent); returns the digest."""
        digest, message = self._profile_message(profile)
        self._call(lambda r: r.set(f"{PREFIX}:profile:{digest}", message, nx=True))
        return digest

    def _profile(self, digest: str) -> Profile:
        profile = self._profiles.get(digest)
        if profile is None:
            message = self._call(lambda r: r.get(f"{PREFIX}:profile:{digest}"))
            if message is None:
                raise RuntimeError(f"the store holds no profile {digest} although a sequence or name refers to it")
            profile = self._profiles[digest] = Profile.from_pb(pb.Profile.FromString(message))
        return profile


def read_password(path: str | None) -> str | None:
    """The Redis password from ``--store-password-file`` (one line; surrounding whitespace dropped)."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise InvalidInputError(f"cannot read --store-password-file {path}: {exc}") from None
