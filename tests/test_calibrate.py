import pytest
import torch

from baseq_export import calibrate
from baseq_export.calibrate import calibrate_baseq
from baseq_export.stage_c import block_tensors, fold_block, init_params
from baseq_export.settings import BaseqSettings
from baseq_export.models import from_hf_model
from baseq_export.models.base import forward, layer_weights
from baseq_export.blocks import calib_rope, run_block
from baseq_export.gptq_model import quantize_model, round_layer
from baseq_export.settings import QuantSettings
from baseq_export.artifact import load_artifact, save_artifact
from baseq_export.reference import QuantHooks, reference_model
from conftest import tiny_hf_model

Q = QuantSettings(method="quarot-gptq", bits="w4a4kv4")
B = BaseqSettings(nsamples=12, calib_ctx=24, epochs=3, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    return from_hf_model(tiny_hf_model("qwen2", dtype=torch.float32, num_hidden_layers=3))


def calib():
    return torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(0))


def test_folded_artifact_equals_training_forward(tiny, tmp_path):
    """Random (non-trivial) stage-C parameters: the training-time block and the saved artifact agree bit for bit."""
    from baseq_export.rotate import rotate_model

    cfg, w = rotate_model(tiny.config, {k: v.double() for k, v in tiny.weights.items()})
    w = {k: v.float() for k, v in w.items()}
    lw = layer_weights(w, 1)
    qweights = round_layer(lw, Q, None)
    qlw = {**{f"{n}.weight": qw.dequantize() for n, qw in qweights.items()}, **{k: v for k, v in lw.items() if k.endswith(".bias")}}
    gen = torch.Generator().manual_seed(3)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in init_params(cfg, B, None).items()}
    quant_cfg = Q.quant_config()
    h = torch.randn(2, 24, cfg.hidden_size, generator=gen)
    rope = calib_rope(cfg, w, h)
    with torch.enable_grad():
        params_g = {k: v.clone().requires_grad_() for k, v in params.items()}
        lw_t, on_t = fold_block(qlw, params_g, 1)
        train_out = run_block(cfg, lw_t, 1, h, QuantHooks(quant_cfg, on_t), rope)
        train_out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params_g.values())  # every parameter is learnable

    # a complete artifact whose block 1 is replaced by the folded one
    base = quantize_model(tiny, QuantSettings(method="quarot-rtn", bits="w4a4kv4"))
    base.tensors.update(block_tensors(qweights, lw_t, on_t, 1))
    art = load_artifact(save_artifact(tmp_path / "b.baseq", base))
    ref = reference_model(art, exact=False)  # the float32 forward training runs (exact mode rounds differently)
    ref_out = run_block(ref.config, layer_weights(ref.weights, 1), 1, h, ref.hooks, rope)
    assert torch.equal(ref_out, train_out.detach())


def test_training_lowers_every_block_mse_and_the_model_error(tiny):
    art = calibrate_baseq(tiny, Q, B, calib())
    blocks = art.calibration["blocks"]
    assert len(blocks) == 3
    for b in blocks:
        assert b["kept"] == "trained" and b["mse_baseq"] < b["mse_gptq"]
    ids = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(9))
    fp = forward(tiny.config, tiny.weights, ids)
    err = lambda a: float((reference_model(a).logits(ids) - fp).norm() / fp.norm())  # noqa: E731
    assert err(art) < err(quantize_model(tiny, Q, calib()))


def test_resume_after_interruption_is_bit_identical(tiny, tmp_path, monkeypatch):
    full = calibrate_baseq(tiny, Q, B, calib(), workdir=tmp_path / "a")
    calls = {"n": 0}
    real_train = calibrate.train_block

    def interrupt_at_third_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(calibrate, "train_block", interrupt_at_third_block)
    with pytest.raises(KeyboardInterrupt):
        calibrate_baseq(tiny, Q, B, calib(), workdir=tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").glob("block_*.safetensors")) == ["block_0.safetensors", "block_1.safetensors"]
    monkeypatch.setattr(calibrate, "train_block", real_train)
    trained = []
    monkeypatch.setattr(calibrate, "train_block", lambda *a, **k: trained.append(a[2]) or real_train(*a, **k))
    resumed = calibrate_baseq(tiny, Q, B, calib(), workdir=tmp_path / "b")
    assert trained == [2]  # only the unfinished block was trained again
    assert set(resumed.tensors) == set(full.tensors)
    for k, v in full.tensors.items():
        assert torch.equal(resumed.tensors[k], v), k


def test_partial_run_with_other_settings_is_refused(tiny, tmp_path):
    calibrate_baseq(tiny, Q, B, calib(), workdir=tmp_path)
    with pytest.raises(ValueError, match="partial run with other settings"):
        calibrate_baseq(tiny, Q, BaseqSettings(nsamples=12, calib_ctx=24, epochs=1), calib(), workdir=tmp_path)


def test_baseq_needs_activation_quantization(tiny):
    with pytest.raises(ValueError, match="w4a4kv4 or w4a8kv8"):
        calibrate_baseq(tiny, QuantSettings(method="quarot-gptq", bits="w4a16"), B, calib())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stage_a_transforms_keep_the_float_block_exact(arch):
    """Random non-trivial scales and rotations: the transformed block computes the same output in float64 (v/o
    per KV head with grouped-query heads, v and up biases, down_proj behind the online R4 Hadamard)."""
    from baseq_export.rotate import RotationHooks, rotate_model
    from baseq_export.stage_a import cayley, init_transform, transform_block

    m = from_hf_model(tiny_hf_model(arch, num_hidden_layers=1, num_key_value_heads=2))
    cfg, w = rotate_model(m.config, {k: v.double() for k, v in m.weights.items()})
    lw = layer_weights(w, 0)
    gen = torch.Generator().manual_seed(4)
    t = {k: 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in init_transform(cfg).items()}
    r = cayley(t["vo.skew"])
    eye = torch.eye(cfg.head_dim, dtype=torch.float64)
    assert torch.allclose(r @ r.transpose(-1, -2), eye.expand_as(r), atol=1e-12) and (r - eye).abs().max() > 0.1
    tw = transform_block(lw, t, cfg, r4=True)
    assert all(not torch.allclose(tw[f"{n}.weight"], lw[f"{n}.weight"]) for n in ("v", "o", "up", "down"))
    h = torch.randn(2, 9, cfg.hidden_size, generator=gen, dtype=torch.float64)
    rope = calib_rope(cfg, w, h)
    hooks = RotationHooks(r3=False, r4=True)
    torch.testing.assert_close(run_block(cfg, tw, 0, h, hooks, rope), run_block(cfg, lw, 0, h, hooks, rope),
                               rtol=1e-10, atol=1e-10)


def test_stage_a_lowers_the_rtn_block_error_and_keeps_the_function(tiny):
    """Calibrating with stage A: each block's stage A MSE (RTN weights) drops, and the model it leaves to GPTQ and
    stage C still quantizes to an artifact nearer the float model than GPTQ alone."""
    b = BaseqSettings(nsamples=12, calib_ctx=24, epochs=3, batch_size=4, stage_a_epochs=3)
    art = calibrate_baseq(tiny, Q, b, calib())
    blocks = art.calibration["blocks"]
    assert all(x["stage_a"] == "trained" and x["mse_stage_a"] < x["mse_stage_a_start"] for x in blocks)
    ids = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(9))
    fp = forward(tiny.config, tiny.weights, ids)
    err = lambda a: float((reference_model(a).logits(ids) - fp).norm() / fp.norm())  # noqa: E731
    assert err(art) < err(quantize_model(tiny, Q, calib()))


