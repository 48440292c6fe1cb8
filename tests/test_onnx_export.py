import gc
import importlib.util
import itertools
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from baseq_export.calibrate import calibrate_baseq
from baseq_export.settings import BaseqSettings
from baseq_export.targets.onnx import OnnxModel, write as export_onnx
from baseq_export.targets.onnx.graph import MS_DOMAIN, Graph, emit_fake_quant, emit_hadamard, matmul_nbits_inputs
from baseq_export.hadamard import apply_hadamard
from baseq_export.models import from_hf_model
from baseq_export.gptq_model import quantize_model
from baseq_export.settings import QuantSettings
from baseq_export.artifact import save_artifact
from baseq_export.reference import reference_model
from baseq_export.quant import fake_quant_per_token, packed_kv_row_width, rtn_quantize
from conftest import tiny_hf_model


def run_subgraph(build, x: np.ndarray, extra_inputs=()) -> np.ndarray:
    """Build a one-output graph around `build(g, 'x')` and run it in onnxruntime."""
    g = Graph()
    out = build(g, "x")
    g.nodes.append(helper.make_node("Identity", [out], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    graph = helper.make_graph(g.nodes, "t", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 896), (3, 5, 64), (2, 3, 4, 128)])
@pytest.mark.parametrize("bits, clip", [(4, 0.88), (8, 1.0), (4, 0.5)])
def test_fake_quant_subgraph_is_bit_exact(shape, bits, clip):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    x[..., 0] = 40.0  # an outlier channel
    got = run_subgraph(lambda g, name: emit_fake_quant(g, name, bits, g.const(clip)), x.numpy())
    np.testing.assert_array_equal(got, fake_quant_per_token(x, bits, clip).numpy())


def test_fake_quant_subgraph_per_head_clip_and_constant_tokens():
    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(1))
    x[0, 1, 2] = 1.5  # a constant token
    clip = torch.tensor([0.9, 0.7, 1.0]).reshape(3, 1, 1)
    got = run_subgraph(lambda g, name: emit_fake_quant(g, name, 4, g.init("clip", clip.numpy())), x.numpy())
    np.testing.assert_array_equal(got, fake_quant_per_token(x, 4, clip).numpy())


@pytest.mark.filterwarnings("ignore:no exact Hadamard")
@pytest.mark.parametrize("n", [64, 128, 576, 896, 1536, 4864, 11008, 3776])
def test_hadamard_subgraph_matches_fast_transform(n):
    """Kronecker matmuls in float64 (onnxruntime) against butterflies in float64 (torch), both rounded once."""
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))
    got = run_subgraph(lambda g, name: emit_hadamard(g, name, n), x.numpy())
    ref = apply_hadamard(x.double()).float().numpy()
    np.testing.assert_array_max_ulp(got, ref, maxulp=1)
    assert (got != ref).mean() < 1e-4


