"""Checkpoints that lie about themselves are refused at load with one line naming the file, the field and the fix
(models.checks): a config.json whose dimensions are not the tensors', a tokenizer with ids the embedding lacks, and
weights only in pickle (never unpickled). Each class for the three architectures, through the eager and lazy loaders
and the CLI (exit 1, no traceback, the checkpoint unchanged)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from baseq_export.models import ModelLoadError, load_model
from conftest import TINY, tiny_hf_model
from test_cli import WORDS, word_tokenizer
from test_reliability import eval_args, refused

ARCHS = ["llama", "mistral", "qwen2"]
ROWS = len(WORDS) + 1 + 8  # the embedding's rows: the word vocabulary, [UNK] and spare rows


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    """(checkpoint dir, text file) of a tiny random model of each architecture with a word-level tokenizer."""
    d = tmp_path_factory.mktemp(request.param)
    tok = word_tokenizer()
    tok.save_pretrained(d / "ckpt")
    # spare embedding rows, as real checkpoints have (Qwen2's tokenizer class adds <|endoftext|> to any vocabulary)
    tiny_hf_model(request.param, dtype=torch.float32, vocab_size=ROWS).save_pretrained(d / "ckpt")
    (d / "eval.txt").write_text(" ".join(WORDS * 10))
    return d / "ckpt", d / "eval.txt"


def copy_with(base: Path, dest: Path, **config) -> Path:
    shutil.copytree(base, dest)
    c = json.loads((dest / "config.json").read_text())
    c.update(config)
    (dest / "config.json").write_text(json.dumps(c))
    return dest


def both_loaders_refuse(d: Path, *needles: str) -> None:
    for lazy in (False, True):
        with pytest.raises(ModelLoadError) as e:
            load_model(str(d), lazy=lazy)
        for needle in needles:
            assert needle in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("field", ["intermediate_size", "hidden_size", "num_key_value_heads"])
def test_a_config_whose_dimensions_are_not_the_tensors_is_refused(checkpoint, field, tmp_path, capsys):
    wrong = {"intermediate_size": TINY["intermediate_size"] * 2, "hidden_size": TINY["hidden_size"] * 2,
             "num_key_value_heads": TINY["num_attention_heads"]}[field]
    d = copy_with(checkpoint[0], tmp_path / "m", **{field: wrong})
    if field == "hidden_size":  # the tensors' shapes as the weights have them
        head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
        json_cfg = json.loads((d / "config.json").read_text())
        json_cfg["head_dim"] = head_dim  # keep the heads' width: the mismatch is the hidden size alone
        (d / "config.json").write_text(json.dumps(json_cfg))
    named = "num_key_value_heads x head_dim" if field == "num_key_value_heads" else f"{field} = {wrong}"
    needles = (str(d / "model.safetensors"), "config.json implies", named, "use the checkpoint's own config.json")
    both_loaders_refuse(d, *needles)
    refused(capsys, eval_args(d, checkpoint[1]), *needles, keep=(d,))


@pytest.mark.parametrize("layers", [10**9])  # (one more layer than held: tests/test_models.py)
def test_a_config_with_more_layers_than_the_tensors_is_refused_before_a_model_is_built(checkpoint, layers, tmp_path,
                                                                                       capsys):
    """10**9 layers: found by the fuzzer, once a hang (a model of the config was built layer by layer first)."""
    d = copy_with(checkpoint[0], tmp_path / "m", num_hidden_layers=layers)
    needles = (str(d / "config.json"), f"num_hidden_layers is {layers}",
               f"hold {TINY['num_hidden_layers']} layers", "use the checkpoint's own config.json")
    both_loaders_refuse(d, *needles)
    refused(capsys, eval_args(d, checkpoint[1]), *needles, keep=(d,))


def test_the_unchanged_checkpoint_loads_and_its_shapes_agree(checkpoint):
    """The check does not refuse a good checkpoint (both loaders, equal weights)."""
    eager, lazy = load_model(str(checkpoint[0])), load_model(str(checkpoint[0]), lazy=True)
    for name, w in eager.weights.items():
        assert torch.equal(w, lazy.weights[name]), name


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(checkpoint, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(checkpoint[0], d)
    tok = word_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(12)])  # past the spare rows
    tok.save_pretrained(d)
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(d))  # the loaders' tokenizer: added tokens, and any its class adds
    assert n > ROWS
    needles = (str(d), f"the tokenizer has {n} tokens", f"the embedding has {ROWS} rows", "vocab_size")
    both_loaders_refuse(d, *needles)
    refused(capsys, eval_args(d, checkpoint[1]), *needles, keep=(d,))


class Payload:
    """A pickle that, when loaded, creates a marker file: the proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_weights_are_named_as_such_and_never_opened(checkpoint, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(checkpoint[0], d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    needles = (str(d), "pickle", "pytorch_model.bin", "save_pretrained")
    both_loaders_refuse(d, *needles)
    refused(capsys, eval_args(d, checkpoint[1]), *needles, keep=(d,))
    assert not marker.exists()
    (d / "pytorch_model.bin").unlink()  # no weights at all: said so, not "lacks every tensor"
    both_loaders_refuse(d, "has no weight files")


def gguf_with(tmp_path: Path, key: str, was: int, value: int) -> Path:
    """A tiny model's GGUF (what --model FILE.gguf reads) with the uint32 metadata value of key changed."""
    from baseq_export.targets import gguf as G
    from test_cli import bpe_checkpoint

    bpe, _ = bpe_checkpoint(tmp_path / "bpe")
    (tmp_path / "g").mkdir()
    f = G.write_model(load_model(str(bpe)), tmp_path / "g" / "m.gguf", weights="f16", head="f16")
    data = bytearray(f.read_bytes())
    at = data.index(key.encode()) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 4  # GGUF's uint32 type, then the value
    assert int.from_bytes(data[at + 4 : at + 8], "little") == was
    data[at + 4 : at + 8] = value.to_bytes(4, "little")
    f.write_bytes(bytes(data))
    return f


def test_a_gguf_whose_metadata_does_not_give_its_tensors_shapes_is_refused(tmp_path):
    """The same rule for a --model FILE.gguf: head_count_kv raised in the header, so k_proj's rows disagree."""
    f = gguf_with(tmp_path, "llama.attention.head_count_kv", TINY["num_key_value_heads"], TINY["num_attention_heads"])
    with pytest.raises(ModelLoadError) as e:
        load_model(str(f), lazy=True)
    assert str(f) in str(e.value) and "attn_k.weight has shape [32, 64] but the file's metadata implies [64, 64]" in \
        str(e.value) and "the file is damaged" in str(e.value), str(e.value)


def test_a_gguf_claiming_more_blocks_than_its_tensors_is_refused_before_a_model_is_built(tmp_path):
    """block_count raised to 10**9 in the header: refused from the header, not after building 10**9 layers."""
    f = gguf_with(tmp_path, "llama.block_count", TINY["num_hidden_layers"], 10**9)
    both_loaders_refuse(f, str(f), "llama.block_count is 1000000000",
                        f"tensors hold {TINY['num_hidden_layers']} layers")


def test_a_gguf_whose_rope_dimension_is_huge_is_refused_before_anything_is_sized_by_it(tmp_path):
    """Found by the 10,000-case fuzz run: rope.dimension_count (transformers' head_dim) raised to 2**30 made the
    rotary table 4 GiB before the tensors' shapes were compared; now attn_q's shape refuses it first."""
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    f = gguf_with(tmp_path, "llama.rope.dimension_count", head_dim, 2**30)
    both_loaders_refuse(f, str(f), "attn_q.weight has shape", "the file is damaged")
