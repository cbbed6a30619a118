"""One budget for a layer's whole cache: keys and values split by measured effect on attention.

A user states true bits per KV element (or a ratio vs fp16); :func:`compress_kv` compresses
the layer's keys and values at every candidate split of those bits between them (each
codec's ``bits_per_element`` counts every byte of its blob; the values get what the keys'
blob leaves of the total, so any split costs the same) and keeps the split whose attention
output is closest to the uncompressed one.

The attention output is measured with probe queries: without the model's queries (a
storage service sees only keys and values), the layer's own post-RoPE keys at evenly spaced
positions stand in for them; they live in the query space, give each probe a causal
softmax over the tokens before it, and show which tokens the layer's keys make
distinguishable. The error of a split is ``sum ||softmax(q K^T / sqrt(D)) V - softmax(q
K_hat^T / sqrt(D)) V_hat||^2`` over probes and KV heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .codec import (
    MAX_BUDGET,
    Basis,
    CodecConfig,
    CompressedKeys,
    compress,
    finish_quantized,
    prepare,
    quantize_prepared,
    quantized_nbytes,
    restored_quantized,
)
from .errors import InvalidInputError
from .rope import RopeConfig, apply_rope
from .values import (
    DEFAULT_VALUE_CODEC,
    CompressedValues,
    ValueConfig,
    _latent_values,
    compress_values,
    prepare_values,
)

#: Default whole-cache budget: 2 true bits per KV element, 8x smaller than fp16.
DEFAULT_TOTAL_BITS = 2.0
#: Keys of a whole-cache budget: an eighth of the quantized keys (at least 4), the worst
#: reconstructed, also stored as 2-bit corrections, paid from the same budget. Rare tokens
#: such as a needle's digits are the keys a basis fits worst; at 2.0 bits this found every
#: needle at 1,024 and 4,096 tokens where 4 exact keys lost one (docs/quality.md, round 4).
DEFAULT_CACHE_KEY_CODEC = CodecConfig(exact_tokens=4, exact_share=0.125, exact_bits=2)
#: Candidate shares of the budget spent on keys (values get what the keys' blob leaves).
DEFAULT_KEY_SHARES = (0.25, 0.3125, 0.375, 0.4375, 0.5)
#: Value budget when the keys alone reach the whole one (the cache then stores more, and the
#: value codec says so).
MIN_VALUE_BITS = 0.5


@dataclass(frozen=True)
class CacheBudget:
    """A budget for keys and values together.

    Attributes:
        bits_per_element: true bits per KV element, keys' and values' serialized bytes over
            ``2 * tokens * kv_heads * head_dim`` elements; (0, 16].
        key_shares: candidate fractions of the budget spent on keys, each in (0, 1).
        key_codec: key settings (its ``bits_per_element`` is replaced by the split's); default
            :data:`DEFAULT_CACHE_KEY_CODEC`.
        value_codec: value settings (likewise).
        probe_queries: probe positions the split is measured with, 1..4096.
    """

    bits_per_element: float = DEFAULT_TOTAL_BITS
    key_shares: tuple[float, ...] = DEFAULT_KEY_SHARES
    key_codec: CodecConfig = DEFAULT_CACHE_KEY_CODEC
    value_codec: CodecConfig = DEFAULT_VALUE_CODEC
    probe_queries: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.bits_per_element, (int, float)) and 0 < self.bits_per_element <= MAX_BUDGET):
            raise InvalidInputError(f"cache bits_per_element must be in (0, {MAX_BUDGET}], got {self.bits_per_element!r}")
        shares = tuple(self.key_shares)
        if not shares or any(not (isinstance(s, (int, float)) and 0 < s < 1) for s in shares):
            raise InvalidInputError(f"key_shares must be fractions in (0, 1), got {self.key_shares!r}")
        object.__setattr__(self, "key_shares", shares)
        for name in ("key_codec", "value_codec"):
            codec = getattr(self, name)
            if not isinstance(codec, CodecConfig) or codec.method != "svdq" or codec.schedule is not None:
                raise InvalidInputError(f"{name} must be an svdq CodecConfig with a bit budget, got {codec!r}")
        if not (isinstance(self.probe_queries, int) and 1 <= self.probe_queries <= 4096):
            raise InvalidInputError(f"probe_queries must be an integer in 1..4096, got {self.probe_queries!r}")
        for share in shares:
            for part, fraction in (("keys", share), ("values", 1 - share)):
                bits = 2 * self.bits_per_element * fraction
                if bits > MAX_BUDGET:
                    raise InvalidInputError(f"key share {share} gives {part} {bits:.2f} bits per element, above "
                                            f"{MAX_BUDGET}; lower bits_per_element or pick shares nearer 0.5")

    def with_share(self, key_share: float | None) -> CacheBudget:
        """This budget with one calibrated key share (one compression per layer), or itself for None."""
        return self if key_share is None else replace(self, key_shares=(key_share,))

    @classmethod
    def from_ratio(cls, ratio: float, **kwargs) -> CacheBudget:
        """The budget that makes the cache ``ratio`` times smaller than fp16 (``16 / ratio`` bits)."""
        if not (isinstance(ratio, (int, float)) and ratio >= 1):
            raise InvalidInputError(f"compression ratio must be a number >= 1, got {ratio!r}")
        return cls(bits_per_element=16.0 / ratio, **kwargs)


@dataclass
class CompressedCache:
    """A layer's keys and values compressed under one :class:`CacheBudget`.

    ``key_share`` is the chosen split and ``split_errors`` the measured probe error of every
    candidate share (relative to the probes' output energy).
    """

    keys: CompressedKeys
    values: CompressedValues
    key_share: float
    split_errors: dict[float, float]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(1, 2 * self.keys.num_tokens * self.keys.channels)


def _future_mask(probe_positions: torch.Tensor, token_positions: torch.Tensor) -> torch.Tensor:
    """bool [1, P, S]: the tokens after each probe, which its causal softmax leaves out."""
    return token_positions[None, None, :] > probe_positions[None, :, None]


def _attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, probe_positions: torch.Tensor,
               token_positions: torch.Tensor, future: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of probes [P, H, D] over keys/values [S, H, D] -> [P, H, D] (float32);
    ``future`` is :func:`_future_mask` of the positions when the caller keeps it."""
    # In place on the fresh scores: the same bits as dividing and masking into new tensors,
    # without two [P, H, S] copies (7 of 25 ms at 64 probes x 3 heads x 3,968 tokens).
    # Per head [H, P, S]: one batched product that reads the keys [S, H, D] in place (each
    # head's rows with a stride), where einsum first copied them to [H, D, S] (42 -> 26 ms at
    # 64 probes x 8 x 8,192 x 128); the same dot products, so the same bits (checked against
    # einsum at 8 x 128 and 3 x 64). The softmax runs along each row either way.
    scores = torch.matmul(queries.transpose(0, 1), keys.permute(1, 2, 0)).div_(math.sqrt(keys.shape[-1]))
    if future is None:
        future = _future_mask(probe_positions, token_positions)
    weights = torch.softmax(scores.masked_fill_(future, -math.inf), dim=-1)
    return torch.matmul(weights, values.transpose(0, 1)).transpose(0, 1)


def compress_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    budget: CacheBudget | None = None,
    *,
    positions: torch.Tensor | None = None,
    rope: RopeConfig | None = None,
    key_space: str = "pre_rope",
    key_basis: Basis | None = None,
    value_basis: Basis | None = None,
) -> CompressedCache:
    """Compress one layer's keys and values [tokens, kv_heads, head_dim] under one budget.

    Keys take the arguments of :func:`svdq.codec.compress`, values those of
    :func:`svdq.values.compress_values`. Every candidate split is compressed (keys once per
    key budget, values once per value budget) and the one with the smallest probe error is
    returned. The candidates share what does not depend on the budget (:func:`svdq.codec.prepare`:
    RoPE undone, rounding, the angles of the positions, the basis fit or centring, the
    allocation's error table and plan), so each one costs its allocation, quantization and
    probe error (only the chosen split's keys and values are packed); the bytes are those of a
    plain compress per candidate.
    """
    budget = budget or CacheBudget()
    if not isinstance(values, torch.Tensor) or values.shape != keys.shape:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise InvalidInputError(f"values must have the keys' shape {tuple(keys.shape)}, got {shape}")
    if key_space == "post_rope" and rope is None:  # before any candidate is compressed
        raise InvalidInputError("post-RoPE keys need a rope description")

    def key_config(share: float) -> CodecConfig:
        return replace(budget.key_codec, bits_per_element=2 * budget.bits_per_element * share)

    def value_config(key_bits: float) -> ValueConfig:
        # Values get what the keys' blob (``key_bits`` per element) left of the whole budget:
        # keys store more than their share when their fixed costs (16-bit tail, exact tokens)
        # exceed it, and the cache as a whole must still weigh the bits asked for.
        value_bits = max(2 * budget.bits_per_element - key_bits, MIN_VALUE_BITS)
        return ValueConfig(codec=replace(budget.value_codec, bits_per_element=value_bits))

    if len(budget.key_shares) == 1:  # a calibrated split: one compress each, one float32 copy at a time
        share = budget.key_shares[0]
        compressed_keys = compress(keys, key_config(share), positions=positions, rope=rope, key_space=key_space,
                                   basis=key_basis)
        compressed_values = compress_values(values, value_config(compressed_keys.bits_per_element), basis=value_basis)
        return CompressedCache(compressed_keys, compressed_values, share, {share: math.nan})

    # What does not depend on the split (checks, RoPE undone, rounding, centring, the
    # allocation's error tables) is done once for keys and once for values, and every
    # candidate compresses from it: the bytes of one compress per candidate, at a fraction.
    prepared_keys = prepare(keys, budget.key_codec, positions=positions, rope=rope, key_space=key_space,
                            basis=key_basis)
    prepared_values = prepare_values(values, ValueConfig(codec=budget.value_codec), basis=value_basis)

    tokens = keys.shape[0]
    token_positions = prepared_keys.token_positions()
    # Post-RoPE keys are the probes and what they are scored against (the space queries see).
    # float32: the candidates' errors differ by far more than its rounding (float64 took 2x
    # as long, ~25% of a five-candidate call on an AVX2 CPU, and picked the same splits on
    # SmolLM2's layers, docs/quality.md round 9).
    reference_keys = keys.float() if key_space == "post_rope" or rope is None else \
        apply_rope(keys.float(), token_positions, rope)
    probe_index = torch.linspace(tokens // 2, tokens - 1, min(budget.probe_queries, tokens)).round().long().unique()
    probe_index = probe_index.to(keys.device)
    probes = reference_keys[probe_index]
    probe_positions = token_positions[probe_index]
    future = _future_mask(probe_positions, token_positions)  # the same for every candidate
    reference = _attention(probes, reference_keys, values.float(), probe_positions, token_positions, future)
    energy = float(reference.double().pow(2).sum().clamp(min=1e-300))
    space = "post_rope" if rope is not None else "pre_rope"
    errors = {}
    best = None
    # Each candidate is measured as soon as it is compressed, from the reconstruction its exact
    # tokens were chosen with: one candidate's reconstruction is held at a time. Its keys and
    # values are scored before their codes are packed (restored_quantized gives decompress's
    # bits; the keys' size, which the values' budget needs, comes from the shapes); only the
    # chosen split is packed, once the choice is made.
    element_count = max(1, tokens * keys.shape[1] * keys.shape[2])
    for share in budget.key_shares:
        quantized_keys = quantize_prepared(prepared_keys, key_config(share), restore=True)
        restored_keys = restored_quantized(prepared_keys, quantized_keys, space)
        quantized_keys.body = quantized_keys.full = None  # not kept with the winner
        # CompressedKeys.bits_per_element of the finished keys, the same float
        value_codec = value_config(8.0 * quantized_nbytes(prepared_keys, quantized_keys) / element_count)
        quantized_values = quantize_prepared(prepared_values, value_codec.codec, restore=True)
        restored_values = restored_quantized(prepared_values, quantized_values, "pre_rope")
        output = _attention(probes, restored_keys, restored_values, probe_positions, token_positions, future)
        del restored_keys, restored_values
        quantized_values.body = quantized_values.full = None
        errors[share] = float((output - reference).double().pow(2).sum()) / energy
        if best is None or errors[share] < errors[best[0]]:
            best = (share, quantized_keys, quantized_values)
    share, quantized_keys, quantized_values = best
    return CompressedCache(finish_quantized(prepared_keys, quantized_keys),
                           _latent_values(finish_quantized(prepared_values, quantized_values)), share, errors)


def measure_key_shares(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    budget: CacheBudget | None = None,
    *,
    positions: torch.Tensor | None = None,
    rope: RopeConfig | None = None,
    key_space: str = "pre_rope",
    key_bases: list[Basis] | tuple[Basis, ...] | None = None,
    value_bases: list[Basis] | tuple[Basis, ...] | None = None,
) -> tuple[float, ...]:
    """Each layer's split of ``budget``, measured once on calibration keys and values.

    ``keys`` / ``values``: one [tokens, kv_heads, head_dim] tensor per layer (text like the
    served traffic, with the shared bases the profile will use). Returns the key share
    :func:`compress_kv` picks per layer; a profile that stores them (``cache_key_shares``)
    compresses every upload once per layer instead of once per candidate share.
    """
    budget = budget or CacheBudget()
    if len(keys) != len(values):
        raise InvalidInputError(f"got {len(keys)} key layers but {len(values)} value layers")
    for name, bases in (("key_bases", key_bases), ("value_bases", value_bases)):
        if bases is not None and len(bases) != len(keys):
            raise InvalidInputError(f"{name} must hold one basis per layer ({len(keys)}), got {len(bases)}")
    return tuple(
        compress_kv(layer_keys, layer_values, budget, positions=positions, rope=rope, key_space=key_space,
                    key_basis=key_bases[layer] if key_bases is not None else None,
                    value_basis=value_bases[layer] if value_bases is not None else None).key_share
        for layer, (layer_keys, layer_values) in enumerate(zip(keys, values, strict=True))
    )


__all__ = ["DEFAULT_CACHE_KEY_CODEC", "DEFAULT_TOTAL_BITS", "CacheBudget", "CompressedCache", "compress_kv", "measure_key_shares"]
