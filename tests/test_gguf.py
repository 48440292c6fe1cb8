"""GGUF export: tensors against gguf-py's dequantizer, logits in llama.cpp against transformers and the
torch reference, refusals, overwrite rules and damaged files. Tiny random Llama / Qwen2 models with a
tiny byte-level BPE tokenizer, all built here."""

from __future__ import annotations

import itertools
import json
import warnings

import gguf
import numpy as np
import pytest
import torch

from baseq_export.targets import gguf as G
from baseq_export.gguf_file import GGUFFileError
from baseq_export.models import from_hf_model
from baseq_export.models.base import forward
from baseq_export.gptq_model import quantize_model
from baseq_export.settings import QuantSettings, profile_settings
from baseq_export.artifact import load_artifact, save_artifact
from baseq_export.artifact_tensors import linear_from_tensors
from baseq_export.reference import reference_model
from baseq_export.quant import fp16_ceil, quantize
from conftest import tiny_hf_model

# head_dim 64 (llama.cpp rotates a quantized KV cache only then), every K a multiple of 256 (Q6_K rows)
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
LLAMA_ROW_ORDER = ("q", "k")  # rows llama.cpp's llama graph wants in its own RoPE pair order


def bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer (as the default model's) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, a tiny tokenizer for tests 0123456789"]
    tok.train_from_iterator(text * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def tiny(arch: str, tokenizer):
    """(transformers model, canonical LoadedModel) of a tiny random model in float32."""
    hf = tiny_hf_model(arch, dtype=torch.float32, **DIMS)
    return hf, from_hf_model(hf, tokenizer)


def save(tmp_path, art, tokenizer, name="t.baseq"):
    return save_artifact(tmp_path / name, art, write_extra=lambda d: tokenizer.save_pretrained(str(d)))


def quiet_write(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return G.write(*args, **kwargs)


def read_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by gguf-py, in numpy's [rows, cols] order."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim > 1 else a
    return out


def hf_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k weight in llama.cpp's pair order: per head, halves (j, j + d/2) interleaved (the reshape
    that llama.cpp's converter applies to Hugging Face checkpoints)."""
    n = w.shape[0]
    return w.reshape(heads, 2, n // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_rows(name: str, w: np.ndarray, cfg, arch: str) -> np.ndarray:
    if arch != "llama" or name not in LLAMA_ROW_ORDER:
        return w
    return hf_rope_rows(w, cfg.num_heads if name == "q" else cfg.num_kv_heads)


GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
              "down": "ffn_down"}


def q4_1_grid_artifact(model):
    """An artifact on the Q4_1 grid built here by hand: fp16 m = min of each 32-block, fp16 d covering it,
    w = d * q + m ("weight_grid": "q4_1", tensors .mins instead of .zeros)."""
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32))
    from baseq_export.quant import pack_int4

    for prefix in [n.removesuffix(".qweight") for n in list(art.tensors) if n.endswith(".qweight")]:
        lin = prefix.rsplit(".", 1)[-1]
        w = model.weights[f"{prefix}.weight"].to(torch.float32)
        blocks = w.reshape(w.shape[0], -1, 32)
        m = blocks.amin(-1).to(torch.float16).to(torch.float32)
        m = torch.where(m > blocks.amin(-1), m - m.abs() * 2**-10, m).to(torch.float16).to(torch.float32)
        d = fp16_ceil((blocks.amax(-1) - m) / 15)
        q = torch.round((blocks - m[..., None]) / d[..., None]).clamp(0, 15).to(torch.uint8).reshape(w.shape)
        art.tensors[f"{prefix}.qweight"] = pack_int4(q)
        art.tensors[f"{prefix}.scales"] = d
        art.tensors[f"{prefix}.mins"] = m
        del art.tensors[f"{prefix}.zeros"]
        assert lin in GGUF_NAMES
    art.quant["weight_grid"] = "q4_1"
    return art


def grid_weights(art, cfg) -> dict[str, np.ndarray]:
    """The artifact's 4-bit weights dequantized independently of the writer: (q - zero) * scale, or q * d + m."""
    from baseq_export.models.base import linear_in_features
    from baseq_export.quant import unpack_int4

    out = {}
    for i in range(cfg.num_layers):
        for lin in GGUF_NAMES:
            prefix = f"layers.{i}.{lin}"
            k = linear_in_features(cfg, lin)
            t = art.tensors
            q = unpack_int4(t[f"{prefix}.qweight"], k).to(torch.float64).reshape(-1, k // 32, 32)
            d = t[f"{prefix}.scales"].to(torch.float64).repeat_interleave(k // 32 // t[f"{prefix}.scales"].shape[1], 1)
            if f"{prefix}.mins" in t:
                w = q * d[..., None] + t[f"{prefix}.mins"].to(torch.float64)[..., None]
            else:
                z = t[f"{prefix}.zeros"].to(torch.float64).repeat_interleave(k // 32 // t[f"{prefix}.zeros"].shape[1], 1)
                w = (q - z[..., None]) * d[..., None]
            out[prefix] = w.reshape(-1, k).to(torch.float32).numpy()
    return out


# ---------------------------------------------------------------------------------------------
# (a) the file's tensors are the artifact's weights


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("grid", ["q4_0", "q4_0-profile", "q4_1-grid", "q4_1-profile", "q4_1-legacy"])
def test_q4_tensors_dequantize_to_the_artifacts_weights(tmp_path, tokenizer, arch, grid):
    _, model = tiny(arch, tokenizer)
    cfg = model.config
    if grid == "q4_1-grid":
        art = q4_1_grid_artifact(model)
    elif grid.endswith("-profile"):  # the pipeline's own q4_0 (signed d) / q4_1 grids
        art = quantize_model(model, profile_settings("gguf", method="rtn", weight_grid=grid.removesuffix("-profile"),
                                                     weight_clip="minmax"))
    else:  # symmetric RTN has zero point 8 everywhere: Q4_0 holds it as is
        art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32,
                                                  symmetric=grid == "q4_0"))
    path = save(tmp_path, art, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = G.write(path, tmp_path / "t.gguf")
    rounding = [w for w in caught if "not an fp16 value" in str(w.message)]
    assert bool(rounding) == (grid == "q4_1-legacy")
    r = gguf.GGUFReader(str(out))
    kind = gguf.GGMLQuantizationType.Q4_0 if grid.startswith("q4_0") else gguf.GGMLQuantizationType.Q4_1
    types = {t.name: t.tensor_type for t in r.tensors}
    assert r.get_field("general.architecture").contents() == arch
    got, want = read_tensors(out), grid_weights(art, cfg)
    for i in range(cfg.num_layers):
        for lin, gname in GGUF_NAMES.items():
            name = f"blk.{i}.{gname}.weight"
            assert types[name] == kind
            expected = expected_rows(lin, want[f"layers.{i}.{lin}"], cfg, arch)
            if grid != "q4_1-legacy":
                np.testing.assert_array_equal(got[name], expected)  # bit for bit
                continue
            # legacy integer zeros: the block offset m = -zero * scale is rounded to fp16, nothing else changes
            qw = linear_from_tensors(f"layers.{i}.{lin}", art.tensors, expected.shape[1], 32)
            m = (-qw.zero.to(torch.float64) * qw.scale.to(torch.float64)).numpy()
            m16 = m.astype(np.float16).astype(np.float64)
            q = qw.codes.to(torch.float64).numpy().reshape(*m.shape, 32)
            rounded = (q * qw.scale.to(torch.float64).numpy()[..., None] + m16[..., None]).reshape(expected.shape)
            np.testing.assert_array_equal(got[name], expected_rows(lin, rounded.astype(np.float32), cfg, arch))
            exact = np.repeat(m16 == m, 32, axis=1)
            exact = expected_rows(lin, exact, cfg, arch)
            np.testing.assert_array_equal(got[name][exact], expected[exact])
            assert np.abs(got[name] - expected).max() <= 2**-11 * np.abs(m).max()
            if lin in ("q", "k", "v") and f"layers.{i}.{lin}.bias" in art.tensors:
                bias = art.tensors[f"layers.{i}.{lin}.bias"].numpy()
                np.testing.assert_array_equal(got[f"blk.{i}.{gname}.bias"], expected_rows(lin, bias, cfg, arch))
        np.testing.assert_array_equal(got[f"blk.{i}.attn_norm.weight"], art.tensors[f"layers.{i}.attn_norm"].numpy())
        np.testing.assert_array_equal(got[f"blk.{i}.ffn_norm.weight"], art.tensors[f"layers.{i}.mlp_norm"].numpy())
    has_bias = any(n.endswith(".bias") for n in got)
    assert has_bias == (arch == "qwen2")


def test_head_types_and_a_tied_embedding(tmp_path, tokenizer):
    _, model = tiny("llama", tokenizer)  # tied embeddings
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32))
    path = save(tmp_path, art, tokenizer)
    embed = art.tensors["embed"].numpy()
    one = quiet_write(path, tmp_path / "one.gguf", head="f32")
    t = read_tensors(one)
    assert "output.weight" not in t  # written once, as token_embd
    np.testing.assert_array_equal(t["token_embd.weight"], embed)
    two = quiet_write(path, tmp_path / "two.gguf", head="q6_k", embed="q8_0")
    r = {x.name: x.tensor_type for x in gguf.GGUFReader(str(two)).tensors}
    assert r["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0 and r["output.weight"] == gguf.GGMLQuantizationType.Q6_K
    t = read_tensors(two)
    np.testing.assert_array_equal(t["token_embd.weight"], gguf.quants.dequantize(
        gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0))
    # Q6_K: 16-weight sub-blocks with 8-bit scales and 6-bit codes; error well under a 4-bit grid's
    step = np.abs(embed).reshape(embed.shape[0], -1, 16).max(-1, keepdims=True) / 31
    err = np.abs(t["output.weight"] - embed).reshape(embed.shape[0], -1, 16)
    assert (err <= step * 1.01 + 1e-6).all() and err.max() > 0


def test_four_bit_heads_are_written_from_their_codes(tmp_path, tokenizer):
    _, model = tiny("qwen2", tokenizer)  # untied: embed and lm_head both 4-bit
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32, head_bits=4))
    path = save(tmp_path, art, tokenizer)
    out = quiet_write(path, tmp_path / "h.gguf")
    r = {x.name: x.tensor_type for x in gguf.GGUFReader(str(out)).tensors}
    assert r["token_embd.weight"] == r["output.weight"] == gguf.GGMLQuantizationType.Q4_1
    t = read_tensors(out)
    for name, gname in (("embed", "token_embd.weight"), ("lm_head", "output.weight")):
        qw = linear_from_tensors(name, art.tensors, model.config.hidden_size, 32)
        m = (-qw.zero.to(torch.float64) * qw.scale.to(torch.float64)).numpy()
        exact = np.repeat(m.astype(np.float16).astype(np.float64) == m, 32, axis=1)
        np.testing.assert_array_equal(t[gname][exact], qw.dequantize().numpy()[exact])


