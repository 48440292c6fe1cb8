"""`run` as users meet it: sampling against an independent computation, the chat template's exact ids fed to the
model, the conversation's history, tokens streamed as text, and the same sampled tokens on every backend that is
installed here (torch reference, onnxruntime, onnxruntime-genai, llama.cpp). Tiny random models built here."""

from __future__ import annotations

import importlib.util
import itertools
import math

import numpy as np
import pytest
import torch

from baseq_export import api
from baseq_export.cli import main
from baseq_export.generate import (Conversation, Sampling, argmax_token, greedy_tokens, sample_token, stream_text,
                                   token_probabilities)
from baseq_export.gptq_model import quantize_model
from baseq_export.settings import QuantSettings
from baseq_export.targets import TorchBackend
from test_gguf import DIMS, bpe_tokenizer, quiet_write, save, tiny

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def chat_tokenizer():
    tok = bpe_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A W4A16 RTN artifact on llama.cpp's Q4_0 blocks (both targets can write it) with a chat tokenizer."""
    tok = chat_tokenizer()
    _, model = tiny("llama", tok)
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32, weight_grid="q4_0", r4=False))
    return save(tmp_path_factory.mktemp("gen"), art, tok), tok


def kept_distribution(logits: list[float], s: Sampling) -> dict[int, float]:
    """The distribution Sampling s draws from, computed in plain Python: rank by logit, keep top_k, softmax at the
    temperature, keep the shortest prefix whose mass reaches top_p, renormalize."""
    ranked = sorted(range(len(logits)), key=lambda i: (-logits[i], i))[: s.top_k or None]
    weights = [math.exp((logits[i] - logits[ranked[0]]) / s.temperature) for i in ranked]
    total = sum(weights)
    kept, mass = [], 0.0
    for i, w in zip(ranked, weights):
        kept.append((i, w))
        mass += w / total
        if mass >= s.top_p - 1e-12:
            break
    z = sum(w for _, w in kept)
    return {i: w / z for i, w in kept}


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 8, 0.6)])
def test_sampling_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, generator=gen) * 2
    s = Sampling(temperature, top_k, top_p, seed=3)
    want = kept_distribution(logits.tolist(), s)
    p = token_probabilities(logits, s)
    assert set(np.flatnonzero(p)) == set(want)
    assert max(abs(p[i] - q) for i, q in want.items()) < 1e-12
    rng = np.random.default_rng(s.seed)
    n = 20000
    counts = np.bincount([sample_token(logits, s, rng) for _ in range(n)], minlength=40)
    assert set(np.flatnonzero(counts)) <= set(want)  # nothing outside the kept set is ever drawn
    for i, q in want.items():  # frequencies within 5 standard deviations of the probabilities
        assert abs(counts[i] / n - q) < 5 * math.sqrt(q * (1 - q) / n) + 1e-9, (i, counts[i] / n, q)
    assert Sampling(0.0).chooser()(logits) == int(torch.argmax(logits))


def test_sampling_refuses_bad_settings():
    for kwargs, word in [({"temperature": -1}, "--temperature"), ({"top_k": -2}, "--top-k"),
                         ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"), ({"seed": -1}, "--seed")]:
        with pytest.raises(ValueError, match=word):
            Sampling(**kwargs)


class Recording:
    """A backend wrapper that keeps the prompt ids each generate() call was fed."""

    def __init__(self, backend):
        self.backend, self.fed, self.label = backend, [], backend.label

    def generate(self, prompt_ids, max_new_tokens=None, choose=None):
        self.fed.append(list(prompt_ids))
        return self.backend.generate(prompt_ids, max_new_tokens, choose)


def test_chat_feeds_the_templates_ids_and_keeps_the_history(artifact):
    path, tok = artifact
    backend = Recording(TorchBackend(path))
    talk = Conversation(backend, tok, max_new_tokens=6)
    pieces: list[str] = []
    first = talk.ask("hello world", pieces.append)
    second = talk.ask("the lazy dog")
    turn1 = [{"role": "user", "content": "hello world"}]
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "the lazy dog"}]

    def own(messages):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    assert backend.fed == [own(turn1), own(turn2)]
    assert talk.messages == turn2 + [{"role": "assistant", "content": second}]
    assert "".join(pieces) == first  # streamed: the pieces are the reply, one per token
    raw = Conversation(Recording(TorchBackend(path)), tok, raw=True, max_new_tokens=3)
    raw.ask("hello world")
    assert raw.backend.fed == [tok("hello world", add_special_tokens=False)["input_ids"]] and raw.messages == []


def test_stream_text_sends_each_token_and_stops_at_the_end_of_a_turn():
    tok = chat_tokenizer()
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    text = stream_text(iter(ids + [tok.eos_token_id] + ids), tok, 50, pieces.append)
    assert text == tok.decode(ids) and "".join(pieces) == text and len(pieces) == len(ids)


def sampled(backend, prompt, s: Sampling, n: int = 12) -> list[int]:
    return list(itertools.islice(backend.generate(prompt, n, s.chooser()), n))


