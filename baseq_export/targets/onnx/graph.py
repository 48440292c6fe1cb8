"""A minimal ONNX graph accumulator and the standard-op building blocks of our quantized forward.

Each `emit_*` function appends the nodes of one computation and returns its output name; they
reproduce the exact mode of models.base / reference.QuantHooks: float32 element-wise steps op for op,
norms and Hadamards in float64 rounded once, quantizers bit for bit. So onnxruntime gets the
reference's values, not just close ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ...quant import matmul_nbits_bytes

MS_DOMAIN = "com.microsoft"

EXTERNAL_THRESHOLD = 1024
"""Initializers of at least this many bytes go to the external data file; smaller ones stay in the graph."""
EXTERNAL_ALIGN = 64
PAGE_ALIGN = 4096  # tensors of a MiB or more start on a page, so a runtime can map them from the file
PAGE_ALIGN_FROM = 1 << 20


class ExternalData:
    """The external data file of one or more graphs, written while the graphs are built: an initializer's bytes
    are appended as soon as it is made and only a reference stays in the graph, so a model of any size (past
    protobuf's 2 GB) is exported with one tensor in memory. A tensor with the same name and bytes as one already
    written (a second graph of the same weights) points at the first copy."""

    def __init__(self, path: Path):
        self.path, self.location = Path(path), Path(path).name
        self._file = open(self.path, "wb")
        self._written: dict[tuple[str, str], tuple[int, int]] = {}

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A TensorProto of array whose data lies in this file."""
        raw = memoryview(np.ascontiguousarray(array)).cast("B")  # the array's own bytes, not a copy
        key = (name, hashlib.sha256(raw).hexdigest() + array.dtype.str + str(array.shape))
        if key not in self._written:
            align = PAGE_ALIGN if len(raw) >= PAGE_ALIGN_FROM else EXTERNAL_ALIGN
            offset = self._file.seek(0, 2)
            if offset % align:
                self._file.write(b"\0" * (align - offset % align))
                offset += align - offset % align
            self._file.write(raw)
            self._written[key] = (offset, len(raw))
        offset, length = self._written[key]
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                             data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        return t

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ExternalData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Graph:
    """Nodes and initializers being collected, with unique names; initializers go to `external` (an
    ExternalData file) as they are made when it is given, else they stay inside the graph."""

    def __init__(self, external: ExternalData | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.external = external
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, domain: str = "", n_out: int = 1,
           outputs: list[str] | None = None, **attrs):
        """Append a node; its outputs get fresh names (from hint), or the given `outputs` (graph outputs)."""
        outs = list(outputs) if outputs else [self.name(hint or op_type) for _ in range(n_out)]
        n_out = len(outs)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n_" + op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if self.external is not None and array.nbytes >= EXTERNAL_THRESHOLD:
            self.inits.append(self.external.tensor(name, array))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A shared scalar or small constant initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("c"), arr)
        return self._consts[key]


def to_double(g: Graph, x: str) -> str:
    return g.op("Cast", [x], to=TensorProto.DOUBLE)


def to_float(g: Graph, x: str) -> str:
    return g.op("Cast", [x], to=TensorProto.FLOAT)


def emit_rms_norm(g: Graph, x: str, weight: str | None, eps: float) -> str:
    """x * 1/sqrt(mean(x^2) + eps) in float64 rounded once [* weight in float32], as models.base.rms_norm(exact=True)."""
    xd = to_double(g, x)
    mean = g.op("ReduceMean", [g.op("Mul", [xd, xd]), g.const([-1], np.int64)], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(eps, np.float64)])])])
    y = to_float(g, g.op("Mul", [xd, inv]))
    return g.op("Mul", [y, weight]) if weight else y


def emit_swiglu(g: Graph, gate: str, up: str) -> str:
    """silu(gate) * up in float64 rounded once (models.base.swiglu in exact mode)."""
    gd, ud = to_double(g, gate), to_double(g, up)
    return to_float(g, g.op("Mul", [g.op("Mul", [gd, g.op("Sigmoid", [gd])]), ud]))


def emit_fake_quant(g: Graph, x: str, bits: int, clip: str) -> str:
    """Per-token asymmetric quant-dequant over the last axis: quant.fake_quant_per_token's recipe."""
    levels, scale = emit_quant_levels(g, x, bits, clip)
    return g.op("Mul", [levels, scale])


