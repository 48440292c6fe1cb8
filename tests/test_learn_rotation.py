import numpy as np
import pytest
import torch

from baseq_export import calibrate
from baseq_export.calibrate import calibrate_baseq
from baseq_export.settings import BaseqSettings
from baseq_export.learn_rotation import RotationFit, SiteSample, learn_residual_rotation, rotation_loss, weighted_error
from baseq_export.models import from_hf_model
from baseq_export.models.base import forward
from baseq_export.blocks import BlockWeights
from baseq_export.gptq_model import quantize_model
from baseq_export.learn_rotation import block_weights, learned_residual
from baseq_export.settings import QuantSettings
from baseq_export.rotate import RotationHooks, random_orthogonal
from conftest import tiny_hf_model


@pytest.fixture(scope="module")
def tiny():
    return from_hf_model(tiny_hf_model("llama", dtype=torch.float32, num_hidden_layers=2))


def calib():
    return torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(1))


def outlier_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Gaussian token rows with two channels 20x larger than the rest (what a rotation should spread)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:, :2] *= 20
    return x


def numpy_fake_quant(x: np.ndarray, bits: int, clip: float) -> np.ndarray:
    """Per-token asymmetric min-max fake quant with the range shrunk about its midpoint (quant.py's recipe)."""
    qmax = 2**bits - 1
    lo_x, hi_x = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    r = hi_x - lo_x
    scale = np.maximum(r * clip / qmax, 1e-8)
    zero = np.round(-((hi_x + lo_x) / 2 - r / 2 * clip) / scale)
    return (np.clip(np.round(x / scale) + zero, 0, qmax) - zero) * scale


def test_weighted_error_is_the_output_error_of_the_linears():
    """e G e^T with G = W^T W equals |(fq(x Q) Q^T - x) W^T|^2, computed in numpy from W itself."""
    x = outlier_rows(64, 32, 0)
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    q = random_orthogonal(32, seed=2).to(torch.float32)
    ours = weighted_error(x, q, w.T @ w, 4, 0.9)
    xn, qn, wn = x.double().numpy(), q.double().numpy(), w.double().numpy()
    e = numpy_fake_quant(xn @ qn, 4, 0.9) @ qn.T - xn
    ref = ((e @ wn.T) ** 2).sum(-1)
    assert ours.sum().item() == pytest.approx(ref.sum(), rel=1e-3)
    assert np.median(np.abs(ours.double().numpy() - ref) / ref) < 1e-3


def test_learned_rotation_is_orthogonal_and_spreads_outliers():
    d = 32
    samples = []
    for seed in (0, 1):
        w = torch.randn(40, d, generator=torch.Generator().manual_seed(10 + seed))
        samples.append(SiteSample(outlier_rows(512, d, seed), w.T @ w))
    q = learn_residual_rotation(samples, RotationFit(steps=60, lr=2e-2, batch_tokens=256), bits=4, clip=0.9, seed=0)
    assert q.dtype == torch.float64
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-10)
    rows = torch.arange(512)
    before = rotation_loss(samples, torch.eye(d), rows, 4, 0.9).item()
    after = rotation_loss(samples, q.float(), rows, 4, 0.9).item()
    assert after < 0.5 * before  # two 20x channels: a rotation that mixes them into the others quantizes far better
    with pytest.raises(ValueError, match="at least one step"):
        learn_residual_rotation(samples, RotationFit(steps=0), bits=4, clip=0.9, seed=0)


def test_block_weights_with_a_residual_rotation_compute_the_same_function(tiny):
    """R1 times any orthogonal residual rotation, folded into every block and both tables: the float model's logits."""
    rot = random_orthogonal(tiny.config.hidden_size, seed=3)
    src = BlockWeights(tiny, rotated=True, seed=1, r4=True, residual=rot)
    w = dict(src.outside_and_norms())
    for i in range(src.config.num_layers):
        w.update({f"layers.{i}.{k}": v for k, v in src.layer(i).items()})
    plain = BlockWeights(tiny, rotated=True, seed=1, r4=True)
    assert not torch.allclose(w["layers.0.q.weight"], plain.layer(0)["q.weight"], atol=1e-3)
    ids = calib()[:2]
    ref = forward(tiny.config, tiny.weights, ids)
    out = forward(src.config, w, ids, RotationHooks())
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_learned_rotation_settings_are_checked_and_recorded(tiny):
    with pytest.raises(ValueError, match="quantized activations"):
        QuantSettings(method="quarot-gptq", bits="w4a16", r1_steps=10)
    with pytest.raises(ValueError, match="rotated method"):
        QuantSettings(method="gptq", bits="w4a4kv4", r1_steps=10)
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        QuantSettings(r1_steps=-1)
    s = QuantSettings(method="quarot-rtn", bits="w4a4kv4", r1_steps=8)
    assert s.quant_config()["rotation"]["r1_learned_steps"] == 8
    assert "r1_learned_steps" not in QuantSettings(method="quarot-rtn").quant_config()["rotation"]
    with pytest.raises(ValueError, match="calibration windows"):
        learned_residual(tiny, s, None)
    art = quantize_model(tiny, s, calib())
    assert art.quant["rotation"]["r1_learned_steps"] == 8
    # the artifact's weights are the plain rotation's weights times the learned residual rotation, rounded
    residual = learned_residual(tiny, s, calib())
    same = quantize_model(tiny, QuantSettings(method="quarot-rtn", bits="w4a4kv4"), calib())
    assert not torch.equal(art.tensors["layers.0.q.qweight"], same.tensors["layers.0.q.qweight"])
    w_plain = block_weights(tiny, QuantSettings(method="quarot-rtn", bits="w4a4kv4"), calib()).layer(0)["q.weight"]
    w_learned = block_weights(tiny, s, calib()).layer(0)["q.weight"]
    assert torch.allclose(w_learned.double(), w_plain.double() @ residual, atol=1e-5)


