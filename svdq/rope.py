"""Rotary position embeddings: describe, apply and undo them exactly.

Inference engines hold post-RoPE keys, but SVDq needs pre-RoPE keys (the latent spectrum of
post-RoPE keys barely decays, see docs/DESIGN.md). RoPE is an exact rotation of channel
pairs, so given the positions and the model's RoPE description the codec undoes it on the
way in and the attention path re-applies it.

Angles are computed the way Hugging Face transformers computes them (float32 inverse
frequencies times float32 positions), so undoing the rotation of keys produced by a
transformers model is exact up to float32 rounding of the rotation itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import InvalidInputError

ROPE_STYLES = ("half", "interleaved")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """How a model rotates its keys.

    Attributes:
        theta: base of the inverse frequencies (``rope_theta``).
        rotary_dim: number of leading channels of each head that rotate (partial rotary);
            ``0`` means the whole head. Must be even.
        style: ``"half"`` pairs channel ``i`` with ``i + rotary_dim/2`` (Llama, Qwen,
            transformers' ``rotate_half``); ``"interleaved"`` pairs ``2i`` with ``2i+1``
            (GPT-J, GLM).
        scaling: ``"none"``, ``"linear"`` (positions divided by ``factor``) or ``"llama3"``
            (wavelength-dependent scaling of Llama 3.1).
        factor, low_freq_factor, high_freq_factor, original_max_position: parameters of the
            scaling; ignored for ``"none"``.
    """

    theta: float = 10000.0
    rotary_dim: int = 0
    style: str = "half"
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if not (math.isfinite(self.theta) and self.theta > 1.0):
            raise InvalidInputError(f"rope theta must be a finite number > 1, got {self.theta}")
        if self.rotary_dim < 0 or self.rotary_dim % 2:
            raise InvalidInputError(
                f"rope rotary_dim must be 0 (whole head) or a positive even number, got {self.rotary_dim}"
            )
        if self.style not in ROPE_STYLES:
            raise InvalidInputError(f"rope style must be one of {ROPE_STYLES}, got {self.style!r}")
        if self.scaling not in ROPE_SCALINGS:
            raise InvalidInputError(f"rope scaling must be one of {ROPE_SCALINGS}, got {self.scaling!r}")
        if self.scaling != "none" and not (self.factor > 0 and math.isfinite(self.factor)):
            raise InvalidInputError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.scaling == "llama3":
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise InvalidInputError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"{self.high_freq_factor} and {self.low_freq_factor}"
                )
            if self.original_max_position <= 0:
                raise InvalidInputError("llama3 rope scaling needs original_max_position > 0")

    def dims(self, head_dim: int) -> int:
        """Number of rotating channels for a head of ``head_dim`` channels."""
        rotary = self.rotary_dim or head_dim
        if rotary > head_dim:
            raise InvalidInputError(f"rope rotary_dim {rotary} exceeds head_dim {head_dim}")
        return rotary

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> RopeConfig:
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(
                f"unknown rope fields {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, config: Any, layer_type: str | None = None) -> RopeConfig:
        """Read the RoPE description of a transformers model config.

        Understands both ``rope_scaling`` + ``rope_theta`` (transformers 4) and
        ``rope_parameters`` (transformers 5), and ``partial_rotary_factor``. Hybrid models
        (Gemma 3) give ``rope_parameters`` per layer type (``{"full_attention": {...},
        "sliding_attention": {...}}``): ``layer_type`` picks one; without it the types must
        agree, else the error names them (use :func:`layer_ropes` for every layer).
        """
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None) or {}
        if not params:
            params = dict(legacy)
        per_type = {kind: dict(value) for kind, value in params.items() if isinstance(value, dict)}
        if not per_type:
            return cls._from_params(config, params)
        if layer_type is not None:
            if layer_type not in per_type:
                raise InvalidInputError(
                    f"rope_parameters has no entry for layer type {layer_type!r}; it has {sorted(per_type)}"
                )
            return cls._from_params(config, per_type[layer_type])
        ropes = {kind: cls._from_params(config, value) for kind, value in per_type.items()}
        if len(set(ropes.values())) > 1:
            raise InvalidInputError(
                "this model uses a different RoPE per layer type ("
                + "; ".join(f"{kind}: theta {rope.theta:g}, scaling {rope.scaling}" for kind, rope in sorted(ropes.items()))
                + "): pass layer_type or use svdq.rope.layer_ropes(config)"
            )
        return next(iter(ropes.values()))

    @classmethod
    def _from_params(cls, config: Any, params: dict[str, Any]) -> RopeConfig:
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * partial)
        rotary_dim = 0 if rotary_dim == head_dim else rotary_dim
        if kind == "default":
            return cls(theta=float(theta), rotary_dim=rotary_dim)
        if kind == "linear":
            return cls(theta=float(theta), rotary_dim=rotary_dim, scaling="linear", factor=float(params["factor"]))
        if kind == "llama3":
            return cls(
                theta=float(theta),
                rotary_dim=rotary_dim,
                scaling="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position=int(params["original_max_position_embeddings"]),
            )
        raise InvalidInputError(
            f"rope type {kind!r} is not supported; supported: default, linear, llama3"
        )


def layer_ropes(config: Any) -> tuple[RopeConfig, ...]:
    """The RoPE of every decoder layer of a transformers config, by ``config.layer_types``
    (all layers the same when the config has one RoPE for every layer)."""
    layers = int(config.num_hidden_layers)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    params = getattr(config, "rope_parameters", None) or {}
    if not any(isinstance(value, dict) for value in params.values()):
        rope = RopeConfig.from_hf_config(config)
        return (rope,) * layers
    return tuple(RopeConfig.from_hf_config(config, layer_type=kind) for kind in layer_types)


def inverse_frequencies(rope: RopeConfig, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 inverse frequencies [rotary_dim // 2], scaling applied; made once per (RoPE,
    head_dim, device) and shared (read-only): every sequence's first attention call rotates
    its full-precision keys, and a RoPE config is shared by every sequence of a layer."""
    return _inverse_frequencies(rope, head_dim, torch.device(device))


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(rope: RopeConfig, head_dim: int, device: torch.device) -> torch.Tensor:
    rotary = rope.dims(head_dim)
    exponents = torch.arange(0, rotary, 2, dtype=torch.int64, device=device).float() / rotary
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.scaling == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    rope: RopeConfig, positions: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin of shape [len(positions), rotary_dim // 2]."""
    inv_freq = inverse_frequencies(rope, head_dim, positions.device)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _rotate(keys: torch.Tensor, positions: torch.Tensor, rope: RopeConfig, sign: float,
            tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    if keys.dim() != 3:
        raise InvalidInputError(f"keys for RoPE must be [tokens, heads, head_dim], got shape {tuple(keys.shape)}")
    if positions.dim() != 1 or positions.shape[0] != keys.shape[0]:
        raise InvalidInputError(
            f"positions must be a 1-D tensor with one entry per token ({keys.shape[0]}), "
            f"got shape {tuple(positions.shape)}"
        )
    cos, sin = rope_cos_sin(rope, positions, keys.shape[-1]) if tables is None else tables
    return rotate_with_tables(keys, cos, sign * sin, rope)


#: tokens rotated at a time on the CPU: one chunk's temporaries stay in the core's cache
ROPE_CHUNK = 512


def rotate_with_tables(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Rotate ``keys`` [tokens, heads, head_dim] by precomputed angles: ``cos``, ``sin``
    [tokens, rotary / 2] as :func:`rope_cos_sin` gives them (negated ``sin`` undoes the
    rotation); float32 out. For callers that compute the angles themselves (e.g. per block)."""
    rotary = rope.dims(keys.shape[-1])
    # Every rotating channel is x * cos + partner * (-sin or +sin), its pair's other channel
    # being the partner: tables at the full rotary width make it one multiply and one
    # multiply-add over contiguous rows, where four passes over strided halves ran ~2x slower.
    if rope.style == "half":
        cos_full, sin_full = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
    else:
        cos_full, sin_full = cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)
    out = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    out[..., rotary:] = keys[..., rotary:]
    step = ROPE_CHUNK if keys.device.type == "cpu" else max(1, keys.shape[0])
    for start in range(0, keys.shape[0], step):
        rows = slice(start, start + step)
        # exact float32 copy of 16-bit keys, one chunk at a time
        work = keys[rows, :, :rotary].to(torch.float32)
        if rope.style == "half":
            partner = torch.cat([work[..., rotary // 2:], work[..., :rotary // 2]], -1)
        else:
            partner = torch.stack([work[..., 1::2], work[..., 0::2]], -1).flatten(-2)
        torch.mul(work, cos_full[rows, None, :], out=out[rows, :, :rotary]).addcmul_(partner, sin_full[rows, None, :])
    return out


def apply_rope(keys: torch.Tensor, positions: torch.Tensor, rope: RopeConfig,
               tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotate pre-RoPE ``keys`` [tokens, heads, head_dim] to their ``positions``; float32 out.
    ``tables``: the positions' :func:`rope_cos_sin`, when the caller rotates the same
    positions more than once (else computed here)."""
    return _rotate(keys, positions, rope, 1.0, tables)


def undo_rope(keys: torch.Tensor, positions: torch.Tensor, rope: RopeConfig,
              tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Inverse of :func:`apply_rope`: post-RoPE keys back to pre-RoPE; float32 out."""
    return _rotate(keys, positions, rope, -1.0, tables)
