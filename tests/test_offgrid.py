"""tools/offgrid_copy.py: a function-preserving copy of a model whose weights are on no 4-bit grid."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from baseq_export.models import from_hf_model, load_model
from baseq_export.models.base import forward
from baseq_export.quant import rtn_quantize
from conftest import tiny_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import offgrid_copy  # noqa: E402


def q4_1_rel_err(w: torch.Tensor) -> float:
    w = w.to(torch.float32)
    return float((rtn_quantize(w, grid="q4_1").dequantize() - w).norm() / w.norm())


def word_tokenizer():
    """A word-level tokenizer (the copy keeps whatever tokenizer it is given)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of to and in is it that for on with as was by be this are or from".split()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def on_grid():
    """A tiny tied Llama whose block linears and embedding lie on the Q4_1 grid, like the default model."""
    m = tiny_hf_model("llama", dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.copy_(rtn_quantize(p.detach(), grid="q4_1").dequantize())
    return m


def test_copy_keeps_logits_and_leaves_the_grid(on_grid, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = word_tokenizer()
    out = offgrid_copy.make_copy(on_grid, tokenizer, tmp_path / "copy", seed=3)
    assert (out / "tokenizer.json").is_file()
    copy_ = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    assert copy_.config.tie_word_embeddings is False  # the folded final norm unties the head
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = on_grid(ids).logits, copy_(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # float32 model: rounding of the rotated matmuls
    sd0, sd1 = on_grid.state_dict(), copy_.state_dict()
    for name, p in sd1.items():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p))  # gains folded
        elif p.dim() == 2 and name != "lm_head.weight":
            assert q4_1_rel_err(sd0[name]) < 1e-6, name  # the source is on the grid ...
            assert q4_1_rel_err(p) > 1e-2, name  # ... the copy is not
    # the canonical loader (what `baseq-export --model DIR` uses) reads it and computes the same logits
    m = load_model(str(out))
    assert m.tokenizer("the a of")["input_ids"] == tokenizer("the a of")["input_ids"]
    torch.testing.assert_close(forward(m.config, m.weights, ids), a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_offgrid_weights_are_function_preserving_in_float64(arch):
    m = from_hf_model(tiny_hf_model(arch, dtype=torch.float64))
    cfg, w = offgrid_copy.offgrid_weights(m.config, m.weights, seed=1)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(forward(cfg, w, ids), forward(m.config, m.weights, ids), rtol=1e-10, atol=1e-10)
    # seeded: the same seed gives the same copy, another seed another one
    _, w2 = offgrid_copy.offgrid_weights(m.config, m.weights, seed=1)
    _, w3 = offgrid_copy.offgrid_weights(m.config, m.weights, seed=2)
    assert torch.equal(w["embed"], w2["embed"]) and not torch.allclose(w["embed"], w3["embed"])


def test_random_orthogonal_is_orthogonal_and_dense():
    from baseq_export.rotate import random_orthogonal

    q = random_orthogonal(48, seed=5)
    torch.testing.assert_close(q @ q.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    # not a scaled +-1 (Hadamard-like) matrix: entries take many magnitudes
    assert q.abs().unique().numel() > 1000


def test_copy_refuses_to_overwrite(on_grid, tmp_path):
    (tmp_path / "user").mkdir()
    with pytest.raises(FileExistsError, match="not an off-grid copy"):
        offgrid_copy.make_copy(on_grid, None, tmp_path / "user", force=True)
    out = offgrid_copy.make_copy(on_grid, None, tmp_path / "c")
    with pytest.raises(FileExistsError, match="--force"):
        offgrid_copy.make_copy(on_grid, None, out)
    offgrid_copy.make_copy(on_grid, None, out, seed=4, force=True)