def test_a_resumed_calibration_reuses_the_saved_rotation(tiny, tmp_path, monkeypatch):
    q = QuantSettings(method="quarot-gptq", bits="w4a4kv4", r1_steps=5)
    b = BaseqSettings(nsamples=6, calib_ctx=16, epochs=1, batch_size=3)
    first = calibrate_baseq(tiny, q, b, calib(), workdir=tmp_path / "run")
    assert (tmp_path / "run" / calibrate.RESIDUAL_FILE).is_file()

    def refit(*args, **kwargs):
        raise AssertionError("the saved rotation should be read, not fitted again")

    monkeypatch.setattr(calibrate, "learned_residual", refit)
    again = calibrate_baseq(tiny, q, b, calib(), workdir=tmp_path / "run")
    for k in first.tensors:
        assert torch.equal(first.tensors[k], again.tensors[k]), k


def test_site_samples_are_the_norm_outputs_and_respect_the_memory_cap(tiny):
    from baseq_export.learn_rotation import sampled_sites, token_sample
    from baseq_export.models.base import rms_norm
    from baseq_export.learn_rotation import residual_site_samples

    src = BlockWeights(tiny, rotated=True, seed=0, r4=True)
    cfg, ids = src.config, calib()
    every = residual_site_samples(src, ids, RotationFit(steps=1, sample_tokens=40), seed=3)
    assert len(every) == 2 * cfg.num_layers
    rows = token_sample(ids.numel(), 40, 3)
    h = torch.nn.functional.embedding(ids, src.embed())
    first = rms_norm(h, None, cfg.rms_eps).reshape(-1, cfg.hidden_size)  # block 0's attn_in (norm gain folded away)
    assert torch.allclose(every[0].x, first[rows], atol=1e-6)
    assert torch.allclose(every[0].mean, first.mean(0), atol=1e-6)
    w = torch.cat([src.layer(0)[f"{n}.weight"] for n in ("q", "k", "v")])
    assert torch.allclose(every[0].gram, w.T @ w, atol=1e-5)
    per_site = 4 * (40 * cfg.hidden_size + cfg.hidden_size**2)
    capped = residual_site_samples(src, ids, RotationFit(steps=1, sample_tokens=40, max_sample_bytes=2 * per_site), seed=3)
    assert len(capped) == 2  # the first and the last site, the same numbers as in the full collection
    assert torch.equal(capped[0].x, every[0].x) and torch.equal(capped[1].x, every[-1].x)
    # the last block's mlp_in: the unrotated pass's sample times R1 is the rotated model's (its R2 and R4 inside)
    from baseq_export.blocks import TapHooks, calib_rope, run_block

    taps = {}
    hooks = TapHooks(RotationHooks(r3=False, r4=True), lambda site, x: taps.__setitem__(site, x.reshape(-1, x.shape[-1])))
    h = torch.nn.functional.embedding(ids, src.embed())
    rope = calib_rope(cfg, src.outside, h)
    for i in range(cfg.num_layers):
        lw = src.layer(i)
        h = run_block(cfg, lw, i, h, hooks, rope)
    assert torch.allclose(every[-1].x, taps["mlp_in"][rows], atol=1e-5)
    assert torch.allclose(every[-1].mean, taps["mlp_in"].mean(0), atol=1e-6)
    w = torch.cat([lw[f"{n}.weight"] for n in ("gate", "up")])
    assert torch.allclose(every[-1].gram, w.T @ w, atol=1e-5)
    assert sampled_sites(64, 4096, 4096, 768 * 2**20) == [0, 13, 25, 38, 50, 63]
    assert sampled_sites(60, 576, 4096, 768 * 2**20) == list(range(60))