def test_the_same_seed_gives_the_same_tokens_on_every_backend(artifact, tmp_path):
    """Sampling happens in one place (generate.Sampling) on each backend's logits: torch reference, onnxruntime
    and onnxruntime-genai compute the same logits, so the same seed draws the same tokens; llama.cpp (8-bit
    activations in its Q4 dot products) draws reproducibly and, at a vanishing temperature, its greedy tokens."""
    path, tok = artifact
    prompt = Conversation(None, tok).prompt("hello world")
    s = Sampling(temperature=1.0, top_k=20, top_p=0.95, seed=7)
    ref = sampled(TorchBackend(path), prompt, s)
    assert ref != sampled(TorchBackend(path), prompt, Sampling())  # it samples
    assert ref != sampled(TorchBackend(path), prompt, Sampling(1.0, 20, 0.95, seed=8))
    onnx = api.export(path, "onnx", tmp_path / "onnx")
    _, model = tiny("llama", tok)
    q4_1 = save(tmp_path, quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32,
                                                              weight_grid="q4_1")), tok, "q4_1.baseq")
    with pytest.raises(ValueError, match="Q4_1 grid"):  # a refusal that names the fix, not a TypeError inside
        api.export(q4_1, "onnx", tmp_path / "q4_1-onnx")
    assert sampled(api.chat(onnx).backend, prompt, s) == ref
    if importlib.util.find_spec("onnxruntime_genai"):
        assert sampled(api.chat(onnx, backend="onnxruntime-genai").backend, prompt, s) == ref
    if importlib.util.find_spec("llama_cpp"):
        g = quiet_write(path, tmp_path / "m.gguf")
        cpp = api.chat(g).backend
        a = sampled(cpp, prompt, s)
        assert a == sampled(cpp, prompt, s) and a != sampled(cpp, prompt, Sampling(1.0, 20, 0.95, seed=8))
        assert sampled(cpp, prompt, Sampling(temperature=1e-6)) == list(itertools.islice(cpp.greedy(prompt, 12), 12))


def test_run_command_chat_raw_fp_and_conversation(artifact, tmp_path, capsys, monkeypatch):
    path, tok = artifact
    talk = Conversation(TorchBackend(path), tok, max_new_tokens=5)
    want = talk.ask("hello world")
    assert main(["run", str(path), "--prompt", "hello world", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["run", str(path), "--prompt", "hello world", "--raw", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("hello world")
    ckpt = tmp_path / "ckpt"
    hf, model = tiny("llama", tok)
    hf.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    fp = api.chat(str(ckpt), max_new_tokens=5)
    fp_reply = fp.ask("hello world")
    # the float forward with its cache gives the argmax of transformers' own logits
    ids = torch.tensor([fp.prompt("hello world")])
    with torch.no_grad():
        first = int(torch.argmax(hf(ids).logits[0, -1]))
    assert fp_reply.startswith(tok.decode([first])) or first == tok.eos_token_id
    assert main(["run", "--model", str(ckpt), "--prompt", "hello world", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == fp_reply + "\n"
    lines = iter(["hello world", "the lazy dog", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert main(["run", str(path), "-i", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    talk = Conversation(TorchBackend(path), tok, max_new_tokens=5)
    assert out == [talk.ask("hello world"), talk.ask("the lazy dog")]
    for bad, word in [(["run", "--prompt", "x"], "either PATH"), (["run", str(path), "--model", str(ckpt), "--prompt", "x"], "not both"),
                      (["run", str(path)], "--prompt TEXT"), (["run", str(path), "-i", "--prompt", "x"], "do not go together"),
                      (["run", str(path), "--prompt", "x", "--temperature", "-1"], "--temperature")]:
        assert main(bad) == 1
        assert word in capsys.readouterr().err



def test_argmax_token_picks_torch_argmax_including_ties_and_nan():
    """The numpy fast path chooses the token torch.argmax chooses: the first of equal maxima, a NaN over any
    number, on float32 and (through torch) on other dtypes."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = torch.randint(-3, 4, (50,), generator=gen).float()  # many ties
        if trial % 5 == 0:
            logits[int(torch.randint(0, 50, (1,), generator=gen))] = float("nan")
        assert argmax_token(logits) == int(torch.argmax(logits))
        assert argmax_token(logits.double()) == int(torch.argmax(logits.double()))
    assert argmax_token(torch.tensor([0.5, 2.0, 1.0], requires_grad=True)) == 1  # a tensor that tracks gradients


def test_greedy_tokens_follow_the_argmax_of_each_step():
    """greedy_tokens feeds each chosen token back and stops after eos: checked on a stepper whose logits are a
    fixed table indexed by the last token (the next token is (last * 7 + 3) mod 11)."""
    table = torch.full((11, 11), -1.0)
    for t in range(11):
        table[t, (t * 7 + 3) % 11] = 1.0
    seen = []

    def step(ids):
        seen.append(list(ids))
        return table[ids[-1]]

    want, t = [], 2
    for _ in range(6):
        t = (t * 7 + 3) % 11
        want.append(t)
    assert greedy_tokens(step, [5, 2], 6) == want
    assert seen[0] == [5, 2] and [s[0] for s in seen[1:]] == want[:-1]
    eos = want[2]
    assert greedy_tokens(step, [5, 2], 6, eos=eos) == want[:3]
