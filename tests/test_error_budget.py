"""tools/error_budget.py: an artifact's forward with some of its quantizers left out."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from baseq_export.models import from_hf_model
from baseq_export.models.base import ACT_SITES, forward
from baseq_export.gptq_model import quantize_model
from baseq_export.settings import QuantSettings
from baseq_export.reference import reference_model
from baseq_export.rotate import RotationHooks
from conftest import tiny_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from error_budget import PartialHooks  # noqa: E402


def test_leaving_every_quantizer_out_leaves_the_4bit_weights_with_the_rotations():
    """Nothing left out: the artifact's own logits. Every activation site and the KV cache left out: the float
    forward of the same (dequantized) weights with only the online Hadamards (R3, R4). Each single site left
    out changes the logits."""
    m = from_hf_model(tiny_hf_model("qwen2", dtype=torch.float32, num_hidden_layers=2))
    ref = reference_model(quantize_model(m, QuantSettings(method="quarot-rtn", bits="w4a4kv4")), exact=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    quantized = ref.hooks
    full = ref.logits(ids)

    def logits(hooks):
        ref.hooks = hooks
        return ref.logits(ids)

    assert torch.equal(logits(PartialHooks(quantized)), full)
    weights_only = forward(ref.config, ref.weights, ids, RotationHooks(r3=True, r4=True))
    torch.testing.assert_close(logits(PartialHooks(quantized, ACT_SITES, float_kv=True)), weights_only)
    assert (weights_only - full).abs().max() > 1e-3
    for site in ACT_SITES:
        assert not torch.equal(logits(PartialHooks(quantized, (site,))), full), site
    assert not torch.equal(logits(PartialHooks(quantized, float_kv=True)), full)
