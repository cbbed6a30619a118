"""RoPE apply/undo against transformers' own rotary code, for every style and scaling."""

import pytest
import torch
from transformers import LlamaConfig, PhiConfig
from transformers.models.gptj import modeling_gptj
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb as phi_apply

from svdq import InvalidInputError, RopeConfig, apply_rope, undo_rope

HEADS, HEAD_DIM = 3, 64

LLAMA_ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
}


def _llama_config(rope_parameters):
    return LlamaConfig(hidden_size=HEADS * HEAD_DIM * 2, num_attention_heads=HEADS * 2, num_key_value_heads=HEADS,
                       head_dim=HEAD_DIM, max_position_embeddings=131072, rope_parameters=rope_parameters)


@pytest.mark.parametrize("kind", sorted(LLAMA_ROPES))
def test_apply_matches_transformers_llama(kind):
    config = _llama_config(dict(LLAMA_ROPES[kind]))
    rope = RopeConfig.from_hf_config(config)
    assert rope.scaling == ("none" if kind == "default" else kind)
    positions = torch.tensor([0, 1, 5, 63, 1000, 8191, 9000, 40000, 100000])
    keys = torch.randn(len(positions), HEADS, HEAD_DIM)
    cos, sin = LlamaRotaryEmbedding(config)(keys, positions[None])
    _, expected = llama_apply(keys.transpose(0, 1)[None], keys.transpose(0, 1)[None], cos, sin)
    ours = apply_rope(keys, positions, rope)
    torch.testing.assert_close(ours, expected[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_partial_rotary_matches_transformers_phi():
    config = PhiConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                       partial_rotary_factor=0.5)
    rope = RopeConfig.from_hf_config(config)
    assert rope.rotary_dim == HEAD_DIM // 2
    positions = torch.arange(0, 700, 7)
    keys = torch.randn(len(positions), HEADS, HEAD_DIM)
    cos, sin = PhiRotaryEmbedding(config)(keys, positions[None])
    k = keys.transpose(0, 1)[None]
    rotary = rope.rotary_dim
    _, k_rot = phi_apply(k[..., :rotary], k[..., :rotary], cos, sin)
    expected = torch.cat([k_rot, k[..., rotary:]], dim=-1)[0].transpose(0, 1)
    torch.testing.assert_close(apply_rope(keys, positions, rope), expected, rtol=1e-5, atol=1e-5)


def test_interleaved_matches_transformers_gptj():
    rotary = 32
    positions = torch.arange(0, 2048, 37)
    keys = torch.randn(len(positions), HEADS, HEAD_DIM)
    sincos = modeling_gptj.create_sinusoidal_positions(4096, rotary)[positions]
    sin, cos = torch.split(sincos, rotary // 2, dim=-1)
    k = keys[None]  # GPT-J applies RoPE on [batch, tokens, heads, head_dim]
    k_rot = modeling_gptj.apply_rotary_pos_emb(k[..., :rotary], sin[None], cos[None])
    expected = torch.cat([k_rot, k[..., rotary:]], dim=-1)[0]
    rope = RopeConfig(theta=10000.0, rotary_dim=rotary, style="interleaved")
    torch.testing.assert_close(apply_rope(keys, positions, rope), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rope",
    [RopeConfig(), RopeConfig(style="interleaved", rotary_dim=32), RopeConfig(scaling="linear", factor=2.0),
     RopeConfig(theta=500000.0, scaling="llama3", factor=8.0)],
)
def test_undo_inverts_apply(rope):
    positions = torch.randint(0, 50000, (41,))
    keys = torch.randn(41, HEADS, HEAD_DIM) * 5
    roundtrip = undo_rope(apply_rope(keys, positions, rope), positions, rope)
    torch.testing.assert_close(roundtrip, keys, rtol=0, atol=5e-5)


def test_bad_descriptions_are_rejected_with_what_is_allowed():
    with pytest.raises(InvalidInputError, match="style must be one of"):
        RopeConfig(style="diagonal")
    with pytest.raises(InvalidInputError, match="scaling must be one of"):
        RopeConfig(scaling="yarn")
    with pytest.raises(InvalidInputError, match="even"):
        RopeConfig(rotary_dim=3)
    with pytest.raises(InvalidInputError, match="exceeds head_dim"):
        apply_rope(torch.zeros(2, 1, 16), torch.arange(2), RopeConfig(rotary_dim=32))
    with pytest.raises(InvalidInputError, match="one entry per token"):
        apply_rope(torch.zeros(2, 1, 16), torch.arange(3), RopeConfig())
    config = _llama_config({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 4096})
    with pytest.raises(InvalidInputError, match="not supported"):
        RopeConfig.from_hf_config(config)


def test_dict_round_trip_and_unknown_fields():
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0)
    assert RopeConfig.from_dict(rope.to_dict()) == rope
    with pytest.raises(InvalidInputError, match="unknown rope fields"):
        RopeConfig.from_dict({"theta": 1e4, "base": 3})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_16_bit_keys_rotate_exactly_as_their_float32_values(dtype, style):
    rope = RopeConfig(theta=10000.0, style=style, rotary_dim=12)
    keys = torch.randn(9, 2, 16).to(dtype)
    positions = torch.arange(9) * 37
    rotated = apply_rope(keys, positions, rope)
    assert rotated.dtype == torch.float32
    assert torch.equal(rotated, apply_rope(keys.float(), positions, rope))
    assert torch.equal(undo_rope(keys, positions, rope), undo_rope(keys.float(), positions, rope))
