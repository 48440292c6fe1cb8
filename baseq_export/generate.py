"""Text generation with a KV cache, for any backend that can take one step: greedy or sampled tokens, prompts
through the tokenizer's chat template, text streamed as it comes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
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


Choose = Callable[[torch.Tensor], int]
"""Picks the next token from one position's logits [vocab] (argmax_token, or Sampling.chooser())."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 is greedy (argmax); else a draw from the softmax of
    logits / temperature, restricted to the top_k most likely tokens (0: all) and then to the smallest set whose
    probability reaches top_p, from a generator seeded with seed (the same seed gives the same tokens)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be 0 (all tokens) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise ValueError(f"--seed must be 0 or more, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def chooser(self) -> Choose:
        """A token picker with its own random generator (one per generated sequence)."""
        if self.greedy:
            return argmax_token
        rng = np.random.default_rng(self.seed)
        return lambda logits: sample_token(logits, self, rng)


def token_probabilities(logits: torch.Tensor | np.ndarray, s: Sampling) -> np.ndarray:
    """float64 probabilities [vocab] that Sampling s draws from: softmax(logits / temperature) over the top_k
    tokens, then over the smallest most-likely set reaching top_p (zero elsewhere, renormalized)."""
    x = np.asarray(logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits, np.float64)
    order = np.argsort(-x, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    z = x[order] / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), s.top_p * (1 - 1e-12))) + 1
    out = np.zeros_like(x)
    out[order[:keep]] = p[:keep] / p[:keep].sum()
    return out


def sample_token(logits: torch.Tensor | np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """One draw from token_probabilities (inverse CDF on one uniform number of rng)."""
    p = token_probabilities(logits, s)
    return min(int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right")), p.size - 1)


def token_stream(step: Step, prompt_ids: list[int], choose: Choose = argmax_token) -> Iterator[int]:
    """Tokens after prompt_ids picked by choose, one model step each, for as long as the caller reads."""
    logits = step(prompt_ids)
    while True:
        token = choose(logits)
        yield token
        logits = step([token])


def greedy_stream(step: Step, prompt_ids: list[int]) -> Iterator[int]:
    """Argmax tokens after prompt_ids, one model step each, for as long as the caller reads."""
    return token_stream(step, prompt_ids, argmax_token)


def greedy_tokens(step: Step, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The argmax continuation of prompt_ids (stops after eos)."""
    out: list[int] = []
    for token in itertools.islice(greedy_stream(step, prompt_ids), max_new_tokens):
        out.append(token)
        if token == eos:
            break
    return out


def stop_ids(tokenizer) -> set[int]:
    """Tokens that end a reply: eos, and for a chat template the end-of-turn token that closes an assistant turn
    (a template's text right after the reply, as when eos is not the token the template writes there)."""
    stops = {tokenizer.eos_token_id} - {None}
    if has_chat_template(tokenizer):
        probe = "\x00reply\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}],
                                             tokenize=False)
        after = text.split(probe, 1)[1] if probe in text else ""
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        special = set(tokenizer.all_special_ids)
        stops |= {i for i in ids[:1] if i in special}
    return stops


def stream_text(tokens: Iterable[int], tokenizer, max_new_tokens: int, on_text: Callable[[str], None],
                stops: set[int] | None = None) -> str:
    """Decode tokens as they arrive, sending each new piece of text to on_text; stops at a stop token (stop_ids)."""
    stops = stop_ids(tokenizer) if stops is None else stops
    produced: list[int] = []
    shown = ""
    for token in itertools.islice(tokens, max_new_tokens):
        if token in stops:
            break
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        on_text(text[len(shown):])
        shown = text
    return shown


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A raw prompt's ids (no special tokens added)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; pass some text with --prompt")
    return ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids of a conversation (role/content messages) through the tokenizer's own chat template, ending with
    the prompt for the assistant's turn: what an instruct model was trained to answer. transformers renders the
    template in a sandboxed jinja environment."""
    if not has_chat_template(tokenizer):
        raise ValueError("this tokenizer has no chat template; send plain text with --raw")
    from jinja2 import TemplateError

    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except TemplateError as e:  # the sandbox's refusal (SecurityError) among them
        raise ValueError(f"the tokenizer's chat template cannot be rendered ({type(e).__name__}: {e}); send plain "
                         "text with --raw, or fix chat_template in tokenizer_config.json") from e
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


@dataclass
class Conversation:
    """A runner (a targets.Backend) and its tokenizer, and the turns so far. ask() sends one user turn through the
    chat template (with the history) or, raw or without a template, the text alone; the reply streams to on_text."""

    backend: object
    tokenizer: object
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 64
    raw: bool = False
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.choose = None if self.sampling.greedy else self.sampling.chooser()  # one generator for the whole talk

    @property
    def chat(self) -> bool:
        """True when turns go through the tokenizer's chat template."""
        return not self.raw and has_chat_template(self.tokenizer)

    def prompt(self, text: str) -> list[int]:
        """The ids a turn with this text feeds the model."""
        if not self.chat:
            return prompt_ids(self.tokenizer, text)
        return chat_ids(self.tokenizer, self.messages + [{"role": "user", "content": text}])

    def ask(self, text: str, on_text: Callable[[str], None] = lambda _piece: None) -> str:
        """The model's reply to text (generated until a stop token or max_new_tokens), kept in the history."""
        ids = self.prompt(text)
        tokens = self.backend.generate(ids, self.max_new_tokens, self.choose)
        reply = stream_text(tokens, self.tokenizer, self.max_new_tokens, on_text)
        if self.chat:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply
