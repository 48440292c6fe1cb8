"""Shared fixtures: tiny random models of each supported architecture, and the real default model."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_hf_model(arch: str, dtype=torch.float64, **overrides):
    """A randomly initialised transformers model of the given architecture, tiny and seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None, "tie_word_embeddings": False}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False}),
    }
    config_cls, model_cls, extra = classes[arch]
    torch.manual_seed(0)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # random norm gains and biases, so folding them is actually tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M in the canonical layout (loaded once per session)."""
    from baseq_export.models import load_model

    return load_model("default")