@pytest.mark.parametrize("k, group", [(96, None), (160, None), (96, 32), (224, 32), (256, 128)])
def test_matmul_nbits_matches_numpy_dequant(k, group):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(24, k, generator=gen)
    qw = rtn_quantize(w, 4, group)
    arrays, block = matmul_nbits_inputs(qw.codes.numpy(), qw.scale.numpy(), qw.zero.numpy(), qw.group_size)
    # independent numpy dequantization of the (unpacked) MatMulNBits inputs
    b = arrays["B"].reshape(24, -1)
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(24, -1)[:, :k].astype(np.float32)
    zp = arrays["zero_points"]
    zeros = np.stack([zp & 15, zp >> 4], axis=-1).reshape(24, -1)[:, : k // block].astype(np.float32)
    deq = (codes - np.repeat(zeros, block, axis=1)) * np.repeat(arrays["scales"], block, axis=1)
    np.testing.assert_array_equal(deq, qw.dequantize().numpy())
    x = torch.randn(3, k, generator=gen).numpy()

    def build(g, name):
        ins = [name] + [g.init(key, arr) for key, arr in arrays.items()]
        return g.op("MatMulNBits", ins, domain=MS_DOMAIN, K=k, N=24, bits=4, block_size=block)

    np.testing.assert_allclose(run_subgraph(build, x), x @ deq.T, rtol=1e-5, atol=1e-5)


def assert_parity(got: torch.Tensor, ref: torch.Tensor) -> None:
    """The graph computes the exact reference's float32 values. Only matmuls on unquantized inputs
    (the float lm_head, W4A16 linears) may differ in the last bits; a 4-bit activation code flipped by
    such a difference would move logits by ~1e-3 (seen with the float32 reference, exact=False)."""
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def assert_parity_to_summation_order(got: torch.Tensor, ref: torch.Tensor, share: float = 0.9,
                                     flip: float = 3e-3) -> None:
    """Weight-only linears on onnxruntime's int8 kernels agree with the reference to float32 summation order
    (quant.fake_quant_int8_blocks): a linear's output may differ in its last bits, and where the next int8
    rounding of such a value sits on a tie one input code flips, moving that token's logits by ~1e-3. So: a
    `share` of the positions equal to the parity tolerance, none off by more than such a flip. A flipped 4-bit
    KV code (int8 linears before a 4-bit cache) moves logits further and every later position of its sequence
    reads it: there `share` and `flip` are looser (a wrong graph moves every position by far more)."""
    equal = torch.isclose(got, ref, rtol=1e-5, atol=2e-6).all(-1)
    assert equal.float().mean() >= share, f"{int((~equal).sum())} of {equal.numel()} positions differ"
    torch.testing.assert_close(got, ref, rtol=0, atol=flip)


ARTIFACTS = {
    "w4a16-rtn": lambda m, ids: quantize_model(m, QuantSettings(method="rtn", bits="w4a16")),
    "w4a8kv8-quarot-gptq": lambda m, ids: quantize_model(m, QuantSettings(method="quarot-gptq", bits="w4a8kv8"), ids),
    "w4a4kv4-baseq": lambda m, ids: calibrate_baseq(m, QuantSettings(bits="w4a4kv4"), BaseqSettings(nsamples=8, calib_ctx=16, epochs=1), ids),
    "w4a16-rtn-head4": lambda m, ids: quantize_model(m, QuantSettings(method="rtn", bits="w4a16", head_bits=4)),
    "w4a4kv4-quarot-head4": lambda m, ids: quantize_model(m, QuantSettings(method="quarot-rtn", bits="w4a4kv4", head_bits=4)),
    # the head on onnxruntime's int8 kernels (MatMulNBits accuracy level 4): the reference rounds its input the same way
    "w4a4kv4-quarot-head4a8": lambda m, ids: quantize_model(m, QuantSettings(method="quarot-rtn", bits="w4a4kv4", head_bits=4,
                                                                              head_act_bits=8)),
    # weight-only linears on the int8 kernels too (the fast W4A16 export), with R4 online
    "w4a16-quarot-g32-head4a8": lambda m, ids: quantize_model(m, QuantSettings(
        method="quarot-rtn", bits="w4a16", group_size=32, head_bits=4, head_act_bits=8, linear_act_bits=8)),
}


@pytest.mark.parametrize("arch, dims", [("llama", {}), ("qwen2", {"hidden_size": 96, "intermediate_size": 160}),
                                        ("mistral", {"sliding_window": 6})])
@pytest.mark.parametrize("kind", list(ARTIFACTS))
@pytest.mark.parametrize("ops", ["custom", "standard"])
def test_exported_model_matches_reference_forward(tmp_path, arch, dims, kind, ops):
    m = from_hf_model(tiny_hf_model(arch, dtype=torch.float32, **dims))
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    art = ARTIFACTS[kind](m, calib)
    out = export_onnx(save_artifact(tmp_path / "m.baseq", art), tmp_path / "onnx", ops=ops)
    onnx.checker.check_model(str(out / "model.onnx"))
    domains = {n.domain for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert ("baseq" in domains) == (ops == "custom")  # norms, SwiGLU, softmax: our float64 ops even for W4A16
    assert (out / "libbaseq_ops.so").is_file() == (ops == "custom")
    ops_used = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert ("GatherBlockQuantized" in ops_used) == ("head4" in kind)
    head_levels = {a.i for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
                   if n.op_type == "MatMulNBits" and not n.input[1].startswith("layers.") for a in n.attribute
                   if a.name == "accuracy_level"}  # 4: int8 kernels
    assert head_levels == ({4} if kind.endswith("a8") else {0} if "head4" in kind else set()), head_levels
    # each head table of the artifact is stored once (float [V, H] or 4-bit V*H/2 bytes): a tied embedding
    # (unrotated models; rotation folds the final norm into the head) serves the lm_head too
    cfg = m.config
    inits = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
    tables = [i.name for i in inits if not i.name.startswith("layers.") and int(np.prod(i.dims)) in (cfg.vocab_size * cfg.hidden_size, cfg.vocab_size * cfg.hidden_size // 2)]
    heads = {n.split(".")[0] for n in art.tensors if n.split(".")[0] in ("embed", "lm_head")}
    # a rotated tied model's 4-bit head is the embedding table times head_mix (rotate.head_mix): one table
    assert ("head_mix" in art.tensors) == (cfg.tied_embeddings and bool(art.quant["rotation"]) and "head4" in kind)
    assert len(tables) == len(heads) == (1 if cfg.tied_embeddings and (not art.quant["rotation"] or "head_mix" in art.tensors) else 2), tables
    assert (out / "model.onnx.data").is_file()
    om = OnnxModel(out, threads=1)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = reference_model(art).logits(ids)
    full = om.logits(ids)
    (assert_parity_to_summation_order if "a8" in kind and "w4a16" in kind else assert_parity)(full, ref)
    # incremental decoding with the past/present KV cache gives the same logits
    logits, past = om.step(ids[:, :11].numpy(), om.empty_cache(2))
    steps = [logits]
    for t in range(11, 20):
        logits, past = om.step(ids[:, t : t + 1].numpy(), past)
        steps.append(logits)
    assert_parity(torch.from_numpy(np.concatenate(steps, axis=1)), full)


def test_export_refuses_to_clobber(tmp_path):
    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    art = save_artifact(tmp_path / "m.baseq", quantize_model(m, QuantSettings(method="rtn", bits="w4a16")))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a baseq ONNX export"):
        export_onnx(art, mine, force=True)
    out = export_onnx(art, tmp_path / "onnx")
    with pytest.raises(FileExistsError, match="already exists"):
        export_onnx(art, out)
    export_onnx(art, out, force=True)
    assert (mine / "keep.txt").read_text() == "x"


def test_large_export_is_checked_without_a_session(tmp_path, monkeypatch, capsys):
    """Above SESSION_CHECK_BYTES of weights the write is not opened in onnxruntime (which would load every
    weight); it is still checked against what was built, and runs with the reference's logits."""
    from baseq_export.targets import onnx as onnx_export

    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    art = quantize_model(m, QuantSettings(method="rtn", bits="w4a16"))
    monkeypatch.setattr(onnx_export, "SESSION_CHECK_BYTES", 0)
    opened = []
    monkeypatch.setattr(onnx_export, "open_session", lambda *a, **k: opened.append(a))
    out = export_onnx(save_artifact(tmp_path / "m.baseq", art), tmp_path / "onnx")
    assert not opened and "not opened in onnxruntime" in capsys.readouterr().err
    monkeypatch.undo()
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    assert_parity(OnnxModel(out, threads=1).logits(ids), reference_model(art).logits(ids))


@pytest.mark.parametrize("ops", ["custom", "standard"])
def test_onnxruntime_genai_runs_the_export(tmp_path, ops):
    og = pytest.importorskip("onnxruntime_genai", reason="install the [genai] extra")
    m = from_hf_model(tiny_hf_model("qwen2", dtype=torch.float32))
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    art = calibrate_baseq(m, QuantSettings(bits="w4a4kv4"), BaseqSettings(nsamples=8, calib_ctx=16, epochs=1), calib)
    out = export_onnx(save_artifact(tmp_path / "m.baseq", art), tmp_path / "onnx", ops=ops)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"].get("custom_ops_library") == (
        "libbaseq_ops.so" if ops == "custom" else None)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=14, do_sample=False)
    gen = og.Generator(model, params)
    prompt = [5, 17, 42, 8, 63]
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    om = OnnxModel(out, threads=1)
    ours, past = om.step(np.array([prompt]), om.empty_cache(1))
    np.testing.assert_allclose(gen.get_output("logits")[0, -1], ours[0, -1], rtol=1e-5, atol=1e-6)
    for _ in range(6):  # decode steps: genai's past/present handling agrees with ours
        gen.generate_next_token()  # runs the model on the previous token (if any), then picks
        np.testing.assert_allclose(gen.get_output("logits")[0, -1], ours[0, -1], rtol=1e-5, atol=1e-6)
        token = int(gen.get_next_tokens()[0])
        assert token == int(ours[0, -1].argmax())
        ours, past = om.step(np.array([[token]]), past)


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["w4a16-rtn", "w4a16-int8-kernels", "w4a4kv4-baseq"])
def test_default_model_onnx_parity(default_model, tmp_path, kind):
    """Default model: onnxruntime (our ops and standard ops) against the torch reference of the same
    artifact: perplexity within 0.01% and the same 32 greedy tokens with torch, onnxruntime and
    onnxruntime-genai. For W4A4KV4 this needs the exact mode (models.base.forward): with plain float32
    matmuls a last-bit difference flips a 4-bit code and the flip spreads into other tokens. The W4A4KV4
    artifact has the main job's 4-bit head on the int8 kernels (its input rounding is the reference's, but
    onnxruntime sums the 18 block products in float32 in its own order: logits agree to ~1e-7 of their
    range, perplexity to ~1e-6). w4a16-int8-kernels is the onnx-w4a16 profile's arithmetic (groups of 64,
    every linear and the head on the int8 kernels) with RTN weights: there a last-bit difference in one
    linear's float32 sum can move an int8 code of the next one, so torch agrees only to about 0.1% in
    perplexity and the tokens may part; the onnxruntime graphs (custom, standard, genai) give the same tokens and
    perplexities within ~1e-8.
    How far the flips carry depends on onnxruntime's summation order, which differs by instruction set:
    0.1% was measured on an AVX-512 VNNI EPYC, 0.33% on an AVX2-only one (both 2 cores, same packages).
    """
    from baseq_export import data
    from baseq_export.perplexity import perplexity
    from baseq_export.targets.onnx.genai import genai_stream
    from baseq_export.generate import greedy_tokens, onnx_stepper, torch_stepper

    tok = default_model.tokenizer
    if kind == "w4a16-rtn":
        art = quantize_model(default_model, QuantSettings(method="rtn", bits="w4a16"))
    elif kind == "w4a16-int8-kernels":
        art = quantize_model(default_model, QuantSettings(method="quarot-rtn", bits="w4a16", group_size=64, r4=False,
                                                          head_bits=4, head_act_bits=8, linear_act_bits=8))
    else:  # a small calibration budget and min-max weight groups (no clip search) keep the test short; the method
        # (learned R1 and the end-to-end pass included) and the graph are the main job's
        calib = data.calibration_windows(data.tokenize(tok, data.embedded_text("calib")), 4, 64, seed=0)
        art = calibrate_baseq(default_model, QuantSettings(bits="w4a4kv4", head_bits=4, head_act_bits=8, r1_steps=8,
                                                            weight_clip="minmax"),
                              BaseqSettings(nsamples=4, calib_ctx=64, epochs=1, e2e_epochs=1), calib)
        # the pass runs; whether it is kept (KL on its check windows lower after one epoch over 4 windows) depends on
        # the CPU's float summation order: on a 2-core AMD EPYC (AVX2) it went 0.3564 -> 0.3575 and was dropped, with
        # the code before and after the redesign alike. Parity holds either way: the graph is the same.
        assert art.calibration["end_to_end"]["kl_end"] > 0
    path = save_artifact(tmp_path / "m.baseq", art, write_extra=lambda d: tok.save_pretrained(str(d)))
    ref = reference_model(art)
    int8_linears = kind == "w4a16-int8-kernels"
    # exact-mode graphs agree to ~1e-7 on any window; the int8 linears' 0.5% bound is statistical: 4 windows
    windows = data.token_windows(data.tokenize(tok, data.embedded_text("eval")), 512, 4 if int8_linears else 2)
    p_ref = perplexity(ref.logits, windows).ppl
    prompt = tok("def fibonacci(n):\n    ", add_special_tokens=False)["input_ids"]
    torch_tokens = greedy_tokens(torch_stepper(ref), prompt, 32)
    first = None
    for ops in ("custom", "standard"):
        out = export_onnx(path, tmp_path / f"onnx-{ops}", ops=ops)
        om = OnnxModel(out)
        p_ort = perplexity(om.logits, windows).ppl
        ort_tokens = greedy_tokens(onnx_stepper(om), prompt, 32)
        print(kind, ops, "ppl torch", p_ref, "ort", p_ort, "tokens equal", ort_tokens == torch_tokens)
        # the issue asks 0.5%; exact mode gives ~1e-7 (~1e-6 with the int8 head)
        assert abs(p_ort / p_ref - 1) < (5e-3 if int8_linears else 1e-4), (ops, p_ort, p_ref)
        if int8_linears:  # the onnxruntime graphs agree among themselves: the same tokens, perplexity to ~1e-8
            # (bit for bit with min-max weights; with the searched clip a last-bit difference between the custom
            # and the standard graph's float ops moved an int8 code of some linear's input: 3e-9 relative)
            first = first or (p_ort, ort_tokens)
            assert ort_tokens == first[1] and abs(p_ort / first[0] - 1) < 1e-7, (p_ort, first[0])
        else:
            assert ort_tokens == torch_tokens
        if importlib.util.find_spec("onnxruntime_genai"):
            assert list(genai_stream(out, prompt, 32)) == ort_tokens
        if om.shares_buffer:  # `baseq-export run`'s decoder: the C++ loop on the shared KV buffer
            assert list(itertools.islice(om.greedy(prompt, 32), 32)) == ort_tokens


@pytest.mark.parametrize("arch, dims", [("llama", {}), ("qwen2", {"hidden_size": 96, "intermediate_size": 160}),
                                        ("mistral", {"sliding_window": 6})])
@pytest.mark.parametrize("kind", ["w4a4kv4-baseq", "w4a16-rtn"])
@pytest.mark.parametrize("kv_cache", ["float", "int4"])
def test_fused_rope_attention_equals_the_op_chain(tmp_path, monkeypatch, arch, dims, kind, kv_cache):
    """baseq.RopeAttention[KV4] (one node per layer: heads, rotary embedding, R3, KV quantizer, attention) gives
    the logits of the unfused graph (Reshape/Transpose, standard-op RoPE, Hadamard, QuantDequant, Attention) bit for
    bit, for a prompt and decode steps."""
    from baseq_export.targets.onnx import model as onnx_model

    if kind == "w4a16-rtn" and kv_cache == "int4":
        pytest.skip("a packed cache needs a 4-bit KV quantizer")
    hf = tiny_hf_model(arch, dtype=torch.float32, **dims)
    m = from_hf_model(hf)
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    art = ARTIFACTS[kind](m, calib)
    art_path = save_artifact(tmp_path / "m.baseq", art)
    hd = hf.config.hidden_size // hf.config.num_attention_heads
    # R3 inside the fused op needs a power-of-two head_dim; otherwise the exporter keeps the chain
    fusable = not (art.quant.get("rotation") or {}).get("r3") or hd & (hd - 1) == 0
    fused = OnnxModel(export_onnx(art_path, tmp_path / "fused", ops="custom", kv_cache=kv_cache), threads=1)
    monkeypatch.setattr(onnx_model, "fuses_rope", lambda c: False)
    chain = OnnxModel(export_onnx(art_path, tmp_path / "chain", ops="custom", kv_cache=kv_cache), threads=1)
    for name, model in (("fused", fused), ("chain", chain)):
        ops = {n.op_type for n in onnx.load(str(tmp_path / name / model.model_file), load_external_data=False).graph.node}
        assert any(o.startswith("RopeAttention") for o in ops) == (name == "fused" and fusable), (name, hd, ops)
    assert_same_steps(fused, chain, torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5)).numpy(), 8)