def emit_quant_levels(g: Graph, x: str, bits: int, clip: str) -> tuple[str, str]:
    """(levels, scale) of the per-token quantizer over the last axis: quant.quantize_per_token's recipe."""
    qmax = float(2**bits - 1)
    axes = g.const([-1], np.int64)
    xmin = g.op("ReduceMin", [x, axes], keepdims=1)
    xmax = g.op("ReduceMax", [x, axes], keepdims=1)
    rng = g.op("Sub", [xmax, xmin])
    scale = g.op("Max", [g.op("Div", [g.op("Mul", [rng, clip]), g.const(qmax)]), g.const(1e-8)])
    # onnxruntime's ReduceMin/Max skip NaN; torch's propagate it. sum(x * 0) is 0 for a finite token and
    # NaN otherwise, so adding it makes a token holding NaN or Inf all NaN, as in torch (and exact otherwise).
    scale = g.op("Add", [scale, g.op("ReduceSum", [g.op("Mul", [x, g.const(0.0)]), axes], keepdims=1)])
    mid = g.op("Mul", [g.op("Add", [xmax, xmin]), g.const(0.5)])
    lo = g.op("Sub", [mid, g.op("Mul", [g.op("Mul", [rng, g.const(0.5)]), clip])])
    zero = g.op("Round", [g.op("Div", [g.op("Neg", [lo]), scale])])
    q = g.op("Add", [g.op("Round", [g.op("Div", [x, scale])]), zero])
    q = g.op("Clip", [q, g.const(0.0), g.const(qmax)])
    return g.op("Sub", [q, zero]), scale


def emit_hadamard(g: Graph, x: str, n: int) -> str:
    """x @ H along the last axis as Reshape + MatMul by the Kronecker factors of hadamard.plan_hadamard,
    in float64 rounded once (QuantHooks.hadamard in exact mode)."""
    from ...hadamard import hadamard_matrix, plan_hadamard

    plan = plan_hadamard(n)
    p = plan.pow2
    m = plan.m
    shape = g.op("Shape", [x])
    lead = g.op("Slice", [shape, g.const([0], np.int64), g.const([-1], np.int64)])
    split = g.op("Concat", [lead, g.const([plan.blocks, m, p], np.int64)], axis=0)
    y = g.op("Reshape", [to_double(g, x), split])
    if p > 1:
        y = g.op("MatMul", [y, g.const(hadamard_matrix(p).numpy(), np.float64)])
    if plan.small is not None:
        y = g.op("MatMul", [g.const(plan.small.numpy().T, np.float64), y])  # S^T X P for X = [m, p]
    return to_float(g, g.op("Reshape", [y, shape]))


def matmul_nbits_inputs(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int) -> tuple[dict, int]:
    """(arrays, block_size) for com.microsoft.MatMulNBits from our [N, K] codes and [N, G] scale/zero.

    Per-channel weights (G = 1, wider than one MatMulNBits block) repeat the scale and zero point over
    blocks of 32 (or 16/64/128 when K needs it), which is exact. A group that is a whole block (also when
    it spans all of K) stays one block, as the int8 kernels' input rounding must follow the groups.
    """
    n, k = codes.shape
    groups = scale.shape[1]
    if groups == 1 and not (group_size in (16, 32, 64, 128) and group_size == k):
        block = next((b for b in (32, 64, 128, 16) if k % b == 0), None)
        if block is None:
            raise ValueError(f"in_features {k} is not a multiple of 16: MatMulNBits cannot hold it exactly")
        scale = np.repeat(scale, k // block, axis=1)
        zero = np.repeat(zero, k // block, axis=1)
    else:
        block = group_size
    b, zp = matmul_nbits_bytes(torch.from_numpy(codes), torch.from_numpy(zero), block)
    return {"B": b.numpy(), "scales": scale.astype(np.float32), "zero_points": zp.numpy()}, block


# ------------------------------------------------------------------ our custom ops (domain "baseq")

OPS_DOMAIN = "baseq"


def emit_hadamard_op(g: Graph, x: str, n: int) -> str:
    """x @ H along the last axis as one baseq.Hadamard node (butterflies + the small dense factor)."""
    from ...hadamard import plan_hadamard

    plan = plan_hadamard(n)
    inputs = [x] if plan.small is None else [x, g.const(plan.small.numpy(), np.float64)]
    return g.op("Hadamard", inputs, domain=OPS_DOMAIN, blocks=plan.blocks, size=n)


def _quantizer_inputs(g: Graph, x: str, clip: str, shift: str | None, gain: str | None, width: int | None) -> list[str]:
    inputs = [x, clip]
    if gain is not None and shift is None:  # a gain without a shift gets zeros
        shift = g.const(np.zeros(width, np.float32))
    if shift is not None:
        inputs.append(shift)
    if gain is not None:
        inputs.append(gain)
    return inputs


def emit_quant_dequant_op(g: Graph, x: str, bits: int, clip: str, shift: str | None = None, gain: str | None = None,
                          width: int | None = None) -> str:
    """fq(x * gain - shift) per token as one baseq.QuantDequant node."""
    return g.op("QuantDequant", _quantizer_inputs(g, x, clip, shift, gain, width), domain=OPS_DOMAIN, bits=bits)


def emit_quant_levels_op(g: Graph, x: str, bits: int, clip: str, shift: str | None = None, gain: str | None = None,
                         width: int | None = None) -> tuple[str, str]:
    """(levels, scale) of x * gain - shift per token as one baseq.QuantLevels node."""
    return g.op("QuantLevels", _quantizer_inputs(g, x, clip, shift, gain, width), domain=OPS_DOMAIN, n_out=2, bits=bits)
