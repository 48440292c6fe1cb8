"""Weight-only GGUF in llama.cpp's own block types (--gguf-mix): GPTQ on ggml's grids (quant.ggml_weights) against
llama.cpp's own quantizer with the same importance, the per-tensor types against llama.cpp's file of the same
name (a second implementation of the rules), and the written file in llama.cpp against the reference forward."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from baseq_export import api
from baseq_export.gguf_file import read_header
from baseq_export.quant import HessianAccumulator
from baseq_export.quant.ggml_codecs import decode
from baseq_export.quant.ggml_mix import MIXES
from baseq_export.quant.ggml_weights import ggml_gptq, ggml_rtn, weight_error
from baseq_export.reference import reference_model
from baseq_export.targets import gguf as G
from baseq_export.targets.gguf.runtime import llama_quantize
from test_gguf import bpe_tokenizer, tiny

QT = gguf.GGMLQuantizationType
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


@pytest.fixture(scope="module")
def layer():
    """A [192, 512] weight and the Hessian of correlated inputs with a few dominant columns (as real layers have)."""
    g = torch.Generator().manual_seed(0)
    k = 512
    mix = torch.randn(k, k, generator=g) * 0.1 + torch.eye(k)
    x = torch.randn(4096, k, generator=g) @ mix
    x[:, :8] *= 6.0
    acc = HessianAccumulator(k)
    acc.add(x)
    return torch.randn(192, k, generator=g), acc.hessian


@pytest.mark.parametrize("qtype", TYPES)
def test_gptq_on_ggml_grids_beats_llama_cpps_quantizer_with_the_same_importance(layer, qtype):
    w, h = layer
    ours = ggml_gptq(w, h.clone(), qtype)
    theirs = ggml_rtn(w, qtype, torch.diagonal(h))  # llama.cpp's quantize with an imatrix of the same inputs
    e_ours, e_theirs = (weight_error(w, q.dequantize(), h) for q in (ours, theirs))
    assert e_ours < 0.8 * e_theirs, (e_ours, e_theirs)
    # the same grid: GPTQ changed the codes only, every block's scale and offset is ggml's
    a, b = (decode(q.raw.numpy(), QT[qtype], w.shape[1]) for q in (ours, theirs))
    assert (a.scale == b.scale).all() and (a.offset == b.offset).all() and (a.codes != b.codes).any()
    assert torch.equal(ours.dequantize(), torch.from_numpy(a.dequantize()))


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.mark.parametrize("hidden", [256, 96])  # rows of 256 take every type; rows of 96 make K-quants fall back
@pytest.mark.parametrize("name", ["q4_k_m", "iq4_xs", "q4_0", "q4_1"])
def test_each_tensor_gets_the_type_llama_cpp_gives_it(tmp_path, tokenizer, name, hidden):
    """Our file of a mix and llama.cpp's own quantization of the float model to the file type of that name, with an
    importance matrix (as the benchmarks compare; without one llama.cpp gives IQ4_XS's first ffn_down Q5_K), hold
    the same type in every tensor, so they have the same size."""
    from baseq_export.models import from_hf_model
    from conftest import tiny_hf_model

    n_layers = 8  # llama.cpp's more-bits layers differ from plain halves here
    hf = tiny_hf_model("llama", dtype=torch.float32, hidden_size=hidden, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=320, num_hidden_layers=n_layers)
    model = from_hf_model(hf, tokenizer)
    f32 = G.write_model(model, tmp_path / "f32.gguf", weights="f32", head="f32")
    theirs = tmp_path / "theirs.gguf"
    imatrix = {}
    reader = gguf.GGUFReader(str(f32))
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            imatrix[t.name] = np.ones(int(t.shape[0]), np.float32)  # gguf-py's shape: [K, N] (ggml's order)
    llama_quantize(f32, theirs, name, imatrix=imatrix)
    art = api.quantize(model, tmp_path / "ours.baseq", method="rtn", bits="w4a16", ggml_mix=name)
    ours = G.write(art, tmp_path / "ours.gguf")
    types = [{t.name: QT(t.qtype).name for t in read_header(p).tensors} for p in (ours, theirs)]
    assert types[0] == types[1]
    assert ours.stat().st_size == pytest.approx(theirs.stat().st_size, rel=0.01)
    assert read_header(ours, {"general.file_type"}).values["general.file_type"] == MIXES[name].file_type


@pytest.mark.parametrize("name", ["q4_k_m", "iq4_xs"])
def test_a_mixed_file_computes_what_the_reference_forward_computes(tmp_path, tokenizer, name):
    """Rotated GPTQ in the mix's types, float32 head and cache in llama.cpp against the artifact's reference
    forward: only llama.cpp's 8-bit rounding of activations differs (K-quant dot products take Q8_K activations,
    as test_gguf's Q4 case takes Q8_0: about 1% of the logits' range, tolerance 5%)."""
    _, model = tiny("llama", tokenizer)
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(4))
    art = api.quantize(model, tmp_path / "m.baseq", profile="gguf", ggml_mix=name, calib=calib)
    out = G.write(art, tmp_path / "m.gguf", head="f32", embed="f32")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    got = G.open(out, kv_cache="f32", n_threads=2).logits(ids)
    want = reference_model(art, exact=False).logits(ids)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.05 * scale
    float_art = api.quantize(model, method="quarot-rtn", bits="w4a16", group_size=32, r4=False)  # a 4-bit control:
    assert (reference_model(float_art, exact=False).logits(ids) - want).abs().max() > 0.05 * scale  # it can fail


def test_mixes_are_refused_where_they_do_not_apply(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="weight-only llama.cpp format"):
        api.plan("quarot-gptq", "w4a4kv4", ggml_mix="q4_k_m")
    with pytest.raises(ValueError, match="unknown GGUF mix 'q3_k'"):
        api.plan(profile="gguf", ggml_mix="q3_k")
    with pytest.raises(ValueError, match="--tune-blocks"):
        api.plan(profile="gguf", ggml_mix="q4_k_m", tune=True)
    _, model = tiny("llama", tokenizer)
    art = api.quantize(model, tmp_path / "m.baseq", method="rtn", bits="w4a16", ggml_mix="q4_0")
    with pytest.raises(ValueError, match="llama.cpp's block types"):
        api.export(art, "onnx", tmp_path / "m-onnx")
    assert not (tmp_path / "m-onnx").exists()


def test_more_bits_by_sensitivity_keeps_the_size_and_picks_the_largest_gains(tmp_path, tokenizer):
    from baseq_export.quant.ggml_mix import choose_more_bits, more_bits, more_bits_count

    gains = [0.5, 3.0, -1.0, 2.0, 0.1, 7.0, 0.0, 1.0]
    assert more_bits_count(8) == sum(more_bits(i, 8) for i in range(8)) == 4
    assert choose_more_bits(gains, 8) == set(np.argsort(gains)[::-1][:4].tolist())  # {5, 1, 3, 7}
    _, model = tiny("llama", tokenizer)
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(4))
    arts = {c: api.quantize(model, tmp_path / f"{c}.baseq", profile="gguf", ggml_mix="q4_k_m", ggml_choice=c,
                            calib=calib) for c in ("llama.cpp", "sensitivity")}
    files = {c: G.write(a, tmp_path / f"{c}.gguf") for c, a in arts.items()}
    data_bytes = {c: sum(t.nbytes for t in read_header(f).tensors) for c, f in files.items()}
    assert data_bytes["llama.cpp"] == data_bytes["sensitivity"]  # (the metadata differs by the recorded choice)
    chosen = arts["sensitivity"].quant["ggml_more_bits"]
    types = {t.name: QT(t.qtype).name for t in read_header(files["sensitivity"]).tensors}
    for lin, tensor in (("v", "attn_v"), ("down", "ffn_down")):
        assert [i for i in range(model.config.num_layers) if types[f"blk.{i}.{tensor}.weight"] == "Q6_K"] == chosen[lin]
