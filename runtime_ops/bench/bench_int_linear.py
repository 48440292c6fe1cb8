"""Microbenchmark of baseq.IntLinear against onnxruntime's MatMulNBits on the same shapes.

    python runtime_ops/bench/bench_int_linear.py [--shapes 1x576x576,512x576x1536] [--threads 2]
        [--isa best|avx2|...] [--bits 4] [--group-size 0] [--repeats 50] [--json OUT]

Each shape M x K x N is run as one-node (or three-node) graphs in onnxruntime, all in this
process, interleaved: IntLinear (4-bit activations, per-channel weights; --bits / --group-size for
others, e.g. 8-bit levels on groups of 32 as an exact int8 lm_head would be), the chain it replaces
(QuantLevels -> MatMulNBits accuracy_level 0 with unit scales -> ScaleSums), and float-input
MatMulNBits at accuracy_level 0 and 4 (int8 activations: onnxruntime-genai's int4 choice).
Reports medians of `repeats` timed runs after warm-up, and the CPU's idle share during half a
second before them (/proc/stat): figures from a busy machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from baseq_export import runtime_ops
from baseq_export.quant import matmul_nbits_bytes, pack_int4


def _model(nodes, inits, outputs=("y",)):
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid("baseq", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def weights(n: int, k: int, seed: int = 0, groups: int = 1):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zero = rng.integers(0, 16, (n, groups)).astype(np.uint8)
    scale = (rng.random((n, groups)) * 0.01 + 0.001).astype(np.float32)
    packed = pack_int4(torch.from_numpy(codes)).numpy()  # the byte layout's one definition (quant.layout)
    return codes, packed, zero, scale


def int_linear_model(n: int, k: int, bits: int = 4, group_size: int = 0) -> bytes:
    _, packed, zero, scale = weights(n, k, groups=-(-k // group_size) if group_size else 1)
    inits = [numpy_helper.from_array(np.array([0.9], np.float32), "clip"), numpy_helper.from_array(packed, "B"),
             numpy_helper.from_array(zero, "Z"), numpy_helper.from_array(scale, "S")]
    node = helper.make_node("IntLinear", ["x", "clip", "", "", "B", "Z", "S"], ["y"], domain="baseq", bits=bits,
                            group_size=group_size)
    return _model([node], inits)


def _nbits_inputs(n: int, k: int, unit: bool):
    codes, _, zero, scale = weights(n, k)
    block = 32 if k % 32 == 0 else 16
    kb = -(-k // block)
    padded = np.pad(codes, ((0, 0), (0, kb * block - k)))
    b, zp = (t.numpy() for t in matmul_nbits_bytes(torch.from_numpy(padded), torch.from_numpy(np.repeat(zero, kb, axis=1)),
                                                    block))
    sc = np.ones((n, kb), np.float32) if unit else np.repeat(scale, kb, axis=1)
    return b, sc, zp, block, scale


def matmul_nbits_model(n: int, k: int, level: int) -> bytes:
    b, sc, zp, block, _ = _nbits_inputs(n, k, unit=False)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(sc, "S"), numpy_helper.from_array(zp, "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=level)
    return _model([node], inits)


def chain_model(n: int, k: int) -> bytes:
    b, sc, zp, block, scale = _nbits_inputs(n, k, unit=True)
    inits = [numpy_helper.from_array(np.array([0.9], np.float32), "clip"), numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(sc, "S"), numpy_helper.from_array(zp, "Z"),
             numpy_helper.from_array(scale[:, 0].copy(), "C")]
    nodes = [helper.make_node("QuantLevels", ["x", "clip"], ["lv", "s"], domain="baseq", bits=4),
             helper.make_node("MatMulNBits", ["lv", "B", "S", "Z"], ["sums"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block, accuracy_level=0),
             helper.make_node("ScaleSums", ["sums", "s", "C"], ["y"], domain="baseq")]
    return _model(nodes, inits)


def _cpu_times():
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)  # idle + iowait, total


def bench(shapes, threads: int, repeats: int, isa: str | None, bits: int = 4, group_size: int = 0):
    if isa:
        os.environ["BASEQ_INT_LINEAR_ISA"] = isa
    opts = runtime_ops.session_options(threads)
    opts.inter_op_num_threads = 1
    rows = []
    for m, k, n in shapes:
        idle0, total0 = _cpu_times()
        time.sleep(0.5)  # how idle the machine is without us (before our sessions' threads exist)
        idle1, total1 = _cpu_times()
        idle = (idle1 - idle0) / max(1, total1 - total0)
        variants = {"IntLinear": int_linear_model(n, k, bits, group_size), "QuantLevels+MatMulNBits0+ScaleSums": chain_model(n, k),
                    "MatMulNBits acc4": matmul_nbits_model(n, k, 4), "MatMulNBits acc0": matmul_nbits_model(n, k, 0)}
        sess = {name: ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]) for name, model in variants.items()}
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        for s in sess.values():  # warm-up (the first run repacks constant weights)
            for _ in range(3):
                s.run(None, {"x": x})
        times = {name: [] for name in sess}
        for _ in range(repeats):
            for name, s in sess.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[name].append(time.perf_counter() - t)
        med = {name: float(np.median(v)) * 1e6 for name, v in times.items()}
        rows.append({"M": m, "K": k, "N": n, "threads": threads, "median_us": med, "cpu_idle_share": idle})
        del sess
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x576x576,1x576x1536,1x1536x576,512x576x576,512x576x1536")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--isa", default=None, help="force an IntLinear kernel (BASEQ_INT_LINEAR_ISA)")
    p.add_argument("--bits", type=int, default=4, help="IntLinear's activation bits (the chain stays 4-bit)")
    p.add_argument("--group-size", type=int, default=0, help="IntLinear's weight group size (0: per channel)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rows = bench(shapes, a.threads, a.repeats, a.isa, a.bits, a.group_size)
    for r in rows:
        med = r["median_us"]
        base = med["MatMulNBits acc4"]
        cells = "  ".join(f"{name} {us:8.1f} us ({base / us:4.2f}x)" for name, us in med.items())
        print(f"M={r['M']:4d} K={r['K']:5d} N={r['N']:5d}  {cells}  [cpu idle {r['cpu_idle_share']:.0%}]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"isa": a.isa or "best", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
