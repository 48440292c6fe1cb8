import dataclasses

import pytest
import torch

from baseq_export import calibrate
from baseq_export.calibrate import calibrate_baseq
from baseq_export.settings import BaseqSettings
from baseq_export.end_to_end import EndToEndFit, TunableArtifact, token_kl, tune_end_to_end
from baseq_export.models import from_hf_model
from baseq_export.models.base import forward, head_logits
from baseq_export.settings import QuantSettings
from baseq_export.artifact import Artifact
from baseq_export.reference import reference_model
from baseq_export.tensor_files import TensorStore
from conftest import tiny_hf_model

Q = QuantSettings(method="quarot-gptq", bits="w4a4kv4")
B = BaseqSettings(nsamples=8, calib_ctx=24, epochs=2, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    return from_hf_model(tiny_hf_model("qwen2", dtype=torch.float32, num_hidden_layers=2))


def calib() -> torch.Tensor:
    return torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))


def held_out() -> torch.Tensor:
    return torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def calibrated(tiny):
    """A BASE-Q artifact without the end-to-end pass, and the FP blocks' last hidden states on the windows."""
    captured = {}

    def capture(art, windows, fp_last, fit, seed, device):
        captured["fp_last"] = fp_last.clone()
        return None, {"kept": False}

    mp = pytest.MonkeyPatch()
    mp.setattr(calibrate, "tune_end_to_end", capture)
    try:
        art = calibrate_baseq(tiny, Q, dataclasses.replace(B, e2e_epochs=1), calib())
    finally:
        mp.undo()
    return art, captured["fp_last"]


def copy_artifact(art: Artifact, changed: dict[str, torch.Tensor] | None = None) -> Artifact:
    tensors = TensorStore()
    tensors.update({k: art.tensors[k].clone() for k in art.tensors})
    tensors.update(changed or {})
    return dataclasses.replace(art, tensors=tensors)


def moved(model: TunableArtifact, seed: int) -> None:
    """Move every trainable tensor a little (as training would)."""
    g = torch.Generator().manual_seed(seed)
    for t in model.params.values():
        t.add_(0.05 * torch.randn(t.shape, generator=g) * (t.abs().mean() + 0.1))


def test_the_teacher_is_the_fp_model(tiny, calibrated):
    """The FP blocks' last hidden states (rotated basis) through the artifact's final norm and head are the
    unrotated float model's logits."""
    art, fp_last = calibrated
    qm = reference_model(art, exact=False)
    outside = {k: v for k, v in qm.weights.items() if not k.startswith("layers.")}
    ours = head_logits(qm.config, outside, fp_last, qm.hooks)
    ref = forward(tiny.config, tiny.weights, calib())
    assert torch.allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_trained_tensors_written_back_give_the_same_model(calibrated):
    """What the tuner computes with moved parameters is what the artifact holding its tensors() computes."""
    art, _ = calibrated
    model = TunableArtifact(art)
    ids = held_out()
    with torch.no_grad():
        assert torch.allclose(model.logits(ids), reference_model(art, exact=False).logits(ids), atol=1e-5)
        moved(model, 0)
        ours = model.logits(ids)
    back = reference_model(copy_artifact(art, model.tensors()), exact=False).logits(ids)
    assert torch.allclose(ours, back, atol=1e-4)
    assert not torch.allclose(ours, reference_model(art, exact=False).logits(ids), atol=1e-3)


def test_a_moved_shift_is_compensated_in_the_biases(calibrated):
    """Without rounding, the shifts change nothing (x - shift quantized, + shift in the next linear's bias)."""
    art, _ = calibrated
    model = TunableArtifact(art)
    model.hooks.a_bits = model.hooks.kv_bits = None
    ids = held_out()
    with torch.no_grad():
        before = model.logits(ids)
        for name, t in model.params.items():
            if name.endswith(".shift"):
                t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
        assert torch.allclose(model.logits(ids), before, atol=1e-4)


def test_end_to_end_lowers_the_kl_to_the_fp_model_on_other_windows(tiny, calibrated):
    art, fp_last = calibrated
    tuned, entry = tune_end_to_end(art, calib(), fp_last, EndToEndFit(epochs=6, lr_gain=5e-3, lr_shift=5e-3), seed=0)
    assert entry["kept"] and entry["kl_end"] < entry["kl_start"]
    ids = held_out()
    fp = forward(tiny.config, tiny.weights, ids)
    with torch.no_grad():
        kl_before = token_kl(reference_model(art).logits(ids), fp).item()
        kl_after = token_kl(reference_model(copy_artifact(art, tuned)).logits(ids), fp).item()
    assert kl_after < kl_before
    with pytest.raises(ValueError, match="at least one epoch"):
        tune_end_to_end(art, calib(), fp_last, EndToEndFit(epochs=0), seed=0)


