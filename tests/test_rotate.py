import pytest
import torch

from baseq_export.hadamard import hadamard_matrix
from baseq_export.models import from_hf_model
from baseq_export.models.base import forward
from baseq_export.rotate import RotationHooks, fold_norms, random_signs, rotate_model, rotate_r1
from conftest import tiny_hf_model

# hidden 96 = 12*8, head_dim 24 = 12*2, ffn 160 = 20*8: non-power-of-two Hadamards everywhere
ODD_DIMS = dict(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dims", [{}, ODD_DIMS], ids=["pow2", "non-pow2"])
def test_rotated_model_reproduces_logits(arch, dims):
    m = from_hf_model(tiny_hf_model(arch, **dims))
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))
    ref = forward(m.config, m.weights, ids)
    cfg, w = rotate_model(m.config, m.weights, seed=3)
    out = forward(cfg, w, ids, hooks=RotationHooks(r3=True, r4=True))
    assert max_rel_diff(out, ref) < 1e-10
    # the rotation really changed the weights (not an identity that passes trivially)
    assert not torch.allclose(w["layers.0.q.weight"], m.weights["layers.0.q.weight"] * m.weights["layers.0.attn_norm"])
    # without the online R4 the folded down_proj no longer matches: the online part is needed
    wrong = forward(cfg, w, ids, hooks=RotationHooks(r3=True, r4=False))
    assert max_rel_diff(wrong, ref) > 1e-3


def test_r1_is_diag_signs_times_hadamard():
    m = from_hf_model(tiny_hf_model("llama", **ODD_DIMS))
    cfg, w = fold_norms(m.config, m.weights)
    rotated = rotate_r1(cfg, w, seed=5)
    r1 = torch.diag(random_signs(96, 5)) @ hadamard_matrix(96)
    torch.testing.assert_close(rotated["embed"], w["embed"] @ r1)
    torch.testing.assert_close(rotated["layers.1.o.weight"], r1.T @ w["layers.1.o.weight"])
    torch.testing.assert_close(r1 @ r1.T, torch.eye(96, dtype=torch.float64))


def test_rotation_needs_folded_norms():
    m = from_hf_model(tiny_hf_model("llama"))
    with pytest.raises(ValueError, match="fold_norms first"):
        rotate_r1(m.config, m.weights)


def test_tied_embeddings_are_untied_and_model_stays_correct():
    m = from_hf_model(tiny_hf_model("llama"))
    assert m.config.tied_embeddings
    cfg, w = rotate_model(m.config, m.weights)
    assert not cfg.tied_embeddings and w["lm_head"] is not w["embed"]


@pytest.mark.real_model
def test_default_model_rotation_is_exact(default_model):
    w64 = {k: v.to(torch.float64) for k, v in default_model.weights.items()}
    cfg = default_model.config
    ids = torch.tensor([default_model.tokenizer("def rotate(x):\n    return x @ H  # a Hadamard rotation")["input_ids"]])
    ref = forward(cfg, w64, ids)
    rcfg, rw = rotate_model(cfg, w64, seed=0)
    out = forward(rcfg, rw, ids, hooks=RotationHooks(r3=True, r4=True))
    assert max_rel_diff(out, ref) < 1e-4


def test_head_mix_ties_a_rotated_head_to_the_embedding():
    """fold_norms + R1 untie a tied head (E diag(g) R1 vs E R1); head_mix recovers M with lm_head = embed @ M, so
    the embedding table times M reproduces the head's logits; a genuinely untied head gives None."""
    from baseq_export.rotate import head_mix

    m = from_hf_model(tiny_hf_model("llama"))
    cfg, w = rotate_model(m.config, m.weights, seed=0)
    mix = head_mix(w["embed"], w["lm_head"])
    assert mix is not None and mix.shape == (cfg.hidden_size, cfg.hidden_size)
    h = torch.randn(5, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direct = h @ w["lm_head"].T
    via_mix = (h @ mix.double().T) @ w["embed"].T
    assert torch.allclose(via_mix, direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))
    untied = from_hf_model(tiny_hf_model("qwen2")).weights
    assert head_mix(untied["embed"], untied["lm_head"]) is None


def test_head_mix_of_a_rank_deficient_embedding_solves_it_densely():
    """An embedding with a dead column has a singular Gram matrix: head_mix falls back to one dense least-squares
    solve, and embed @ M still reproduces the head; a head outside the embedding's span gives None."""
    from baseq_export.rotate import head_mix

    gen = torch.Generator().manual_seed(4)
    embed = torch.randn(300, 16, generator=gen)
    embed[:, 5] = 0.0
    mix = torch.randn(16, 16, generator=gen)
    lm_head = embed @ mix
    got = head_mix(embed, lm_head)
    assert got is not None
    assert torch.allclose(embed.double() @ got.double(), lm_head.double(), rtol=1e-5, atol=1e-5 * float(lm_head.abs().max()))
    assert head_mix(embed, lm_head + torch.randn(300, 16, generator=gen)) is None
