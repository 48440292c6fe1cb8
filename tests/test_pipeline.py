import json

import pytest
import torch

from baseq_export.models import from_hf_model
from baseq_export.models.base import forward
from baseq_export.gptq_model import quantize_model
from baseq_export.settings import QuantSettings
from baseq_export.artifact import load_artifact, save_artifact
from baseq_export.reference import reference_model
from baseq_export import quant
from baseq_export.quant import HessianAccumulator, dequantize_weight, fake_quant_per_token, gptq_quantize, rtn_quantize
from baseq_export.rotate import RotationHooks, rotate_model
from conftest import tiny_hf_model


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny():
    return from_hf_model(tiny_hf_model("qwen2", dtype=torch.float32))


def calib():
    return torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", ["rtn", "quarot-rtn", "quarot-gptq"])
@pytest.mark.parametrize("bits", ["w4a16", "w4a8kv8", "w4a4kv4"])
def test_artifact_reference_forward_round_trips(tiny, tmp_path, method, bits):
    art = quantize_model(tiny, QuantSettings(method=method, bits=bits), calib())
    before = reference_model(art)
    after = reference_model(load_artifact(save_artifact(tmp_path / "m.baseq", art)))
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(before.logits(ids), after.logits(ids))
    err = rel_err(after.logits(ids), forward(tiny.config, tiny.weights, ids))
    assert 1e-4 < err < 0.5  # quantized: close to FP, but not equal to it


def test_reference_forward_is_the_documented_computation(tiny):
    """Rebuild the W4A4KV4 QuaRot forward by hand from the artifact's codes and compare."""
    s = QuantSettings(method="quarot-rtn", bits="w4a4kv4", a_clip=0.9, kv_clip=0.95, weight_clip="minmax")
    art = quantize_model(tiny, s)
    cfg, w = rotate_model(tiny.config, {k: v.double() for k, v in tiny.weights.items()}, s.seed)
    w = {k: v.float() for k, v in w.items()}
    for i in range(cfg.num_layers):
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            w[f"layers.{i}.{name}.weight"] = dequantize_weight(rtn_quantize(w[f"layers.{i}.{name}.weight"], 4))

    class Hand(RotationHooks):
        def act(self, layer, site, x):
            return fake_quant_per_token(super().act(layer, site, x), 4, 0.9)

        def kv(self, layer, k, v):
            return fake_quant_per_token(k, 4, 0.95), fake_quant_per_token(v, 4, 0.95)

    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    expected = forward(cfg, w, ids, hooks=Hand(r3=True, r4=True))
    torch.testing.assert_close(reference_model(art, exact=False).logits(ids), expected, rtol=0, atol=0)
    # the exact (order-independent) forward computes the same values, rounded differently
    torch.testing.assert_close(reference_model(art).logits(ids), expected, rtol=1e-5, atol=1e-5)


def test_gptq_beats_rtn_through_the_pipeline(tiny):
    ids = calib()
    ref = forward(tiny.config, tiny.weights, ids)
    errs = {
        m: rel_err(reference_model(quantize_model(tiny, QuantSettings(method=m, bits="w4a16"), ids)).logits(ids), ref)
        for m in ("quarot-rtn", "quarot-gptq")
    }
    assert errs["quarot-gptq"] < errs["quarot-rtn"]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        QuantSettings(method="awq")
    with pytest.raises(ValueError, match="unknown bits"):
        QuantSettings(bits="w3a3")
    with pytest.raises(ValueError, match="group size"):
        QuantSettings(group_size=48)
    with pytest.raises(ValueError, match="head bits"):
        QuantSettings(head_bits=8)
    with pytest.raises(ValueError, match="head activation bits"):
        QuantSettings(head_bits=4, head_act_bits=4)
    with pytest.raises(ValueError, match="need a 4-bit head"):
        QuantSettings(head_act_bits=8)
    with pytest.raises(ValueError, match="weight-only linears with grouped weights"):
        QuantSettings(linear_act_bits=8)  # w4a4kv4: its linears are integer already
    with pytest.raises(ValueError, match="weight-only linears with grouped weights"):
        QuantSettings(bits="w4a16", linear_act_bits=8)  # per channel


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied and untied embeddings
def test_4bit_embedding_and_head(tmp_path, arch):
    """--head-bits 4: the embedding (and an untied lm_head) are stored as group-32 4-bit codes; the
    reference reads exactly (code - zero) * scale of them, and stays close to the float head."""
    import numpy as np

    m = from_hf_model(tiny_hf_model(arch, dtype=torch.float32))
    art = quantize_model(m, QuantSettings(method="rtn", bits="w4a16", head_bits=4))
    art = load_artifact(save_artifact(tmp_path / "m.baseq", art))
    heads = ["embed"] if m.config.tied_embeddings else ["embed", "lm_head"]
    assert not any(h in art.tensors for h in heads)  # no float copy left
    ref = reference_model(art)
    for h in heads:
        packed = art.tensors[f"{h}.qweight"].numpy()
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1).astype(np.float32)
        zeros = art.tensors[f"{h}.zeros"].numpy().astype(np.float32)
        scales = art.tensors[f"{h}.scales"].numpy()
        deq = (codes - np.repeat(zeros, 32, 1)) * np.repeat(scales, 32, 1)  # independent dequant, groups of 32
        np.testing.assert_array_equal(ref.weights[h].numpy(), deq)
        assert 0 < rel_err(ref.weights[h], m.weights[h]) < 0.15
    if m.config.tied_embeddings:
        assert ref.weights["lm_head"] is ref.weights["embed"]
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    float_head = reference_model(quantize_model(m, QuantSettings(method="rtn", bits="w4a16"))).logits(ids)
    assert 0 < rel_err(ref.logits(ids), float_head) < 0.2


