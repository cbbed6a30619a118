"""The serialized format rejects damaged or unknown blobs with a clear error."""

import struct

import pytest
import torch

from svdq import CodecConfig, FormatError, RopeConfig, compress, decompress, from_bytes, to_bytes
from svdq.format import MAGIC, VERSION


@pytest.fixture(scope="module")
def blob():
    keys = torch.randn(200, 2, 16)
    return to_bytes(compress(keys, CodecConfig(bits_per_element=4.0, group_size=32), rope=RopeConfig(),
                             positions=torch.arange(7, 207), key_space="post_rope"))


def test_header_is_self_describing(blob):
    assert blob[:4] == MAGIC and blob[4] == 1
    tokens, heads, head_dim, group_size = struct.unpack_from("<IHHH", blob, 8)
    assert (tokens, heads, head_dim, group_size) == (200, 2, 16, 32)
    loaded = from_bytes(blob)
    assert loaded.rope == RopeConfig() and loaded.position_offset == 7 and loaded.input_space == "post_rope"


@pytest.mark.parametrize("cut", [0, 3, 20, 100, -5, -1])
def test_truncated_blob(blob, cut):
    with pytest.raises(FormatError, match="truncated|checksum"):
        from_bytes(blob[:cut])


def test_corrupted_byte_fails_the_checksum(blob):
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x10
    with pytest.raises(FormatError, match="checksum mismatch"):
        from_bytes(bytes(damaged))


def test_newer_version_is_refused(blob):
    newer = bytearray(blob)
    newer[4] = VERSION + 1
    with pytest.raises(FormatError, match=f"version {VERSION + 1} is newer"):
        from_bytes(bytes(newer))


def test_wrong_magic(blob):
    with pytest.raises(FormatError, match="not an svdq blob"):
        from_bytes(b"GGUF" + blob[4:])


def test_round_trip_is_exact(blob):
    assert to_bytes(from_bytes(blob)) == blob
    assert decompress(from_bytes(blob)).shape == (200, 2, 16)


@pytest.mark.parametrize("config", [CodecConfig(), CodecConfig(method="kivi", bits=4), CodecConfig(method="fp16")],
                         ids=["svdq", "kivi", "fp16"])
def test_every_method_round_trips_through_bytes(config):
    keys = torch.randn(150, 2, 16, dtype=torch.float16)
    compressed = compress(keys, config)
    loaded = from_bytes(to_bytes(compressed))
    assert loaded.method == config.method
    assert torch.equal(decompress(loaded), decompress(compressed))


def test_nbytes_is_kept_once_and_follows_a_field_assigned_anew():
    import dataclasses

    from svdq import append

    generator = torch.Generator().manual_seed(8)
    keys = torch.randn(150, 2, 16, generator=generator)
    compressed = compress(keys, CodecConfig(group_size=16))
    assert compressed.nbytes == len(to_bytes(compressed))
    assert compressed._size is not None  # kept after the first read
    longer = append(compressed, torch.randn(40, 2, 16, generator=generator))
    assert longer.nbytes == len(to_bytes(longer)) > compressed.nbytes
    # replace() starts without the kept size; an assigned field makes it recount.
    explicit = dataclasses.replace(compressed, positions=torch.arange(150) * 2)
    assert explicit.nbytes == len(to_bytes(explicit)) == compressed.nbytes + 8 * 150
    before = compressed.nbytes
    assert compressed.tail.shape[0] == 2
    compressed.tail = compressed.tail[:1]
    assert compressed.nbytes == len(to_bytes(compressed)) == before - 2 * 2 * 16
