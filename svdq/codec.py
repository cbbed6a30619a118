"""The SVDq key codec: compress, append to and reconstruct the keys of one layer.

Token layout of a compressed sequence of ``S`` tokens::

    [ sinks: num_sinks tokens | groups: n_groups * group_size tokens | tail: < group_size ]
      full precision            quantized latent channels               full precision

* Keys are moved to the pre-RoPE space first (post-RoPE input is un-rotated exactly with its
  positions and :class:`~svdq.rope.RopeConfig`), flattened over heads to ``C = kv_heads *
  head_dim`` channels, centred by ``mean`` and projected on the ``basis`` columns of the kept
  latent channels.
* Three methods share this layout, so that baselines are measured with the same bytes
  accounting and the same attention path:

  - ``svdq``: basis from the sequence's own keys (or a shared calibrated :class:`Basis`),
    mixed widths per latent channel;
  - ``kivi``: the KIVI-like baseline: identity basis, no mean, one width for every channel,
    in the space the keys came in (post-RoPE keys stay post-RoPE);
  - ``fp16``: passthrough; every token stays in the full-precision tail.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from .allocation import AllocationPlan, allocate_schedule
from .errors import InvalidInputError, ResourceExhaustedError
from .quant import (
    MAX_BITS,
    cpu_bfloat16_is_fast,
    dequantize_groups,
    distortion_table,
    group_bytes,
    pack_codes,
    pack_rows,
    quantize_groups,
    unpack_codes,
    unpack_rows,
)
from .rope import RopeConfig, apply_rope, rope_cos_sin, undo_rope

log = logging.getLogger(__name__)

METHODS = ("svdq", "kivi", "fp16")
KEY_SPACES = ("pre_rope", "post_rope")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_SIZES = (8, 16, 32, 64, 128, 256)
MAX_SINKS = 1024
MAX_EXACT_TOKENS = 1024
MAX_EXACT_SHARE = 0.5
#: widths of exact tokens: 16-bit rows, or a per-token correction of their reconstruction
EXACT_BITS = (16, 8, 4, 2)
MAX_BUDGET = 16.0

#: Defaults chosen from bench/quality.py on SmolLM2-135M (see README): 1.5 bits per element
#: all metadata included, token groups chosen by the sequence's length (below), 4
#: full-precision sink tokens.
DEFAULT_BITS_PER_ELEMENT = 1.5
DEFAULT_GROUP_SIZE = 64
#: The default token group by sequence length: (below this many tokens, group size), else
#: DEFAULT_GROUP_SIZE. Short sequences pay for long groups in a 16-bit tail of up to
#: group_size - 1 tokens (at 473 tokens, 21 of them cost 0.71 bits per element with groups
#: of 64), long ones pay for short groups in scales and minimums (32 / group_size bits per
#: kept element). On SmolLM2 (docs/quality.md, issue 14 round 5) groups of 16 found every
#: needle at 512 and 1,024 tokens where groups of 64 lost some, and cost less NLL at a
#: 1,024-token prefix; at 3,072 tokens they cost more, so long sequences keep groups of 64.
LENGTH_GROUP_SIZES = ((2048, 16),)
DEFAULT_SINKS = 4
MAX_NOISE_AVERAGING = 1024


@dataclass(frozen=True)
class CodecConfig:
    """How to compress.

    Attributes:
        method: ``"svdq"``, ``"kivi"`` or ``"fp16"``.
        bits_per_element: svdq budget in true bits per key element, counting every serialized
            byte (header, scales, minimums, basis, mean, full-precision sinks and tail).
            Allowed: (0, 16]; default 1.5. Not together with ``schedule`` (``None`` then).
            A budget below what a sequence's fixed costs need is exceeded: the keys are
            stored at the bits they need and a warning says so.
        schedule: explicit svdq widths for equal groups of latent channels, e.g.
            ``(8, 4, 2, 1, 1, 0, 0, 0)``, instead of a ``bits_per_element`` budget.
        bits: width of every channel for ``kivi`` (1..8).
        group_size: tokens per quantization group, one of 8, 16, 32, 64, 128, 256; ``None``
            (the default) chooses it from the sequence's length when it is compressed
            (:meth:`group_size_for`, :data:`LENGTH_GROUP_SIZES`) and the blob records it, so
            appends keep it.
        num_sinks: leading tokens kept in full precision (attention sinks), 0..1024.
        noise_averaging: how many tokens' quantization noise an attention output averages,
            1..1024. The allocator weighs a kept channel's quantization error by
            ``1 / noise_averaging`` against the error of dropping a channel, which the tokens
            an output mixes share rather than average out. 1 for keys (a score sees each
            token's error alone); values use :data:`svdq.values.DEFAULT_VALUE_CODEC`'s. Only the
            allocation reads it (nothing is stored).
        exact_tokens: svdq only: the quantized tokens whose reconstruction error is largest
            are kept exact as well (16-bit rows and their indices, paid from the budget),
            0..1024. Rare, high-information tokens (a needle's digits, a name) are the ones a
            shared or per-sequence basis fits worst; on SmolLM2 four per layer took the whole
            cache at 2.0 bits from 8/12 to 11/12 needles at 512 tokens and from 10/12 to 11/12
            at 1,024 (docs/quality.md). Chosen when the keys are compressed; tokens appended
            later get none. With ``exact_share`` this is the floor of the count.
        exact_share: svdq only: keep ``max(exact_tokens, round(exact_share * n))`` of the
            ``n`` quantized tokens exact, in [0, 0.5], so that the count grows with the
            sequence (default 0: ``exact_tokens`` alone).
        exact_bits: how the exact tokens are stored: 16 keeps their 16-bit rows; 8, 4 or 2
            stores instead a per-token, per-head ``exact_bits``-bit correction of the
            reconstruction (the error that remains is that of the correction's rounding), so
            that 2x, 4x or 8x as many tokens fit in the same bytes. Only with exact tokens.
    """

    method: str = "svdq"
    bits_per_element: float | None = None
    schedule: tuple[int, ...] | None = None
    bits: int = 2
    group_size: int | None = None
    num_sinks: int = DEFAULT_SINKS
    noise_averaging: float = 1.0
    exact_tokens: int = 0
    exact_share: float = 0.0
    exact_bits: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.schedule is not None and self.bits_per_element is not None:
            raise InvalidInputError(
                f"give either bits_per_element ({self.bits_per_element}) or schedule ({tuple(self.schedule)}), not "
                "both: a schedule fixes every channel's width, so no budget would apply"
            )
        if self.schedule is None and self.bits_per_element is None:
            object.__setattr__(self, "bits_per_element", DEFAULT_BITS_PER_ELEMENT)
        if self.schedule is None and not (
                isinstance(self.bits_per_element, (int, float)) and 0 < self.bits_per_element <= MAX_BUDGET):
            raise InvalidInputError(
                f"bits_per_element must be in (0, {MAX_BUDGET}], got {self.bits_per_element}"
            )
        if self.schedule is not None:
            object.__setattr__(self, "schedule", tuple(int(b) for b in self.schedule))
            if not self.schedule or any(not 0 <= b <= MAX_BITS for b in self.schedule):
                raise InvalidInputError(f"schedule widths must be integers 0..{MAX_BITS}, got {self.schedule}")
        if not 1 <= self.bits <= MAX_BITS:
            raise InvalidInputError(f"bits must be in 1..{MAX_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise InvalidInputError(f"group_size must be one of {GROUP_SIZES} or None (chosen by length), "
                                    f"got {self.group_size!r}")
        if not 0 <= self.num_sinks <= MAX_SINKS:
            raise InvalidInputError(f"num_sinks must be in 0..{MAX_SINKS}, got {self.num_sinks}")
        if not (isinstance(self.noise_averaging, (int, float)) and 1 <= self.noise_averaging <= MAX_NOISE_AVERAGING):
            raise InvalidInputError(
                f"noise_averaging must be in [1, {MAX_NOISE_AVERAGING}], got {self.noise_averaging!r}"
            )
        if not (isinstance(self.exact_tokens, int) and 0 <= self.exact_tokens <= MAX_EXACT_TOKENS):
            raise InvalidInputError(f"exact_tokens must be an integer in 0..{MAX_EXACT_TOKENS}, got {self.exact_tokens!r}")
        if not (isinstance(self.exact_share, (int, float)) and 0 <= self.exact_share <= MAX_EXACT_SHARE):
            raise InvalidInputError(f"exact_share must be a fraction in [0, {MAX_EXACT_SHARE}], got {self.exact_share!r}")
        if (self.exact_tokens or self.exact_share) and self.method != "svdq":
            raise InvalidInputError(f"exact tokens (exact_tokens={self.exact_tokens}, exact_share={self.exact_share}) "
                                    f"apply to method 'svdq' only, not {self.method!r}")
        if self.exact_bits not in EXACT_BITS:
            raise InvalidInputError(f"exact_bits must be one of {EXACT_BITS}, got {self.exact_bits!r}")
        if self.exact_bits != 16 and not (self.exact_tokens or self.exact_share):
            raise InvalidInputError(f"exact_bits={self.exact_bits} needs exact tokens (exact_tokens or exact_share > 0): "
                                    "without them nothing is stored at that width")

    def group_size_for(self, tokens: int) -> int:
        """The token group of a sequence of ``tokens``: ``group_size``, or when it is None the
        first :data:`LENGTH_GROUP_SIZES` entry the length is below, else DEFAULT_GROUP_SIZE."""
        if self.group_size is not None:
            return self.group_size
        return next((size for below, size in LENGTH_GROUP_SIZES if tokens < below), DEFAULT_GROUP_SIZE)

    def exact_count(self, quantized: int) -> int:
        """How many of ``quantized`` tokens are kept exact."""
        return min(quantized, max(self.exact_tokens, round(self.exact_share * quantized)))


#: largest sequence (tokens of one layer) the codec takes by default
DEFAULT_MAX_TOKENS = 1 << 20
#: kv_heads * head_dim of the largest common models (multi-head 32 x 128)
DEFAULT_MAX_CHANNELS = 4096
DEFAULT_MAX_WORK_BYTES = 8 << 30


@dataclass(frozen=True)
class CostLimits:
    """What one codec call on one layer may cost, checked by :func:`check_cost` before any
    work or allocation (compress, append, decompress, :func:`svdq.format.from_bytes`).

    Attributes:
        max_tokens: tokens of one layer.
        max_channels: ``kv_heads * head_dim``; fitting a basis costs ``O(C^3)`` and its
            covariance ``4 * C * C`` bytes whatever the token count.
        max_work_bytes: estimated peak working memory of the call (:func:`work_bytes`).
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_work_bytes: int = DEFAULT_MAX_WORK_BYTES

    def __post_init__(self) -> None:
        if min(self.max_tokens, self.max_channels, self.max_work_bytes) < 1:
            raise InvalidInputError(f"cost limits must be >= 1, got {self}")


def work_bytes(tokens: int, channels: int, operation: str = "compress") -> int:
    """Upper estimate of the peak working memory of one codec call on ``[tokens, C]`` keys.

    Compress holds a few float32 copies of the keys (input, 16-bit rounding, latent, trial
    quantizations of the sample) and the ``[C, C]`` covariance, eigenvectors and basis:
    measured on the CPU at 4-7x ``4 * tokens * C`` plus ~6x ``4 * C * C``; the estimate
    doubles the first. Decompress and append build about three float32 copies of the keys.
    """
    if operation == "compress":
        return 32 * tokens * channels + 24 * channels * channels
    return 12 * tokens * channels + 8 * channels * channels


def check_cost(tokens: int, kv_heads: int, head_dim: int, limits: CostLimits | None = None, *,
               what: str = "keys", operation: str = "compress", work_tokens: int | None = None) -> int:
    """Refuse, before any work, keys ``[tokens, kv_heads, head_dim]`` that exceed ``limits``.

    ``work_tokens`` are the tokens the call processes when fewer than the ``tokens`` it leaves
    (an append works on its new tokens). Raises ResourceExhaustedError naming the limit (and,
    when the shape looks like ``[kv_heads, tokens, head_dim]``, how to fix it); returns the
    estimated work bytes.
    """
    limits = limits or CostLimits()
    channels = kv_heads * head_dim
    processed = tokens if work_tokens is None else work_tokens
    estimate = work_bytes(processed, channels, operation)
    problem = None
    if tokens > limits.max_tokens:
        problem = f"{tokens} tokens is more than the limit of {limits.max_tokens} (max_tokens)"
    elif channels > limits.max_channels:
        problem = (f"kv_heads * head_dim = {kv_heads} * {head_dim} = {channels} channels is more than the limit of "
                   f"{limits.max_channels} (max_channels)")
    elif estimate > limits.max_work_bytes:
        problem = (f"{operation} of {processed} tokens x {channels} channels needs about {estimate} bytes of working "
                   f"memory, more than the limit of {limits.max_work_bytes} (max_work_bytes)")
    if problem is None:
        return estimate
    hint = ""
    if kv_heads > tokens or (tokens <= 8 and channels > limits.max_channels):
        hint = (f"; {what} [{tokens}, {kv_heads}, {head_dim}] read as {tokens} tokens of {kv_heads} kv_heads: the "
                "layout is [tokens, kv_heads, head_dim], so keys in [kv_heads, tokens, head_dim] order need "
                ".transpose(0, 1)")
    raise ResourceExhaustedError(f"{what}: {problem}{hint}")


@dataclass(frozen=True)
class Basis:
    """A latent basis for one model layer: ``latent = (keys - mean) @ components``.

    Attributes:
        mean: float32 [C] mean pre-RoPE key.
        components: float32 [C, C], orthonormal columns in decreasing singular value order.
        singular_values: float32 [C].
    """

    mean: torch.Tensor
    components: torch.Tensor
    singular_values: torch.Tensor

    @property
    def channels(self) -> int:
        return self.mean.numel()

    @functools.cached_property
    def fingerprint(self) -> int:
        """64-bit identity of the basis (its float16 bytes) that blobs referencing it carry.
        Hashed once per basis object (a basis is not modified in place): ~12 ms of SHA-256
        at C = 1024, which every compress and load with this shared basis would repeat."""
        digest = hashlib.sha256()
        digest.update(self.mean.to(torch.float32).cpu().numpy().tobytes())
        digest.update(self.components.to(torch.float16).cpu().numpy().tobytes())
        return int.from_bytes(digest.digest()[:8], "little")


def fit_basis(keys: torch.Tensor) -> Basis:
    """Mean-centred SVD basis of pre-RoPE keys [tokens, C] (all KV heads of a layer together).

    Uses the eigen-decomposition of the covariance: the same right singular vectors
    as an SVD of the centred keys at a fraction of the cost when tokens >> C.
    """
    return _fit_centred(keys.to(torch.float32, copy=True))[0]


def _fit_centred(work: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """:func:`fit_basis` of the float32 keys ``work`` [tokens, C], which it centres in place
    (``work - basis.mean``, returned with the basis): compress projects them rather than
    centring the same tokens again, and fit_basis passes a copy of the caller's keys."""
    # torch's float32 reduction sums in cascades: within an ulp of a float64 mean of these
    # keys, without the float64 copy of every key that took longer than the sum.
    mean = work.mean(dim=0)
    centred = work.sub_(mean)
    # The eigenvectors that the covariance's rounding (see gram) cannot resolve belong to the
    # smallest singular values, whose channels the allocation drops anyway.
    covariance = gram(centred)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = torch.argsort(eigenvalues, descending=True)
    singular = eigenvalues[order].clamp(min=0).sqrt()
    components = eigenvectors[:, order]
    # Fix the sign of each column so the same keys always give the same basis bytes.
    signs = torch.sign(components[components.abs().argmax(dim=0), torch.arange(components.shape[1])])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    return Basis(mean.float(), components.float(), singular.float()), centred


#: tokens per bfloat16 product of :func:`gram` and per projected chunk (a multiple of every group size)
GRAM_CHUNK = 1024

#: whether the codec's cheap CPU products use bfloat16 operands: None decides by
#: :func:`svdq.quant.cpu_bfloat16_is_fast` (``$SVDQ_CPU_BFLOAT16``, else measured); True or
#: False forces it (tests)
_CPU_BF16_PRODUCTS: bool | None = None


def _bfloat16_products(device: torch.device) -> bool:
    """Whether the codec's cheap products use bfloat16 operands on ``device``: on CUDA, and
    on CPUs where they measure faster than float32 (:func:`svdq.quant.cpu_bfloat16_is_fast`:
    3-5x on the AVX512-BF16 CPU of rounds 4-7). Where they are emulated (4-70x slower) or
    native but slower (0.5x on an AVX512-BF16 Xeon without AMX), the products stay float32:
    more exact, and the blobs differ only by that rounding (the same sizes)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return cpu_bfloat16_is_fast() if _CPU_BF16_PRODUCTS is None else _CPU_BF16_PRODUCTS


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows.T @ rows`` float32 [C, C] of float32 ``rows`` [tokens, C], as bfloat16 products
    over chunks of :data:`GRAM_CHUNK` tokens summed in float32.

    Where bfloat16 products are used (:func:`_bfloat16_products`; float32 accumulation
    inside, the result rounded to bfloat16: 3-5x the float32 rate where they are fast);
    elsewhere this is one float32 product. Each chunk's product is rounded once and the
    roundings of the chunks are independent, so their sum errs by ~1/sqrt(chunks) of one
    bfloat16 rounding: on bench/quality.py's 8192 x 1024 layer the covariance is within 7e-4
    (Frobenius, relative) of float64 and the basis leaves 0.13% more energy outside its first
    200 columns than a float32 one (one bfloat16 product: 1.7e-3 and 1%). A sample of the
    tokens, the other way to cut this product, errs by ~1/sqrt(sample) in every entry."""
    if not _bfloat16_products(rows.device):
        if rows.device.type != "cpu" or rows.shape[1] <= GRAM_BLOCK:
            return rows.T @ rows
        return _blocked_gram(rows)
    channels = rows.shape[1]
    out = rows.new_zeros(channels, channels, dtype=torch.float32)
    for start in range(0, rows.shape[0], GRAM_CHUNK):
        chunk = rows[start:start + GRAM_CHUNK].to(torch.bfloat16)  # no bfloat16 copy of every row
        out += chunk.T @ chunk
    return out


#: channels per block of :func:`_blocked_gram`
GRAM_BLOCK = 256


def _blocked_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows.T @ rows`` float32 [C, C] from the blocks on and above the diagonal, mirrored:
    the product is symmetric, and torch has no symmetric rank-k product, so a plain one
    computes every entry twice. At C = 1024 in 256-channel blocks that is 10 of 16 blocks:
    0.17 s instead of 0.29 s at 8k tokens on one thread of the AVX2 EPYC. There each entry is
    the same dot product over the tokens, in the same order (MKL's blocking runs over the
    tokens, not over the output's shape), so the result has the plain product's bits; on an
    AVX-512 Xeon some entries differ in their last bits (as close to float64; tests/test_codec.py)."""
    channels = rows.shape[1]
    out = rows.new_empty(channels, channels)
    for first in range(0, channels, GRAM_BLOCK):
        block = rows[:, first:first + GRAM_BLOCK]
        stop = first + block.shape[1]
        torch.matmul(block.T, rows[:, first:], out=out[first:stop, first:])
        out[stop:, first:stop] = out[first:stop, stop:].T
    return out


def fit_layer_basis(
    keys: torch.Tensor | Sequence[torch.Tensor],
    positions: torch.Tensor | Sequence[torch.Tensor] | None = None,
    rope: RopeConfig | None = None,
) -> Basis:
    """Fit a shared basis on calibration keys of one layer, reusable across sequences.

    ``keys`` is one [tokens, kv_heads, head_dim] tensor or a list of them (several
    calibration sequences). When ``positions`` are given the keys are post-RoPE and are
    un-rotated first.
    """
    key_list = [keys] if isinstance(keys, torch.Tensor) else list(keys)
    if positions is None:
        pos_list: list[torch.Tensor | None] = [None] * len(key_list)
    else:
        pos_list = [positions] if isinstance(positions, torch.Tensor) else list(positions)
    if len(pos_list) != len(key_list):
        raise InvalidInputError(f"got {len(key_list)} key tensors but {len(pos_list)} position tensors")
    flat = []
    for item, pos in zip(key_list, pos_list, strict=True):
        _check_keys(item)
        pre = item.float() if pos is None else undo_rope(item, pos, _require_rope(rope))
        flat.append(pre.reshape(pre.shape[0], -1))
    return fit_basis(torch.cat(flat))


@dataclass
class CompressedKeys:
    """Compressed keys of one layer of one sequence (in memory; see :mod:`svdq.format`).

    Tensor fields, ``r`` = number of kept latent channels, ``C = kv_heads * head_dim``:

    * ``channel_bits``: uint8 [C], width of every latent channel (0 = dropped).
    * ``basis``: float16 [C, r], kept columns (identity columns for ``kivi``; empty for fp16).
    * ``mean``: float32 [C] (zeros for ``kivi`` and ``fp16``).
    * ``sinks``: [num_sinks_stored, C] and ``tail``: [n_tail, C] full-precision keys
      (``storage_dtype``), in ``stored_space``.
    * ``codes``: uint8 [n_groups, group_bytes]; ``scales``, ``mins``: float16 [n_groups, r].
    * ``positions``: int64 [S] when positions are not ``position_offset + arange(S)``.
    * ``exact_index``: int64 [k] ascending sequence indices of quantized body tokens that are
      also kept exact, ``exact_rows`` [k, C] (``storage_dtype``, ``stored_space``): their keys,
      which replace the reconstruction of those tokens. Empty when ``exact_tokens`` is 0.
    * ``exact_bits`` 16: ``exact_rows`` is what the blob stores. 8, 4 or 2: the blob stores
      ``exact_codes`` uint8 [k, kv_heads, head_dim * b / 8] (:func:`svdq.quant.pack_rows`),
      ``exact_scales`` and ``exact_mins`` float16 [k, kv_heads]: a correction of the tokens'
      reconstruction per head, and ``exact_rows`` is the corrected reconstruction
      (:func:`exact_corrected_rows`), the same whether computed by compress or by the loader.
    """

    method: str
    kv_heads: int
    head_dim: int
    input_dtype: torch.dtype
    storage_dtype: torch.dtype
    stored_space: str
    rope: RopeConfig | None
    group_size: int
    num_sinks: int
    position_offset: int
    channel_bits: torch.Tensor
    basis: torch.Tensor
    mean: torch.Tensor
    sinks: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    tail: torch.Tensor
    positions: torch.Tensor | None = None
    shared_basis: int | None = None  # fingerprint when the basis is not stored with the keys
    input_space: str = "pre_rope"
    exact_index: torch.Tensor | None = None
    exact_rows: torch.Tensor | None = None
    exact_bits: int = 16
    exact_codes: torch.Tensor | None = None
    exact_scales: torch.Tensor | None = None
    exact_mins: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    # (what the size depends on, the size): see nbytes; not an init field, so replace() drops it
    _size: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # (channel_bits, its kept widths): see kept_bits; not an init field either
    _kept: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        device = self.codes.device
        if self.exact_index is None:
            self.exact_index = torch.zeros(0, dtype=torch.int64, device=device)
        if self.exact_rows is None:
            self.exact_rows = self.sinks.new_zeros(0, self.kv_heads * self.head_dim)
        if self.exact_codes is None:
            self.exact_codes = torch.zeros(0, self.kv_heads, 0, dtype=torch.uint8, device=device)
        if self.exact_scales is None:
            self.exact_scales = torch.zeros(0, self.kv_heads, dtype=torch.float16, device=device)
        if self.exact_mins is None:
            self.exact_mins = torch.zeros(0, self.kv_heads, dtype=torch.float16, device=device)

    @property
    def num_exact(self) -> int:
        return self.exact_index.numel()

    @property
    def channels(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def num_groups(self) -> int:
        return self.codes.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.sinks.shape[0] + self.num_groups * self.group_size + self.tail.shape[0]

    @property
    def kept_bits(self) -> torch.Tensor:
        """int64 [r] widths of the kept channels, in latent order.

        Computed once per ``channel_bits`` tensor (kept with it and compared by identity, as
        :attr:`nbytes` keeps its fields): a sequence's first attention call read it a dozen
        times at ~75 us each. Shared by every reader, so never changed in place."""
        kept = self._kept
        if kept is None or kept[0] is not self.channel_bits:
            self._kept = kept = (self.channel_bits, self.channel_bits[self.channel_bits > 0].to(torch.int64))
        return kept[1]

    @property
    def nbytes(self) -> int:
        """Serialized size in bytes, everything included.

        Computed once (walking the format costs ~60 us, and stores, metrics and replies read it
        often). The dataclass is not frozen, though the codec never changes one in place
        (append, to() and the loader return new objects), so the size is kept together with
        the fields it depends on and recomputed if one was assigned anew. The tensors themselves
        are kept and compared by identity: an ``id()`` alone can be reused by a new tensor once
        the old one is freed."""
        scalars = (self.method, self.kv_heads, self.head_dim, self.group_size, self.num_sinks, self.exact_bits,
                   self.rope is None, self.shared_basis is None)
        tensors = (self.channel_bits, self.sinks, self.codes, self.tail, self.positions, self.exact_index)
        kept = self._size
        if kept is None or kept[0] != scalars or any(old is not new for old, new in zip(kept[1], tensors, strict=True)):
            from .format import serialized_size

            self._size = kept = (scalars, tensors, serialized_size(self))
        return kept[2]

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(1, self.num_tokens * self.channels)

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes of the same keys over the serialized bytes."""
        return 2.0 * self.num_tokens * self.channels / self.nbytes

    def token_positions(self) -> torch.Tensor:
        """int64 [S] position of every stored token."""
        if self.positions is not None:
            return self.positions
        return torch.arange(self.num_tokens, dtype=torch.int64, device=self.codes.device) + self.position_offset

    def to(self, device: torch.device | str) -> CompressedKeys:
        moved = {
            name: getattr(self, name).to(device)
            for name in ("channel_bits", "basis", "mean", "sinks", "codes", "scales", "mins", "tail", "exact_index",
                         "exact_rows", "exact_codes", "exact_scales", "exact_mins")
        }
        if self.positions is not None:
            moved["positions"] = self.positions.to(device)
        if self.method == "kivi":
            moved["basis"] = identity_basis(self.channels, torch.device(device))
        return replace(self, **moved, _cache={})


@functools.lru_cache(maxsize=32)
def identity_basis(channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float16 [C, C] identity used as the basis of the kivi baseline; one shared, read-only
    copy per shape and device, so stored baseline sequences do not each hold a C x C matrix."""
    return torch.eye(channels, device=device, dtype=torch.float16)


def _check_keys(keys: torch.Tensor, name: str = "keys", limits: CostLimits | None = None, *,
                total_tokens: int | None = None, operation: str = "compress", scan: bool = True) -> None:
    """Type, layout, cost (``total_tokens`` of the result, default the keys' own) before the
    finiteness scan, so that an oversized input is refused without reading it. ``scan=False``
    leaves the scan to the caller (compress does it on its float32 copy, see :func:`_peak`)."""
    if not isinstance(keys, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype not in SUPPORTED_DTYPES:
        raise InvalidInputError(f"{name} dtype must be float16, bfloat16 or float32, got {keys.dtype}")
    if keys.dim() != 3:
        raise InvalidInputError(
            f"{name} must have shape [tokens, kv_heads, head_dim], got {keys.dim()} dimensions {tuple(keys.shape)}"
        )
    if keys.shape[1] < 1 or keys.shape[2] < 2 or keys.shape[2] % 2:
        raise InvalidInputError(f"{name} need kv_heads >= 1 and an even head_dim >= 2, got {tuple(keys.shape)}")
    tokens = keys.shape[0] if total_tokens is None else total_tokens
    check_cost(tokens, keys.shape[1], keys.shape[2], limits, what=name, operation=operation, work_tokens=keys.shape[0])
    if scan and not torch.isfinite(keys).all():
        raise InvalidInputError(f"{name} contain NaN or Inf; only finite values can be compressed")


def _peak(work: torch.Tensor, name: str = "keys") -> float:
    """Largest magnitude of float32 ``work``, refusing NaN and Inf: one min/max pass over the
    float32 copy does both the finiteness scan and the float16 range check (a scan of
    16-bit input is several times slower on the CPU than one of float32)."""
    if work.numel() == 0:
        return 0.0
    low, high = torch.aminmax(work)
    peak = max(-float(low), float(high))
    if not math.isfinite(peak):  # aminmax propagates NaN
        raise InvalidInputError(f"{name} contain NaN or Inf; only finite values can be compressed")
    return peak


def _require_rope(rope: RopeConfig | None) -> RopeConfig:
    if rope is None:
        raise InvalidInputError("post-RoPE keys need a rope description to be un-rotated")
    return rope


def _positions_for(count: int, positions: torch.Tensor | None, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """Split positions into (offset, explicit-or-None), validating them."""
    if positions is None:
        return 0, None
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.numel() != count:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise InvalidInputError(f"positions must be a 1-D tensor with one entry per token ({count}), got {shape}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise InvalidInputError(f"positions must be integers, got {positions.dtype}")
    positions = positions.to(device=device, dtype=torch.int64)
    if count and int(positions.min()) < 0:
        raise InvalidInputError("positions must be >= 0")
    if count == 0:
        return 0, None
    offset = int(positions[0])
    if torch.equal(positions, torch.arange(count, device=device) + offset):
        return offset, None
    return offset, positions


def _storage_dtype(keys: torch.Tensor) -> torch.dtype:
    # Full-precision tokens keep bfloat16 when they came as bfloat16 (range), else float16.
    return torch.bfloat16 if keys.dtype == torch.bfloat16 else torch.float16


@dataclass
class PreparedKeys:
    """One layer's keys made ready for :func:`compress_prepared`: everything compress does
    before it spends a bit budget, so that several budgets of the same keys (the candidate
    splits of :func:`svdq.kv.compress_kv`) share it instead of repeating it.

    Built by :func:`prepare` (checks, RoPE undone, 16-bit rounding, the basis, the centred
    body); the error table the allocation ranks channels by is measured on first use and
    kept. Read-only once built: every compress from it gives the bytes a plain
    :func:`compress` of the same keys and config gives. It holds a float32 copy of the body
    (what one compress holds at its peak), so keep it only while its compressions run.
    """

    method: str
    group_size: int | None  # the config's (None: chosen by length), checked against each compress's
    num_sinks_config: int
    keys_dtype: torch.dtype
    kv_heads: int
    head_dim: int
    stored_space: str
    key_space: str
    rope: RopeConfig | None
    storage: torch.dtype
    offset: int
    explicit: torch.Tensor | None
    rounded: torch.Tensor  # [tokens, C] in ``storage``: what full-precision tokens store
    flat: torch.Tensor  # float32 [tokens, C]; its body rows are ``centred`` once that is known
    num_sinks: int
    token_group: int
    n_groups: int
    fitted: Basis | None  # None: no quantized group and no shared basis (the config's schedule decides)
    shared_fp: int | None
    shared: bool
    components: torch.Tensor | None
    mean: torch.Tensor | None
    centred: torch.Tensor | None
    #: the allocation's budget-free plans by (noise_averaging, quantized tokens, metadata bits) and
    #: fixed bits by ("fixed", exact tokens, exact_bits), see _allocate
    plans: dict = field(default_factory=dict, repr=False, compare=False)
    #: float32 cos and sin [tokens, rotary / 2] of the tokens' positions (rope_cos_sin), once known
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return self.rounded.shape[0]

    def token_positions(self) -> torch.Tensor:
        """int64 [tokens] position of every token (:meth:`CompressedKeys.token_positions` of the result)."""
        if self.explicit is not None:
            return self.explicit
        return torch.arange(self.tokens, dtype=torch.int64, device=self.rounded.device) + self.offset

    def rotate(self, keys: torch.Tensor, key_space: str) -> torch.Tensor:
        """float32 ``keys`` [tokens, kv_heads, head_dim] of these tokens rotated to ``key_space``
        from the other space (:func:`apply_rope` or :func:`undo_rope`, the same bits), with the
        angles of their positions computed once for every candidate that is restored."""
        rope = _require_rope(self.rope)
        positions = self.token_positions()
        if self.rope_tables is None:
            self.rope_tables = rope_cos_sin(rope, positions, self.head_dim)
        rotate = apply_rope if key_space == "post_rope" else undo_rope
        return rotate(keys, positions, rope, self.rope_tables)

    @functools.cached_property
    def table(self) -> torch.Tensor:
        """The allocation's error table of the sampled groups (:func:`_sample_table`), measured once."""
        return _sample_table(self.centred, self.components, self.token_group)


def prepare(
    keys: torch.Tensor,
    config: CodecConfig | None = None,
    *,
    positions: torch.Tensor | None = None,
    rope: RopeConfig | None = None,
    key_space: str = "pre_rope",
    basis: Basis | None = None,
    limits: CostLimits | None = None,
    what: str = "keys",
) -> PreparedKeys:
    """The part of :func:`compress` (same arguments, same errors) that does not depend on the
    bit budget: :func:`compress_prepared` then compresses it under any ``config`` that differs
    from this one in ``bits_per_element`` or ``schedule`` only. ``what`` names the tensor in
    errors (values are prepared here too)."""
    config = config or CodecConfig()
    _check_keys(keys, what, limits=limits, scan=False)
    if keys.shape[0] == 0:
        raise InvalidInputError("keys must hold at least one token, got 0")
    if key_space not in KEY_SPACES:
        raise InvalidInputError(f"key_space must be one of {KEY_SPACES}, got {key_space!r}")
    if key_space == "post_rope" and positions is None:
        _warn_once(("positions", keys.shape[1], keys.shape[2]), "post-RoPE keys came without positions: assuming positions "
                   f"0..{keys.shape[0] - 1}; pass positions= when the keys do not start at position 0")
    if basis is not None and config.method != "svdq":
        raise InvalidInputError(f"a shared basis only applies to method 'svdq', not {config.method!r}")
    tokens, kv_heads, head_dim = keys.shape
    channels = kv_heads * head_dim
    if rope is not None:
        rope.dims(head_dim)
    offset, explicit = _positions_for(tokens, positions, keys.device)
    token_pos = explicit if explicit is not None else torch.arange(tokens, device=keys.device) + offset

    # svdq works on pre-RoPE keys; the baselines keep the space they were given.
    stored_space = key_space
    unrotated = config.method == "svdq" and key_space == "post_rope"
    rope_tables = None
    if unrotated:
        # undo_rope with its angles kept: restoring candidates (compress_kv) rotates back by them
        rope_tables = rope_cos_sin(_require_rope(rope), token_pos, head_dim)
        work = undo_rope(keys, token_pos, rope, rope_tables)
        stored_space = "pre_rope"
    else:
        # A copy even of float32 keys (not .float(), which returns them): it is rounded and
        # centred in place below.
        work = keys.to(torch.float32, copy=True)
    storage = _storage_dtype(keys)
    if _peak(work, what) > torch.finfo(torch.float16).max and storage == torch.float16:
        storage = torch.bfloat16  # float16 would overflow; bfloat16 keeps the range
    # Every token is rounded to the 16-bit storage dtype first, so a token quantized now and a
    # token that waited in the full-precision tail before its group filled are quantized alike.
    # ``rounded`` is what the full-precision tokens store; the float32 buffer takes its values
    # back in place: each fresh float32 copy of every key costs ~20 ms of page faults alone.
    if not unrotated and keys.dtype == storage:
        # 16-bit keys as given are their own rounding, and the float32 buffer already holds them.
        rounded, flat = keys.reshape(tokens, channels), work.reshape(tokens, channels)
    else:
        rounded = work.reshape(tokens, channels).to(storage)
        flat = work.reshape(tokens, channels).copy_(rounded)

    if config.method == "fp16":
        num_sinks, group_size = 0, config.group_size_for(tokens)
        n_groups = 0
    else:
        num_sinks, group_size = min(config.num_sinks, tokens), config.group_size_for(tokens)
        n_groups = (tokens - num_sinks) // group_size
    body = flat[num_sinks:num_sinks + n_groups * group_size]
    device = keys.device

    shared_fp = None
    fitted = components = mean = centred = None  # centred: body - mean, when the basis fit computed it
    if config.method == "svdq":
        if basis is not None:
            if basis.channels != channels:
                raise InvalidInputError(
                    f"shared basis has {basis.channels} channels but keys have kv_heads*head_dim = {channels}"
                )
            fitted, shared_fp = basis, basis.fingerprint
        elif n_groups:
            fitted, centred = _fit_centred(body)  # the body rows of the float32 copy, centred in place
        if fitted is not None:
            components = fitted.components.to(device).to(torch.float16)
            mean = fitted.mean.to(device).float()
    else:
        components = identity_basis(channels, torch.device(device))
        mean = torch.zeros(channels, device=device)
    if centred is None and mean is not None:
        centred = body.sub_(mean)  # the body's float32 rows are not read again
    return PreparedKeys(
        method=config.method, group_size=config.group_size, num_sinks_config=config.num_sinks, keys_dtype=keys.dtype,
        kv_heads=kv_heads, head_dim=head_dim, stored_space=stored_space, key_space=key_space, rope=rope,
        storage=storage, offset=offset, explicit=explicit, rounded=rounded, flat=flat, num_sinks=num_sinks,
        token_group=group_size, n_groups=n_groups, fitted=fitted, shared_fp=shared_fp, shared=basis is not None,
        components=components, mean=mean, centred=centred, rope_tables=rope_tables,
    )


def compress(
    keys: torch.Tensor,
    config: CodecConfig | None = None,
    *,
    positions: torch.Tensor | None = None,
    rope: RopeConfig | None = None,
    key_space: str = "pre_rope",
    basis: Basis | None = None,
    limits: CostLimits | None = None,
) -> CompressedKeys:
    """Compress the keys of one layer of one sequence.

    Args:
        keys: [tokens, kv_heads, head_dim], float16/bfloat16/float32, finite.
        config: :class:`CodecConfig`; the default is svdq at 1.5 true bits per element.
        positions: int [tokens] absolute positions; default ``0..tokens-1``.
        rope: the model's RoPE; required when ``key_space="post_rope"`` for svdq, and needed
            later to return post-RoPE keys or to attend.
        key_space: ``"pre_rope"`` or ``"post_rope"``, the space ``keys`` are in.
        basis: a shared calibrated :class:`Basis` (svdq only); the blob then stores only its
            fingerprint and loading it needs the same basis.
        limits: :class:`CostLimits` checked before any work (default: the library's).

    Raises InvalidInputError for malformed keys or options, ResourceExhaustedError for keys
    beyond ``limits``. The same keys under several budgets: :func:`prepare` once, then
    :func:`compress_prepared` per budget (the same bytes).
    """
    config = config or CodecConfig()
    return compress_prepared(prepare(keys, config, positions=positions, rope=rope, key_space=key_space, basis=basis,
                                     limits=limits), config)


def compress_prepared(prepared: PreparedKeys, config: CodecConfig | None = None) -> CompressedKeys:
    """:func:`compress` of the keys :func:`prepare` made ready, under ``config``: the bytes a
    plain compress gives. ``config`` may differ from the prepared one in ``bits_per_element``
    and ``schedule`` only; ``prepared`` is not modified."""
    return compress_restored(prepared, config)[0]


def compress_restored(prepared: PreparedKeys,
                      config: CodecConfig | None = None) -> tuple[CompressedKeys, torch.Tensor | None]:
    """:func:`compress_prepared`, and the float32 [body tokens, C] pre-RoPE reconstruction of
    the quantized tokens (before exact rows replace theirs) when choosing exact tokens
    computed it (else None): :func:`decompress` ``body=`` takes it instead of computing it
    again (the same bits)."""
    quantized = quantize_prepared(prepared, config)
    return finish_quantized(prepared, quantized), quantized.body


@dataclass
class QuantizedKeys:
    """A compress of prepared keys before its codes are packed (:func:`quantize_prepared`):
    what the probe scoring of :func:`svdq.kv.compress_kv` needs of every candidate, where only
    the chosen one is packed and stored (:func:`finish_quantized`)."""

    config: CodecConfig
    channel_bits: torch.Tensor  # int64 [C]
    kept_bits: torch.Tensor
    basis_columns: torch.Tensor
    components: torch.Tensor
    mean: torch.Tensor
    codes: torch.Tensor  # uint8 [groups, group_size, r], unpacked
    scales: torch.Tensor
    mins: torch.Tensor
    exact_index: torch.Tensor  # body-relative
    exact_rows: torch.Tensor  # float32 rows (corrected reconstructions or the rounded keys)
    exact: dict
    body: torch.Tensor | None  # float32 [body tokens, C] pre-RoPE reconstruction, or None
    #: with ``restore``: the float32 [tokens, C] buffer ``body`` is the body rows of, which
    #: :func:`restored_quantized` fills and returns (no second copy of every key)
    full: torch.Tensor | None = None


def quantize_prepared(prepared: PreparedKeys, config: CodecConfig | None = None, *,
                      restore: bool = False) -> QuantizedKeys:
    """The allocation, quantization and exact tokens of :func:`compress_prepared`, codes not
    yet packed; ``restore`` computes the body's reconstruction even without exact tokens (the
    products and order of :func:`decompress`, so the same bits)."""
    config = config or CodecConfig()
    if (config.method, config.group_size, config.num_sinks) != (prepared.method, prepared.group_size,
                                                                prepared.num_sinks_config):
        raise InvalidInputError(
            f"keys prepared for method={prepared.method!r}, group_size={prepared.group_size}, "
            f"num_sinks={prepared.num_sinks_config} cannot be compressed with method={config.method!r}, "
            f"group_size={config.group_size}, num_sinks={config.num_sinks}: only the bit budget may differ"
        )
    rounded, flat = prepared.rounded, prepared.flat
    tokens, channels = rounded.shape
    kv_heads, head_dim = prepared.kv_heads, prepared.head_dim
    num_sinks, group_size, n_groups = prepared.num_sinks, prepared.token_group, prepared.n_groups
    body_end = num_sinks + n_groups * group_size
    device = rounded.device
    components, mean, centred = prepared.components, prepared.mean, prepared.centred
    if components is None:
        # Nothing to quantize and no shared basis: without a schedule the budget keeps no
        # channel and later appends quantize none either, so only the mean is stored and the
        # O(C^3) fit would be wasted; a schedule keeps channels of a basis fitted on every key.
        if config.schedule is None:
            fitted = Basis(flat.to(torch.float64).mean(dim=0).float(), flat.new_zeros(channels, 0),
                           flat.new_zeros(0))
        else:
            fitted = fit_basis(flat)
        components = fitted.components.to(device).to(torch.float16)
        mean = fitted.mean.to(device).float()
        centred = flat[num_sinks:body_end] - mean  # no rows: nothing of the shared buffer changes
    if config.method == "fp16":
        channel_bits = torch.zeros(channels, dtype=torch.int64)
    elif config.method == "kivi":
        channel_bits = torch.full((channels,), config.bits, dtype=torch.int64)
    elif config.schedule is not None:
        channel_bits = allocate_schedule(config.schedule, channels)
    elif n_groups == 0:
        channel_bits = torch.zeros(channels, dtype=torch.int64)
    else:
        channel_bits = _allocate(prepared.table, config, group_size, tokens, kv_heads, head_dim, num_sinks,
                                 n_groups, stored_basis=not prepared.shared, rope=prepared.rope,
                                 explicit_positions=prepared.explicit is not None, plans=prepared.plans)
    channel_bits = channel_bits.to(device)
    kept = torch.nonzero(channel_bits).flatten()
    kept_bits = channel_bits[kept]
    basis_columns = components[:, kept]  # one gather of [C, r] (~2 ms at C = 1024), not one per use
    # Only the kept columns are projected: the exact computation append() repeats (_encode).
    codes, scales, mins = _encode(centred, basis_columns, kept_bits, group_size, config.method)
    full = torch.empty(tokens, channels, device=device) if restore and n_groups else None
    out = full[num_sinks:body_end] if full is not None else None
    exact_index, exact_rows, restored_body = _exact_tokens(rounded[num_sinks:body_end], codes, scales, mins, mean,
                                                           basis_columns, config.exact_count(n_groups * group_size),
                                                           out=out)
    exact = {}
    if config.exact_bits != 16 and exact_index.numel():
        # reconstruct_tokens of the packed codes (what the loader computes): unpacking gives
        # back these codes, so the same bits without packing first.
        restored = _reconstruct_from_codes(codes, scales, mins, group_size, basis_columns, mean, exact_index)
        exact_codes, exact_scales, exact_mins, unpacked = _encode_correction(exact_rows - restored, kv_heads,
                                                                             config.exact_bits)
        exact = {"exact_bits": config.exact_bits, "exact_codes": exact_codes, "exact_scales": exact_scales,
                 "exact_mins": exact_mins}
        # exact_corrected_rows of the packed codes, from the codes before packing (unpacking gives them back)
        exact_rows = _corrected_rows(restored, unpacked, exact_scales, exact_mins)
    if out is not None and restored_body is None:
        restored_body = torch.matmul(dequantize_groups(codes, scales, mins).reshape(n_groups * group_size, -1),
                                     basis_columns.float().T, out=out)
        restored_body += mean
    return QuantizedKeys(config, channel_bits, kept_bits, basis_columns, components, mean, codes, scales, mins,
                         exact_index, exact_rows, exact, restored_body, full)


def finish_quantized(prepared: PreparedKeys, quantized: QuantizedKeys) -> CompressedKeys:
    """The :class:`CompressedKeys` of :func:`quantize_prepared`'s result: its codes packed."""
    config, kept_bits, basis_columns, mean = quantized.config, quantized.kept_bits, quantized.basis_columns, \
        quantized.mean
    rounded = prepared.rounded
    kv_heads, head_dim = prepared.kv_heads, prepared.head_dim
    num_sinks, group_size = prepared.num_sinks, prepared.token_group
    body_end = num_sinks + prepared.n_groups * group_size
    packed = pack_codes(quantized.codes, kept_bits)
    scales, mins, exact_index, exact_rows, exact = quantized.scales, quantized.mins, quantized.exact_index, \
        quantized.exact_rows, quantized.exact
    channel_bits, components = quantized.channel_bits, quantized.components
    storage = prepared.storage
    compressed = CompressedKeys(
        method=config.method,
        kv_heads=kv_heads,
        head_dim=head_dim,
        input_dtype=prepared.keys_dtype,
        storage_dtype=storage,
        stored_space=prepared.stored_space,
        rope=prepared.rope,
        group_size=group_size,
        num_sinks=config.num_sinks if config.method != "fp16" else 0,
        position_offset=prepared.offset,
        channel_bits=channel_bits.to(torch.uint8),
        basis=components if config.method == "kivi" else basis_columns,
        mean=mean,
        sinks=rounded[:num_sinks].clone(),  # clones: a view would keep every rounded key alive
        codes=packed,
        scales=scales,
        mins=mins,
        tail=rounded[body_end:].clone(),
        positions=prepared.explicit,
        shared_basis=prepared.shared_fp,
        input_space=prepared.key_space,
        exact_index=exact_index + num_sinks,
        exact_rows=exact_rows.to(storage),
        **exact,
    )
    if config.method == "svdq" and config.schedule is None:
        _warn_if_over_budget(compressed, config.bits_per_element)
    return compressed


def quantized_nbytes(prepared: PreparedKeys, quantized: QuantizedKeys) -> int:
    """:attr:`CompressedKeys.nbytes` of :func:`finish_quantized`'s result, from the shapes alone:
    a caller that compares candidates by their size packs only the one it keeps."""
    from .format import _layout

    config = quantized.config
    return sum(_layout(
        config.method, prepared.kv_heads * prepared.head_dim, prepared.tokens,
        config.num_sinks if config.method != "fp16" else 0, prepared.token_group, quantized.kept_bits.cpu().numpy(),
        prepared.rope is not None, prepared.shared_fp is None, prepared.explicit is not None,
        quantized.exact_index.numel(), quantized.exact.get("exact_bits", 16), prepared.kv_heads,
    ).values())


def restored_quantized(prepared: PreparedKeys, quantized: QuantizedKeys, key_space: str) -> torch.Tensor:
    """float32 [tokens, kv_heads, head_dim]: :func:`decompress` of :func:`finish_quantized`'s
    keys in ``key_space`` (the same bits), from ``quantized.body`` and without packing."""
    rounded = prepared.rounded
    tokens, channels = rounded.shape
    num_sinks = prepared.num_sinks
    body_end = num_sinks + prepared.n_groups * prepared.token_group
    body = quantized.body
    if body is None and body_end > num_sinks:
        raise InvalidInputError("quantize_prepared(restore=True) gives the reconstruction this needs")
    if quantized.full is not None and body is not None and body.data_ptr() == quantized.full[num_sinks:].data_ptr():
        flat = quantized.full  # its body rows already hold the reconstruction (written in place)
    else:
        flat = torch.empty(tokens, channels, device=rounded.device)
        if body is not None:
            flat[num_sinks:body_end] = body
    flat[:num_sinks] = rounded[:num_sinks]
    if quantized.exact_index.numel():
        flat[quantized.exact_index + num_sinks] = quantized.exact_rows.to(prepared.storage).float()
    flat[body_end:] = rounded[body_end:]
    keys = flat.reshape(tokens, prepared.kv_heads, prepared.head_dim)
    if key_space != prepared.stored_space:
        if prepared.rope is None:
            raise InvalidInputError(f"keys are stored {prepared.stored_space} without a rope description; cannot "
                                    f"return {key_space}")
        keys = prepared.rotate(keys, key_space)
    return keys


_WARNED: set = set()


def _warn_once(key: tuple, message: str | Callable[[], str]) -> None:
    """Log ``message`` the first time ``key`` is seen; a server compressing every layer of
    every upload would otherwise repeat it per call. Bounded: past 1024 keys it stays quiet.
    A callable message is built only when it is logged (short sequences warn on every
    compress, and measuring what the message says costs more than the check)."""
    if key in _WARNED or len(_WARNED) >= 1024:
        return
    _WARNED.add(key)
    log.warning(message() if callable(message) else message)


def _warn_if_over_budget(compressed: CompressedKeys, target: float) -> None:
    """Say when the fixed costs made the stored bits exceed the asked budget (short sequences,
    tiny budgets): the keys are kept, at the bits reported here and in ``bits_per_element``."""
    stored = compressed.bits_per_element
    if stored <= 1.05 * target + 0.01:
        return

    def message() -> str:
        from .format import fixed_size

        fixed = 8 * fixed_size(method="svdq", channels=compressed.channels, tokens=compressed.num_tokens,
                               num_sinks=compressed.num_sinks, group_size=compressed.group_size,
                               has_rope=compressed.rope is not None, stored_basis=compressed.shared_basis is None,
                               explicit_positions=compressed.positions is not None,
                               exact_tokens=compressed.num_exact, exact_bits=compressed.exact_bits,
                               kv_heads=compressed.kv_heads)
        fixed_per_element = fixed / (compressed.num_tokens * compressed.channels)
        return (f"svdq: asked for {target:g} bits per element, stored {stored:.3f} for {compressed.num_tokens} "
                f"tokens x {compressed.channels} channels: the fixed costs alone (header, mean, full-precision "
                f"sinks, tail and exact tokens) take {fixed_per_element:.3f} and every kept channel pays its "
                "scales, minimums and basis column; longer sequences, smaller token groups or a shared basis come "
                "closer to the budget")

    _warn_once(("budget", target, compressed.channels, compressed.group_size), message)


def _exact_tokens(body: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  mean: torch.Tensor, basis_columns: torch.Tensor, count: int,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(body-relative int64 [count] ascending indices, rows [count, C] in ``body``'s dtype) of
    the body tokens whose reconstruction from ``codes`` is farthest from ``body`` [n, C]
    (pre-RoPE; compress passes the 16-bit rounded keys it stores), and that float32
    reconstruction [n, C] (None for no exact token: none is computed).

    The absolute error, not the error relative to the token's norm: attention scores are dot
    products, so a large error moves a score as much whatever the key's own length."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=body.device), body.new_zeros(0, body.shape[1]), None
    # What decompress computes for these rows (the same products, in the same order), into
    # ``out`` [n, C] when given (decompress's own in-place product and sum: the same bits).
    latent = dequantize_groups(codes, scales, mins).reshape(body.shape[0], -1)
    if out is None:
        restored = latent @ basis_columns.float().T + mean
    else:
        restored = torch.matmul(latent, basis_columns.float().T, out=out)
        restored += mean
    # In place on one fresh difference: the bits of (restored - body).pow(2), without a
    # second [n, C] temporary (~20 ms of fresh pages at 8k x 1024).
    error = torch.sub(restored, body).square_().sum(dim=1)
    index = torch.sort(torch.topk(error, count).indices).values
    return index, body[index], restored


#: kept latent channels at most this wide are projected by bfloat16 products (float32
#: accumulation, the result rounded to bfloat16): their step is at least 1/15 of the group's
#: range, >30x that rounding; wider channels' steps come within 4x of it, so they stay float32
LOW_PRECISION_MAX_WIDTH = 4


#: the float32 projection's basis is padded with zero columns to a multiple of this many
PROJECTION_COLUMNS = 8


def _projected_chunks(centred: torch.Tensor, basis_columns: torch.Tensor, kept_bits: torch.Tensor,
                      low_precision: bool) -> Iterator[torch.Tensor]:
    """Latent channels float32 [<= GRAM_CHUNK, r] of centred pre-RoPE keys float32 [tokens, C]
    on the kept ``basis_columns`` [C, r] of widths ``kept_bits`` [r], :data:`GRAM_CHUNK` tokens
    at a time, in order. ``low_precision`` (svdq) projects the channels of at most
    :data:`LOW_PRECISION_MAX_WIDTH` bits by bfloat16 products where they are used
    (:func:`_bfloat16_products`: where they measure faster); without it, or on a CPU
    where they are slower, every product is float32.

    Chunks of tokens: no bfloat16 copy of every key at once, and what a chunk's latent feeds
    stays in cache. Each row of a product depends on that row alone (checked on this oneDNN
    and MKL for 64 to 8192 rows), so the chunking does not change the result, and an append's
    groups project as they would in one compress."""
    low_precision = low_precision and _bfloat16_products(centred.device)
    narrow = (kept_bits <= LOW_PRECISION_MAX_WIDTH) if low_precision else torch.zeros_like(kept_bits, dtype=torch.bool)
    wide = ~narrow
    any_narrow, any_wide = bool(narrow.any()), bool(wide.any())
    # Whole columns are not gathered: a product's last bits depend on its operand's layout.
    low_basis = wide_basis = None
    if any_narrow:
        low_basis = (basis_columns[:, narrow] if any_wide else basis_columns).to(torch.bfloat16)
    kept = basis_columns.shape[1]
    padded = False
    if not any_narrow:  # also no kept channel at all: an empty [tokens, 0] product
        wide_basis = basis_columns.float()
        if centred.device.type == "cpu" and kept % PROJECTION_COLUMNS:
            # Zero columns up to a multiple of PROJECTION_COLUMNS: MKL's float32 product runs
            # 1.5x as fast at 792 columns as at 787 (its kernels' width), and every kept
            # column's entries are the same dot products, so the same bits (checked on the
            # blobs, bench/codec_change.py, and tests/test_codec.py).
            wide_basis = torch.cat([wide_basis, wide_basis.new_zeros(wide_basis.shape[0],
                                                                     -kept % PROJECTION_COLUMNS)], dim=1)
            padded = True
    elif any_wide:
        wide_basis = basis_columns[:, wide].float()
    for start in range(0, centred.shape[0], GRAM_CHUNK):
        rows = centred[start:start + GRAM_CHUNK]
        if padded:
            yield (rows @ wide_basis)[:, :kept]  # the kept columns, a strided view
        elif not any_narrow:
            yield rows @ wide_basis
        elif not any_wide:
            yield (rows.to(torch.bfloat16) @ low_basis).float()
        else:
            latent = rows.new_empty(rows.shape[0], basis_columns.shape[1])
            latent[:, narrow] = (rows.to(torch.bfloat16) @ low_basis).float()
            latent[:, wide] = rows @ wide_basis
            yield latent


def _encode(centred: torch.Tensor, basis_columns: torch.Tensor, kept_bits: torch.Tensor, group_size: int,
            method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 [groups, group_size, r], float16 scales and minimums [groups, r] of the
    centred keys float32 [groups * group_size, C] (:func:`_projected_chunks`, then
    :func:`svdq.quant.quantize_groups`); compress and append share it, so an appended group
    quantizes as it would have in one compress. Each chunk of whole groups is quantized as it
    is projected: the float32 latent of every key never exists at once (~25 MB of fresh pages
    and a pass through memory at 8k tokens x 800 channels). The kivi baseline quantizes the
    keys' own channels: its basis is the identity and keeps every channel, so a product with
    it would only cost ``tokens * C * C`` operations."""
    kept = basis_columns.shape[1]
    groups = centred.shape[0] // group_size
    device = centred.device
    codes = torch.empty(groups, group_size, kept, dtype=torch.uint8, device=device)
    scales = torch.empty(groups, kept, dtype=torch.float16, device=device)
    mins = torch.empty(groups, kept, dtype=torch.float16, device=device)
    first = 0
    if method == "kivi":
        chunks = (centred[start:start + GRAM_CHUNK] for start in range(0, centred.shape[0], GRAM_CHUNK))
    else:
        chunks = _projected_chunks(centred, basis_columns, kept_bits, method == "svdq")
    for latent in chunks:
        count = latent.shape[0] // group_size  # GRAM_CHUNK is whole groups
        rows = slice(first, first + count)
        codes[rows], scales[rows], mins[rows] = quantize_groups(latent.reshape(count, group_size, kept), kept_bits)
        first = rows.stop
    return codes, scales, mins


def _reconstruct_from_codes(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                            basis_columns: torch.Tensor, mean: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """:func:`reconstruct_tokens` from the unpacked codes [groups, group_size, r]."""
    groups, inside = index // group_size, index % group_size
    unique, which = torch.unique(groups, return_inverse=True)
    latent = dequantize_groups(codes[unique], scales[unique], mins[unique])
    return latent[which, inside] @ basis_columns.float().T + mean


def reconstruct_tokens(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, kept_bits: torch.Tensor,
                        group_size: int, basis_columns: torch.Tensor, mean: torch.Tensor,
                        index: torch.Tensor) -> torch.Tensor:
    """float32 [k, C] pre-RoPE reconstruction of the body tokens ``index`` (body-relative) from
    the packed ``codes`` of their groups only. Compress and the loader both call it, so an
    exact token's corrected row is the same bytes on both sides."""
    groups, inside = index // group_size, index % group_size
    unique, which = torch.unique(groups, return_inverse=True)
    latent = dequantize_groups(unpack_codes(codes[unique], kept_bits, group_size), scales[unique], mins[unique])
    return latent[which, inside] @ basis_columns.float().T + mean


def _encode_correction(residual: torch.Tensor, kv_heads: int, bits: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, torch.Tensor]:
    """``bits``-bit codes (packed, [k, kv_heads, head_dim * bits / 8]), float16 scales and
    minimums [k, kv_heads] of ``residual`` [k, C], one range per token and head, and the codes
    unpacked (uint8 [k, kv_heads, head_dim]): the error of a badly reconstructed key sits in a
    few dropped latent channels, so its range per head is small next to the key's own."""
    tokens = residual.shape[0]
    runs = residual.reshape(tokens * kv_heads, -1, 1)
    codes, scales, mins = quantize_groups(runs, torch.tensor([bits]))
    unpacked = codes.reshape(tokens, kv_heads, -1)
    return pack_rows(unpacked, bits), scales.reshape(tokens, kv_heads), mins.reshape(tokens, kv_heads), unpacked


def exact_corrected_rows(restored: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                         bits: int) -> torch.Tensor:
    """float32 [k, C]: the reconstruction ``restored`` [k, C] plus its stored correction."""
    return _corrected_rows(restored, unpack_rows(codes, bits), scales, mins)


def _corrected_rows(restored: torch.Tensor, unpacked: torch.Tensor, scales: torch.Tensor,
                    mins: torch.Tensor) -> torch.Tensor:
    """:func:`exact_corrected_rows` from the unpacked codes uint8 [k, kv_heads, head_dim]."""
    correction = unpacked.float() * scales.float()[..., None] + mins.float()[..., None]
    return restored + correction.reshape(restored.shape)


def _sample_table(centred: torch.Tensor, components: torch.Tensor, group_size: int,
                  sample_tokens: int = 2048) -> torch.Tensor:
    """The error of every latent channel at every width (:func:`svdq.quant.distortion_table`)
    measured on evenly spaced token groups holding about ``sample_tokens`` tokens and scaled
    to all groups: enough to rank channels, and it keeps the full [tokens, C] projection and
    nine trial quantizations of it out of the hot path. ``centred`` are the body tokens minus
    the mean, float32 [n_groups * group_size, C]. It does not depend on the budget."""
    channels = centred.shape[1]
    n_groups = centred.shape[0] // group_size
    groups = centred.reshape(n_groups, group_size, channels)
    sample_groups = max(4, sample_tokens // group_size)
    if n_groups > sample_groups:
        groups = groups[torch.linspace(0, n_groups - 1, sample_groups, device=centred.device).round().long()]
    # bfloat16 products where they are fast: the table ranks channels by errors that their
    # rounding does not move.
    sample = groups.reshape(-1, channels)
    if _bfloat16_products(centred.device):
        sample = (sample.to(torch.bfloat16) @ components.to(torch.bfloat16)).float()
    else:
        sample = sample @ components.float()
    sample = sample.reshape(-1, group_size, channels)
    # Errors of the sample stand for all groups: scale them so they weigh right against bit costs.
    return distortion_table(sample) * (n_groups / sample.shape[0])


def _allocate(sample_table: torch.Tensor, config, group_size, tokens, kv_heads, head_dim, num_sinks, n_groups, *,
              stored_basis, rope, explicit_positions, plans: dict | None = None) -> torch.Tensor:
    """Budget allocation: spend what the fixed costs leave of ``bits_per_element`` on the
    channels of ``sample_table`` (:func:`_sample_table`, not modified). ``plans`` keeps the
    budget-free part (:class:`~svdq.allocation.AllocationPlan`) for the next budget of the
    same prepared keys: at 383 tokens it was ~2/3 of each candidate's allocation."""
    from .format import fixed_size

    channels = kv_heads * head_dim
    quantized = n_groups * group_size
    # The fixed bytes of these keys depend on the config only through its exact tokens.
    fixed_key = ("fixed", config.exact_count(quantized), config.exact_bits)
    fixed_bits = None if plans is None else plans.get(fixed_key)
    if fixed_bits is None:
        fixed_bits = 8 * fixed_size(
            method="svdq", channels=channels, tokens=tokens, num_sinks=num_sinks, group_size=group_size,
            has_rope=rope is not None, stored_basis=stored_basis, explicit_positions=explicit_positions,
            exact_tokens=fixed_key[1], exact_bits=fixed_key[2], kv_heads=kv_heads,
        )
        if plans is not None:
            plans[fixed_key] = fixed_bits
    budget = config.bits_per_element * tokens * channels - fixed_bits
    # Sequences too short to amortise the fixed costs still get half the budget's bits for
    # their quantized tokens' codes and metadata, rather than none; the true bits per element
    # then exceed the target (reported as such).
    budget = max(budget, config.bits_per_element * quantized * channels * 0.5)
    per_channel_meta = 32 * n_groups + (16 * channels if stored_basis else 0)
    key = (config.noise_averaging, quantized, per_channel_meta)
    plan = None if plans is None else plans.get(key)
    if plan is None:
        table = sample_table.clone()
        table[:, 1:] /= config.noise_averaging
        plan = AllocationPlan(table, quantized, per_channel_meta)
        if plans is not None:
            plans[key] = plan
    return plan.allocate(budget)


def _latent_rows(compressed: CompressedKeys) -> torch.Tensor:
    """float32 [n_groups * group_size, r] dequantized latent channels."""
    codes = unpack_codes(compressed.codes, compressed.kept_bits, compressed.group_size)
    latent = dequantize_groups(codes, compressed.scales, compressed.mins)
    return latent.reshape(compressed.num_groups * compressed.group_size, compressed.kept_bits.numel())


def decompress(
    compressed: CompressedKeys | bytes, key_space: str | None = None, dtype: torch.dtype | None = None,
    *, body: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct keys [tokens, kv_heads, head_dim].

    Args:
        compressed: :class:`CompressedKeys`, or the bytes of :func:`svdq.format.to_bytes`
            (parsed with ``from_bytes``; a blob made with a shared basis needs ``from_bytes(blob, basis)``).
        key_space: ``"pre_rope"`` or ``"post_rope"``; default: the space the keys came in.
        dtype: output dtype; default: the dtype the keys came in.
        body: the reconstruction of the quantized tokens that :func:`compress_restored` gave
            with ``compressed`` (svdq), used instead of computing it again.
    """
    if isinstance(compressed, (bytes, bytearray, memoryview)):
        from .format import from_bytes  # format imports this module

        compressed = from_bytes(compressed)
    if not isinstance(compressed, CompressedKeys):
        raise InvalidInputError(f"decompress takes CompressedKeys (from compress or from_bytes) or blob bytes, got "
                                f"{type(compressed).__name__}")
    key_space = key_space or compressed.input_space
    if key_space not in KEY_SPACES:
        raise InvalidInputError(f"key_space must be one of {KEY_SPACES}, got {key_space!r}")
    # Sinks, body and tail written into one buffer: no concatenated copy of every key.
    sinks, tail = compressed.sinks.shape[0], compressed.tail.shape[0]
    body_end = compressed.num_tokens - tail
    flat = torch.empty(compressed.num_tokens, compressed.channels, device=compressed.codes.device)
    flat[:sinks] = compressed.sinks
    if compressed.method == "kivi":  # identity basis, zero mean: the latent rows are the keys
        flat[sinks:body_end] = _latent_rows(compressed)
    elif body is not None:
        if body.shape != (body_end - sinks, compressed.channels):
            raise InvalidInputError(f"body must be the [{body_end - sinks}, {compressed.channels}] reconstruction of "
                                    f"these keys' quantized tokens, got {list(body.shape)}")
        flat[sinks:body_end] = body
    else:
        torch.matmul(_latent_rows(compressed), compressed.basis.float().T, out=flat[sinks:body_end])
        flat[sinks:body_end] += compressed.mean
    if compressed.num_exact:
        flat[compressed.exact_index] = compressed.exact_rows.float()
    flat[body_end:] = compressed.tail
    keys = flat.reshape(-1, compressed.kv_heads, compressed.head_dim)
    if key_space != compressed.stored_space:
        rope = compressed.rope
        if rope is None:
            raise InvalidInputError(
                f"keys are stored {compressed.stored_space} without a rope description; cannot return {key_space}"
            )
        rotate = apply_rope if key_space == "post_rope" else undo_rope
        keys = rotate(keys, compressed.token_positions(), rope)
    dtype = dtype or compressed.input_dtype
    # Finite stored keys can leave a narrower output dtype's range (float32 keys read as
    # float16). Rounding is monotonic, so the largest magnitude tells whether any key
    # overflows; scanning the float32 keys is several times faster than the 16-bit output.
    if keys.numel():
        low, high = torch.aminmax(keys)
        peak = torch.stack([low.abs(), high.abs()]).amax()
        if not bool(torch.isfinite(peak.to(dtype))):
            raise InvalidInputError(f"reconstructed keys do not fit {dtype} (they overflow to Inf); ask for float32")
    return keys.to(dtype)


def append(
    compressed: CompressedKeys, keys: torch.Tensor, positions: torch.Tensor | None = None,
    limits: CostLimits | None = None,
) -> CompressedKeys:
    """Append decode-time keys [new_tokens, kv_heads, head_dim] and return the new state.

    New keys come in the same space as the original input (post-RoPE keys need their
    positions; by default they continue after the last stored position). They fill the sinks
    first, then the full-precision tail; every time the tail holds a full group, that group is
    projected on the existing basis and quantized with the existing channel widths. The
    result equals compressing all the keys at once with the same basis and widths. The input
    object is not modified.
    """
    _check_keys(keys, "appended keys", limits, total_tokens=compressed.num_tokens + keys.shape[0], operation="append")
    if keys.shape[1:] != (compressed.kv_heads, compressed.head_dim):
        raise InvalidInputError(
            f"appended keys must have kv_heads={compressed.kv_heads}, head_dim={compressed.head_dim}, "
            f"got {tuple(keys.shape[1:])}"
        )
    new = keys.shape[0]
    if new == 0:
        return compressed
    device = compressed.codes.device
    keys = keys.to(device)
    old_positions = compressed.token_positions()
    if positions is None:
        start = int(old_positions[-1]) + 1 if old_positions.numel() else compressed.position_offset
        new_positions = torch.arange(new, device=device) + start
    else:
        _, explicit = _positions_for(new, positions, device)
        new_positions = explicit if explicit is not None else positions.to(device=device, dtype=torch.int64)
    work = keys.float()
    if compressed.input_space != compressed.stored_space:
        work = undo_rope(keys, new_positions, _require_rope(compressed.rope))
    if compressed.storage_dtype == torch.float16 and work.abs().max() > torch.finfo(torch.float16).max:
        raise InvalidInputError("appended keys exceed the float16 range of this sequence's full-precision tokens")
    flat = work.reshape(new, -1).to(compressed.storage_dtype).float()

    all_positions = torch.cat([old_positions, new_positions])
    offset, explicit = _positions_for(all_positions.numel(), all_positions, device)

    sinks_missing = 0 if compressed.method == "fp16" else max(0, compressed.num_sinks - compressed.sinks.shape[0])
    to_sinks = flat[:sinks_missing]
    pending = torch.cat([compressed.tail.float(), flat[sinks_missing:]])
    sinks = torch.cat([compressed.sinks, to_sinks.to(compressed.storage_dtype)])
    codes, scales, mins = compressed.codes, compressed.scales, compressed.mins
    if compressed.method != "fp16":
        full = pending.shape[0] // compressed.group_size
        if full:
            block = pending[: full * compressed.group_size]
            new_codes, new_scales, new_mins = _encode(block - compressed.mean, compressed.basis, compressed.kept_bits,
                                                      compressed.group_size, compressed.method)
            codes = torch.cat([codes, pack_codes(new_codes, compressed.kept_bits)])
            scales = torch.cat([scales, new_scales])
            mins = torch.cat([mins, new_mins])
            pending = pending[full * compressed.group_size :]
    storage = compressed.storage_dtype
    return replace(
        compressed,
        sinks=sinks,
        codes=codes,
        scales=scales,
        mins=mins,
        tail=pending.to(storage),
        position_offset=offset,
        positions=explicit,
        _cache={},
    )


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """||approximation - reference|| / ||reference|| in float64."""
    ref = reference.double()
    return float((approximation.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def check_group_bytes(compressed: CompressedKeys) -> None:
    """Internal consistency check used by the loader."""
    expected = group_bytes(compressed.kept_bits, compressed.group_size)
    if compressed.codes.shape[1] != expected:
        raise InvalidInputError(f"code rows have {compressed.codes.shape[1]} bytes, expected {expected}")


__all__ = [
    "Basis",
    "CodecConfig",
    "CompressedKeys",
    "CostLimits",
    "append",
    "check_cost",
    "compress",
    "compress_prepared",
    "compress_restored",
    "decompress",
    "fit_basis",
    "fit_layer_basis",
    "prepare",
    "relative_error",
]
