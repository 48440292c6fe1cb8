"""Adapter for transformers' Mistral: Llama layout plus an optional sliding attention window."""

from __future__ import annotations

import dataclasses

from . import llama
from .base import ModelConfig

ARCH = "mistral"
LINEAR_PATHS, NORM_PATHS = llama.LINEAR_PATHS, llama.NORM_PATHS  # the Llama layout
weights_from_hf = llama.weights_from_hf
rope_attention_scaling = llama.rope_attention_scaling


def config_from_hf(hf_config) -> ModelConfig:
    """Llama dimensions plus Mistral's sliding window (None when the config disables it)."""
    cfg = llama.config_from_hf(hf_config, ARCH)
    return dataclasses.replace(cfg, sliding_window=getattr(hf_config, "sliding_window", None))