# ---------------------------------------------------------------------------------------------
# (b), (c) logits in llama.cpp


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_matches_transformers(tmp_path, tokenizer, arch):
    """Float32 weights and a float32 KV cache: llama.cpp and transformers compute the same function in float32,
    in different summation orders (ggml's blocked dot products vs PyTorch's GEMM) and with different RoPE
    angle arithmetic, so logits agree to float32 accumulation error: 1e-5 of the logit range (measured
    4e-7 and 6e-7)."""
    hf, model = tiny(arch, tokenizer)
    out = G.write_model(model, tmp_path / "f32.gguf", weights="f32", head="f32")
    ids = torch.randint(0, DIMS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = G.open(out, kv_cache="f32", n_threads=2).logits(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def llama_cpp_linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    """models.base.linear as llama.cpp's CPU kernels compute a Q4 matmul: the activation is rounded per block of
    32 to Q8 (id = 127 / max|x|, q8 = round(x * id), fp16 d8 = max|x| / 127; Q8_1 also keeps the fp16 block sum
    s8 = d8 * sum(q8)), then per block Q4_0: d4 * d8 * sum((q4 - 8) * q8); Q4_1: d4 * d8 * sum(q4 * q8) + m4 * s8."""
    q4, d4, m4 = w[f"{name}.q4"]
    n, nb, block = q4.shape
    xb = x.to(torch.float32).reshape(*x.shape[:-1], nb, block)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q8 = torch.round(xb * inv[..., None]).to(torch.float64)
    d8 = (amax / 127).to(torch.float16).to(torch.float64)
    if m4 is None:
        y = torch.einsum("...bk,nbk,nb->...n", q8 * d8[..., None], q4 - 8, d4)
    else:
        s8 = (amax / 127 * q8.sum(-1).to(torch.float32)).to(torch.float16).to(torch.float64)
        y = torch.einsum("...bk,nbk,nb->...n", q8 * d8[..., None], q4, d4) + torch.einsum("...b,nb->...n", s8, m4)
    y = y.to(torch.float32)
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def with_q4_grids(weights: dict, art, cfg) -> dict:
    """The reference weights plus each linear's (codes [N, K/32, 32], d, m or None for Q4_0) in float64 as the
    GGUF holds them (an integer-zero artifact's m = -zero * d rounded to fp16), for llama_cpp_linear."""
    from baseq_export.models.base import linear_in_features

    out = dict(weights)
    for i in range(cfg.num_layers):
        for lin in GGUF_NAMES:
            prefix = f"layers.{i}.{lin}"
            k = linear_in_features(cfg, lin)
            qw = linear_from_tensors(prefix, art.tensors, k, 32, art.quant.get("weight_grid"))
            q = qw.codes.to(torch.float64).reshape(-1, k // 32, 32)
            d = qw.scale.to(torch.float64)
            if qw.grid == "q4_1":
                m = qw.minimum.to(torch.float64)
            elif bool((qw.zero == 8).all()):
                m = None
            else:
                m = (-qw.zero.to(torch.float64) * d).to(torch.float16).to(torch.float64)
            out[f"{prefix}.q4"] = (q, d, m)
    return out


@pytest.mark.parametrize("arch, weights", [(a, w) for w in ("q4_0", "q4_1", "profile-q4_1") for a in ("llama", "qwen2")]
                         + [("llama", "profile-q4_0")])
def test_q4_gguf_matches_the_reference_forward(tmp_path, tokenizer, arch, weights, monkeypatch):
    """A 4-bit GGUF (float32 head and KV cache, so only the linears differ) against the artifact's reference
    forward. llama.cpp multiplies Q4 weights by activations rounded to 8 bits per 32-block (Q8_0 / Q8_1, step
    max|x|/127: up to 1/254 of the block's largest value per element) and, for Q4_1, takes the m term from
    an fp16-rounded block sum; logits so move by about 1% of their range here: tolerance 5%. With that
    arithmetic emulated in the reference (llama_cpp_linear) logits agree to float32 summation order (median
    1e-6 of the range; measured 4e-7 where nothing flips), except that such a last-bit difference can flip
    one Q8 rounding, which moves the logits downstream of it by up to about 1e-3 of their range (measured
    1.2e-4 and 1.3e-3 in two of the four cases): max tolerance 5e-3."""
    import baseq_export.models.base as base

    _, model = tiny(arch, tokenizer)
    if weights.startswith("profile"):  # rotated (R1/R2 folded, norms folded into the linears) GPTQ on llama.cpp's grid
        calib = torch.randint(0, DIMS["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(4))
        grid = weights.removeprefix("profile-")  # the clip search only where it is quick (q4_0's is slow on 2 cores)
        art = quantize_model(model, profile_settings("gguf", weight_grid=grid, weight_clip="mse" if grid == "q4_1" else
                                                     "minmax"), calib)
    else:
        art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32,
                                                  symmetric=weights == "q4_0"))
    path = save(tmp_path, art, tokenizer)
    out = quiet_write(path, tmp_path / "q.gguf", head="f32")
    ids = torch.randint(0, DIMS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    got = G.open(out, kv_cache="f32", n_threads=2).logits(ids)
    ref = reference_model(load_artifact(path), exact=False)
    want = ref.logits(ids)
    scale = want.abs().max()
    assert 1e-3 * scale < (got - want).abs().max() <= 0.05 * scale
    monkeypatch.setattr(base, "linear", llama_cpp_linear)
    emulated = forward(ref.config, with_q4_grids(ref.weights, art, ref.config), ids)
    diff = (got - emulated).abs()
    assert diff.median() <= 1e-6 * scale and diff.max() <= 5e-3 * scale


def test_scaled_rope_is_written_as_rope_freqs(tmp_path, tokenizer):
    """A Llama 3 RoPE (frequencies divided per dimension) reaches llama.cpp as its rope_freqs factors: logits
    match transformers past the original context of 32 as closely as unscaled RoPE does."""
    hf = tiny_hf_model("llama", dtype=torch.float32, **DIMS, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    model = from_hf_model(hf, tokenizer)
    out = G.write_model(model, tmp_path / "r.gguf", weights="f32", head="f32")
    assert "rope_freqs.weight" in read_tensors(out)
    ids = torch.randint(0, DIMS["vocab_size"], (1, 80), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(ids).logits
    got = G.open(out, kv_cache="f32", n_threads=2).logits(ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_biases_on_every_projection_are_loaded(tmp_path, tokenizer, arch, monkeypatch):
    """Bias terms on o/gate/up/down (e.g. folded bias corrections) next to Qwen2's q/k/v ones: llama.cpp's llama
    graph loads them all (its qwen2 graph only q/k/v), so such a Qwen2 model is written as llama; llama.cpp's
    logits then follow the reference forward as in test_q4_gguf_matches_the_reference_forward."""
    import baseq_export.models.base as base

    _, model = tiny(arch, tokenizer)
    art = quantize_model(model, profile_settings("gguf", method="rtn", weight_clip="minmax"))
    gen = torch.Generator().manual_seed(6)
    for i in range(model.config.num_layers):
        for lin, n in (("o", model.config.hidden_size), ("down", model.config.hidden_size),
                       ("gate", model.config.intermediate_size), ("up", model.config.intermediate_size)):
            art.tensors[f"layers.{i}.{lin}.bias"] = 0.3 * torch.randn(n, generator=gen)
    path = save(tmp_path, art, tokenizer)
    out = quiet_write(path, tmp_path / "b.gguf", head="f32")
    r = gguf.GGUFReader(str(out))
    assert r.get_field("general.architecture").contents() == "llama"
    assert {t.name for t in r.tensors} >= {f"blk.1.{g}.bias" for g in ("attn_output", "ffn_down", "ffn_gate", "ffn_up")}
    ids = torch.randint(0, DIMS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    got = G.open(out, kv_cache="f32", n_threads=2).logits(ids)
    ref = reference_model(load_artifact(path), exact=False)
    scale = ref.logits(ids).abs().max()
    monkeypatch.setattr(base, "linear", llama_cpp_linear)
    diff = (got - forward(ref.config, with_q4_grids(ref.weights, art, ref.config), ids)).abs()
    assert diff.median() <= 1e-6 * scale and diff.max() <= 5e-3 * scale


@pytest.mark.parametrize("kv_cache", ["f16", "q8_0", "q4_0"])
def test_kv_cache_types_and_llama_cpps_own_rotation(tmp_path, tokenizer, kv_cache):
    """llama.cpp's KV cache types against the float32 cache. With a quantized cache llama.cpp rotates K/V by a
    Hadamard itself (head_dim 64 here); LLAMA_ATTN_ROT_DISABLE=1 (attn_rot=False) must change the logits."""
    _, model = tiny("llama", tokenizer)
    out = G.write_model(model, tmp_path / "f.gguf", weights="f32", head="f32")
    ids = torch.randint(0, DIMS["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(3))
    base = G.open(out, kv_cache="f32", n_threads=2).logits(ids)
    got = G.open(out, kv_cache=kv_cache, n_threads=2).logits(ids)
    # measured 2e-4 (fp16 K/V), 5e-3 (8-bit blocks of 32), 7e-2 (4-bit blocks; 8e-2 without the rotation)
    tol = {"f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.25}[kv_cache]
    assert 0 < (got - base).abs().max() <= tol * base.abs().max()
    if kv_cache != "f16":
        unrotated = G.open(out, kv_cache=kv_cache, n_threads=2, attn_rot=False).logits(ids)
        assert not torch.equal(unrotated, got)
        assert (unrotated - base).abs().max() <= tol * base.abs().max()


def test_greedy_follows_the_argmax_of_its_logits(tmp_path, tokenizer):
    _, model = tiny("qwen2", tokenizer)
    out = G.write_model(model, tmp_path / "f.gguf", weights="f32", head="f32")
    backend = G.open(out, kv_cache="f32", n_threads=2)
    prompt = [5, 17, 42]
    tokens = list(itertools.islice(backend.greedy(prompt), 6))
    assert len(list(backend.greedy(prompt, max_new_tokens=3))) == 3
    logits = backend.logits(torch.tensor([prompt + tokens]))[0]
    assert tokens == [int(x) for x in logits[len(prompt) - 1 : -1].argmax(-1)]


# ---------------------------------------------------------------------------------------------
# metadata and tokenizer


def test_metadata_and_tokenizer_are_carried_over(tmp_path, tokenizer):
    import llama_cpp

    _, model = tiny("llama", tokenizer)
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32))
    out = quiet_write(save(tmp_path, art, tokenizer), tmp_path / "t.gguf", context_length=256)
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    cfg = model.config
    assert f["llama.block_count"] == cfg.num_layers and f["llama.embedding_length"] == cfg.hidden_size
    assert f["llama.feed_forward_length"] == cfg.intermediate_size and f["llama.context_length"] == 256
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (cfg.num_heads, cfg.num_kv_heads)
    assert f["llama.rope.dimension_count"] == cfg.head_dim and f["llama.vocab_size"] == cfg.vocab_size
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)  # transformers' default, fitted from inv_freq
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_eps)
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1 and f[G.FORMAT_KEY] == G.FORMAT_VALUE
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.chat_template"] == tokenizer.chat_template
    vocab = tokenizer.get_vocab()
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    assert f["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    # llama.cpp's own tokenizer reads the same vocabulary: it splits text as the Hugging Face tokenizer does
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    text = "the lazy fox, hello world 42"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text, add_special_tokens=False)["input_ids"]


def spm_tokenizer():
    """A SentencePiece-style BPE tokenizer (Llama 2 / Mistral: "▁" for spaces, byte fallback), trained on prose."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:40],
                            trainers.BpeTrainer(vocab_size=500, special_tokens=specials, limit_alphabet=60))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_tokenizes_as_in_transformers(tmp_path):
    """llama.cpp's SentencePiece tokenizer merges the pair whose token scores highest; scores from the BPE merge
    ranks make it split text exactly as the Hugging Face tokenizer (gguf-py's LlamaHfVocab placeholder scores,
    all -1000, do not: 130 of 226 ids differ on this text)."""
    import llama_cpp
    import pydoc_data.topics

    tok = spm_tokenizer()
    model = from_hf_model(tiny_hf_model("llama", dtype=torch.float32, hidden_size=64, intermediate_size=128,
                                        vocab_size=512), tok)
    out = G.write_model(model, tmp_path / "s.gguf")
    r = gguf.GGUFReader(str(out))
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    types = r.get_field("tokenizer.ggml.token_type").contents()
    assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tok.bos_token_id] == gguf.TokenType.CONTROL
    text = list(pydoc_data.topics.topics.values())[50][:2000]
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizers_llama_cpp_cannot_read_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "a": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]")
    model = from_hf_model(tiny_hf_model("llama", dtype=torch.float32, hidden_size=64, intermediate_size=128,
                                        vocab_size=8), tok)
    with pytest.raises(G.GGUFExportError, match="WordLevel"):
        G.write_model(model, tmp_path / "w.gguf")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# (d) refusals, (e) overwrite rules, (f) damaged files


@pytest.mark.parametrize("settings, words", [
    (QuantSettings(method="rtn", bits="w4a4kv4", group_size=32), ["w4a4kv4", "--bits w4a16 --group-size 32"]),
    (QuantSettings(method="quarot-rtn", bits="w4a16", group_size=32), ["R4", "--bits w4a16 --group-size 32"]),
    (QuantSettings(method="rtn", bits="w4a16"), None),  # per channel, K % 32 == 0: fine
])
def test_artifacts_llama_cpp_cannot_run_are_refused(tmp_path, tokenizer, settings, words):
    _, model = tiny("llama", tokenizer)
    art = quantize_model(model, settings)
    if words is None:
        G.check_artifact(art)
        return
    with pytest.raises(G.GGUFExportError) as e:
        G.check_artifact(art)
    for w in words:
        assert w in str(e.value)
    path = save(tmp_path, art, tokenizer)
    with pytest.raises(G.GGUFExportError):
        G.write(path, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".x.gguf*"))


def test_per_channel_weights_repeat_per_block(tmp_path, tokenizer):
    _, model = tiny("llama", tokenizer)
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", symmetric=True))
    out = quiet_write(save(tmp_path, art, tokenizer), tmp_path / "pc.gguf")
    got = read_tensors(out)["blk.1.ffn_down.weight"]
    qw = linear_from_tensors("layers.1.down", art.tensors, model.config.intermediate_size, None)
    np.testing.assert_array_equal(got, qw.dequantize().numpy())


def test_existing_files_are_never_clobbered(tmp_path, tokenizer):
    _, model = tiny("llama", tokenizer)
    path = save(tmp_path, quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32)), tokenizer)
    user = tmp_path / "notes.gguf"
    user.write_text("my notes")
    with pytest.raises(FileExistsError, match="--force"):
        quiet_write(path, user)
    with pytest.raises(FileExistsError, match="not a baseq GGUF export"):
        quiet_write(path, user, force=True)
    assert user.read_text() == "my notes"
    ours = quiet_write(path, tmp_path / "ours.gguf")
    with pytest.raises(FileExistsError):
        quiet_write(path, ours, head="f16")
    before = ours.stat().st_size
    assert quiet_write(path, ours, head="f16", force=True) == ours and ours.stat().st_size != before
    assert G.is_export(ours) and not G.is_export(user)
    (tmp_path / "dir").mkdir()
    assert quiet_write(path, tmp_path / "dir") == tmp_path / "dir" / "model.gguf"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_damaged_files_give_a_clear_error_at_open(tmp_path, tokenizer):
    _, model = tiny("llama", tokenizer)
    good = G.write_model(model, tmp_path / "good.gguf", weights="f16", head="f16")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "header.gguf").write_bytes(data[:200])
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(GGUFFileError, match="truncated"):
        G.open(tmp_path / "cut.gguf")
    with pytest.raises(GGUFFileError, match="truncated or damaged"):
        G.open(tmp_path / "header.gguf")
    with pytest.raises(GGUFFileError, match="not a GGUF file"):
        G.open(tmp_path / "text.gguf")
    with pytest.raises(GGUFFileError, match="does not exist"):
        G.open(tmp_path / "missing.gguf")
    assert not G.is_export(tmp_path / "cut.gguf") and G.is_export(good)


def test_target_interface_options(tmp_path, tokenizer):
    import argparse

    p = argparse.ArgumentParser()
    G.add_arguments(p)
    args = p.parse_args(["--gguf-weights", "q4_0", "--gguf-head", "q6_k", "--gguf-kv-cache", "q4_0", "--gguf-ctx", "64",
                         "--gguf-pre", "gpt-2"])
    assert G.options(args) == {"weights": "q4_0", "head": "q6_k", "embed": None, "kv_cache": "q4_0",
                               "context_length": 64, "tokenizer_pre": "gpt-2"}
    sub = argparse.ArgumentParser()
    G.add_arguments(sub, sub=True)
    assert vars(sub.parse_args([])) == {}  # a subcommand does not mask the main parser's values
    assert G.options(argparse.Namespace())["weights"] == "auto" and G.default_out("m") == "m.gguf"
    assert G.main_job_settings(argparse.Namespace()) == {"profile": "gguf", "gguf_mix": G.MAIN_JOB_MIX}
    _, model = tiny("llama", tokenizer)
    asym = save(tmp_path, quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32)), tokenizer)
    with pytest.raises(G.GGUFExportError, match="write it as q4_1"):
        quiet_write(asym, tmp_path / "a.gguf", **G.options(args))
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32, symmetric=True))
    out = quiet_write(save(tmp_path, art, tokenizer, "s.baseq"), tmp_path / "s.gguf", **G.options(args))
    assert f"GGUF export: {out} (MOSTLY_Q4_0," in G.describe(out)
    r = gguf.GGUFReader(str(out))
    assert r.get_field("llama.context_length").contents() == 64 and r.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q6_K and "output.weight" not in types  # tied


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q6_K"])
def test_row_sliced_conversion_writes_the_bytes_of_a_whole_matrix(monkeypatch, qtype):
    from baseq_export.targets.gguf import tensors as T

    qt = gguf.GGMLQuantizationType[qtype]
    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    perm = np.random.default_rng(1).permutation(37)
    whole = T.convert(w.float().numpy()[perm], qt)
    monkeypatch.setattr(T, "CONVERT_ELEMENTS", 3 * 256 + 5)  # 3 rows a slice, the last slice short
    np.testing.assert_array_equal(T.convert_rows(w, qt, perm), whole)
    np.testing.assert_array_equal(T.convert_rows(w, qt), T.convert(w.float().numpy(), qt))


def test_a_plan_holds_no_weights_only_how_to_read_them(tmp_path, tokenizer):
    """Planning reads each weight once to check it and keeps none: a plan holding them grew with the depth."""
    from baseq_export.targets.gguf.meta import rope_factors
    from baseq_export.quant import QuantizedWeight

    _, model = tiny("qwen2", tokenizer)
    path = save(tmp_path, quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32)), tokenizer)
    art = load_artifact(path, lazy=True)
    plan = G.plan_tensors(art, "auto", "f32", None, rope_factors(art))
    held = [(p.name, type(c.cell_contents).__name__) for p in plan.tensors for c in (p.make.__closure__ or ())
            if isinstance(c.cell_contents, (torch.Tensor, QuantizedWeight)) and c.cell_contents.numel() > 64]
    assert not held
    made = {p.name: p.make() for p in plan.tensors}
    t = read_tensors(quiet_write(path, tmp_path / "p.gguf", head="f32"))
    assert made.keys() == t.keys()
    np.testing.assert_array_equal(made["token_embd.weight"], t["token_embd.weight"])