def test_a_block_at_a_time_trains_the_same_numbers_as_holding_every_block(calibrated):
    """The pass that dequantizes a block when it runs (and again for its backward, activation checkpointing) gives
    the held pass's logits, gradients and trained tensors bit for bit; it never reads every block at once."""
    art, fp_last = calibrated
    held, light = TunableArtifact(art, hold=True), TunableArtifact(art, hold=False)
    assert not isinstance(light.weights, dict)  # lazy: the blocks' linears are dequantized when read
    ids = held_out()
    for m in (held, light):
        moved(m, 3)
        m.groups(EndToEndFit(epochs=1))  # the parameters require gradients
        loss = m.logits(ids).logsumexp(-1).mean()
        loss.backward()
    with torch.no_grad():
        assert torch.equal(held.logits(ids), light.logits(ids))
    for k in held.params:
        assert torch.equal(held.params[k].grad, light.params[k].grad), k
    fit = EndToEndFit(epochs=2, lr_gain=5e-3, lr_shift=5e-3)
    a = tune_end_to_end(art, calib(), fp_last, fit, seed=0, hold=True)
    b = tune_end_to_end(art, calib(), fp_last, fit, seed=0, hold=False)
    assert a[1]["kl_start"] == b[1]["kl_start"] and a[1]["kl_end"] == b[1]["kl_end"]
    assert a[0] is not None and b[0] is not None and a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k


def test_the_pass_holds_the_blocks_where_they_fit_in_free_memory(calibrated):
    from baseq_export.end_to_end import end_to_end_bytes, holds_blocks
    from baseq_export.models.base import ModelConfig

    cfg = ModelConfig.from_dict(calibrated[0].model)
    need = end_to_end_bytes(cfg, held=True)
    assert holds_blocks(cfg, free=need) and not holds_blocks(cfg, free=need - 1)
    assert end_to_end_bytes(cfg, held=False) == need  # two blocks held at most: this cfg has two
    big = dataclasses.replace(cfg, num_layers=32)
    assert end_to_end_bytes(big, held=False) < end_to_end_bytes(big, held=True)


def test_token_kl_matches_a_direct_computation():
    t, s = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    p, q = t.softmax(-1).double(), s.softmax(-1).double()
    assert token_kl(s, t).item() == pytest.approx((p * (p / q).log()).sum(-1).mean().item(), rel=1e-5)
    assert token_kl(t, t).item() == pytest.approx(0, abs=1e-6)


def test_calibration_runs_the_pass_records_it_and_a_resumed_run_reuses_it(tiny, tmp_path, monkeypatch):
    b = dataclasses.replace(B, e2e_epochs=2)
    first = calibrate_baseq(tiny, Q, b, calib(), workdir=tmp_path / "run")
    entry = first.calibration["end_to_end"]
    assert entry["epochs"] == 2 and entry["kl_end"] < entry["kl_start"] and entry["kept"]
    plain = calibrate_baseq(tiny, Q, B, calib())
    assert not torch.equal(first.tensors["layers.1.o_in.shift"], plain.tensors["layers.1.o_in.shift"])

    def again(*args, **kwargs):
        raise AssertionError("a resumed run should read the saved pass, not tune again")

    monkeypatch.setattr(calibrate, "tune_end_to_end", again)
    resumed = calibrate_baseq(tiny, Q, b, calib(), workdir=tmp_path / "run")
    assert resumed.calibration["end_to_end"] == entry
    for k in first.tensors:
        assert torch.equal(first.tensors[k], resumed.tensors[k]), k


def test_the_pass_is_skipped_with_a_note_when_memory_is_short(tiny, monkeypatch, capsys):
    monkeypatch.setattr(calibrate, "available_memory", lambda: 1024)
    art = calibrate_baseq(tiny, Q, dataclasses.replace(B, e2e_epochs=1), calib())
    assert art.calibration["end_to_end"]["skipped"] == "memory"
    assert "end-to-end tuning skipped" in capsys.readouterr().out
    plain = calibrate_baseq(tiny, Q, B, calib())
    for k in plain.tensors:
        assert torch.equal(art.tensors[k], plain.tensors[k]), k
