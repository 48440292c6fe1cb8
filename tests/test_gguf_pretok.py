"""llama.cpp tokenizes text in our GGUF files exactly as the Hugging Face tokenizer does (targets/gguf/pretok.py):
on the embedded evaluation text, the GPL-3 text Debian ships and pretok's probe text, for tiny tokenizers of both
vocabulary kinds and for the default model. A pre-tokenizer no llama.cpp name reproduces is refused."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from baseq_export import data
from baseq_export.gguf_file import read_keys
from baseq_export.models import from_hf_model
from baseq_export.targets import gguf as G
from baseq_export.targets.gguf import pretok
from conftest import tiny_hf_model
from test_gguf import bpe_tokenizer, spm_tokenizer

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def texts() -> list[str]:
    """The evaluation texts whole: the embedded split, the GPL-3 text where the system has it, the probe text."""
    return [data.embedded_text("eval")] + ([GPL3.read_text()] if GPL3.is_file() else []) + [pretok.PROBE_TEXT]


def assert_tokenizes_like(path: Path, tokenizer) -> None:
    """llama.cpp's ids of every text from the file equal the tokenizer's (equal lists, so equal counts)."""
    want = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts()]
    got = pretok.llama_ids(path, texts())
    assert got is not None, f"llama.cpp cannot load {path}"
    miss = pretok.first_mismatch(texts(), want, got)
    assert miss is None, miss.describe()


def tiny_model(tok, vocab_size: int):
    return from_hf_model(tiny_hf_model("llama", dtype=torch.float32, hidden_size=64, intermediate_size=128,
                                       vocab_size=vocab_size), tok)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_written_files_tokenize_like_hugging_face(tmp_path, kind):
    tok = bpe_tokenizer() if kind == "gpt2" else spm_tokenizer()
    out = G.write_model(tiny_model(tok, 512), tmp_path / "t.gguf")
    keys = read_keys(out, {"tokenizer.ggml.model", "tokenizer.ggml.pre"})
    assert keys["tokenizer.ggml.model"] == kind
    # GPT-2's split for a byte-level BPE (the name of its form, tried first); no pre-tokenizer for SentencePiece
    assert keys.get("tokenizer.ggml.pre") == ("gpt-2" if kind == "gpt2" else None)
    assert_tokenizes_like(out, tok)


def test_the_wrong_name_is_the_bug_this_prevents(tmp_path):
    """The test above can fail: the same tokenizer under a digit-splitting name tokenizes differently."""
    tok = bpe_tokenizer()
    with pytest.warns(UserWarning, match="--gguf-pre smollm: llama.cpp's tokenization differs"):
        out = G.write_model(tiny_model(tok, 512), tmp_path / "t.gguf", tokenizer_pre="smollm")
    assert read_keys(out, {"tokenizer.ggml.pre"})["tokenizer.ggml.pre"] == "smollm"
    with pytest.raises(AssertionError, match="Hugging Face"):
        assert_tokenizes_like(out, tok)


def test_a_split_no_llama_cpp_name_reproduces_is_refused(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    tok = bpe_tokenizer()
    backend = tok.backend_tokenizer
    # every letter its own piece: a split none of llama.cpp's regexes makes
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[a-z]"), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(pretok.PreTokenizerError, match="--gguf-pre NAME") as e:
        G.write_model(tiny_model(tok, 512), tmp_path / "t.gguf")
    assert "none of llama.cpp's" in str(e.value) and "Hugging Face" in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left
    with pytest.raises(pretok.PreTokenizerError, match="does not know the pre-tokenizer 'no-such-split'"):
        G.write_model(tiny_model(tok, 512), tmp_path / "t.gguf", tokenizer_pre="no-such-split")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = G.write_model(tiny_model(tok, 512), tmp_path / "t.gguf", tokenizer_pre="gpt-2")  # the override
    assert read_keys(out, {"tokenizer.ggml.pre"})["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.real_model
def test_default_model_and_a_checkpoint_saved_from_it(tmp_path):
    """The default model's tokenizer is the one it was trained with (llama.cpp's reading of the shipped file, whose
    pre-tokenizer is smollm), and files written from it, or from a directory with its tokenizer and no pre-tokenizer
    name, tokenize like it."""
    from baseq_export.artifact import Artifact
    from baseq_export.models import default_model_path, load_model, source_info
    from baseq_export.targets.gguf import meta

    model = load_model("default", lazy=True)
    assert_tokenizes_like(default_model_path(), model.tokenizer)
    with tempfile.TemporaryDirectory() as tok:  # what write() chooses for a model loaded from the shipped file
        model.tokenizer.save_pretrained(tok)
        art = Artifact(model=model.config.to_dict(), quant={}, tensors={}, source=source_info(model), path=Path(tok))
        assert meta.choose_pre(art, "llama", Path(tok)) == "smollm"
    ckpt = tmp_path / "ckpt"
    model.tokenizer.save_pretrained(ckpt)
    (ckpt / "config.json").write_text("{}")  # a checkpoint directory: its config names no pre-tokenizer
    small = tiny_model(model.tokenizer, len(model.tokenizer))  # its tokenizer, small weights: the test is the vocab
    small.source = str(ckpt)
    out = G.write_model(small, tmp_path / "c.gguf")
    assert read_keys(out, {"tokenizer.ggml.pre"})["tokenizer.ggml.pre"] == "smollm"
    assert_tokenizes_like(out, model.tokenizer)
