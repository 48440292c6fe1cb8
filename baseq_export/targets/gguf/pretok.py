"""Which llama.cpp pre-tokenizer a GGUF names: the one whose tokenization reproduces the Hugging Face tokenizer's ids.

llama.cpp splits text before BPE with a regex chosen by the `tokenizer.ggml.pre` key; a wrong name
makes llama.cpp feed the model token sequences it never saw in training (with GPT-2's split for
SmolLM2, 4% more tokens on English text and a far worse perplexity). llama.cpp's own converter
names it from a hash of how the source tokenizer splits a fixed text; here each candidate name is
written into a vocabulary-only GGUF, llama.cpp tokenizes probe texts with it, and the first name
whose ids equal the Hugging Face tokenizer's is kept (the source's own name and the name of a known form
are tried first, so that texts on which several names agree do not pick an unrelated one). None -> a refusal, with --gguf-pre as the
override. SentencePiece-style vocabularies ("llama") have no pre-tokenizer; their ids are checked
the same way.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .tensors import GGUFExportError

PROBE_TEXT = (
    "Plain words, then numbers: 7, 42, 365, 2026, 1234567 and 3.14159 or 1,000,000 (decimals; digits).\n"
    "Contractions: it's, we're, they've, I'm, you'll, he'd, DON'T, O'Neil's.\n"
    "Whitespace:  two,   three,\tone tab,\t\ttwo tabs, trailing   \n\n\n  indented line\r\nwindows line\n"
    "Code: def f(x_1, y2=0x1F):\n    return {'a': [x_1**2, y2 // 3]} if x_1 >= -1 else None  # ok?!\n"
    "Punctuation runs: ... --- !!! ??? ;;; ::: ((( ))) [[ ]] {{ }} <<< >>> @#$%^&*_+=|\\~`\n"
    "Accents and scripts: café naïve façade Ærøskøbing straße Ελληνικά русский العربية עברית हिन्दी "
    "中文字符 日本語のかな 한국어 ไทย\n"
    "Emoji and symbols: 🙂 👍🏽 🇫🇷 ✓ → ∑ ∞ ≤ ≥ € £ ¥ © ™ ° ½\n"
    "Mixed: abc123def 123abc ABC_DEF-ghi.jkl/mno\\pqr email@example.org https://example.org/a?b=c&d=e#f\n"
)
"""A text that exercises every rule pre-tokenizers disagree on (written for this project)."""

CANDIDATES = (
    "smollm", "gpt-2", "llama-bpe", "qwen2", "starcoder", "refact", "deepseek-llm", "deepseek-coder",
    "deepseek-v3", "falcon", "mpt", "olmo", "dbrx", "stablelm2", "command-r", "gpt-4o", "tekken", "bloom",
    "phi-2", "jais", "poro-chat", "smaug-bpe", "codeshell", "exaone", "chameleon", "minerva-7b", "megrez",
    "superbpe", "trillion", "bailingmoe", "seed-coder", "hunyuan", "kimi-k2", "default",
)
"""llama.cpp pre-tokenizer names tried in order after the source model's own (a name this llama.cpp build does not
know fails to load and is skipped)."""

PROBE_CHARS = 40_000
"""Characters of each evaluation text tokenized when a pre-tokenizer is chosen at export (tests use whole texts)."""


class PreTokenizerError(GGUFExportError):
    """No llama.cpp pre-tokenizer reproduces the Hugging Face tokenizer's ids; the message says where they differ."""


@dataclass
class Mismatch:
    """Where llama.cpp's ids first differ from the Hugging Face tokenizer's for one text."""

    text: str
    index: int
    hf: list[int]
    llama: list[int]

    def describe(self) -> str:
        lo = max(0, self.index - 3)
        return (f"at token {self.index}: Hugging Face {self.hf[lo:self.index + 4]} against llama.cpp "
                f"{self.llama[lo:self.index + 4]} ({len(self.hf)} and {len(self.llama)} tokens in all)")