def test_token_loss_weighs_every_token_by_its_own_target():
    """output_loss: 'mse' is the plain mean square; 'token' is each token's squared error over its target's mean
    square, averaged (numpy), so a token whose residual stream is 1000x larger counts like any other."""
    import numpy as np

    from baseq_export.stage_c import output_loss

    gen = torch.Generator().manual_seed(5)
    y = torch.randn(3, 7, 16, generator=gen)
    out = y + 0.1 * torch.randn(3, 7, 16, generator=gen)
    yn, on = y.numpy().astype(np.float64), out.numpy().astype(np.float64)
    np.testing.assert_allclose(float(output_loss(out, y)), ((on - yn) ** 2).mean(), rtol=1e-6)
    relative = ((on - yn) ** 2).mean(-1) / (yn**2).mean(-1)
    np.testing.assert_allclose(float(output_loss(out, y, "token")), relative.mean(), rtol=1e-6)
    sink_y, sink_out = y.clone(), out.clone()
    sink_y[:, 0] *= 1000
    sink_out[:, 0] *= 1000  # the same relative error on a huge token
    torch.testing.assert_close(output_loss(sink_out, sink_y, "token"), output_loss(out, y, "token"))
    assert float(output_loss(sink_out, sink_y)) > 1e4 * float(output_loss(out, y))


def test_learned_weight_scales_keep_the_codes_and_the_artifact_computes_the_recorded_loss(tiny):
    """learn_weight_scale: block 0 keeps GPTQ's codes and zero points (its input is the same with or without), its
    scales are fp16 values that differ from GPTQ's; the saved block's output loss (reference forward, float32) is
    the loss calibration recorded for it, below its GPTQ start."""
    from baseq_export.stage_c import output_loss
    from baseq_export.blocks import BlockWeights
    from baseq_export.rotate import RotationHooks

    b = BaseqSettings(nsamples=12, calib_ctx=24, epochs=3, batch_size=4, learn_weight_scale=True, loss="token")
    scaled = calibrate_baseq(tiny, Q, b, calib())
    plain = calibrate_baseq(tiny, Q, BaseqSettings(nsamples=12, calib_ctx=24, epochs=3, batch_size=4, loss="token"), calib())
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        p = f"layers.0.{name}"
        assert torch.equal(scaled.tensors[f"{p}.qweight"], plain.tensors[f"{p}.qweight"])
        assert torch.equal(scaled.tensors[f"{p}.zeros"], plain.tensors[f"{p}.zeros"])
        s = scaled.tensors[f"{p}.scales"]
        assert torch.equal(s, s.half().float()) and (s > 0).all() and not torch.equal(s, plain.tensors[f"{p}.scales"])
    entry = scaled.calibration["blocks"][0]
    assert entry["kept"] == "trained" and entry["mse_baseq"] < entry["mse_gptq"]
    src = BlockWeights(tiny, rotated=True, seed=Q.seed, r4=True)
    h = torch.nn.functional.embedding(calib(), src.embed())
    rope = calib_rope(src.config, src.outside, h)
    y = run_block(src.config, src.layer(0), 0, h, RotationHooks(r3=False, r4=True), rope)
    ref = reference_model(scaled, exact=False)
    out = run_block(ref.config, layer_weights(ref.weights, 0), 0, h, ref.hooks, rope)
    assert float(output_loss(out, y, "token")) == pytest.approx(entry["mse_baseq"], rel=1e-5)
