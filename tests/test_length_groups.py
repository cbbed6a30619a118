"""The default token group chosen by the sequence's length (``CodecConfig.group_size=None``)."""

import pytest
import torch
from svdq_proto.svdq.v1 import kvcache_pb2 as pb
from test_codec import layer_keys

from svdq import CodecConfig, InvalidInputError, append, compress, decompress, from_bytes, relative_error, to_bytes
from svdq.api.types import codec_from_pb, codec_to_pb
from svdq.codec import DEFAULT_GROUP_SIZE, LENGTH_GROUP_SIZES


@pytest.mark.parametrize(("tokens", "group"), [(1, 16), (473, 16), (2047, 16), (2048, DEFAULT_GROUP_SIZE),
                                                (1 << 20, DEFAULT_GROUP_SIZE)])
def test_the_rule_picks_the_group_from_the_length(tokens, group):
    assert CodecConfig().group_size_for(tokens) == group
    assert CodecConfig(group_size=128).group_size_for(tokens) == 128  # an explicit group is kept
    assert LENGTH_GROUP_SIZES == ((2048, 16),)


def test_a_short_sequence_is_stored_with_small_groups_and_a_short_tail():
    keys = layer_keys(tokens=473, heads=3, head_dim=16)
    compressed = compress(keys, CodecConfig())
    fixed = compress(keys, CodecConfig(group_size=64))
    assert compressed.group_size == 16 and fixed.group_size == 64
    # 469 body tokens: 5 stay 16-bit with groups of 16, 21 with groups of 64
    assert compressed.tail.shape[0] == 5 and fixed.tail.shape[0] == 21
    # Every byte counted: groups of 64 exceed the 1.5-bit budget (their 21-token tail alone
    # costs 0.71 bits per element), groups of 16 stay within it and reconstruct better.
    blob = to_bytes(compressed)
    assert len(blob) == compressed.nbytes
    assert compressed.bits_per_element <= 1.5 < fixed.bits_per_element
    assert relative_error(keys, decompress(from_bytes(blob))) < relative_error(keys, decompress(fixed))


def test_append_keeps_the_group_the_sequence_was_compressed_with():
    keys = layer_keys(tokens=2600, heads=2, head_dim=16)
    first = compress(keys[:1000], CodecConfig())
    grown = append(first, keys[1000:])
    assert first.group_size == grown.group_size == 16  # not the 64 that 2600 tokens would get
    assert grown.num_tokens == 2600 and grown.tail.shape[0] == (2600 - 4) % 16
    assert torch.equal(decompress(from_bytes(to_bytes(grown))), decompress(grown))


def test_the_codec_message_carries_the_rule_as_zero():
    message = codec_to_pb(CodecConfig(), pb.Codec())
    assert message.group_size == 0
    assert codec_from_pb(message).group_size is None
    assert codec_from_pb(codec_to_pb(CodecConfig(group_size=32), pb.Codec())).group_size == 32


@pytest.mark.parametrize("bad", [0, 24, 512, "64"])
def test_a_group_outside_the_allowed_ones_is_refused(bad):
    with pytest.raises(InvalidInputError, match=r"group_size must be one of .*None \(chosen by length\)"):
        CodecConfig(group_size=bad)
