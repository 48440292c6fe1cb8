"""baseq_export.quant.layout against the readers of its bytes: the custom ops' C++ (kv_rows.h, int_linear_pack.h,
compiled into a small probe program), onnxruntime's MatMulNBits and gguf-py's block table."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from baseq_export import runtime_ops
from baseq_export.quant import layout
from baseq_export.quant.activations import per_token_qparams
from baseq_export.quant.weights import quant_values

PROBE = Path(__file__).resolve().parent / "layout_probe.cc"
HEAD_DIMS = (2, 8, 40, 64, 96, 128)  # below, at and past the 32-value SSE2 steps of UnpackKvRow


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """The probe program, built against the checkout's runtime_ops headers."""
    try:
        cxx, include, src = runtime_ops._compiler(), runtime_ops.include_dir(), runtime_ops.source_dir()
    except runtime_ops.BuildError as e:
        pytest.skip(f"cannot build C++ here: {e}")
    exe = tmp_path_factory.mktemp("probe") / "layout_probe"
    cmd = [cxx, "-std=c++17", "-O1", f"-I{include}", f"-I{src}", str(PROBE), str(src / "int_linear_pack.cc"),
           "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def run(probe: Path, *args) -> str:
    proc = subprocess.run([str(probe), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, f"layout_probe {args}: exit {proc.returncode} {proc.stderr}"
    return proc.stdout


def test_packed_kv_row_width_is_the_cpp_one(probe):
    widths = [int(v) for v in run(probe, "width", *HEAD_DIMS).split()]
    assert widths == [layout.packed_kv_row_width(hd) for hd in HEAD_DIMS]


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_cpp_unpacks_python_packed_kv_rows(probe, tmp_path, hd):
    g = torch.Generator().manual_seed(hd)
    rows = 7
    codes = torch.randint(0, 16, (rows, hd), dtype=torch.uint8, generator=g)
    scale = torch.rand(rows, 1, generator=g) * 0.1 + 1e-3
    zero = torch.randint(-4, 20, (rows, 1), generator=g).to(torch.float32)
    packed = layout.pack_kv_rows(codes, scale, zero)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, layout.packed_kv_row_width(hd))
    back = layout.unpack_kv_rows(packed, hd)
    assert all(torch.equal(a, b) for a, b in zip(back, (codes, scale, zero)))
    (tmp_path / "in").write_bytes(packed.numpy().tobytes())
    run(probe, "kv_unpack", tmp_path / "in", tmp_path / "out", hd, rows)
    got = np.fromfile(tmp_path / "out", np.float32).reshape(rows, hd)
    np.testing.assert_array_equal(got, layout.dequantize_kv_rows(packed, hd).numpy())


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_cpp_packed_kv_rows_are_python_packed_ones(probe, tmp_path, hd):
    """PackKvRow's bytes = pack_kv_rows of the per-token 4-bit quantizer's codes, scale and zero."""
    rows = 5
    x = (torch.randn(rows, hd, generator=torch.Generator().manual_seed(100 + hd)) * 3 + 0.5).to(torch.float32)
    clip = torch.tensor([0.9], dtype=torch.float32)
    scale, zero = per_token_qparams(x, 4, clip)
    codes = quant_values(x, scale, zero, 15).to(torch.uint8)
    (tmp_path / "in").write_bytes(x.numpy().tobytes())
    run(probe, "kv_pack", tmp_path / "in", tmp_path / "out", hd, rows, float(clip).hex())
    got = np.fromfile(tmp_path / "out", np.uint8).reshape(rows, layout.packed_kv_row_width(hd))
    np.testing.assert_array_equal(got, layout.pack_kv_rows(codes, scale, zero).numpy())


@pytest.mark.parametrize("n,k", [(20, 37), (3, 64), (17, 2)])
def test_cpp_int_linear_reads_pack_int4(probe, tmp_path, n, k):
    """baseq.IntLinear's weight reader gets back every code of pack_int4 (odd K padded with a zero nibble)."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = layout.pack_int4(codes)
    assert packed.shape == (n, (k + 1) // 2) and torch.equal(layout.unpack_int4(packed, k), codes)
    (tmp_path / "in").write_bytes(packed.numpy().tobytes())
    run(probe, "int4", tmp_path / "in", tmp_path / "out", n, k)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out", np.uint8).reshape(n, k), codes.numpy())


@pytest.mark.parametrize("k,block", [(96, 32), (128, 64), (64, 16)])
def test_onnxruntime_matmul_nbits_reads_matmul_nbits_bytes(k, block):
    """MatMulNBits with unit scales on an identity input returns code - zero point for every weight: B and the
    packed zero points (an odd block count padded) read as layout.py writes them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = 24
    g = torch.Generator().manual_seed(k + block)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    zero = torch.randint(0, 16, (n, k // block), dtype=torch.uint8, generator=g)
    b, zp = layout.matmul_nbits_bytes(codes, zero, block)
    assert b.shape == (n, k // block, block // 2) and zp.shape == (n, (k // block + 1) // 2)
    inits = [numpy_helper.from_array(b.numpy(), "b"), numpy_helper.from_array(np.ones(n * (k // block), np.float32), "s"),
             numpy_helper.from_array(zp.numpy().reshape(-1), "z")]
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.eye(k, dtype=np.float32)})[0]
    want = codes.to(torch.float32) - zero.repeat_interleave(block, dim=1).to(torch.float32)
    np.testing.assert_array_equal(y.T, want.numpy())


@pytest.mark.parametrize("grid", ["q4_0", "q4_1"])
def test_ggml_q4_blocks_have_ggmls_block_and_type_sizes(grid):
    """Weights per block and bytes per block of ggml_q4_blocks are gguf-py's (llama.cpp's) Q4_0 / Q4_1 sizes."""
    import gguf

    from baseq_export.quant import rtn_quantize

    w = torch.randn(4, 3 * layout.GGML_BLOCK, generator=torch.Generator().manual_seed(2))
    blocks = layout.ggml_q4_blocks(rtn_quantize(w, grid=grid))
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[grid.upper()]]
    assert layout.GGML_BLOCK == block_size and blocks.shape == (4, 3, type_size)
