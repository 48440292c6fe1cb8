"""Text corpora and token windows: the embedded CPython docs text, user files, calibration samples.

The embedded text is CPython's own documentation prose (`pydoc_data.topics`), split by topic
name with a hash so the calibration and evaluation parts are disjoint and the same everywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

SPLITS = ("calib", "eval")
EVAL_BUCKETS = 4  # of 16 hash buckets: about a quarter of the topics are held out for evaluation


def embedded_topics() -> dict[str, str]:
    """The documentation topics that CPython ships, by name."""
    from pydoc_data.topics import topics

    return dict(topics)


def topic_split(text: str) -> str:
    """'eval' or 'calib' for a topic, decided by a hash of its text (stable; identical topics agree)."""
    bucket = hashlib.sha256(text.strip().encode()).digest()[0] % 16
    return "eval" if bucket < EVAL_BUCKETS else "calib"


def split_topics(split: str) -> list[str]:
    """Sorted topic names of one split of the embedded text."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted(n for n, text in embedded_topics().items() if topic_split(text) == split)


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def embedded_text(split: str) -> str:
    """The text of one split: its topics' paragraphs in sorted order, each paragraph once.

    Some topics repeat paragraphs of others ("if" and "else" share a page), so every paragraph
    is kept only at its first occurrence, and evaluation drops any that calibration has too.
    """
    topics = embedded_topics()
    seen: set[str] = set()
    if split == "eval":
        seen = {p for n in split_topics("calib") for p in paragraphs(topics[n])}
    kept = []
    for name in split_topics(split):
        for p in paragraphs(topics[name]):
            if p not in seen:
                seen.add(p)
                kept.append(p)
    return "\n\n".join(kept)


def read_text_file(path: str | Path) -> str:
    """A user's UTF-8 text file, with a clear error when it is missing, unreadable or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist; pass a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e}); convert it to UTF-8 first") from e
    if "\x00" in text:
        raise ValueError(f"{p} holds NUL bytes, so it is a binary file, not text; pass a UTF-8 text file")
    if not text.strip():
        raise ValueError(f"{p} is empty; it needs text to calibrate or evaluate on")
    return text


def corpus_text(split: str, path: str | Path | list | tuple | None = None) -> str:
    """A user's file, or several joined by blank lines, when given; else the embedded split."""
    if isinstance(path, (list, tuple)):
        return "\n\n".join(read_text_file(p) for p in path) if path else embedded_text(split)
    return read_text_file(path) if path else embedded_text(split)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of a text as one 1-D int64 tensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def token_windows(tokens: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, ctx] from the start of the stream; the tail shorter than ctx is dropped."""
    if ctx < 2:
        raise ValueError(f"context length must be at least 2, got {ctx}")
    n = tokens.numel() // ctx
    if n == 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of {ctx}; use more text or a smaller --ctx")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * ctx].view(n, ctx).clone()


def calibration_windows(tokens: torch.Tensor, n: int, ctx: int, seed: int = 0) -> torch.Tensor:
    """n windows [n, ctx] starting at seeded random offsets (the same seed gives the same windows)."""
    if tokens.numel() < ctx:
        raise ValueError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {ctx}; "
                         "use a longer --calib-text or a smaller --calib-ctx")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - ctx + 1, (n,), generator=gen)
    return torch.stack([tokens[s : s + ctx] for s in starts.tolist()])
