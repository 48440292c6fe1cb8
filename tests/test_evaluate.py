import math

import numpy as np
import torch

from baseq_export.perplexity import perplexity


def numpy_ppl(logits: np.ndarray, ids: np.ndarray) -> float:
    """Independent reference: log-softmax in float64 numpy over every next-token prediction."""
    lg = logits[:, :-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    picked = np.take_along_axis(lg, ids[:, 1:, None], axis=-1)[..., 0]
    return float(np.exp((lse - picked).mean()))


def test_perplexity_matches_numpy_reference():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 50, generator=gen, dtype=torch.float64) * 3

    def logits_fn(ids):  # a bigram "model": logits depend on the current token only
        return table[ids]

    for n, t, batch in ((7, 20, 1), (7, 20, 3), (3, 150, 2)):  # the last scores more rows than NLL_ROWS at a time
        windows = torch.randint(0, 50, (n, t), generator=gen)
        r = perplexity(logits_fn, windows, batch_size=batch)
        assert r.tokens == n * (t - 1) and r.windows == n
        assert math.isclose(r.ppl, numpy_ppl(table[windows].numpy(), windows.numpy()), rel_tol=1e-12)


def test_uniform_model_has_vocab_perplexity():
    windows = torch.randint(0, 32, (4, 9))
    r = perplexity(lambda ids: torch.zeros(*ids.shape, 32), windows)
    assert math.isclose(r.ppl, 32.0, rel_tol=1e-6)
