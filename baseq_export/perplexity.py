"""Perplexity over non-overlapping token windows, for any backend that maps ids to logits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Perplexity:
    """Result of an evaluation: perplexity, mean negative log-likelihood and tokens scored."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    label: str = ""  # what ran (api.evaluate fills it in)


NLL_ROWS = 64
"""Predictions scored at a time: their float64 log-softmax stays small (64 x 49152 entries is 25 MB) where a whole
window's would be 200 MB, twice, next to the logits themselves."""


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) and count for logits [B, T, V] of ids [B, T], NLL_ROWS predictions at a time."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1)
    total = sum(float(F.cross_entropy(pred[i : i + NLL_ROWS].to(torch.float64), target[i : i + NLL_ROWS], reduction="sum"))
                for i in range(0, target.numel(), NLL_ROWS))
    return total, target.numel()


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity") -> Perplexity:
    """exp(mean NLL) of every next-token prediction inside each window (the first token is context only)."""
    total, count = 0.0, 0
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False)
    for start in bar:
        ids = windows[start : start + batch_size]
        nll, n = window_nll(logits_fn(ids), ids)
        total, count = total + nll, count + n
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, windows.shape[0])
