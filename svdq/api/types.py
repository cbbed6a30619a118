"""Domain types of the svdq service API, with their protobuf conversions next to them.

Client and server both speak in these types; ``from_pb`` / ``to_pb`` are the only places
that know the message layout. Validation happens in the constructors, so a bad field is
rejected the same way whether it came from a config file, a Python caller or the wire.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from svdq_proto.svdq.v1 import kvcache_pb2 as pb

from svdq.attention import SparsityConfig
from svdq.codec import Basis, CodecConfig
from svdq.errors import InvalidInputError
from svdq.kv import CacheBudget
from svdq.rope import RopeConfig
from svdq.values import ValueConfig

from .wire import tensor_from_pb, tensor_to_pb

#: longest profile, sequence or upload id
MAX_NAME_LENGTH = 128
# Matched with fullmatch: "$" would also match before a trailing newline ("dup\n" beside "dup").
NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/-]{{0,{MAX_NAME_LENGTH - 1}}}", re.ASCII)
NAME_RULE = (f"1-{MAX_NAME_LENGTH} characters of ASCII letters, digits and '._:/-', starting with a letter or digit")
#: characters of a bad value that an error message quotes
QUOTE_CHARACTERS = 40
MAX_LAYERS = 1024
MAX_KV_HEADS = 256
MAX_HEAD_DIM = 1024
KEY_SPACE_TO_PB = {"pre_rope": pb.PRE_ROPE, "post_rope": pb.POST_ROPE}
KEY_SPACE_FROM_PB = {code: name for name, code in KEY_SPACE_TO_PB.items()}


def abbreviate(value: Any, limit: int = QUOTE_CHARACTERS) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters with the full
    length named: bad input may be megabytes long, and a message must not echo all of it."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}... ({type(value).__name__})"


def check_name(value: str, field_name: str) -> str:
    """Validate a profile, sequence or upload id against :data:`NAME_RULE` (the one place
    that defines them, for client and server alike)."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{field_name} must be a string of {NAME_RULE}; got a {type(value).__name__}")
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidInputError(f"{field_name} must be {NAME_RULE}; got {abbreviate(value)}")
    return value


def key_space_from_pb(code: int, field_name: str, default: str | None) -> str | None:
    """``KeySpace`` enum -> ``"pre_rope"``/``"post_rope"``; unspecified gives ``default``."""
    if code == pb.KEY_SPACE_UNSPECIFIED:
        return default
    try:
        return KEY_SPACE_FROM_PB[code]
    except KeyError:
        raise InvalidInputError(f"{field_name} must be PRE_ROPE or POST_ROPE, got enum value {code}") from None


def key_space_to_pb(name: str | None) -> int:
    """``"pre_rope"``/``"post_rope"``/``None`` -> ``KeySpace`` enum."""
    if name is None:
        return pb.KEY_SPACE_UNSPECIFIED
    try:
        return KEY_SPACE_TO_PB[name]
    except KeyError:
        raise InvalidInputError(f"key_space must be 'pre_rope' or 'post_rope', got {name!r}") from None


def rope_to_pb(rope: RopeConfig, out: pb.Rope) -> pb.Rope:
    """Write a :class:`RopeConfig` into a ``Rope`` message."""
    out.theta, out.rotary_dim, out.style, out.scaling = rope.theta, rope.rotary_dim, rope.style, rope.scaling
    out.factor, out.low_freq_factor, out.high_freq_factor = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    out.original_max_position = rope.original_max_position
    return out


def rope_from_pb(message: pb.Rope) -> RopeConfig:
    """A :class:`RopeConfig` from a ``Rope`` message (validated by RopeConfig itself)."""
    return RopeConfig(
        theta=message.theta, rotary_dim=message.rotary_dim, style=message.style or "half",
        scaling=message.scaling or "none", factor=message.factor or 1.0,
        low_freq_factor=message.low_freq_factor or 1.0, high_freq_factor=message.high_freq_factor or 4.0,
        original_max_position=message.original_max_position or 8192,
    )


