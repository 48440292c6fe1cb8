"""Adapter for transformers' Llama family (Llama 2/3, SmolLM2): where each weight lives."""

from __future__ import annotations

import torch

from .base import LINEARS, ModelConfig

ARCH = "llama"

# Canonical projection name -> attribute path inside a transformers decoder layer.
LINEAR_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
NORM_PATHS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def config_from_hf(hf_config, arch: str = ARCH) -> ModelConfig:
    """Read the dimensions of a transformers Llama-style config."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{arch}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    return ModelConfig(
        arch=arch,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        rms_eps=float(c.rms_norm_eps),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def weights_from_hf(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Flat canonical weight dict (see models.base) from a transformers *ForCausalLM model."""
    inner = model.model
    w: dict[str, torch.Tensor] = {"embed": inner.embed_tokens.weight.detach()}
    for i, layer in enumerate(inner.layers):
        for name, path in NORM_PATHS.items():
            w[f"layers.{i}.{name}"] = _get(layer, path).weight.detach()
        for name in LINEARS:
            mod = _get(layer, LINEAR_PATHS[name])
            w[f"layers.{i}.{name}.weight"] = mod.weight.detach()
            if getattr(mod, "bias", None) is not None:
                w[f"layers.{i}.{name}.bias"] = mod.bias.detach()
    w["norm"] = inner.norm.weight.detach()
    w["lm_head"] = w["embed"] if cfg.tied_embeddings else model.lm_head.weight.detach()
    w["rope.inv_freq"] = inner.rotary_emb.inv_freq.detach().clone()
    return w


def rope_attention_scaling(model) -> float:
    """The post-scaling factor transformers applies to cos/sin (1.0 except for some RoPE types)."""
    return float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
