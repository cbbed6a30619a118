"""svdq as a vLLM v1 KV connector: prefixes computed once are stored compressed in the svdq
server and reloaded by any vLLM worker instead of being prefilled again.

Load it out of tree (see README "vLLM")::

    python -m vllm.entrypoints.openai.api_server --model MODEL --kv-transfer-config '{"kv_connector": "SvdqConnector",
        "kv_connector_module_path": "svdq_client.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"address": "svdq:50051", "token": "...", "profile": "smollm2"}}'

The profile must exist on the server (``python -m svdq_client.vllm register-profile`` makes
one from the model folder, with shared key bases calibrated on text) and match the model.

How it works:

* Scheduler side: a prompt's full chunks (``chunk_tokens``, a multiple of vLLM's block size)
  are named by a hash chain salted by the request's ``cache_salt``
  (:func:`svdq_client.kv_blocks.chunk_keys`); one ``LookupChunks`` call says how many leading
  chunks the server holds (the server salts again by tenant), and those tokens are reported to
  vLLM as external hits; at least one prompt token is always left to compute. vLLM asks again
  on every step while a request waits for room; the answer is remembered until the request is
  scheduled (a preempted request, asked again later, looks up again) or finishes, for at most
  :data:`MAX_REMEMBERED_LOOKUPS` waiting requests.
* Worker side: before the forward pass, hit chunks are fetched in one ``FetchChunks`` call and
  written into the request's blocks of every layer; after each layer's attention the keys
  (post-RoPE, as the engine holds them; the server undoes RoPE with the profile's RoPE) and
  values of every chunk completed in this step are read from the paged cache, and at the end
  of the step each chunk is stored with one ``StoreChunk`` call.
* Block layouts come from the attention backend in use (:class:`~svdq_client.kv_blocks.BlockLayout`):
  CPU_ATTN with the ``vec`` ISA and FLASH_ATTN; anything else stops vLLM at start-up.
* Failures degrade to recomputation: a lookup that fails is a miss; a load that fails (server
  down, timeout, a chunk of the wrong shape, positions or non-finite values) reports its blocks
  to vLLM, which recomputes them (``kv_load_failure_policy: recompute`` is required); a save
  that fails is dropped. Each logs a warning and counts in ``svdq_vllm_connector_errors_total``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import Counter
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from svdq.codec import Basis, CodecConfig
from svdq.errors import InvalidInputError

from .client import KVCacheClient
from .errors import DeadlineExceededError, ServiceError, UnavailableError
from .hf import ModelShape
from .kv_blocks import BlockLayout, chunk_keys
from .types import Profile

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

ERRORS = Counter("svdq_vllm_connector_errors", "svdq connector calls that failed and fell back to recomputation "
                 "(lookup: counted as a miss, load: blocks recomputed, save: chunk not stored).", ["operation"])
TOKENS = Counter("svdq_vllm_connector_tokens", "Prompt tokens the svdq connector found stored (hit), loaded into "
                 "vLLM's cache (loaded) or stored (saved).", ["kind"])
STORED_BYTES = Counter("svdq_vllm_connector_stored_bytes", "Bytes the server holds for the chunks this connector "
                       "created (serialized, every byte counted: keys, values) and the same tensors in fp16 "
                       "(fp16_keys, fp16_values).", ["kind"])

#: default tokens per chunk (rounded up to whole blocks): long enough to quantize in full
#: token groups, short enough for partial prefix hits to reuse most of a shared prefix
DEFAULT_CHUNK_TOKENS = 256
#: the CPU backend's block interior this connector reads and writes (other ISAs differ)
CPU_ISA = "vec"
EXTRA_CONFIG_KEYS = ("address", "token", "profile", "timeout_s", "chunk_tokens")
#: waiting requests whose lookup answer is remembered (least recently asked out): a bound on
#: the scheduler's memory however long the waiting queue
MAX_REMEMBERED_LOOKUPS = 4096


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config`` of the connector.

    Attributes:
        address: ``host:port`` of the svdq server.
        profile: the server profile to store chunks under (it must match the model).
        token: bearer token of the tenant; chunks are private to it.
        timeout_s: deadline of one server call; past it the call counts as failed.
        chunk_tokens: tokens per stored chunk, a multiple of vLLM's block size.
    """

    address: str
    profile: str
    token: str | None = None
    timeout_s: float = 30.0
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any], block_size: int) -> ConnectorSettings:
        unknown = sorted(set(extra) - set(EXTRA_CONFIG_KEYS))
        if unknown:
            raise InvalidInputError(f"unknown kv_connector_extra_config keys {unknown}; allowed: {list(EXTRA_CONFIG_KEYS)}")
        missing = [name for name in ("address", "profile") if not extra.get(name)]
        if missing:
            raise InvalidInputError(f"kv_connector_extra_config needs {missing} (the svdq server and its profile)")
        chunk_tokens = int(extra.get("chunk_tokens") or -(-DEFAULT_CHUNK_TOKENS // block_size) * block_size)
        if chunk_tokens < block_size or chunk_tokens % block_size:
            raise InvalidInputError(f"chunk_tokens must be a positive multiple of the block size {block_size}, "
                                    f"got {chunk_tokens}")
        timeout = float(extra.get("timeout_s", 30.0))
        if not timeout > 0:
            raise InvalidInputError(f"timeout_s must be > 0, got {timeout}")
        return cls(str(extra["address"]), str(extra["profile"]), extra.get("token") or None, timeout, chunk_tokens)


@dataclass
class LoadSpec:
    """Tokens ``[start, stop)`` of a request to load from chunks ``first_chunk..`` (``keys``)."""

    req_id: str
    cache_salt: str
    keys: list[str]
    first_chunk: int
    start: int
    stop: int
    block_ids: list[int]


@dataclass
class SaveSpec:
    """Chunk ``index`` of a request (tokens ``[index * chunk_tokens, ...)``) in ``block_ids``."""

    req_id: str
    cache_salt: str
    key: str
    index: int
    block_ids: list[int]


@dataclass
class SvdqConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers for one step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _RequestState:
    """Scheduler-side bookkeeping of one request."""

    token_ids: list[int]
    cache_salt: str
    keys: list[str]
    stored: int = 0                       # leading chunks the server holds or that were saved
    load: tuple[int, int] | None = None   # tokens to load in the request's first step
    block_ids: list[int] = field(default_factory=list)


def model_profile(hf_config: Any, name: str, codec: CodecConfig | None = None, value_bits: int | None = None,
                  bases: tuple[Basis, ...] | None = None) -> Profile:
    """The svdq profile of a transformers/vLLM model config (layers, KV heads, head size, RoPE)."""
    shape = ModelShape.from_config(hf_config)
    return Profile(name, shape.num_layers, shape.kv_heads, shape.head_dim, rope=shape.rope,
                   codec=codec or CodecConfig(), value_bits=value_bits, bases=bases)


def check_profile(profile: Profile, hf_config: Any) -> None:
    """Refuse a server profile that does not describe this model (it would store keys that the
    server un-rotates with the wrong RoPE, or reject every chunk)."""
    expected = model_profile(hf_config, profile.name)
    for name in ("num_layers", "kv_heads", "head_dim", "rope"):
        if getattr(profile, name) != getattr(expected, name):
            raise InvalidInputError(f"svdq profile {profile.name!r} has {name} {getattr(profile, name)!r} but the "
                                    f"model has {getattr(expected, name)!r}: register a profile for this model "
                                    "(python -m svdq_client.vllm register-profile)")


def layout_for(backend_name: str, isa: str | None, block_size: int, kv_heads: int, head_dim: int) -> BlockLayout:
    """The block layout of a vLLM attention backend; InvalidInputError for any other."""
    if backend_name == "CPU_ATTN":
        if isa != CPU_ISA:
            raise InvalidInputError(f"the CPU attention backend with ISA {isa!r} lays blocks out in a way the svdq "
                                    f"connector does not read; supported: ISA {CPU_ISA!r}")
        return BlockLayout("cpu", block_size, kv_heads, head_dim)
    if backend_name == "FLASH_ATTN":
        return BlockLayout("flash", block_size, kv_heads, head_dim)
    raise InvalidInputError(f"attention backend {backend_name!r} is not supported by the svdq connector; "
                            "supported: CPU_ATTN (ISA vec), FLASH_ATTN")


class SvdqConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector storing prompt prefixes in an svdq server (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        if transfer.kv_load_failure_policy != "recompute":
            raise InvalidInputError('the svdq connector needs "kv_load_failure_policy": "recompute" in '
                                    "--kv-transfer-config, so that a failed load is recomputed instead of failing "
                                    f"the request (got {transfer.kv_load_failure_policy!r})")
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise InvalidInputError("the svdq connector supports tensor_parallel_size 1 and pipeline_parallel_size 1 "
                                    f"only, got {parallel.tensor_parallel_size} and {parallel.pipeline_parallel_size}")
        self._block_size = vllm_config.cache_config.block_size
        self.settings = ConnectorSettings.from_extra_config(dict(transfer.kv_connector_extra_config or {}),
                                                            self._block_size)
        self._hf_config = vllm_config.model_config.hf_config
        self._shape = model_profile(self._hf_config, self.settings.profile)
        self._client = KVCacheClient(self.settings.address, token=self.settings.token, timeout=self.settings.timeout_s,
                                     retries=1)
        self._profile_checked = False
        self._ensure_profile(at_start=True)
        # scheduler side
        self._requests: dict[str, _RequestState] = {}
        self._lookups: OrderedDict[str, int] = OrderedDict()  # request id -> leading chunks stored
        # worker side
        self._layout: BlockLayout | None = None
        self._caches: dict[str, tuple[int, torch.Tensor]] = {}
        self._pending: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._failed_blocks: set[int] = set()

    # -- the server ---------------------------------------------------------------------------

    def _ensure_profile(self, at_start: bool = False) -> None:
        """Check the server's profile against the model once; a mismatch stops vLLM at start-up.
        A server that is down at start-up is checked on first use instead (until then every
        call is a miss)."""
        if self._profile_checked:
            return
        try:
            profile = self._client.get_profile(self.settings.profile)
        except (UnavailableError, DeadlineExceededError) as error:
            if at_start:
                log.warning("svdq server %s unreachable at start-up (%s); prefixes are recomputed until it answers",
                            self.settings.address, error.details)
                return
            raise
        check_profile(profile, self._hf_config)
        self._profile_checked = True

    def _failed(self, operation: str, error: Exception, what: str) -> None:
        ERRORS.labels(operation).inc()
        log.warning("svdq connector: %s failed, %s: %s", operation, what, error)

    # -- scheduler side -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        chunk = self.settings.chunk_tokens
        state = self._requests.get(request.request_id)
        if state is None:
            token_ids = list(request.prompt_token_ids or [])
            salt = request.cache_salt or ""
            state = _RequestState(token_ids, salt, chunk_keys(token_ids, chunk, salt, self.settings.profile))
            self._requests[request.request_id] = state
        # vLLM must compute at least the prompt's last token itself.
        loadable = (len(state.token_ids) - 1) // chunk
        if loadable == 0:
            return 0, False
        remembered = self._lookups.get(request.request_id)
        if remembered is not None:
            self._lookups.move_to_end(request.request_id)
            state.stored = remembered
        else:
            try:
                self._ensure_profile()
                state.stored = self._client.lookup_chunks(self.settings.profile, state.keys[:loadable],
                                                          cache_salt=state.cache_salt)
            except (ServiceError, InvalidInputError) as error:
                self._failed("lookup", error, "treating the prompt as a miss")  # asked again next step
                state.stored = 0
                return 0, False
            self._lookups[request.request_id] = state.stored
            if len(self._lookups) > MAX_REMEMBERED_LOOKUPS:
                self._lookups.popitem(last=False)
        hit_tokens = state.stored * chunk
        if hit_tokens <= num_computed_tokens:
            return 0, False
        TOKENS.labels("hit").inc(hit_tokens - num_computed_tokens)
        return hit_tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None or num_external_tokens <= 0:
            return
        hit_tokens = state.stored * self.settings.chunk_tokens
        state.load = (hit_tokens - num_external_tokens, hit_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = SvdqConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._lookups.pop(new.req_id, None)  # scheduled: it waits no more
            self._plan(meta, new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[index]
            self._lookups.pop(req_id, None)  # a resumed request looked up again before it ran
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_blocks[0]) if new_blocks is not None else state.block_ids
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            self._plan(meta, req_id, state, cached.num_computed_tokens[index] + scheduled.get(req_id, 0))
        return meta

    def _plan(self, meta: SvdqConnectorMetadata, req_id: str, state: _RequestState, computed_after: int) -> None:
        chunk = self.settings.chunk_tokens
        if state.load is not None:
            start, stop = state.load
            first = start // chunk
            meta.loads.append(LoadSpec(req_id, state.cache_salt, state.keys[first:-(-stop // chunk)], first, start,
                                       stop, list(state.block_ids)))
            state.load = None
        # Chunks of prompt tokens whose KV exists once this step has run, not stored yet.
        done = min(computed_after, len(state.token_ids)) // chunk
        blocks_per_chunk = chunk // self._block_size
        for index in range(state.stored, done):
            block_ids = state.block_ids[index * blocks_per_chunk:(index + 1) * blocks_per_chunk]
            meta.saves.append(SaveSpec(req_id, state.cache_salt, state.keys[index], index, block_ids))
        state.stored = max(state.stored, done)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves complete within their step (wait_for_save), so the blocks are free to go.
        self._requests.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        return False, None

    # -- worker side --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        layers = self._vllm_config.compilation_config.static_forward_context
        shape = self._shape
        caches, layouts = {}, set()
        for name, cache in kv_caches.items():
            layer = layers[name]
            backend = layer.attn_backend.get_name()
            isa = getattr(layer, "isa", None)
            if backend == "CPU_ATTN" and isa is None:
                from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

                isa = _get_attn_isa(cache.dtype, self._block_size, shape.head_dim,
                                    self._vllm_config.cache_config.cache_dtype)
            layout = layout_for(backend, isa, self._block_size, shape.kv_heads, shape.head_dim)
            layout.check(cache, f"KV cache of layer {name!r}")
            if cache.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise InvalidInputError(f"the svdq connector needs a 16- or 32-bit float KV cache, layer {name!r} "
                                        f"has {cache.dtype} (kv_cache_dtype {self._vllm_config.cache_config.cache_dtype!r})")
            layouts.add(layout)
            caches[name] = (extract_layer_index(name), cache)
        indices = sorted(index for index, _ in caches.values())
        if indices != list(range(shape.num_layers)) or len(layouts) != 1:
            raise InvalidInputError(f"the svdq connector needs one KV cache per decoder layer 0..{shape.num_layers - 1}"
                                    f" in one layout, got layers {indices} in {len(layouts)} layouts")
        self._layout = layouts.pop()
        self._caches = caches
        log.info("svdq connector: %d layers, %s block layout, %d tokens per chunk, server %s, profile %r",
                 len(caches), self._layout.name, self.settings.chunk_tokens, self.settings.address,
                 self.settings.profile)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for spec in getattr(meta, "loads", ()):
            try:
                self._load(spec)
            except (ServiceError, InvalidInputError, IndexError) as error:
                first, last = spec.start // self._block_size, -(-spec.stop // self._block_size)
                self._failed_blocks.update(spec.block_ids[first:last])
                self._failed("load", error, f"vLLM recomputes tokens [{spec.start}, {spec.stop}) of {spec.req_id}")

    def _load(self, spec: LoadSpec) -> None:
        chunk, layout = self.settings.chunk_tokens, self._layout
        dtype = next(iter(self._caches.values()))[1].dtype
        started = time.perf_counter()
        self._ensure_profile()
        chunks = self._client.fetch_chunks(self.settings.profile, spec.keys, self._shape.num_layers,
                                           cache_salt=spec.cache_salt, dtype=dtype)
        fetched_at = time.perf_counter()
        expected = (self._shape.num_layers, chunk, self._shape.kv_heads, self._shape.head_dim)
        # Check everything before writing anything: a bad chunk must not leave half a load behind.
        for offset, fetched in enumerate(chunks):
            start = (spec.first_chunk + offset) * chunk
            if tuple(fetched.keys.shape) != expected or tuple(fetched.values.shape) != expected:
                raise InvalidInputError(f"chunk {start // chunk} came back as {list(fetched.keys.shape)}, expected "
                                        f"{list(expected)}")
            if not torch.equal(fetched.positions, torch.arange(start, start + chunk)):
                raise InvalidInputError(f"chunk {start // chunk} holds other positions than [{start}, {start + chunk})")
            if not (torch.isfinite(fetched.keys).all() and torch.isfinite(fetched.values).all()):
                raise InvalidInputError(f"chunk {start // chunk} holds non-finite keys or values")
        for offset, fetched in enumerate(chunks):
            chunk_start = (spec.first_chunk + offset) * chunk
            low, high = max(spec.start, chunk_start), min(spec.stop, chunk_start + chunk)
            for index, cache in self._caches.values():
                layout.write(cache, spec.block_ids, low, fetched.keys[index, low - chunk_start:high - chunk_start],
                             fetched.values[index, low - chunk_start:high - chunk_start])
        TOKENS.labels("loaded").inc(spec.stop - spec.start)
        log.info("svdq connector: loaded tokens [%d, %d) of %s: fetch %.0f ms, write %.0f ms", spec.start, spec.stop,
                 spec.req_id, 1e3 * (fetched_at - started), 1e3 * (time.perf_counter() - fetched_at))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        saves = getattr(meta, "saves", ())
        if not saves or layer_name not in self._caches:
            return
        index = self._caches[layer_name][0]
        for spec in saves:
            keys, values = self._layout.read(kv_layer, spec.block_ids, 0, self.settings.chunk_tokens)
            parts = self._pending.setdefault((spec.req_id, spec.index), [None] * self._shape.num_layers)
            parts[index] = (keys.cpu(), values.cpu())

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        unreachable = None
        started = time.perf_counter()
        saves = getattr(meta, "saves", ())
        for spec in saves:
            parts = self._pending.pop((spec.req_id, spec.index), None)
            if unreachable is not None:
                self._failed("save", unreachable, f"chunk {spec.index} of {spec.req_id} not stored (server unreachable)")
                continue
            if parts is None or any(part is None for part in parts):
                self._failed("save", InvalidInputError("not every layer's KV was seen"),
                             f"chunk {spec.index} of {spec.req_id} not stored")
                continue
            start = spec.index * self.settings.chunk_tokens
            keys = torch.stack([part[0] for part in parts])
            values = torch.stack([part[1] for part in parts])
            try:
                self._ensure_profile()
                info, created = self._client.store_chunk(
                    self.settings.profile, spec.key, keys, values,
                    positions=torch.arange(start, start + self.settings.chunk_tokens), cache_salt=spec.cache_salt)
                TOKENS.labels("saved").inc(self.settings.chunk_tokens)
                if created:
                    for kind, nbytes in (("keys", info.key_bytes), ("values", info.value_bytes),
                                         ("fp16_keys", info.fp16_key_bytes), ("fp16_values", info.fp16_value_bytes)):
                        STORED_BYTES.labels(kind).inc(nbytes)
            except (ServiceError, InvalidInputError) as error:
                self._failed("save", error, f"chunk {spec.index} of {spec.req_id} not stored")
                if isinstance(error, (UnavailableError, DeadlineExceededError)):
                    unreachable = error  # the rest of this step's saves would wait for it in vain
        self._pending.clear()
        if saves:
            log.info("svdq connector: stored %d chunks in %.0f ms", len(saves), 1e3 * (time.perf_counter() - started))

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        self._client.close()


# -- profiles for a model -------------------------------------------------------------------

def calibrated_bases(model_dir: str, tokens: int = 4096) -> tuple[Basis, ...]:
    """Shared key bases of a model (a local transformers folder), fitted by
    :func:`svdq_client.hf.default_calibrated_bases` (what the transformers integration uses by
    default) on ``tokens`` tokens of the shipped calibration text, the end of the Python
    documentation's prose, not on the traffic it will serve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import default_calibrated_bases

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    return default_calibrated_bases(model, tokenizer, tokens)[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m svdq_client.vllm register-profile``: register a model's profile on a server."""
    parser = argparse.ArgumentParser(prog="python -m svdq_client.vllm",
                                     description="Register the svdq profile of a vLLM model (its layers, KV heads, "
                                                 "head size and RoPE, the codec, and shared key bases).")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register-profile", help="register (or replace) a model's profile")
    register.add_argument("--model", required=True, help="local transformers model folder (what vLLM serves)")
    register.add_argument("--address", required=True, help="svdq server host:port")
    register.add_argument("--token", default=None, help="bearer token of the tenant")
    register.add_argument("--name", required=True, help="profile name (the connector's 'profile')")
    register.add_argument("--codec", choices=("svdq", "fp16"), default="svdq",
                          help="svdq (default codec, 1.5 true bits per key element) or fp16 passthrough")
    register.add_argument("--bits", type=float, default=CodecConfig().bits_per_element, help="svdq key bits budget")
    register.add_argument("--value-bits", type=int, choices=(2, 4), default=None, help="quantize values too")
    register.add_argument("--calibration-tokens", type=int, default=4096,
                          help="tokens of calibration text for the shared key bases (svdq; 0: none)")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    codec = CodecConfig(method=args.codec, bits_per_element=args.bits)
    bases = calibrated_bases(args.model, args.calibration_tokens) if args.codec == "svdq" and args.calibration_tokens \
        else None
    profile = model_profile(config, args.name, codec, args.value_bits, bases)
    with KVCacheClient(args.address, token=args.token) as client:  # bases stream one layer per message
        client.register_profile(profile, replace=True)
    print(f"registered profile {args.name!r}: {profile.num_layers} layers x {profile.kv_heads} x {profile.head_dim}, "
          f"codec {codec.method}, {'shared' if bases else 'no shared'} bases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
