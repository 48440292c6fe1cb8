"""An ONNX export's context: --max-length (default: the source model's own), prompts past the old 2048-token cap
in onnxruntime and onnxruntime-genai against the torch reference, and a manifest that names no path of the
machine that built it. A tiny random model."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch

from baseq_export import api
from baseq_export.cli import main
from baseq_export.gptq_model import quantize_model
from baseq_export.reference import reference_model
from baseq_export.artifact import load_artifact
from baseq_export.settings import QuantSettings
from baseq_export.targets.onnx import DEFAULT_MAX_LENGTH
from test_gguf import bpe_tokenizer, save, tiny


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tok = bpe_tokenizer()
    hf, model = tiny("llama", tok)
    tmp = tmp_path_factory.mktemp("ctx")
    hf.save_pretrained(tmp / "ckpt")
    tok.save_pretrained(tmp / "ckpt")
    model.source = str(tmp / "ckpt")  # the artifact records where its model came from (as quantize does)
    art = quantize_model(model, QuantSettings(method="quarot-gptq", bits="w4a4kv4"), calib=torch.randint(0, 300, (4, 32)))
    return save(tmp, art, tok), tmp


def test_a_prompt_past_2048_tokens_runs_in_onnxruntime_and_genai(artifact, tmp_path):
    path, _ = artifact
    out = api.export(path, "onnx", tmp_path / "onnx", max_length=2600)
    assert json.loads((out / "manifest.json").read_text())["max_length"] == 2600
    assert json.loads((out / "genai_config.json").read_text())["model"]["context_length"] == 2600
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 300, (1, 2100), generator=gen)
    ref = reference_model(load_artifact(path)).logits(prompt)
    run = api.chat(out).backend
    got = run.logits(prompt)
    assert torch.equal(got.argmax(-1), ref.argmax(-1)) and (got - ref).abs().max() < 1e-3 * ref.abs().max()
    want = list(itertools.islice(run.greedy(prompt[0].tolist(), 8), 8))
    assert want == [int(t) for t in ref[0, -1:].argmax(-1)] + want[1:]  # the first new token is the reference's
    if importlib.util.find_spec("onnxruntime_genai"):
        assert list(itertools.islice(api.chat(out, backend="onnxruntime-genai").backend.greedy(prompt[0].tolist(), 8), 8)) == want
    with pytest.raises(ValueError, match="--max-length"):  # past the context: refused, naming the fix
        run.logits(torch.randint(3, 300, (1, 2601), generator=gen))


@pytest.mark.skipif(not importlib.util.find_spec("onnxruntime_genai"), reason="onnxruntime-genai not installed")
def test_genai_scores_a_window_as_long_as_the_context(artifact, tmp_path):
    """eval --ctx N on an export of context N: genai takes the whole window (it once asked for N + 1 and refused)."""
    path, _ = artifact
    out = api.export(path, "onnx", tmp_path / "onnx", max_length=48)
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    ref = reference_model(load_artifact(path)).logits(ids)
    got = api.chat(out, backend="onnxruntime-genai").backend.logits(ids)
    assert got.shape == ref.shape and torch.equal(got.argmax(-1), ref.argmax(-1))
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()


def test_default_length_is_the_source_models_and_no_path_of_this_machine_is_written(artifact, tmp_path):
    path, built = artifact
    assert main(["export", str(path), "--out", str(tmp_path / "onnx")]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    source = json.loads((built / "ckpt" / "config.json").read_text())["max_position_embeddings"]
    assert manifest["max_length"] == source != DEFAULT_MAX_LENGTH
    for f in (tmp_path / "onnx").iterdir():  # every text file of the export: no path of the building machine
        if f.suffix in (".json", ".jinja", ".txt"):
            text = f.read_text()
            for where in (str(built), str(tmp_path), str(path.parent), "/tmp/", "/work/", "/home/", "/root/"):
                assert where not in text, (f.name, where)
