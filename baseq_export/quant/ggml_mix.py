"""Which llama.cpp block type each tensor of a weight-only GGUF gets: the named mixes (`--gguf-mix`).

A mix names a base type for the block linears, a type for the layers' sensitive tensors (attn_v, ffn_down) in
the layers that get more bits, and the output / embedding types. The rules follow llama.cpp's own choices for
its file types of the same name, so a file of ours and llama.cpp's of one mix have the same size:
- Q4_K_M: attn_v and ffn_down in Q6_K in the first and last eighth of the layers and every third layer
  between (llama.cpp's use_more_bits), Q4_K elsewhere; the output in Q6_K.
- Q4_0: ffn_down of the first eighth of the layers in Q4_1 (llama.cpp does so when it has an importance
  matrix, which our files always have: the rules are those of llama.cpp quantizing with an imatrix).
- A type whose blocks do not divide a row (K-quants and IQ4_XS take rows of multiples of 256) falls back as
  llama.cpp's does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL (SmolLM2's hidden 576 is such a
  row, so most of its Q4_K_M file is Q5_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

QT = gguf.GGMLQuantizationType

FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
"""llama.cpp's type for a tensor whose rows do not split into the wanted type's 256-weight blocks."""

MORE_BITS_LINEARS = ("v", "down")  # attn_v, ffn_down: the tensors llama.cpp's _M mixes give more bits


@dataclass(frozen=True)
class Mix:
    """A named mix: base type of the block linears, the type of MORE_BITS_LINEARS in more-bits layers (None: no
    such layers), output and embedding types, and the llama.cpp file type it is written as."""

    base: str
    more_bits: str | None
    output: str
    embed: str
    file_type: "gguf.LlamaFileType"
    early_down: str | None = None  # ffn_down's type in the first eighth of the layers, when not the base type


MIXES = {
    "q4_0": Mix("Q4_0", None, "Q6_K", "Q4_0", gguf.LlamaFileType.MOSTLY_Q4_0, early_down="Q4_1"),
    "q4_1": Mix("Q4_1", None, "Q6_K", "Q4_1", gguf.LlamaFileType.MOSTLY_Q4_1),
    "iq4_nl": Mix("IQ4_NL", None, "Q6_K", "IQ4_NL", gguf.LlamaFileType.MOSTLY_IQ4_NL),
    "iq4_xs": Mix("IQ4_XS", None, "Q6_K", "IQ4_XS", gguf.LlamaFileType.MOSTLY_IQ4_XS),
    "q4_k_s": Mix("Q4_K", None, "Q6_K", "Q4_K", gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": Mix("Q4_K", "Q6_K", "Q6_K", "Q4_K", gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": Mix("Q5_K", "Q6_K", "Q6_K", "Q5_K", gguf.LlamaFileType.MOSTLY_Q5_K_M),
}


def mix(name: str) -> Mix:
    """The Mix of a name, or a clear error listing the names."""
    if name not in MIXES:
        raise ValueError(f"unknown GGUF mix {name!r}; choose one of {', '.join(MIXES)}")
    return MIXES[name]


def fits(qtype: str, k: int) -> str:
    """qtype where its blocks divide rows of k weights, else llama.cpp's fallback type (repeatedly)."""
    while k % gguf.GGML_QUANT_SIZES[QT[qtype]][0]:
        if qtype not in FALLBACK:
            raise ValueError(f"rows of {k} weights do not split into {qtype} blocks and it has no fallback type")
        qtype = FALLBACK[qtype]
    return qtype


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def more_bits_count(n_layers: int) -> int:
    """How many layers' attn_v (and ffn_down) llama.cpp's rule gives more bits: a choice of as many has its size."""
    return sum(more_bits(i, n_layers) for i in range(n_layers))


def choose_more_bits(gains: list[float], n_layers: int) -> set[int]:
    """The more_bits_count layers of largest measured gain (the fall in a layer's output error when the tensor
    takes the more-bits type instead of the base type), instead of llama.cpp's fixed list of layers."""
    order = sorted(range(n_layers), key=lambda i: (-gains[i], i))
    return set(order[: more_bits_count(n_layers)])


def linear_type(name: str, linear: str, layer: int, n_layers: int, k: int,
                chosen: dict[str, set[int]] | None = None) -> str:
    """The type of block linear `linear` (q, k, v, o, gate, up, down) of `layer` with rows of k weights. chosen:
    the layers of each MORE_BITS_LINEARS tensor that get more bits (choose_more_bits), else llama.cpp's rule."""
    m = mix(name)
    if m.more_bits and linear in MORE_BITS_LINEARS and (
            layer in chosen[linear] if chosen is not None else more_bits(layer, n_layers)):
        return fits(m.more_bits, k)
    if m.early_down and linear == "down" and layer < n_layers // 8:
        return fits(m.early_down, k)
    return fits(m.base, k)


def head_types(name: str, k: int) -> tuple[str, str]:
    """(output type, embedding type) of a mix for rows of k (the hidden size)."""
    m = mix(name)
    return fits(m.output, k), fits(m.embed, k)