def assert_same_steps(a: OnnxModel, b: OnnxModel, ids: np.ndarray, prompt: int) -> tuple[dict, dict]:
    """Both models give the same logits bit for bit on ids[:, :prompt] and then on each later token as a decode
    step; returns their last caches."""
    la, pa = a.step(ids[:, :prompt], a.empty_cache(ids.shape[0]))
    lb, pb = b.step(ids[:, :prompt], b.empty_cache(ids.shape[0]))
    np.testing.assert_array_equal(la, lb)
    for t in range(prompt, ids.shape[1]):
        la, pa = a.step(ids[:, t : t + 1], pa)
        lb, pb = b.step(ids[:, t : t + 1], pb)
        np.testing.assert_array_equal(la, lb)
    return pa, pb


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_int4_kv_cache_gives_the_same_logits(tmp_path, arch):
    """--kv-cache int4 stores the artifact's 4-bit KV codes packed (head_dim/2 bytes + scale + zero per
    token and head): the logits equal those of the float cache bit for bit, for prompt and decode steps."""
    m = from_hf_model(tiny_hf_model(arch, dtype=torch.float32, **({"sliding_window": 6} if arch == "mistral" else {})))
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    art_path = save_artifact(tmp_path / "m.baseq", ARTIFACTS["w4a4kv4-baseq"](m, calib))
    float_dir = export_onnx(art_path, tmp_path / "float", ops="custom")
    flt = OnnxModel(float_dir, threads=1, kv_cache="float")
    packed_dir = export_onnx(art_path, tmp_path / "int4", kv_cache="int4")
    pk = OnnxModel(packed_dir, threads=1)
    if importlib.util.find_spec("onnxruntime_genai"):  # genai runs the packed rows too, in its shared buffer
        from baseq_export.targets.onnx.genai import genai_stream
        from baseq_export.generate import greedy_tokens, onnx_stepper

        prompt = [3, 17, 42, 5]
        assert list(genai_stream(packed_dir, prompt, 12)) == greedy_tokens(onnx_stepper(pk), prompt, 12)
    # the default (float-cache, genai) export also carries the packed-cache graph for onnxruntime, on the same
    # weights file: onnxruntime runs it by default
    both = OnnxModel(float_dir, threads=1)
    assert both.kv_cache == "int4" and (float_dir / "genai_config.json").is_file()
    assert (float_dir / "model.kv4.onnx").stat().st_size < 0.2 * (float_dir / "model.onnx.data").stat().st_size
    np.testing.assert_array_equal(both.logits(torch.from_numpy(ids0 := torch.randint(0, 96, (2, 9)).numpy())).numpy(),
                                  flt.logits(torch.from_numpy(ids0)).numpy())
    past_p, past_f = assert_same_steps(pk, flt, torch.randint(0, 96, (2, 14), generator=torch.Generator().manual_seed(3)).numpy(), 9)
    key = past_p["past_key_values.0.key"]
    hd = m.config.head_dim
    assert key.dtype == np.uint8 and key.shape == (2, m.config.num_kv_heads, 14, packed_kv_row_width(hd))
    # independent numpy unpacking of the stored rows gives the float cache's values
    codes = np.stack([key[..., : hd // 2] & 15, key[..., : hd // 2] >> 4], -1).reshape(*key.shape[:3], hd).astype(np.float32)
    scale = key[..., hd // 2 : hd // 2 + 4].copy().view(np.float32)
    zero = key[..., hd // 2 + 4 :].copy().view(np.float32)
    np.testing.assert_array_equal((codes - zero) * scale, past_f["past_key_values.0.key"])
    assert past_f["past_key_values.0.key"].nbytes / key.nbytes == 4 * hd / (packed_kv_row_width(hd))  # hd 64: 256 -> 40 bytes a row


def test_packed_kv_cache_needs_custom_ops_and_4bit_kv(tmp_path):
    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    art = save_artifact(tmp_path / "m.baseq", quantize_model(m, QuantSettings(method="rtn", bits="w4a16")))
    with pytest.raises(ValueError, match="4-bit KV cache"):
        export_onnx(art, tmp_path / "o", kv_cache="int4")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kv_cache", ["float", "int4"])
def test_decoding_in_one_shared_kv_buffer_equals_the_growing_cache(tmp_path, kv_cache):
    """OnnxModel.greedy with custom ops binds past and present to one buffer per layer (the attention ops write
    the new rows in place): every step's logits equal the growing cache's bit for bit."""
    from baseq_export.targets.onnx.runtime import buffer_stepper
    from baseq_export.generate import greedy_tokens, onnx_stepper

    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    art_path = save_artifact(tmp_path / "m.baseq", ARTIFACTS["w4a4kv4-baseq"](m, calib))
    om = OnnxModel(export_onnx(art_path, tmp_path / "x", ops="custom", kv_cache=kv_cache), threads=1, kv_cache=kv_cache)
    assert om.shares_buffer and om.kv_cache == kv_cache
    prompt = [3, 17, 42, 5, 9]
    grow, shared = onnx_stepper(om), buffer_stepper(om, len(prompt) + 20)
    ids = prompt
    for _ in range(20):  # the prompt, then one token a step
        a, b = grow(ids), shared(ids)
        assert torch.equal(a, b)
        ids = [int(torch.argmax(a))]
    assert greedy_tokens(buffer_stepper(om, 30), prompt, 12) == greedy_tokens(onnx_stepper(om), prompt, 12)
    assert list(itertools.islice(om.greedy(prompt, 12), 12)) == greedy_tokens(onnx_stepper(om), prompt, 12)
    with pytest.raises(ValueError, match="the KV buffer holds 6 tokens"):
        small = buffer_stepper(om, 6)
        small(prompt)
        small([1])
        small([2])


@pytest.mark.parametrize("kv_cache", ["float", "int4"])
def test_cpp_decoder_gives_the_python_steps_logits_and_tokens(tmp_path, kv_cache):
    """The C++ greedy decoder (onnx_native, on the wheel's libonnxruntime) runs the export's last-position graph
    on its own shared KV buffer: each step's logits (the prompt's last position's too) equal the full graph's
    in the Python session bit for bit, its token is their argmax, a reset sequence repeats the first, and
    OnnxModel.greedy (which uses it) gives the Python stepper's tokens."""
    from baseq_export.targets.onnx.runtime import buffer_stepper
    from baseq_export.generate import argmax_token, greedy_tokens

    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    art_path = save_artifact(tmp_path / "m.baseq", ARTIFACTS["w4a4kv4-baseq"](m, calib))
    om = OnnxModel(export_onnx(art_path, tmp_path / "x", ops="custom", kv_cache=kv_cache), threads=1, kv_cache=kv_cache)
    decoder = om.native_decoder(40)
    assert decoder is not None, "the onnxruntime wheel's libonnxruntime or the op library's runner is missing"
    # it runs the export's last-position graph: logits [batch, 1, vocab], the same weights file
    last = onnx.load(str(om.path / om.greedy_file), load_external_data=False).graph.output[0].type.tensor_type.shape
    assert om.greedy_file == om.model_file.replace(".onnx", ".last.onnx") and last.dim[1].dim_value == 1
    assert decoder.capacity == 40 and decoder.vocab_size == om.config.vocab_size
    prompt = [3, 17, 42, 5, 9]
    python = buffer_stepper(om, 40)
    logits = np.empty(decoder.vocab_size, np.float32)
    ids, tokens, refs = prompt, [], []
    for _ in range(20):
        token = decoder.step(ids, logits)
        ref = python(ids)
        np.testing.assert_array_equal(logits, ref.numpy())
        assert token == argmax_token(ref)
        tokens.append(token)
        refs.append(ref.numpy().copy())  # the stepper reuses its logits buffer
        ids = [token]
    # on a graph with every position's logits (an export without the twin) it reads the prompt's last row
    from baseq_export.targets.onnx.native import open_native

    full = open_native(om.path, om.model_file, om.manifest, 1, 40)
    ids = prompt
    for token, ref in zip(tokens[:5], refs):
        assert full.step(ids, logits) == token
        np.testing.assert_array_equal(logits, ref)
        ids = [token]
    full.close()
    assert om.native_decoder(30) is decoder  # reused, reset
    again = [decoder.step(prompt)]
    for _ in range(19):
        again.append(decoder.step([again[-1]]))
    assert again == tokens
    assert list(itertools.islice(om.greedy(prompt, 12), 12)) == greedy_tokens(buffer_stepper(om, 20), prompt, 12)
    assert list(itertools.islice(om.greedy(prompt, 12, native=False), 12)) == tokens[:12]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # e.g. a __del__ failing after a refused open
def test_cpp_decoder_errors_name_the_problem(tmp_path, monkeypatch):
    """A full KV buffer, an id outside the vocabulary, a closed decoder and two generations read at once from one
    model are errors that say what to do; the decoder stays usable after a refused step. A decoder that cannot
    open is tried and warned about once per model; Python steps give the same tokens."""
    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    art_path = save_artifact(tmp_path / "m.baseq", ARTIFACTS["w4a4kv4-baseq"](m, calib))
    om = OnnxModel(export_onnx(art_path, tmp_path / "x", ops="custom"), threads=1)
    decoder = om.native_decoder(6)
    first = decoder.step([3, 17, 42, 5])
    with pytest.raises(ValueError, match="the KV buffer holds 6 tokens and this step would make 7"):
        decoder.step([1, 2, 3])
    with pytest.raises(ValueError, match=r"token id 5000 is outside the vocabulary \[0, 96\)"):
        decoder.step([5000])
    assert decoder.step([first]) >= 0  # the refused steps changed nothing
    with pytest.raises(ValueError, match="logits must be a contiguous float32 array"):
        decoder.step([1], np.empty(3, np.float32))
    a = om.greedy([3, 17, 42], 4)
    next(a)
    b = om.greedy([3, 17], 4)
    next(b)
    with pytest.raises(RuntimeError, match="another greedy"):
        next(a)
    decoder.close()
    with pytest.raises(ValueError, match="closed"):
        decoder.step([1])
    from baseq_export.targets.onnx.native import open_native

    with pytest.warns(RuntimeWarning, match="room for at least one token; decoding with Python steps instead"):
        assert open_native(om.path, om.model_file, om.manifest, 1, 0) is None
    gc.collect()  # the refused decoder is collected cleanly
    standard = OnnxModel(export_onnx(art_path, tmp_path / "s", ops="standard"), threads=1)
    assert standard.native_decoder(20) is None  # no op library: Python steps, the same tokens as the custom graph
    assert list(itertools.islice(standard.greedy([3, 17, 42], 6), 6)) == list(itertools.islice(om.greedy([3, 17, 42], 6), 6))
    from baseq_export.targets.onnx import native as onnx_native

    refusing, opened = OnnxModel(om.path, threads=1), []

    def refuse(*args):
        opened.append(args)
        raise ValueError("no decoder in this test")

    monkeypatch.setattr(onnx_native, "NativeGreedy", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = [list(itertools.islice(refusing.greedy([3, 17, 42], 6), 6)) for _ in range(3)]
    assert runs == [list(itertools.islice(standard.greedy([3, 17, 42], 6), 6))] * 3 and len(opened) == 1
    assert [str(w.message) for w in caught] == ["no decoder in this test; decoding with Python steps instead"]


def test_cpp_greedy_choice_is_numpys_argmax():
    """The decoder's greedy rule (baseq_greedy_argmax) against numpy.argmax: the first of equal maxima, and the
    first NaN where there is one (as torch.argmax), on random vectors with ties, signed zeros, infinities and
    NaNs."""
    from baseq_export.targets.onnx.native import runner_symbols
    from baseq_export.runtime_ops import library_path

    lib = runner_symbols(library_path())
    rng = np.random.default_rng(0)
    for trial in range(600):  # lengths below, at and past the 16-value blocks, and a vocabulary's
        n = 49152 if trial % 50 == 0 else int(rng.integers(1, 300))
        v = rng.integers(-4, 4, size=n).astype(np.float32)  # small integers: many ties
        if trial % 3 == 1:
            v[rng.integers(0, v.size)] = np.inf
        if trial % 4 == 2:
            v[rng.integers(0, v.size, size=2)] = np.nan
        if trial % 5 == 3:
            v[:] = np.where(v == v.max(), -0.0, v)  # -0.0 and 0.0 compare equal: the first one wins
        if trial % 7 == 4:
            v[:] = -np.inf
        assert lib.baseq_greedy_argmax(v.ctypes.data, v.size) == int(np.argmax(v)) == int(torch.argmax(torch.from_numpy(v)))


def test_external_data_streams_weights_and_shares_identical_ones(tmp_path):
    """Initializers go to an ExternalData file as they are made (the graph keeps a reference, small ones stay
    inline); onnxruntime runs the saved graph to numpy's values; a second graph holding the same named bytes
    points at the first copy, while other bytes are appended."""
    from onnx import external_data_helper

    from baseq_export.targets.onnx.graph import EXTERNAL_THRESHOLD, ExternalData

    gen = np.random.default_rng(0)
    w, w2, b = (gen.standard_normal(s).astype(np.float32) for s in ((64, 64), (64, 64), (64,)))

    def save(g: Graph, out: str, path):
        g.nodes.append(helper.make_node("Identity", [out], ["y"]))
        graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.save_model(model, str(path))
        return model

    with ExternalData(tmp_path / "w.data") as data:
        g1 = Graph(data)
        m1 = save(g1, g1.op("Add", [g1.op("MatMul", ["x", g1.init("w", w)]), g1.init("b", b)]), tmp_path / "one.onnx")
        g2 = Graph(data)
        m2 = save(g2, g2.op("MatMul", [g2.op("MatMul", ["x", g2.init("w", w)]), g2.init("w2", w2)]), tmp_path / "two.onnx")
    assert b.nbytes < EXTERNAL_THRESHOLD <= w.nbytes
    where = {}
    for m in (m1, m2):
        for t in m.graph.initializer:
            external = external_data_helper.uses_external_data(t)
            assert external == (t.name != "b") and (not external or not t.raw_data)
            if external:
                info = {e.key: e.value for e in t.external_data}
                where.setdefault(t.name, set()).add((int(info["offset"]), int(info["length"])))
    assert len(where["w"]) == 1 and where["w"] != where["w2"]  # one copy of w for both graphs
    assert (tmp_path / "w.data").stat().st_size == max(o + n for s in where.values() for o, n in s)
    x = gen.standard_normal((3, 64)).astype(np.float32)
    for path, want in (("one.onnx", x @ w + b), ("two.onnx", (x @ w) @ w2)):
        sess = ort.InferenceSession(str(tmp_path / path), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-4)
