"""Greedy text generation with a KV cache, for any backend that can take one step."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Step = Callable[[list[int]], torch.Tensor]  # new token ids -> logits of the last position [vocab]


def torch_stepper(model) -> Step:
    """Steps of a qmodel.QuantizedModel (the PyTorch reference) with its KV cache."""
    from .models.base import new_cache

    cache = new_cache(model.config)

    @torch.inference_mode()
    def step(ids: list[int]) -> torch.Tensor:
        return model.logits(torch.tensor([ids]), cache)[0, -1]

    return step


def onnx_stepper(model) -> Step:
    """Steps of an export.onnx.OnnxModel with its past/present KV cache."""
    state = {"past": model.empty_cache(1)}

    def step(ids: list[int]) -> torch.Tensor:
        logits, state["past"] = model.step(np.array([ids], dtype=np.int64), state["past"])
        return torch.from_numpy(logits[0, -1])

    return step


def greedy_tokens(step: Step, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The argmax continuation of prompt_ids, one token per step after the prompt."""
    out: list[int] = []
    logits = step(prompt_ids)
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        out.append(token)
        if eos is not None and token == eos:
            break
        logits = step([token])
    return out


def generate(step: Step, tokenizer, prompt: str, max_new_tokens: int, on_text: Callable[[str], None]) -> str:
    """Greedy generation that streams decoded text through on_text as tokens arrive."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; pass some text with --prompt")
    on_text(prompt)
    produced: list[int] = []
    shown = ""
    logits = step(ids)
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        if token == tokenizer.eos_token_id:
            break
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        on_text(text[len(shown):])
        shown = text
        logits = step([token])
    return prompt + shown