def codec_to_pb(config: CodecConfig, out: pb.Codec) -> pb.Codec:
    """Write a :class:`CodecConfig` into a ``Codec`` message."""
    out.method, out.bits_per_element, out.bits = config.method, config.bits_per_element or 0.0, config.bits
    out.schedule[:] = list(config.schedule or ())
    out.group_size, out.num_sinks = config.group_size or 0, config.num_sinks  # 0: by length
    if config.noise_averaging != 1.0:
        out.noise_averaging = config.noise_averaging
    out.exact_tokens, out.exact_share = config.exact_tokens, config.exact_share
    out.exact_bits = config.exact_bits if config.exact_bits != 16 else 0
    return out


def codec_from_pb(message: pb.Codec) -> CodecConfig:
    """A :class:`CodecConfig` from a ``Codec`` message; zero fields take the codec defaults."""
    defaults = CodecConfig()
    return CodecConfig(
        method=message.method or defaults.method,
        bits_per_element=message.bits_per_element or None,  # None: the default budget, or the schedule's
        schedule=tuple(message.schedule) or None,
        bits=message.bits or defaults.bits,
        group_size=message.group_size or defaults.group_size,
        num_sinks=message.num_sinks if message.HasField("num_sinks") else defaults.num_sinks,
        noise_averaging=message.noise_averaging if message.HasField("noise_averaging") else 1.0,
        exact_tokens=message.exact_tokens,
        exact_share=message.exact_share,
        exact_bits=message.exact_bits or defaults.exact_bits,
    )


def sparsity_to_pb(config: SparsityConfig, out: pb.Sparsity) -> pb.Sparsity:
    """Write a :class:`SparsityConfig` into a ``Sparsity`` message."""
    out.keep_fraction, out.chunk_size = config.keep_fraction, config.chunk_size
    out.num_recent, out.score_channels = config.num_recent, config.score_channels
    return out


def sparsity_from_pb(message: pb.Sparsity) -> SparsityConfig:
    """A :class:`SparsityConfig` from a ``Sparsity`` message; zero fields take the defaults."""
    defaults = SparsityConfig()
    return SparsityConfig(
        keep_fraction=message.keep_fraction or defaults.keep_fraction,
        chunk_size=message.chunk_size or defaults.chunk_size,
        num_recent=message.num_recent if message.HasField("num_recent") else defaults.num_recent,
        score_channels=message.score_channels or defaults.score_channels,
    )


def codec_to_dict(config: CodecConfig) -> dict[str, Any]:
    """Plain-dict form of a codec config (profiles files, logs)."""
    return {"method": config.method, "bits_per_element": config.bits_per_element,
            "schedule": list(config.schedule) if config.schedule else None, "bits": config.bits,
            "group_size": config.group_size, "num_sinks": config.num_sinks, "noise_averaging": config.noise_averaging}


def basis_bytes(channels: int) -> int:
    """Bytes one layer's shared basis of ``channels`` channels takes held in memory: float32
    mean [C], components [C, C] and singular values [C]."""
    return 4 * channels * (channels + 2)


def basis_to_pb(basis: Basis, out: pb.LayerBasis | None = None) -> pb.LayerBasis:
    """One layer's shared basis on the wire (written into ``out`` when given)."""
    message = out if out is not None else pb.LayerBasis()
    tensor_to_pb(basis.mean.float(), message.mean)
    # float16: all the codec ever uses of a basis (and what its fingerprint hashes), half the bytes
    tensor_to_pb(basis.components.to(torch.float16), message.components)
    tensor_to_pb(basis.singular_values.float(), message.singular_values)
    return message


