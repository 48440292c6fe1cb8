"""Greedy text generation with a KV cache, for any backend that can take one step."""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

# new token ids -> logits of the last position [vocab]; a stepper may reuse the tensor's memory for the next
# step's logits (the shared-buffer runner does), so copy it to keep it
Step = Callable[[list[int]], torch.Tensor]


def argmax_token(logits: torch.Tensor) -> int:
    """The greedy token of one position's logits (the first of equal maxima, as torch.argmax). numpy on a CPU
    float32 vector: a decode step pays a few microseconds for it instead of torch's dispatch (about 60 us)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return int(logits.detach().numpy().argmax())
    return int(torch.argmax(logits))


def torch_stepper(model) -> Step:
    """Steps of a reference.QuantizedModel (the PyTorch reference) with its KV cache."""
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


def greedy_stream(step: Step, prompt_ids: list[int]) -> Iterator[int]:
    """Argmax tokens after prompt_ids, one model step each, for as long as the caller reads."""
    logits = step(prompt_ids)
    while True:
        token = argmax_token(logits)
        yield token
        logits = step([token])


def greedy_tokens(step: Step, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The argmax continuation of prompt_ids (stops after eos)."""
    out: list[int] = []
    for token in itertools.islice(greedy_stream(step, prompt_ids), max_new_tokens):
        out.append(token)
        if token == eos:
            break
    return out


def stream_text(tokens: Iterable[int], tokenizer, max_new_tokens: int, on_text: Callable[[str], None]) -> str:
    """Decode tokens as they arrive, sending each new piece of text to on_text; stops at eos."""
    produced: list[int] = []
    shown = ""
    for token in itertools.islice(tokens, max_new_tokens):
        if token == tokenizer.eos_token_id:
            break
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        on_text(text[len(shown):])
        shown = text
    return shown


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; pass some text with --prompt")
    return ids
