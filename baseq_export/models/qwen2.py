"""Adapter for transformers' Qwen2 / Qwen2.5: Llama layout with biases on q/k/v."""

from __future__ import annotations

import dataclasses

from . import llama
from .base import ModelConfig

ARCH = "qwen2"
LINEAR_PATHS, NORM_PATHS = llama.LINEAR_PATHS, llama.NORM_PATHS  # the Llama layout
weights_from_hf = llama.weights_from_hf  # picks up the q/k/v biases where the modules have them
rope_attention_scaling = llama.rope_attention_scaling


def config_from_hf(hf_config) -> ModelConfig:
    """Llama dimensions; Qwen2 slides its window only on layers >= max_window_layers when enabled."""
    cfg = llama.config_from_hf(hf_config, ARCH)
    window = None
    if getattr(hf_config, "use_sliding_window", False):
        first_sliding = getattr(hf_config, "max_window_layers", 0)
        if 0 < first_sliding < cfg.num_layers:
            raise ValueError("qwen2: sliding windows on only some layers (max_window_layers) are not supported")
        if first_sliding == 0:
            window = hf_config.sliding_window
    return dataclasses.replace(cfg, sliding_window=window)