def basis_from_pb(message: pb.LayerBasis, field: str, channels: int | None = None) -> Basis:
    """A layer's shared basis from the wire, strictly checked (``field`` names it in errors;
    with ``channels``, so is every tensor's shape)."""
    vector, square = ((channels,), (channels, channels)) if channels is not None else (None, None)
    return Basis(
        mean=tensor_from_pb(message.mean, f"{field}.mean", dtypes=(torch.float32,), finite=True, shape=vector),
        components=tensor_from_pb(message.components, f"{field}.components", dtypes=(torch.float16, torch.float32),
                                  finite=True, shape=square).float(),
        singular_values=tensor_from_pb(message.singular_values, f"{field}.singular_values", dtypes=(torch.float32,),
                                       finite=True, shape=vector),
    )


@dataclass(frozen=True, eq=False)
class Profile:
    """What requests about one model share.

    Attributes:
        name: profile name requests refer to.
        num_layers, kv_heads, head_dim: the model's KV cache geometry; every stored sequence
            has keys [num_layers][tokens, kv_heads, head_dim].
        rope: the model's RoPE; needed to accept post-RoPE keys and to attend.
        codec: how keys are compressed (``method="fp16"`` turns compression off).
        value_bits: ``None`` keeps values 16-bit; 2 or 4 quantizes them per token.
        value_group_size: values quantization group along head_dim.
        bases: optional shared calibrated basis per layer (svdq only); blobs then store only
            the basis fingerprint.
        value_codec: an svdq :class:`CodecConfig` stores values as an SVDq latent
            (e.g. :data:`svdq.values.DEFAULT_VALUE_CODEC`); ``value_bits`` must be ``None``.
        value_bases: optional shared value basis per layer (latent values only).
        cache_bits_per_element: one budget in true bits per KV element for keys and latent
            values, split per layer by :func:`svdq.kv.compress_kv` (needs ``value_codec``;
            uploads without values then use ``codec``).
        cache_key_shares: with ``cache_bits_per_element``, one share of the budget spent on
            keys per layer (each in (0, 1)), measured once on calibration data by
            :func:`svdq.kv.measure_key_shares`; ``None`` measures the split on every upload.
    """

    name: str
    num_layers: int
    kv_heads: int
    head_dim: int
    rope: RopeConfig | None = None
    codec: CodecConfig = field(default_factory=CodecConfig)
    value_bits: int | None = None
    value_group_size: int = 64
    bases: tuple[Basis, ...] | None = None
    value_codec: CodecConfig | None = None
    value_bases: tuple[Basis, ...] | None = None
    cache_bits_per_element: float | None = None
    cache_key_shares: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "profile.name")
        for name, upper in (("num_layers", MAX_LAYERS), ("kv_heads", MAX_KV_HEADS), ("head_dim", MAX_HEAD_DIM)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= upper:
                raise InvalidInputError(f"profile.{name} must be an integer in 1..{upper}, got {value!r}")
        if self.head_dim % 2:
            raise InvalidInputError(f"profile.head_dim must be even, got {self.head_dim}")
        if self.rope is not None:
            self.rope.dims(self.head_dim)
        value_config = self.value_config  # validates bits and group size
        if value_config.bits is not None and self.head_dim % value_config.group_size:
            raise InvalidInputError(
                f"profile.value_group_size {value_config.group_size} must divide head_dim {self.head_dim} "
                "when values are quantized"
            )
        if self.bases is not None:
            if self.codec.method != "svdq":
                raise InvalidInputError(f"profile.bases only apply to codec method 'svdq', not {self.codec.method!r}")
            object.__setattr__(self, "bases", self._check_bases(self.bases, "bases"))
        if self.value_bases is not None:
            if self.value_codec is None:
                raise InvalidInputError("profile.value_bases only apply to SVDq latent values (profile.value_codec)")
            object.__setattr__(self, "value_bases", self._check_bases(self.value_bases, "value_bases"))
        if self.cache_bits_per_element is not None:
            if self.value_codec is None or self.codec.method != "svdq" or self.codec.schedule is not None:
                raise InvalidInputError("profile.cache_bits_per_element needs an svdq codec with a bit budget and "
                                        "profile.value_codec (the budget splits between them)")
            _ = self.cache_budget  # validates the budget
        if self.cache_key_shares is not None:
            shares = tuple(self.cache_key_shares)
            if self.cache_bits_per_element is None:
                raise InvalidInputError("profile.cache_key_shares need profile.cache_bits_per_element (the budget "
                                        "they split)")
            if len(shares) != self.num_layers:
                raise InvalidInputError(f"profile.cache_key_shares must hold one share per layer ({self.num_layers}), "
                                        f"got {len(shares)}")
            object.__setattr__(self, "cache_key_shares", shares)
            for layer in range(self.num_layers):
                self.layer_cache_budget(layer)  # validates each share against the budget

    def _check_bases(self, bases: tuple[Basis, ...], name: str) -> tuple[Basis, ...]:
        bases = tuple(bases)
        if len(bases) != self.num_layers:
            raise InvalidInputError(f"profile.{name} must hold one basis per layer ({self.num_layers}), got {len(bases)}")
        channels = self.channels
        for index, basis in enumerate(bases):
            if tuple(basis.mean.shape) != (channels,) or tuple(basis.components.shape) != (channels, channels):
                raise InvalidInputError(
                    f"profile.{name}[{index}] must have mean [{channels}] and components [{channels}, {channels}], "
                    f"got {list(basis.mean.shape)} and {list(basis.components.shape)}"
                )
        return bases

    @property
    def cache_budget(self) -> CacheBudget | None:
        """The whole-cache budget, or None when keys and values follow codec and value_codec."""
        if self.cache_bits_per_element is None:
            return None
        try:
            return CacheBudget(self.cache_bits_per_element, key_codec=self.codec, value_codec=self.value_codec)
        except InvalidInputError as exc:
            raise InvalidInputError(f"profile.cache_bits_per_element: {exc}") from None

    def layer_cache_budget(self, layer: int) -> CacheBudget | None:
        """The whole-cache budget of one layer: its calibrated key share when the profile has
        them (one compression per upload), else every candidate share (measured per upload)."""
        budget = self.cache_budget
        if budget is None or self.cache_key_shares is None:
            return budget
        try:
            return budget.with_share(self.cache_key_shares[layer])
        except InvalidInputError as exc:
            raise InvalidInputError(f"profile.cache_key_shares[{layer}]: {exc}") from None

    @property
    def channels(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def value_config(self) -> ValueConfig:
        try:
            return ValueConfig(bits=self.value_bits, group_size=self.value_group_size, codec=self.value_codec)
        except InvalidInputError as exc:
            raise InvalidInputError(f"profile.values: {exc}") from None

    def to_pb(self) -> pb.Profile:
        message = pb.Profile(name=self.name, num_layers=self.num_layers, kv_heads=self.kv_heads, head_dim=self.head_dim)
        if self.rope is not None:
            rope_to_pb(self.rope, message.rope)
        codec_to_pb(self.codec, message.codec)
        message.values.bits = self.value_bits or 0
        message.values.group_size = self.value_group_size
        if self.value_codec is not None:
            codec_to_pb(self.value_codec, message.values.codec)
        message.cache_bits_per_element = self.cache_bits_per_element or 0.0
        message.cache_key_shares[:] = list(self.cache_key_shares or ())
        for bases, target in ((self.bases, message.bases), (self.value_bases, message.values.bases)):
            for basis in bases or ():
                basis_to_pb(basis, target.add())
        return message

    def without_bases(self) -> Profile:
        """The same profile without its shared bases: what listings and the head of a profile
        stream carry (the bases go one layer per message, or not at all)."""
        return replace(self, bases=None, value_bases=None)

    @property
    def bases_bytes(self) -> int:
        """Bytes the shared key and value bases take held in memory (what --max-profile-bytes bounds)."""
        return (len(self.bases or ()) + len(self.value_bases or ())) * basis_bytes(self.channels)

    @classmethod
    def from_pb(cls, message: pb.Profile) -> Profile:
        def read_bases(layers, name: str) -> tuple[Basis, ...] | None:
            if not layers:
                return None
            return tuple(basis_from_pb(layer, f"profile.{name}[{i}]") for i, layer in enumerate(layers))

        return cls(
            name=message.name, num_layers=message.num_layers, kv_heads=message.kv_heads, head_dim=message.head_dim,
            rope=rope_from_pb(message.rope) if message.HasField("rope") else None,
            codec=codec_from_pb(message.codec), value_bits=message.values.bits or None,
            value_group_size=message.values.group_size or 64, bases=read_bases(message.bases, "bases"),
            value_codec=codec_from_pb(message.values.codec) if message.values.HasField("codec") else None,
            value_bases=read_bases(message.values.bases, "value_bases"),
            cache_bits_per_element=message.cache_bits_per_element or None,
            cache_key_shares=tuple(message.cache_key_shares) or None,
        )

    def same_as(self, other: Profile) -> bool:
        """Whether two profiles describe the same thing (bases compared byte for byte)."""
        return self.to_pb().SerializeToString(deterministic=True) == other.to_pb().SerializeToString(deterministic=True)

    @classmethod
    def from_dict(cls, fields: dict[str, Any], bases: tuple[Basis, ...] | None = None) -> Profile:
        """A profile from its plain-dict form (profiles file): ``name``, ``num_layers``,
        ``kv_heads``, ``head_dim``, optional ``rope`` (RopeConfig fields), ``codec``
        (CodecConfig fields), ``value_bits``, ``value_group_size``, ``value_codec`` (CodecConfig
        fields of SVDq latent values), ``cache_bits_per_element``, ``cache_key_shares`` (a list,
        one per layer)."""
        allowed = {"name", "num_layers", "kv_heads", "head_dim", "rope", "codec", "value_bits",
                   "value_group_size", "basis_file", "value_codec", "cache_bits_per_element", "cache_key_shares"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidInputError(f"unknown profile fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        def read_codec(name: str) -> CodecConfig:
            codec_fields = dict(fields.get(name) or {})
            if codec_fields.get("schedule") is not None:
                codec_fields["schedule"] = tuple(codec_fields["schedule"])
            try:
                return CodecConfig(**codec_fields)
            except TypeError as exc:
                raise InvalidInputError(f"profile {fields.get('name')!r} {name}: {exc}") from None

        codec = read_codec("codec")
        value_codec = read_codec("value_codec") if fields.get("value_codec") is not None else None
        rope = RopeConfig.from_dict(fields["rope"]) if fields.get("rope") else None
        missing = {"name", "num_layers", "kv_heads", "head_dim"} - set(fields)
        if missing:
            raise InvalidInputError(f"profile is missing required fields {sorted(missing)}")
        return cls(name=fields["name"], num_layers=fields["num_layers"], kv_heads=fields["kv_heads"],
                   head_dim=fields["head_dim"], rope=rope, codec=codec, value_bits=fields.get("value_bits"),
                   value_group_size=fields.get("value_group_size", 64), bases=bases, value_codec=value_codec,
                   cache_bits_per_element=fields.get("cache_bits_per_element"),
                   cache_key_shares=tuple(fields["cache_key_shares"]) if fields.get("cache_key_shares") else None)


def profile_pieces(profile: Profile, replace_existing: bool = False) -> Iterator[pb.ProfilePiece]:
    """A profile as a ``ProfilePiece`` stream: the profile without bases first, then one
    layer's basis per message, key bases before value bases; each is built when the stream
    reaches it, so no message (nor the sender) holds more than one layer's basis at a time."""
    bare = profile.without_bases()
    yield pb.ProfilePiece(profile=bare.to_pb(), replace=replace_existing, key_bases=len(profile.bases or ()),
                          value_bases=len(profile.value_bases or ()))
    for basis in (*(profile.bases or ()), *(profile.value_bases or ())):
        yield pb.ProfilePiece(basis=basis_to_pb(basis))


class ProfileAssembler:
    """Collects a ``ProfilePiece`` stream (:func:`profile_pieces`) into a :class:`Profile`,
    checking each message as it comes: ``reserve(profile, nbytes)`` gets the bases the first
    message declares (``nbytes`` held in float32) before any arrives and may refuse them by
    raising, and each basis is converted (and its message let go) on arrival."""

    def __init__(self, reserve: Callable[[Profile, int], None] | None = None) -> None:
        self.reserve = reserve
        self.declared_bytes = 0
        self.profile: Profile | None = None  # the first message's, without bases
        self.replace = False
        self._declared = (0, 0)
        self._bases: list[Basis] = []

    def add(self, piece: pb.ProfilePiece) -> None:
        if self.profile is None:
            if not piece.HasField("profile") or piece.HasField("basis"):
                raise InvalidInputError("the first message of a profile stream must carry the profile (without "
                                        "bases) and no basis")
            if piece.profile.bases or piece.profile.values.bases:
                raise InvalidInputError("the first message of a profile stream carries the profile without bases: "
                                        "send each layer's basis in a message of its own after it")
            profile = Profile.from_pb(piece.profile)
            for name, count in (("key_bases", piece.key_bases), ("value_bases", piece.value_bases)):
                if count not in (0, profile.num_layers):
                    raise InvalidInputError(f"{name} must be 0 or the profile's num_layers {profile.num_layers}, "
                                            f"got {count}")
            declared_bytes = (piece.key_bases + piece.value_bases) * basis_bytes(profile.channels)
            if self.reserve is not None:
                self.reserve(profile, declared_bytes)
            self.declared_bytes = declared_bytes
            self.profile, self.replace, self._declared = profile, piece.replace, (piece.key_bases, piece.value_bases)
            return
        if piece.HasField("profile") or not piece.HasField("basis"):
            raise InvalidInputError("after the first message of a profile stream, each message carries one "
                                    "layer's basis and nothing else")
        keys, values = self._declared
        index = len(self._bases)
        if index >= keys + values:
            raise InvalidInputError(f"profile stream sent more bases than the {keys} key and {values} value bases "
                                    "its first message declared")
        field = f"profile.bases[{index}]" if index < keys else f"profile.value_bases[{index - keys}]"
        # shapes checked before conversion: a basis larger than the declared geometry is refused unread
        self._bases.append(basis_from_pb(piece.basis, field, self.profile.channels))

    def result(self) -> Profile:
        """The whole profile, checked as :class:`Profile` checks one (every basis's shape)."""
        keys, values = self._declared
        if self.profile is None:
            raise InvalidInputError("a profile stream must carry at least its first message (the profile)")
        if len(self._bases) != keys + values:
            raise InvalidInputError(f"profile stream ended after {len(self._bases)} of the {keys + values} bases its "
                                    "first message declared; send them all")
        return replace(self.profile, bases=tuple(self._bases[:keys]) or None,
                       value_bases=tuple(self._bases[keys:]) or None)


@dataclass(frozen=True)
class BlobStats:
    """Sizes of one compressed key blob (``nbytes`` is the serialized size, all included)."""

    num_tokens: int
    nbytes: int
    fp16_bytes: int
    bits_per_element: float
    compression_ratio: float
    relative_error: float

    def to_pb(self) -> pb.BlobStats:
        return pb.BlobStats(**self.__dict__)

    @classmethod
    def from_pb(cls, message: pb.BlobStats) -> BlobStats:
        return cls(message.num_tokens, message.nbytes, message.fp16_bytes, message.bits_per_element,
                   message.compression_ratio, message.relative_error)


@dataclass(frozen=True)
class SequenceInfo:
    """What is stored for one sequence; byte counts are serialized sizes over all layers."""

    sequence_id: str
    profile: str
    num_tokens: int
    num_layers: int
    key_bytes: int
    value_bytes: int
    fp16_key_bytes: int
    fp16_value_bytes: int
    key_compression_ratio: float
    key_bits_per_element: float
    compression_ratio: float
    key_space: str
    has_values: bool

    def to_pb(self) -> pb.SequenceInfo:
        fields = dict(self.__dict__)
        fields["key_space"] = key_space_to_pb(self.key_space)
        return pb.SequenceInfo(**fields)

    @classmethod
    def from_pb(cls, message: pb.SequenceInfo) -> SequenceInfo:
        return cls(
            message.sequence_id, message.profile, message.num_tokens, message.num_layers, message.key_bytes,
            message.value_bytes, message.fp16_key_bytes, message.fp16_value_bytes, message.key_compression_ratio,
            message.key_bits_per_element, message.compression_ratio,
            key_space_from_pb(message.key_space, "key_space", "pre_rope"), message.has_values,
        )


@dataclass(frozen=True)
class ServerInfo:
    """The server's device and store budget; occupancy, evictions and quota of the caller's
    tenant only (``sequences`` equals ``tenant_sequences``; ``tenant_quota_bytes`` 0: none)."""

    version: str
    device: str
    store_budget_bytes: int
    stored_bytes: int
    stored_fp16_bytes: int
    sequences: int
    tenant_sequences: int
    evictions: int
    eviction: str
    ttl_seconds: float
    profiles: tuple[str, ...]
    tenant_quota_bytes: int = 0

    def to_pb(self) -> pb.ServerInfo:
        fields = dict(self.__dict__)
        fields["profiles"] = list(self.profiles)
        return pb.ServerInfo(**fields)

    @classmethod
    def from_pb(cls, message: pb.ServerInfo) -> ServerInfo:
        return cls(message.version, message.device, message.store_budget_bytes, message.stored_bytes,
                   message.stored_fp16_bytes, message.sequences, message.tenant_sequences, message.evictions,
                   message.eviction, message.ttl_seconds, tuple(message.profiles), message.tenant_quota_bytes)


@dataclass(frozen=True)
class AttendStats:
    """Per-entry bytes and tokens of one attention call (mirrors svdq.attention.AttentionStats)."""

    key_bytes_read: int
    dense_fp16_key_bytes: int
    tokens_attended: int
    tokens_total: int

    def to_pb(self) -> pb.AttendStats:
        return pb.AttendStats(**self.__dict__)

    @classmethod
    def from_pb(cls, message: pb.AttendStats) -> AttendStats:
        return cls(message.key_bytes_read, message.dense_fp16_key_bytes, message.tokens_attended, message.tokens_total)


@dataclass
class AttendResult:
    """``output`` float32 [B, q_heads, head_dim], ``lse`` float32 [B, q_heads] (natural log),
    ``stats`` one per entry."""

    output: torch.Tensor
    lse: torch.Tensor
    stats: list[AttendStats]


@dataclass
class FetchResult:
    """Reconstructed cache: ``keys`` and ``values`` [layers, tokens, kv_heads, head_dim]
    (``values`` is None when not stored or not requested), ``positions`` int64 [tokens]."""

    keys: torch.Tensor
    values: torch.Tensor | None
    positions: torch.Tensor


@dataclass
class CompressResult:
    """``blob``: svdq.format bytes of one layer's keys; ``stats``: its sizes."""

    blob: bytes
    stats: BlobStats


__all__ = [
    "AttendResult",
    "AttendStats",
    "BlobStats",
    "CompressResult",
    "FetchResult",
    "Profile",
    "ProfileAssembler",
    "SequenceInfo",
    "ServerInfo",
    "abbreviate",
    "basis_bytes",
    "basis_from_pb",
    "basis_to_pb",
    "check_name",
    "codec_from_pb",
    "codec_to_dict",
    "codec_to_pb",
    "key_space_from_pb",
    "key_space_to_pb",
    "profile_pieces",
    "rope_from_pb",
    "rope_to_pb",
    "sparsity_from_pb",
    "sparsity_to_pb",
]
