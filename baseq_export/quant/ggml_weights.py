"""Weights stored in llama.cpp's own block types (Q4_K, IQ4_XS, Q6_K, ...): ggml chooses each block's scales with
the layer's importance (diag H, what llama.cpp's imatrix holds), then GPTQ chooses the codes on exactly that grid.

The bytes are the GGUF tensor data itself (quant.ggml_codecs is their one definition), so the artifact, the
reference forward (decode -> dequantize) and llama.cpp all read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from .ggml_codecs import decode, encode, ggml_quantize
from .gptq import error_feedback, gptq_factor

QT = gguf.GGMLQuantizationType


@dataclass
class GgmlWeight:
    """A [N, K] weight as ggml block bytes raw uint8 [N, row bytes] of type qtype (a GGMLQuantizationType name)."""

    raw: torch.Tensor
    qtype: str
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.raw.shape[0]), self.k

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: what llama.cpp computes with (bit for bit gguf-py's dequantize)."""
        return torch.from_numpy(decode(self.raw.cpu().numpy(), QT[self.qtype], self.k).dequantize())

    def to(self, device) -> "GgmlWeight":
        return GgmlWeight(self.raw.to(device), self.qtype, self.k)


def ggml_rtn(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> GgmlWeight:
    """ggml's own quantizer of w [N, K] (llama.cpp's quantize, with importance as its imatrix when given)."""
    imatrix = None if importance is None else importance.detach().to(torch.float32).cpu().numpy()
    raw = ggml_quantize(w.detach().to(torch.float32).cpu().numpy(), QT[qtype], imatrix)
    return GgmlWeight(torch.from_numpy(raw), qtype, int(w.shape[1]))


def ggml_gptq(w: torch.Tensor, hessian: torch.Tensor, qtype: str, damp: float = 0.01, act_order: bool = True,
              block_size: int = 128, scratch: bool = False) -> GgmlWeight:
    """GPTQ of w [N, K] on a ggml type's grid: ggml picks every block's scale / min for importance diag H (dead
    inputs zeroed), then the columns are rounded in act order to the nearest level of their block's grid with
    GPTQ's error feedback; the codes go back into ggml's bytes with the scales untouched."""
    k = w.shape[1]
    factor = gptq_factor(hessian, damp, act_order, w.device, scratch)
    wf = w.detach().to(torch.float32).clone()
    wf[:, factor.dead] = 0.0
    raw = ggml_quantize(wf.cpu().numpy(), QT[qtype], factor.diag.to(torch.float32).cpu().numpy())
    grid = decode(raw, QT[qtype], k)
    scale, offset = (torch.from_numpy(a).to(w.device) for a in (grid.scale, grid.offset))
    values = torch.from_numpy(grid.values).to(w.device)
    midpoints = (values[1:] + values[:-1]) / 2
    col_group = (factor.perm // grid.group).tolist()

    def round_column(i: int, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, o = scale[:, col_group[i]], offset[:, col_group[i]]
        x = torch.where(s != 0, (col - o) / torch.where(s != 0, s, 1.0), 0.0)  # a zero scale: every level is o
        q = torch.bucketize(x, midpoints)  # the nearest level (|s| * |level - x| is the weight's error)
        return q.to(torch.uint8), s * values[q] + o  # decode()'s arithmetic: scale * value + offset, float32

    codes_p, _ = error_feedback(wf[:, factor.perm].contiguous(), factor.hinv, block_size, round_column, False)
    codes = torch.empty_like(codes_p)
    codes[:, factor.perm] = codes_p
    return GgmlWeight(torch.from_numpy(encode(raw, QT[qtype], codes.cpu().numpy())), qtype, k)


def weight_error(w: torch.Tensor, qw_dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / N: the output error GPTQ lowers (how much worse than the float layer a rounding is)."""
    dw = (qw_dequantized.to(torch.float64) - w.to(torch.float64))
    return float(((dw @ hessian.to(torch.float64)) * dw).sum() / w.shape[0])


__all__ = ["GgmlWeight", "ggml_gptq", "ggml_rtn", "weight_error"]
