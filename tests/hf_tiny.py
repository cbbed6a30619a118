"""Small random transformers models of every family the offload integration supports, for the
logits-level tests (no download: configs only)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Gemma 2/3 geometry as in Gemma 3 1B: one KV head of 256 channels, sliding and full layers mixed.
_GEMMA = dict(_COMMON, num_hidden_layers=3, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
              sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])

#: name -> (config class, fields): every supported family and the variants workers run.
FAMILIES = {
    "llama": (LlamaConfig, dict(_COMMON, head_dim=16)),
    "llama3-rope-scaling": (LlamaConfig, dict(_COMMON, head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": (MistralConfig, dict(_COMMON, head_dim=16, sliding_window=None)),
    "mistral-sliding": (MistralConfig, dict(_COMMON, head_dim=16, sliding_window=8)),
    "qwen2": (Qwen2Config, dict(_COMMON)),
    "qwen2-sliding-hybrid": (Qwen2Config, dict(_COMMON, num_hidden_layers=3, use_sliding_window=True,
                                               sliding_window=8, max_window_layers=1)),
    "qwen3": (Qwen3Config, dict(_COMMON, head_dim=16)),
    "phi3-partial-rotary": (Phi3Config, dict(_COMMON, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gemma2": (Gemma2Config, dict(_GEMMA, attn_logit_softcapping=None, final_logit_softcapping=30.0)),
    # Real checkpoints cap at 50, which these small random scores never reach; a cap of 2
    # moves the logits by ~0.4 (std 0.8), so leaving it out anywhere fails the comparisons.
    "gemma2-softcap": (Gemma2Config, dict(_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=30.0)),
    "gemma3": (Gemma3TextConfig, dict(_GEMMA, rope_parameters={
        "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}


def tiny_config(name: str, **extra):
    config_class, fields = FAMILIES[name]
    return config_class(**{**fields, **extra})


def tiny_model(name: str, **extra):
    """A float32 model of family ``name`` with random weights large enough that attention
    errors show in the logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **extra), dtype=torch.float32)
    # Random weights of the default scale give near-uniform logits (std ~0.01); larger ones
    # (logits std ~0.8) make the comparison sensitive to attention errors.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.1)
    return model.eval()


class ByteTokenizer:
    """Tokenizer of the tiny models for the shipped calibration text: one token per UTF-8 byte,
    folded into ids 3..VOCAB-1 (0-2 are the special tokens), with transformers' call signature
    (``tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids``)."""

    def __init__(self, vocab: int = VOCAB) -> None:
        self.vocab = vocab

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True):
        from types import SimpleNamespace

        ids = torch.tensor(list(text.encode()), dtype=torch.int64) % (self.vocab - 3) + 3
        return SimpleNamespace(input_ids=ids[None] if return_tensors == "pt" else [ids.tolist()])