def test_gptq_head_lowers_the_logit_error_and_slices_give_the_whole_tables_codes(monkeypatch):
    """gptq_head: on correlated inputs (as hidden states are) the head's output error (X (T - T_q)^T) is well
    below the MSE-clipped RTN table's, on the same group-32 grid; slices of rows give the whole table's codes."""
    from baseq_export import gptq_model

    g = torch.Generator().manual_seed(3)
    table = torch.randn(300, 64, generator=g)
    x = torch.randn(2000, 24, generator=g) @ torch.randn(24, 64, generator=g) + 0.1 * torch.randn(2000, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add(x)
    whole = gptq_model.gptq_head(table, acc.hessian)
    rtn = rtn_quantize(table, 4, gptq_model.HEAD_GROUP_SIZE, mse_clip_search=True)
    assert whole.group_size == rtn.group_size == 32 and whole.zero is not None
    err = {k: float((x @ (table - dequantize_weight(q)).T).norm()) for k, q in (("gptq", whole), ("rtn", rtn))}
    assert err["gptq"] < 0.8 * err["rtn"], err
    plain = gptq_quantize(table, acc.hessian, 4, gptq_model.HEAD_GROUP_SIZE, mse_clip_search=True)  # no shared factor
    assert all(torch.equal(getattr(plain, f), getattr(whole, f)) for f in ("codes", "scale", "zero"))
    monkeypatch.setattr(gptq_model, "HEAD_GPTQ_ELEMENTS", 64 * 70)  # five slices, the last one short
    factored = []
    inverse = quant.gptq._inverse_hessian_upper
    monkeypatch.setattr(quant.gptq, "_inverse_hessian_upper", lambda *a: factored.append(1) or inverse(*a))
    sliced = gptq_model.gptq_head(table, acc.hessian)
    assert all(torch.equal(getattr(sliced, f), getattr(whole, f)) for f in ("codes", "scale", "zero"))
    assert len(factored) == 1  # one factorisation serves the five slices


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied and untied embeddings
def test_calibrated_methods_gptq_the_table_the_head_reads(arch):
    """With calibration windows the 4-bit table the head reads (the tied table, or an untied lm_head) is GPTQ'd
    for the head and recorded as such, by GPTQ and by the weight-only tuning alike; an untied embedding stays RTN;
    without calibration the head is RTN."""
    from baseq_export.tune import TuneSettings, tune_blocks

    m = from_hf_model(tiny_hf_model(arch, dtype=torch.float32))
    rtn = quantize_model(m, QuantSettings(method="quarot-rtn", bits="w4a16", head_bits=4))
    gptq = quantize_model(m, QuantSettings(method="quarot-gptq", bits="w4a16", head_bits=4), calib())
    tuned = tune_blocks(m, QuantSettings(method="quarot-gptq", bits="w4a16", head_bits=4), calib(),
                        TuneSettings(nsamples=4, ctx=16, nval=2, epochs=1))
    assert (rtn.quant["head_quant"], gptq.quant["head_quant"], tuned.quant["head_quant"]) == ("rtn", "gptq", "gptq")
    head = "embed" if "head_mix" in gptq.tensors or m.config.tied_embeddings else "lm_head"
    for art in (gptq, tuned):
        assert not torch.equal(art.tensors[f"{head}.qweight"], rtn.tensors[f"{head}.qweight"])
        if head == "lm_head":  # the embedding is read row by row: RTN in all
            assert torch.equal(art.tensors["embed.qweight"], rtn.tensors["embed.qweight"])


@pytest.mark.real_model
def test_gptq_beats_rtn_on_a_real_layer(default_model):
    """Layer 5 of the rotated default model: GPTQ's output error is below RTN's on held-out tokens."""
    from baseq_export import data
    from baseq_export.models.base import block_forward, layer_weights, rms_norm, rope_tables

    cfg, w = rotate_model(default_model.config, {k: v.double() for k, v in default_model.weights.items()})
    w = {k: v.float() for k, v in w.items()}
    tokens = data.tokenize(default_model.tokenizer, data.embedded_text("calib"))
    windows = data.calibration_windows(tokens, 12, 256, seed=0)
    h = torch.nn.functional.embedding(windows, w["embed"])
    cos, sin = rope_tables(w["rope.inv_freq"], torch.arange(256), 1.0, h.dtype)
    with torch.no_grad():
        for i in range(5):
            h = block_forward(cfg, layer_weights(w, i), i, h, cos, sin, RotationHooks(r3=False))
        # gate_proj input (norm folded into the weight) of layer 5
        x = rms_norm(h, None, cfg.rms_eps)
    fit, held_out = x[:8].reshape(-1, cfg.hidden_size), x[8:].reshape(-1, cfg.hidden_size)
    acc = HessianAccumulator(cfg.hidden_size)
    acc.add(fit)
    weight = w["layers.5.gate.weight"]
    rtn = dequantize_weight(rtn_quantize(weight, 4))
    gptq = dequantize_weight(gptq_quantize(weight, acc.hessian, 4))
    target = held_out @ weight.T
    e_rtn, e_gptq = rel_err(held_out @ rtn.T, target), rel_err(held_out @ gptq.T, target)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("r4", [True, False])
def test_rotating_block_by_block_equals_rotating_the_whole_model(arch, r4):
    from baseq_export.models.base import layer_weights
    from baseq_export.rotate import rotate_layer, rotate_outside_layers

    m = from_hf_model(tiny_hf_model(arch, dtype=torch.float32))
    w64 = {k: v.double() for k, v in m.weights.items()}
    cfg, whole = rotate_model(m.config, w64, seed=3, r4=r4)
    cfg2, outside = rotate_outside_layers(m.config, {k: v for k, v in w64.items() if not k.startswith("layers.")}, seed=3)
    assert cfg2 == cfg
    blocks = {f"layers.{i}.{k}": v for i in range(cfg.num_layers)
              for k, v in rotate_layer(m.config, layer_weights(w64, i), seed=3, r4=r4).items()}
    assert {**outside, **blocks}.keys() == whole.keys()
    assert all(torch.equal({**outside, **blocks}[k], whole[k]) for k in whole)


def _saved_checkpoint(tmp_path, arch="llama"):
    from test_models import save_word_tokenizer

    tiny_hf_model(arch, dtype=torch.float32).save_pretrained(tmp_path, max_shard_size="40KB")
    save_word_tokenizer(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("method, bits", [("quarot-gptq", "w4a4kv4"), ("gptq", "w4a16"), ("baseq", "w4a4kv4"),
                                          ("tune", "w4a16")])
def test_streamed_lazy_weights_give_the_in_memory_artifact(tmp_path, method, bits):
    """A model read tensor by tensor (models.lazy) and rotated block by block gives the artifact of the same
    model loaded whole, bit for bit."""
    from baseq_export.calibrate import calibrate_baseq
    from baseq_export.settings import PRESETS
    from baseq_export.models import load_model

    path = _saved_checkpoint(tmp_path / "model", "qwen2" if method == "gptq" else "llama")
    lazy, eager = load_model(path, lazy=True), load_model(path)
    ids = calib()
    if method == "baseq":
        import dataclasses

        preset = dataclasses.replace(PRESETS["quick"], nsamples=16, calib_ctx=32, epochs=1)
        make = lambda m, spool: calibrate_baseq(m, QuantSettings(bits=bits), preset, ids, workdir=spool)  # noqa: E731
    elif method == "tune":
        from baseq_export.tune import TuneSettings, tune_blocks
        from baseq_export.settings import profile_settings

        tune = TuneSettings(nsamples=8, ctx=32, nval=4, epochs=1)
        make = lambda m, spool: tune_blocks(m, profile_settings("gguf"), ids, tune, workdir=spool)  # noqa: E731
    else:
        make = lambda m, spool: quantize_model(m, QuantSettings(method=method, bits=bits, group_size=32), ids,  # noqa: E731
                                               spool=spool)
    a, b = make(lazy, tmp_path / "spool"), make(eager, None)
    assert not a.tensors._memory and len(list((tmp_path / "spool").glob("block_*.safetensors"))) == lazy.config.num_layers
    assert a.tensors.keys() == b.tensors.keys() and a.model == b.model and a.quant == b.quant
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)
    # the streamed artifact (blocks read back from their files, written one tensor at a time) is the same file
    pa, pb = save_artifact(tmp_path / "a.baseq", a), save_artifact(tmp_path / "b.baseq", b)
    assert (pa / "quant.safetensors").read_bytes() == (pb / "quant.safetensors").read_bytes()
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (pa, pb))
    assert ca["tensors"] == cb["tensors"] and ca["checksums"] == cb["checksums"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_weights_equal_rotating_the_whole_model(arch, monkeypatch):
    """BlockWeights (one linear at a time, tables in slices of rows) gives rotate_model's float64 numbers rounded
    to float32, bit for bit, for every block and the embedding and head."""
    from baseq_export import rotate
    from baseq_export.blocks import BlockWeights

    m = from_hf_model(tiny_hf_model(arch, dtype=torch.float32))
    _, whole = rotate_model(m.config, {k: v.double() for k, v in m.weights.items()}, seed=5, r4=True)  # unsliced
    monkeypatch.setattr(rotate, "ROTATE_ELEMENTS", 7 * 64)  # BlockWeights: every matrix in slices of a few rows
    src = BlockWeights(m, rotated=True, seed=5, r4=True)
    got = {**src.outside_and_norms(), **{f"layers.{i}.{k}": v for i in range(m.config.num_layers) for k, v in src.layer(i).items()}}
    assert got.keys() == whole.keys()
    for k, v in whole.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k
    assert torch.equal(src.embed(), whole["embed"].float())


def test_hessians_gathered_in_two_passes_give_the_same_artifact(tiny, monkeypatch):
    """A big down_proj Hessian is gathered in a forward pass of its own after the other sites' are used and
    dropped (memory at 7B); the codes, scales and every other tensor are those of the one-pass run."""
    from baseq_export import gptq_model

    s = QuantSettings(method="quarot-gptq", bits="w4a4kv4")
    one = quantize_model(tiny, s, calib())
    passes = []
    real = gptq_model.gptq_hessians

    def recorded(*args, **kwargs):
        hessians = real(*args, **kwargs)
        passes.append(tuple(hessians))
        return hessians

    monkeypatch.setattr(gptq_model, "gptq_hessians", recorded)
    monkeypatch.setattr(gptq_model, "SPLIT_HESSIANS_BYTES", 0)
    two = quantize_model(tiny, s, calib())
    assert passes[:2] == list(gptq_model.HESSIAN_PASSES)
    assert set(one.tensors) == set(two.tensors)
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_bytes_counts_a_blocks_linears_and_sets_the_mmap_threshold_only_for_big_blocks(arch, monkeypatch):
    """block_bytes equals 4 bytes times the numel of block 0's linear weights; map_big_allocations fixes glibc's
    threshold (mallopt M_MMAP_THRESHOLD) only from BIG_BLOCK_BYTES on, so small models keep glibc's default."""
    from baseq_export import memory
    from baseq_export.models.base import LINEARS
    from baseq_export.blocks import block_bytes

    m = from_hf_model(tiny_hf_model(arch))
    assert block_bytes(m.config) == 4 * sum(m.weights[f"layers.0.{n}.weight"].numel() for n in LINEARS)
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(memory, "_libc", Libc)
    assert not memory.map_big_allocations(memory.BIG_BLOCK_BYTES - 1) and calls == []
    assert memory.map_big_allocations(memory.BIG_BLOCK_BYTES) and calls == [(-3, memory.MMAP_THRESHOLD)]


@pytest.mark.parametrize("rows,cols,elements", [(10, 4, 12), (10, 4, 3), (7, 100, 1000), (1, 5, 5), (0, 3, 9)])
def test_row_slices_cover_every_row_once_in_parts_of_the_given_size(rows, cols, elements):
    from baseq_export.memory import row_slices

    parts = row_slices(rows, cols, elements)
    covered = [i for p in parts for i in range(rows)[p]]
    assert covered == list(range(rows))
    sizes = [len(range(rows)[p]) for p in parts]
    assert all(s == max(1, elements // cols) for s in sizes[:-1]) and all(0 < s <= max(1, elements // cols) for s in sizes)