def likely(tok_dir: Path) -> str | None:
    """The llama.cpp name for a tokenizer.json pre-tokenizer of a form it is known to implement, tried first: GPT-2's
    byte-level split alone is "gpt-2"; a single-digit split before it is "smollm" (checked by ids all the same)."""
    import json

    pre = json.loads((Path(tok_dir) / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    forms = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in steps]
    byte_level = ("ByteLevel", None, True)
    return {(byte_level,): "gpt-2", (("Digits", True, True), byte_level): "smollm"}.get(tuple(forms))


def hf_ids(tok_dir: Path, texts: list[str]) -> list[list[int]]:
    """Token ids of each text from the Hugging Face fast tokenizer in tok_dir (tokenizer.json, read once), no
    special tokens added."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    return [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]


def llama_ids(path: Path, texts: list[str]) -> list[list[int]] | None:
    """llama.cpp's token ids of each text (parse_special off, no BOS) from the vocabulary of a GGUF, or None when
    llama.cpp refuses the file (e.g. a pre-tokenizer name it does not know)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        out = []
        for text in texts:
            raw = text.encode("utf-8")
            room = len(raw) + 16
            buf = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, room, False, False)
            if n < 0:
                raise RuntimeError(f"llama_tokenize needs room for {-n} tokens, had {room}")
            out.append(list(buf[:n]))
        return out
    finally:
        llama_cpp.llama_model_free(model)


def first_mismatch(texts: list[str], hf: list[list[int]], got: list[list[int]]) -> Mismatch | None:
    """The first position where two tokenizations of the same texts differ, or None when all are equal."""
    for text, a, b in zip(texts, hf, got):
        if a != b:
            i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return Mismatch(text, i, a, b)
    return None


def probe_texts(extra: list[str] | None = None) -> list[str]:
    """PROBE_TEXT, the start of the embedded evaluation text and the start of each extra text."""
    from ... import data

    return [PROBE_TEXT, data.embedded_text("eval")[:PROBE_CHARS]] + [t[:PROBE_CHARS] for t in extra or []]


def choose(write_vocab, tok_dir: Path, kind: str, requested: str | None = None, source_pre: str | None = None,
           texts: list[str] | None = None) -> str | None:
    """The pre-tokenizer name to write (None for a SentencePiece-style vocabulary, which has none).

    write_vocab(path, pre) writes a vocabulary-only GGUF naming pre. A requested name is written as asked (with
    a warning when its ids differ); otherwise the source model's name, then CANDIDATES, until one reproduces the
    Hugging Face ids on texts (probe_texts() by default); none -> PreTokenizerError.
    """
    texts = probe_texts() if texts is None else texts
    hf = hf_ids(tok_dir, texts)
    if requested:
        names: list[str | None] = [requested]
    elif kind != "gpt2":
        names = [None]
    else:
        names = [n for n in dict.fromkeys([source_pre, likely(tok_dir), *CANDIDATES]) if n]
    seen: dict[str, Mismatch] = {}
    with tempfile.TemporaryDirectory(prefix="baseq-gguf-pre-") as tmp:
        for name in names:
            path = Path(tmp) / f"vocab-{len(seen)}.gguf"
            write_vocab(path, name)
            got = llama_ids(path, texts)
            path.unlink()
            if got is None:
                if requested:
                    raise PreTokenizerError(f"llama.cpp does not know the pre-tokenizer {requested!r} (--gguf-pre); "
                                            f"names it knows include {', '.join(CANDIDATES)}")
                continue
            miss = first_mismatch(texts, hf, got)
            if miss is None:
                return name
            seen[str(name)] = miss
    if requested:
        warnings.warn(f"--gguf-pre {requested}: llama.cpp's tokenization differs from the Hugging Face tokenizer's "
                      f"{seen[requested].describe()}; written as asked", stacklevel=3)
        return requested
    if kind != "gpt2":
        raise PreTokenizerError(f"llama.cpp tokenizes text unlike the Hugging Face tokenizer with this "
                                f"{kind} vocabulary ({seen['None'].describe()}); llama.cpp users would feed the model "
                                "token sequences it was not trained on. Export to ONNX instead, or report the tokenizer")
    best = min(seen.items(), key=lambda kv: -kv[1].index)
    raise PreTokenizerError(
        f"none of llama.cpp's {len(seen)} pre-tokenizers tried reproduces the Hugging Face tokenizer's ids (closest: "
        f"{best[0]!r}, differing {best[1].describe()}), so llama.cpp would split text unlike the model's tokenizer. "
        "If you know the right name, pass it with --gguf-pre NAME (written as asked, with a warning)")


def name_of(path: str | Path) -> str | None:
    """The pre-tokenizer a GGUF file names, or None."""
    import gguf

    from ...gguf_file import read_keys

    return read_keys(path, {gguf.Keys.Tokenizer.PRE}).get(gguf.Keys.Tokenizer.PRE)
