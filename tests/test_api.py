"""The public Python API (baseq_export.quantize / export / evaluate) on a tiny checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

import baseq_export as bq
from baseq_export.models.base import forward
from test_cli import tiny_checkpoint


def test_evaluate_fp_is_the_mean_next_token_nll_of_the_forward(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    m = bq.load(str(ckpt), lazy=False)
    windows = torch.randint(0, m.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    logits = forward(m.config, m.weights, windows).to(torch.float64)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    r = bq.evaluate(m, windows=windows)
    assert r.label == "FP" and r.tokens == 3 * 11
    assert r.ppl == pytest.approx(math.exp(float(nll)), rel=1e-9)


def test_quantize_export_evaluate_round_trip(tmp_path):
    """quantize -> export -> evaluate: the saved artifact and its ONNX export score the same text alike, and the
    in-memory artifact (no tokenizer files) refuses to be scored without windows."""
    ckpt, text = tiny_checkpoint(tmp_path)
    opts = dict(method="quarot-gptq", bits="w4a8kv8", calib_text=text, nsamples=4, calib_ctx=16)
    art = bq.quantize(str(ckpt), tmp_path / "t.baseq", **opts)
    assert art.path == tmp_path / "t.baseq" and art.quant["method"] == "quarot-gptq"
    in_memory = bq.quantize(str(ckpt), **opts)
    assert in_memory.path is None
    assert sorted(in_memory.tensors) == sorted(art.tensors)
    for k in art.tensors:  # the same numbers whether written or held
        assert torch.equal(in_memory.tensors[k], art.tensors[k]), k
    with pytest.raises(ValueError, match="pass windows="):
        bq.evaluate(in_memory, text, ctx=16)
    with pytest.raises(ValueError, match="held in memory"):
        bq.export(in_memory, "onnx", tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    onnx_dir = bq.export(art, "onnx", tmp_path / "t-onnx", ops="standard")
    ref, exported = bq.evaluate(art, text, ctx=16), bq.evaluate(onnx_dir, text, ctx=16)
    assert ref.tokens == exported.tokens > 0
    assert exported.ppl == pytest.approx(ref.ppl, rel=5e-3)
    assert "torch reference" in ref.label and "torch" not in exported.label


def test_plan_resolves_presets_and_profiles():
    p = bq.plan("baseq", preset="quick", max_positions=128)
    assert p.baseq.name == "quick" and p.calib_ctx == 128 and p.settings.r1_steps > 0
    g = bq.plan(profile="gguf", group_size=32)
    assert g.baseq is None and g.settings.weight_grid == "q4_1" and g.nsamples > 0
    assert bq.plan("rtn", bits="w4a16").nsamples == 0
    with pytest.raises(ValueError, match="unknown profile"):
        bq.plan(profile="nope")


def test_blockwise_tuning_is_reachable_and_is_tune_blocks(tmp_path):
    """quantize(tune=True) (the CLI's --tune-blocks) writes what tune.tune_blocks makes from the same windows, and
    refuses a method it does not follow."""
    from baseq_export.settings import profile_settings
    from baseq_export.tune import tune_blocks

    ckpt, text = tiny_checkpoint(tmp_path)
    art = bq.quantize(str(ckpt), tmp_path / "t.baseq", profile="gguf", tune=True, calib_text=text, nsamples=6,
                      calib_ctx=16)
    assert "tune" in art.quant and not (tmp_path / "t.baseq.partial").exists()
    m = bq.load(str(ckpt))
    calib = bq.api.calibration_windows(m.tokenizer, 6, 16, 0, text)
    direct = tune_blocks(m, profile_settings("gguf"), calib)
    assert direct.quant == art.quant
    for k in direct.tensors:
        assert torch.equal(direct.tensors[k], art.tensors[k]), k
    with pytest.raises(ValueError, match="follows GPTQ"):
        bq.plan("rtn", bits="w4a16", tune=True)
