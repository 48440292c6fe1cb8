"""Quality against the FP model (compare.py, `eval --against`): per-token KL divergence and top-1 agreement checked
against numpy's full-vocabulary computation, the FP side's cache, and the same figures from every runtime that
scores an export here (torch reference, onnxruntime, onnxruntime-genai, llama.cpp). Tiny random models."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch

from baseq_export import api, compare
from baseq_export.cli import main
from baseq_export.gptq_model import quantize_model
from baseq_export.models.base import forward
from baseq_export.settings import QuantSettings
from test_gguf import bpe_tokenizer, quiet_write, save, tiny


def numpy_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Full-vocabulary KL(P || Q) per row, in float64 numpy."""
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_token_kl_is_the_full_kl_when_the_top_k_holds_the_vocabulary():
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(90, 200, generator=gen) * 3, torch.randn(90, 200, generator=gen) * 3
    ids, logp, rest = compare.top_logprobs(p)
    got = compare.token_kl(ids, logp, rest, q).numpy()
    assert torch.isinf(rest).all()
    assert np.abs(got - numpy_kl(p.numpy(), q.numpy())).max() < 1e-5  # float32 log-probabilities kept


def test_token_kl_over_the_top_k_bounds_the_full_kl_from_below_and_closely():
    """Grouping the FP tail into one bucket can only lower KL, and little: here (Gaussian logits, 8% of the FP mass
    outside the top 256 on average) by 2.3%; a language model's tail is lighter (docs/results.md measures it)."""
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(64, 5000, generator=gen) * 4
    q = p + torch.randn(64, 5000, generator=gen) * 0.5
    got = compare.token_kl(*compare.top_logprobs(p), q).numpy()
    full = numpy_kl(p.numpy(), q.numpy())
    assert (got <= full + 1e-9).all() and abs(got.mean() / full.mean() - 1) < 0.03, (got.mean(), full.mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    tok = bpe_tokenizer()
    hf, model = tiny("llama", tok)
    ckpt = tmp / "ckpt"
    hf.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32, weight_grid="q4_0", r4=False))
    text = tmp / "text.txt"
    words = "the quick brown fox jumps over the lazy dog hello world a tiny tokenizer for tests".split()
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (600,), generator=gen)))
    return save(tmp, art, tok), ckpt, model, text


def test_compare_gives_numpys_kl_and_agreement_and_caches_the_fp_side(setup, tmp_path, monkeypatch):
    """With the top K holding the tiny model's whole vocabulary (its near-uniform distributions are no language
    model's), the figures are numpy's full-vocabulary ones; the FP side is read back from the cache."""
    path, ckpt, model, text = setup
    monkeypatch.setenv("BASEQ_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compare, "TOP_K", 512)
    r = api.compare(path, str(ckpt), text, ctx=64, max_windows=3)
    art_logits, _, tok = api.runner(path, None, torch.device("cpu"), 64)
    from baseq_export import data
    windows = data.token_windows(data.tokenize(tok(), text.read_text()), 64, 3)
    with torch.no_grad():
        q = torch.cat([art_logits(w[None])[0, :-1] for w in windows]).numpy()
        p = torch.cat([forward(model.config, model.weights, w[None])[0, :-1] for w in windows]).numpy()
    full = numpy_kl(p, q)
    assert r.kld_mean == pytest.approx(full.mean(), rel=1e-4) and r.kld_max == pytest.approx(full.max(), rel=1e-4)
    assert r.kld_median == pytest.approx(np.median(full), rel=1e-4) and r.positions == full.size
    assert r.top1 == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).mean()))
    assert r.ppl == pytest.approx(api.evaluate(path, text, 64, 3).ppl, rel=1e-9)
    assert r.fp_ppl == pytest.approx(api.evaluate(str(ckpt), text, 64, 3).ppl, rel=1e-6)
    assert 0 < r.kld_median <= r.kld_p99 <= r.kld_max and 0 < r.top1 < 1
    cached = list((tmp_path / "cache" / "fp").glob("*.npz"))
    assert len(cached) == 1
    real_fp_top = compare.fp_top
    monkeypatch.setattr(compare, "fp_top", lambda *a, **k: pytest.fail("the FP side was computed again"))
    assert api.compare(path, str(ckpt), text, ctx=64, max_windows=3) == r
    cached[0].write_bytes(b"damaged")  # a damaged cache file is computed again, not trusted
    monkeypatch.setattr(compare, "fp_top", real_fp_top)
    assert api.compare(path, str(ckpt), text, ctx=64, max_windows=3) == r


def test_every_runtime_gives_the_same_figures(setup, tmp_path, monkeypatch, capsys):
    """The export in onnxruntime (a window at once) and in onnxruntime-genai (a token at a time) against the torch
    reference; the GGUF in llama.cpp (its 8-bit activations in Q4_0 dot products: close, not equal)."""
    path, ckpt, _, text = setup
    monkeypatch.setenv("BASEQ_EXPORT_CACHE", str(tmp_path / "cache"))
    ref = api.compare(path, str(ckpt), text, ctx=64, max_windows=2)
    onnx = api.export(path, "onnx", tmp_path / "onnx")
    ort = api.compare(onnx, str(ckpt), text, ctx=64, max_windows=2)
    assert ort.top1 == ref.top1 and abs(ort.kld_mean - ref.kld_mean) < 1e-5 * (1 + ref.kld_mean)
    if importlib.util.find_spec("onnxruntime_genai"):
        g = api.compare(onnx, str(ckpt), text, ctx=64, max_windows=2, backend="onnxruntime-genai")
        assert g.top1 == ort.top1 and abs(g.kld_mean / ort.kld_mean - 1) < 1e-4 and g.ppl == pytest.approx(ort.ppl, rel=1e-5)
    if importlib.util.find_spec("llama_cpp"):
        cpp = api.compare(quiet_write(path, tmp_path / "m.gguf"), str(ckpt), text, ctx=64, max_windows=2)
        assert abs(cpp.kld_mean / ref.kld_mean - 1) < 0.2 and abs(cpp.top1 - ref.top1) < 0.05
    assert main(["eval", str(onnx), "--against", str(ckpt), "--eval-text", str(text), "--ctx", "64",
                 "--max-windows", "2"]) == 0
    out = capsys.readouterr().out
    mean, top1 = re.search(r"KL divergence: mean ([\d.]+).*top-1 agreement ([\d.]+)%", out, re.S).groups()
    assert float(mean) == pytest.approx(ort.kld_mean, abs=1e-5) and float(top1) == pytest.approx(100 * ort.top1, abs=0.01)
    assert main(["eval", "--against", str(ckpt)]) == 1 and "pass its PATH" in capsys.readouterr().err
