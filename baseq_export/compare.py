"""How far a model's next-token distributions lie from the full-precision model's, as llama.cpp's
`llama-perplexity --kl-divergence` reports it: per-token KL(P_fp || Q) (mean, median, 99th percentile, maximum) and
the top-1 agreement (the share of positions whose most likely token is the FP model's).

The FP side is computed once and kept small: at every scored position its TOP_K most likely tokens with their
log-probabilities, the rest of its mass as one bucket, and its NLL of the true next token (so its perplexity is
exact). KL over that partition is at most the full KL (grouping tokens never raises a KL divergence), and equal to
it when the FP mass outside the top K is zero; with K = 256 the difference is far below the figures' digits
(test_compare.py measures it). FP references are cached by model digest and windows (fp_reference).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .perplexity import window_nll

TOP_K = 256
"""FP tokens kept per position."""
ROWS = 64
"""Positions whose float64 log-softmax is held at a time (as perplexity.NLL_ROWS)."""


@dataclass(frozen=True)
class FPTop:
    """The FP model on token windows [n, T]: for positions 0..T-2, its TOP_K most likely next tokens `ids`
    [n, T-1, K] (most likely first), their log-probabilities `logp`, the log of the mass of all other tokens
    `rest` [n, T-1] (float64, -inf when the top K is the whole vocabulary) and its NLL of the true next token `nll`."""

    windows: torch.Tensor
    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor
    nll: torch.Tensor

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.double().mean()))


@dataclass(frozen=True)
class Comparison:
    """A model against the FP model on the same windows."""

    ppl: float
    fp_ppl: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1: float  # share of positions whose argmax is the FP model's argmax
    positions: int
    windows: int
    label: str = ""


def rest_logmass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability of every token but ids [P, K], from log-probabilities [P, V] (float64, exact:
    a logsumexp of those tokens, not 1 minus a sum); -inf where ids is the whole vocabulary."""
    return logp.scatter(-1, ids.long(), float("-inf")).logsumexp(-1)


def top_logprobs(logits: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32, log-probabilities float32, rest_logmass float64) of the k (default TOP_K) most likely tokens of
    logits [P, V], most likely first."""
    k = k or TOP_K
    ids, logp, rest = [], [], []
    for i in range(0, logits.shape[0], ROWS):
        lp = F.log_softmax(logits[i : i + ROWS].to(torch.float64), dim=-1)
        v, j = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        ids.append(j.to(torch.int32))
        logp.append(v.to(torch.float32))
        rest.append(rest_logmass(lp, j))
    return torch.cat(ids), torch.cat(logp), torch.cat(rest)


def token_kl(top_ids: torch.Tensor, top_logp: torch.Tensor, rest: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """float64 KL(P || Q) [P] of each position: P the FP model (its top tokens, the rest one bucket), Q the
    softmax of logits [P, V] over the same partition."""
    out = []
    for i in range(0, logits.shape[0], ROWS):
        logq = F.log_softmax(logits[i : i + ROWS].to(torch.float64), dim=-1)
        ids = top_ids[i : i + ROWS].long()
        lp = top_logp[i : i + ROWS].to(torch.float64)
        kl = (lp.exp() * (lp - torch.gather(logq, -1, ids))).sum(-1)
        lp_rest, lq_rest = rest[i : i + ROWS].to(torch.float64), rest_logmass(logq, ids)
        kl += torch.where(torch.isfinite(lp_rest), lp_rest.exp() * (lp_rest - lq_rest), torch.zeros_like(lp_rest))
        out.append(kl.clamp_min(0))
    return torch.cat(out)


@torch.no_grad()
def fp_top(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, desc: str = "FP") -> FPTop:
    """The FP model's FPTop on windows [n, T] (logits_fn: ids [1, T] -> logits [1, T, V])."""
    ids, logp, rest, nll = [], [], [], []
    for w in tqdm(windows, desc=f"{desc} top-{TOP_K} log-probabilities", unit="window", leave=False):
        logits = logits_fn(w[None])[0, :-1]
        i, lp, r = top_logprobs(logits)
        ids.append(i)
        logp.append(lp)
        rest.append(r)
        nll.append(torch.cat([F.cross_entropy(logits[r : r + ROWS].to(torch.float64), w[1:][r : r + ROWS], reduction="none")
                              for r in range(0, logits.shape[0], ROWS)]))
    return FPTop(windows, torch.stack(ids), torch.stack(logp), torch.stack(rest), torch.stack(nll))


@torch.no_grad()
def compare(logits_fn: Callable[[torch.Tensor], torch.Tensor], fp: FPTop, desc: str = "KL divergence") -> Comparison:
    """A model's perplexity, per-token KL divergence from the FP model and top-1 agreement on fp's windows."""
    kls, agree, total, count = [], 0, 0.0, 0
    for n, w in enumerate(tqdm(fp.windows, desc=desc, unit="window", leave=False)):
        logits = logits_fn(w[None])
        nll, c = window_nll(logits, w[None])
        total, count = total + nll, count + c
        pred = logits[0, :-1]
        kls.append(token_kl(fp.ids[n], fp.logp[n], fp.rest[n], pred))
        agree += int((pred.argmax(-1) == fp.ids[n][:, 0].long()).sum())
    kl = torch.cat(kls).numpy()
    return Comparison(math.exp(total / count), fp.ppl, float(kl.mean()), float(np.median(kl)),
                      float(np.percentile(kl, 99)), float(kl.max()), agree / kl.size, int(kl.size), len(fp.windows))


def cache_dir() -> Path:
    """Where FP references are kept: $BASEQ_EXPORT_CACHE, else $XDG_CACHE_HOME/baseq-export (~/.cache)."""
    if os.environ.get("BASEQ_EXPORT_CACHE"):
        return Path(os.environ["BASEQ_EXPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baseq-export"


def reference_key(model_digest: str, windows: torch.Tensor) -> str:
    """The cache key of an FP reference: the model's weights digest, the windows' token ids and TOP_K."""
    h = hashlib.sha256(f"{model_digest}:{tuple(windows.shape)}:{TOP_K}:".encode())
    h.update(windows.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


def load_reference(path: Path, windows: torch.Tensor) -> FPTop | None:
    """A cached FPTop (numpy arrays, no pickle), or None when absent or not for these windows."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if not np.array_equal(z["windows"], windows.numpy()):
                return None
            return FPTop(windows, *(torch.from_numpy(z[k]) for k in ("ids", "logp", "rest", "nll")))
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache file is computed again


def save_reference(path: Path, fp: FPTop) -> None:
    """Write an FPTop atomically (a temporary beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, windows=fp.windows.numpy(), ids=fp.ids.numpy(), logp=fp.logp.numpy(), rest=fp.rest.numpy(),
                 nll=fp.nll.numpy())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
