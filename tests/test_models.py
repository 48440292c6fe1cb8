import json

import pytest
import torch

from baseq_export.models import ModelLoadError, from_hf_model, load_model
from baseq_export.models.base import forward, new_cache
from conftest import tiny_hf_model

ARCHS = ["llama", "mistral", "qwen2"]


# transformers' RMSNorm computes in float32 even for float64 models, so its float64 logits
# differ from ours at ~1e-7; a wrong weight, bias or mask shows up as 1e-2 or more.


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_forward_matches_transformers(arch):
    hf = tiny_hf_model(arch)
    m = from_hf_model(hf)
    assert m.config.arch == arch
    ids = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(1))
    ours = forward(m.config, m.weights, ids)
    torch.testing.assert_close(ours, hf_logits(hf, ids), rtol=1e-5, atol=1e-6)


def test_qwen2_biases_and_tied_flags_are_read():
    m = from_hf_model(tiny_hf_model("qwen2"))
    assert "layers.0.q.bias" in m.weights and "layers.1.v.bias" in m.weights
    assert "layers.0.o.bias" not in m.weights
    assert not m.config.tied_embeddings
    tied = from_hf_model(tiny_hf_model("llama"))
    assert tied.config.tied_embeddings and tied.weights["lm_head"] is tied.weights["embed"]


def test_mistral_sliding_window_matches_transformers():
    hf = tiny_hf_model("mistral", sliding_window=5)
    m = from_hf_model(hf)
    assert m.config.sliding_window == 5
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(forward(m.config, m.weights, ids), hf_logits(hf, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_equals_full_forward(arch):
    m = from_hf_model(tiny_hf_model(arch))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    full = forward(m.config, m.weights, ids)
    cache = new_cache(m.config)
    steps = [forward(m.config, m.weights, ids[:, :6], cache=cache)]
    steps += [forward(m.config, m.weights, ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_load_local_checkpoint_directory(tmp_path):
    hf = tiny_hf_model("qwen2", dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    m = load_model(str(tmp_path))
    assert m.config.arch == "qwen2" and m.source == str(tmp_path)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(forward(m.config, m.weights, ids), hf_logits(hf, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("HuggingFaceTB/SmolLM2-135M", "hub id"),
        ("/no/such/path", "no such file or directory"),
        ("./missing-model", "no such file or directory"),
    ],
)
def test_bad_model_values_give_clear_errors(spec, message):
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(spec)
    assert "--model default" in str(e.value)  # says what is supported


def test_bad_model_files_give_clear_errors(tmp_path):
    text = tmp_path / "weights.bin"
    text.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(text))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(empty))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported; supported: llama, mistral, qwen2"):
        load_model(str(gpt2))


@pytest.mark.real_model
def test_default_model_matches_transformers(default_model):
    from transformers import AutoModelForCausalLM

    from baseq_export.models import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    cfg = default_model.config
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.tied_embeddings) == (9, 3, 64, 49152, True)
    ids = torch.tensor([default_model.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(forward(cfg, default_model.weights, ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def save_word_tokenizer(path) -> None:
    """A real (word-level) tokenizer of 95 entries next to a tiny checkpoint of 96 embedding rows (Qwen2's tokenizer
    class adds <|endoftext|>: that fills the last row)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 95)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(path)


def _assert_same_model(lazy, eager) -> None:
    assert lazy.config == eager.config and lazy.token_ids == eager.token_ids and lazy.max_positions == eager.max_positions
    assert set(lazy.weights) == set(eager.weights)
    for name in eager.weights:
        assert torch.equal(lazy.weights[name], eager.weights[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lazy_loading_of_a_sharded_checkpoint_equals_eager_loading(arch, dtype, tmp_path):
    """safe_open, one tensor per read, across shards: the values transformers loads (upcast to float32)."""
    from baseq_export.models.lazy import LazyWeights

    tiny_hf_model(arch, dtype=dtype).save_pretrained(tmp_path, max_shard_size="30KB")
    save_word_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    lazy, eager = load_model(str(tmp_path), lazy=True), load_model(str(tmp_path))
    assert isinstance(lazy.weights, LazyWeights) and lazy.weights["embed"].dtype == torch.float32
    _assert_same_model(lazy, eager)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(forward(lazy.config, dict(lazy.weights), ids), forward(eager.config, eager.weights, ids),
                               rtol=0, atol=0)
    held = lazy.weights.read_all()  # what the FP evaluation holds: each tensor read once, a tied head not twice
    assert set(held) == set(eager.weights) and all(torch.equal(held[k], eager.weights[k]) for k in held)
    assert (held["lm_head"] is held["embed"]) == lazy.config.tied_embeddings


def test_lazy_loading_refuses_what_eager_loading_refuses(tmp_path):
    hf = tiny_hf_model("llama", dtype=torch.float32, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)  # a separate head saved, then the config edited to say "tied"
    save_word_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ModelLoadError, match="own, different lm_head.weight"):
        load_model(str(tmp_path), lazy=True)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))  # a layer the tensors lack
    for lazy in (True, False):  # refused by both, from the tensor names, before a model of the config is built
        with pytest.raises(ModelLoadError, match="num_hidden_layers is 3 but the checkpoint's tensors hold 2 layers"):
            load_model(str(tmp_path), lazy=lazy)


@pytest.mark.real_model
def test_lazy_loading_of_the_default_gguf_equals_transformers(default_model):
    """gguf-py's reader, one tensor dequantized per read, q/k rows put back from llama.cpp's RoPE order."""
    _assert_same_model(load_model("default", lazy=True), default_model)
