"""baseq.IntLinear (per-token quantizer + exact integer matmul on 4-bit weights) through onnxruntime,
on every kernel this CPU runs: bit for bit the op chain it replaces (QuantLevels -> MatMulNBits with
unit scales -> ScaleSums) and a numpy float64 reference; the C++ kernel test, natively and for
aarch64 under qemu-user."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from baseq_export import runtime_ops
from baseq_export.targets.onnx.graph import MS_DOMAIN, OPS_DOMAIN, emit_quant_levels_op, matmul_nbits_inputs, Graph
from baseq_export.quant import packed_kv_row_width
from test_runtime_ops import np_quant_levels, run_error

REPO = Path(__file__).resolve().parents[1]
ISAS = ["scalar", "avx2", "avxvnni", "avx512vnni", "neon", "neondot"]
F32 = TensorProto.FLOAT


def make_weights(n: int, k: int, groups: int, seed: int = 0):
    """Random 4-bit codes [n, k], zero points and scales [n, groups], and codes packed as the artifact
    stores them (quant.pack_int4: two per byte, low nibble = even k, odd k padded with 0)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zeros = rng.integers(0, 16, (n, groups)).astype(np.uint8)
    scales = (rng.random((n, groups)) * 0.02 + 1e-3).astype(np.float32)
    padded = np.pad(codes, ((0, 0), (0, k % 2)))
    packed = (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)
    return codes, zeros, scales, packed


def build(nodes, inits, inputs, outputs=("y",)):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info(o, F32, None) for o in outputs], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(OPS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), runtime_ops.session_options(2), providers=["CPUExecutionProvider"])


def int_linear(packed, zeros, scales, bits, group_size=0, clip=0.9, shift=None, gain=None, bias=None,
               weights_as_inputs=False, residual=False):
    """A session of one IntLinear node; feed x (and B, zeros, scales when weights_as_inputs)."""
    inits = [numpy_helper.from_array(np.asarray([clip], np.float32), "clip")]
    inputs = [("x", F32)]
    names = ["x", "clip"]
    for name, arr in (("shift", shift), ("gain", gain)):
        names.append(name if arr is not None else "")
        if arr is not None:
            inits.append(numpy_helper.from_array(arr, name))
    for name, arr, t in (("B", packed, TensorProto.UINT8), ("zeros", zeros, TensorProto.UINT8), ("scales", scales, F32)):
        names.append(name)
        if weights_as_inputs:
            inputs.append((name, t))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    names.append("bias" if bias is not None else "")
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
    if residual:  # a graph input "r", added after the bias
        names.append("r")
        inputs.append(("r", F32))
    while names[-1] == "":
        names.pop()
    node = helper.make_node("IntLinear", names, ["y"], domain=OPS_DOMAIN, bits=bits, group_size=group_size)
    return build([node], inits, inputs)


def op_chain(codes, zeros, scales, bits, clip=0.9, shift=None, gain=None, bias=None):
    """The chain IntLinear replaces (per-channel weights): QuantLevels -> MatMulNBits on the levels with
    unit scales (integer sums) -> ScaleSums (both scales in float64, rounded once) + bias."""
    g = Graph()
    c = g.init("clip", np.asarray([clip], np.float32))
    s = g.init("shift", shift) if shift is not None else None
    w = g.init("gain", gain) if gain is not None else None
    levels, scale = emit_quant_levels_op(g, "x", bits, c, s, w, codes.shape[1])
    arrays, block = matmul_nbits_inputs(codes, np.ones_like(scales), zeros, codes.shape[1])
    ins = [levels] + [g.init(name, arr) for name, arr in arrays.items()]
    n, k = codes.shape
    sums = g.op("MatMulNBits", ins, domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block, accuracy_level=0)
    ss = [sums, scale, g.init("c", scales[:, 0].copy())] + ([g.init("bias", bias)] if bias is not None else [])
    g.nodes.append(helper.make_node("ScaleSums", ss, ["y"], domain=OPS_DOMAIN))
    return build(g.nodes, g.inits, [("x", F32)])


def np_int_linear(x, codes, zeros, scales, bits, group_size=0, clip=0.9, shift=None, gain=None, bias=None):
    """numpy reference: the quantizer's float32 levels and scale (np_quant_levels), integer sums per
    group in float64 (exact: integers below 2^53), then G = 1: float((P * s) * W); G > 1:
    float((0 + sum_g P_g * W_g) * s); then + bias in float32."""
    n, k = codes.shape
    groups = zeros.shape[1]
    gs = k if group_size in (0, None) or group_size >= k else group_size
    levels, s = np_quant_levels(x, bits, clip, shift, gain)
    lv = levels.astype(np.float64).reshape(-1, k)
    s64 = s.astype(np.float64).reshape(-1, 1)
    wl = codes.astype(np.float64) - np.repeat(zeros.astype(np.float64), gs, axis=1)[:, :k]
    with np.errstate(invalid="ignore", over="ignore"):
        parts = [lv[:, g * gs:(g + 1) * gs] @ wl[:, g * gs:(g + 1) * gs].T for g in range(groups)]
        if groups == 1:
            y = ((parts[0] * s64) * scales[:, 0].astype(np.float64)).astype(np.float32)
        else:
            total = np.zeros_like(parts[0])
            for g, p in enumerate(parts):
                total = total + p * scales[:, g].astype(np.float64)
            y = (total * s64).astype(np.float32)
        if bias is not None:
            y = y + bias
    return y.reshape(*x.shape[:-1], n)


_available: dict[str, bool] = {}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Each IntLinear kernel in turn (BASEQ_INT_LINEAR_ISA, read when a session is made); skipped
    where this build or CPU does not have it."""
    name = request.param
    monkeypatch.setenv("BASEQ_INT_LINEAR_ISA", name)
    if name not in _available:
        _, zeros, scales, packed = make_weights(16, 8, 1)
        try:
            int_linear(packed, zeros, scales, 4)
            _available[name] = True
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            assert "is not a kernel this build and CPU run" in str(e)
            _available[name] = False
    if not _available[name]:
        pytest.skip(f"this CPU or build has no {name} kernel")
    return name


def site_params(k: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(k).astype(np.float32) * 0.3, (rng.random(k) + 0.5).astype(np.float32))


@pytest.mark.parametrize("xshape, n, bits, extras", [
    ((1, 576), 192, 4, "shift gain bias"),
    ((3, 64), 33, 8, ""),
    ((2, 5, 96), 48, 4, "gain"),
    ((1, 1536), 96, 4, "shift bias"),
    ((512, 576), 64, 4, "shift gain bias"),
    ((7, 576), 17, 8, "bias"),
])
def test_int_linear_is_bit_identical_to_the_op_chain(isa, xshape, n, bits, extras):
    k = xshape[-1]
    codes, zeros, scales, packed = make_weights(n, k, 1, seed=k + n)
    shift, gain = site_params(k, n)
    rng = np.random.default_rng(bits)
    bias = rng.standard_normal(n).astype(np.float32) if "bias" in extras else None
    shift = shift if "shift" in extras else None
    gain = gain if "gain" in extras else None
    x = (rng.standard_normal(xshape) * 2 + 0.3).astype(np.float32)
    x[..., 3] = 25.0  # an outlier channel
    got = int_linear(packed, zeros, scales, bits, 0, 0.9, shift, gain, bias).run(None, {"x": x})[0]
    ref = op_chain(codes, zeros, scales, bits, 0.9, shift, gain, bias).run(None, {"x": x})[0]
    assert got.shape == (*xshape[:-1], n) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, np_int_linear(x, codes, zeros, scales, bits, 0, 0.9, shift, gain, bias))


@pytest.mark.parametrize("xshape, n, group_size", [
    ((3, 100), 33, 0),        # K not a multiple of 8/32/64, N odd
    ((2, 5, 96), 17, 32),     # groups, batch dims
    ((9, 77), 40, 20),        # a group size that is no multiple of 8, a short last group
    ((1, 3, 1536), 50, 128),
    ((130, 200), 31, 64),     # prefill-sized tile remainders, short last group
    ((4, 1), 5, 0),           # K = 1
    ((2, 64), 24, 200),       # group_size >= K: one group
])
@pytest.mark.parametrize("bits", [4, 8])
def test_int_linear_groups_and_ragged_shapes_match_numpy(isa, xshape, n, group_size, bits):
    k = xshape[-1]
    groups = 1 if group_size in (0,) or group_size >= k else -(-k // group_size)
    codes, zeros, scales, packed = make_weights(n, k, groups, seed=k * n + bits)
    shift, gain = site_params(k, k)
    bias = np.linspace(-1, 1, n).astype(np.float32)
    x = (np.random.default_rng(n).standard_normal(xshape) * 1.5).astype(np.float32)
    for s, w, b in [(shift, gain, bias), (None, None, None)]:
        got = int_linear(packed, zeros, scales, bits, group_size, 0.85, s, w, b).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, np_int_linear(x, codes, zeros, scales, bits, group_size, 0.85, s, w, b))


def test_int_linear_adds_the_residual_after_the_bias(isa):
    """The block's residual Add fused: IntLinear(..., bias, residual) = residual + (IntLinear(..., bias)) in float32,
    bit for bit; a residual of another shape is refused by name."""
    k, n = 48, 40
    codes, zeros, scales, packed = make_weights(n, k, 1, seed=9)
    bias = np.linspace(-1, 1, n).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((2, 5, k)).astype(np.float32)
    r = (np.random.default_rng(3).standard_normal((2, 5, n)) * 3).astype(np.float32)
    plain = int_linear(packed, zeros, scales, 4, bias=bias).run(None, {"x": x})[0]
    fused = int_linear(packed, zeros, scales, 4, bias=bias, residual=True)
    np.testing.assert_array_equal(fused.run(None, {"x": x, "r": r})[0], r + plain)
    no_bias = int_linear(packed, zeros, scales, 4, residual=True).run(None, {"x": x, "r": r})[0]
    np.testing.assert_array_equal(no_bias, r + int_linear(packed, zeros, scales, 4).run(None, {"x": x})[0])
    err = run_error_fn(lambda: fused.run(None, {"x": x, "r": r[:, :4]}))
    assert "residual must have the output's shape [2, 5, 40], got [2, 4, 40]" in err


def test_int_linear_nan_inf_constant_and_far_rows(isa):
    """A token with NaN or +-Inf gives an all-NaN output row, as QuantLevels' levels make it; a constant
    token (scale at its 1e-8 floor, zero point ~1e8: the float64 path) and a token far from 0 equal
    the reference too."""
    k, n = 96, 40
    codes, zeros, scales, packed = make_weights(n, k, 1, seed=3)
    bias = np.ones(n, np.float32)
    x = np.random.default_rng(2).standard_normal((7, k)).astype(np.float32)
    x[0, 5], x[1, 7], x[2, 9] = np.nan, np.inf, -np.inf
    x[3] = 1.5          # constant: levels ~1.5e8, beyond the integer path
    x[4] = 0.0          # all zero: levels 0
    x[5] += 1000.0      # far from 0: zero point ~ -15 * 1000 / range, still exact
    sess = int_linear(packed, zeros, scales, 4, bias=bias)
    got = sess.run(None, {"x": x})[0]
    ref = np_int_linear(x, codes, zeros, scales, 4, bias=bias)
    assert np.isnan(got[:3]).all() and np.isfinite(got[3:]).all()
    np.testing.assert_array_equal(got, ref)  # NaN == NaN here
    np.testing.assert_array_equal(got[4], bias)  # 0 * scales + bias
    ref_chain = op_chain(codes, zeros, scales, 4, bias=bias).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got[[0, 1, 2, 4, 5, 6]], ref_chain[[0, 1, 2, 4, 5, 6]])


def test_int_linear_empty_tensors(isa):
    codes, zeros, scales, packed = make_weights(24, 64, 1)
    sess = int_linear(packed, zeros, scales, 4, bias=np.ones(24, np.float32))
    for shape in [(0, 64), (2, 0, 64), (0, 3, 0, 64)]:
        y = sess.run(None, {"x": np.zeros(shape, np.float32)})[0]
        assert y.shape == (*shape[:-1], 24)
    # K = 0: no products, levels of width 0 have scale 1 (QuantLevels): y = 0 * c + bias
    bias = np.arange(5, dtype=np.float32)
    empty = int_linear(np.zeros((5, 0), np.uint8), np.zeros((5, 1), np.uint8), np.ones((5, 1), np.float32), 4, bias=bias)
    np.testing.assert_array_equal(empty.run(None, {"x": np.zeros((3, 0), np.float32)})[0], np.tile(bias, (3, 1)))


def test_int_linear_weights_fed_as_graph_inputs_are_read_each_run(isa):
    """Weights that are not initializers may change between runs: each run uses the ones it is given."""
    sess = None
    x = np.random.default_rng(9).standard_normal((3, 80)).astype(np.float32)
    for seed in (1, 2):
        codes, zeros, scales, packed = make_weights(20, 80, 1, seed=seed)
        sess = sess or int_linear(packed, zeros, scales, 4, weights_as_inputs=True)
        got = sess.run(None, {"x": x, "B": packed, "zeros": zeros, "scales": scales})[0]
        np.testing.assert_array_equal(got, np_int_linear(x, codes, zeros, scales, 4))


def test_int_linear_rejects_bad_inputs():
    codes, zeros, scales, packed = make_weights(8, 64, 1)
    x = np.ones((2, 64), np.float32)
    feeds = lambda **kw: {"x": x, "B": packed, "zeros": zeros, "scales": scales, **kw}  # noqa: E731
    sess = int_linear(packed, zeros, scales, 4, weights_as_inputs=True)
    assert "B must be uint8 [N, ceil(K/2)] = [N, 32] for X [2, 64], got [8, 31]" in run_error(sess, feeds(B=packed[:, :31].copy()))
    assert "zeros must be uint8 [N, G] = [8, G >= 1], got [7, 1]" in run_error(sess, feeds(zeros=zeros[:7].copy()))
    assert "W_scales must have the shape of zeros [8, 1], got [8, 2]" in run_error(
        sess, feeds(scales=np.ones((8, 2), np.float32)))
    assert "2 groups of weight zero points/scales, but k = 64 in groups of 64 needs 1" in run_error(
        sess, feeds(zeros=np.zeros((8, 2), np.uint8), scales=np.ones((8, 2), np.float32)))
    assert "zero points must be 4-bit codes in [0, 15], got 16 at [0, 0]" in run_error(
        sess, feeds(zeros=np.full((8, 1), 16, np.uint8)))
    assert "rank >= 1" in run_error(sess, feeds(x=np.array(1.0, np.float32)))
    with pytest.raises(Exception):  # a float tensor where uint8 codes belong: refused by onnxruntime
        sess.run(None, feeds(B=packed.astype(np.float32)))
    bad_bias = int_linear(packed, zeros, scales, 4, bias=np.ones(5, np.float32))
    assert "bias must be float [N] = [8], got [5]" in run_error(bad_bias, {"x": x})
    bad_shift = int_linear(packed, zeros, scales, 4, shift=np.ones(3, np.float32))
    assert "IntLinear: shift must have 64 values" in run_error(bad_shift, {"x": x})
    grouped = int_linear(packed, zeros, scales, 4, group_size=16)
    assert "1 groups of weight zero points/scales, but k = 64 in groups of 16 needs 4" in run_error(grouped, {"x": x})
    for attrs, msg in [(dict(bits=0), "attribute bits must be in 1..8"), (dict(bits=9), "attribute bits must be in 1..8"),
                       (dict(bits=4, group_size=-1), "group_size must be >= 0")]:
        node = helper.make_node("IntLinear", ["x", "clip", "", "", "B", "zeros", "scales"], ["y"], domain=OPS_DOMAIN, **attrs)
        inits = [numpy_helper.from_array(a, nm) for nm, a in
                 (("clip", np.ones(1, np.float32)), ("B", packed), ("zeros", zeros), ("scales", scales))]
        with pytest.raises(Exception, match=msg):
            build([node], inits, [("x", F32)])
    np.testing.assert_array_equal(sess.run(None, feeds())[0], np_int_linear(x, codes, zeros, scales, 4))  # lives on


def test_int_linear_refuses_a_kernel_the_cpu_lacks(monkeypatch):
    _, zeros, scales, packed = make_weights(8, 64, 1)
    monkeypatch.setenv("BASEQ_INT_LINEAR_ISA", "no-such-isa")
    with pytest.raises(Exception, match="BASEQ_INT_LINEAR_ISA=no-such-isa is not a kernel this build and CPU run"):
        int_linear(packed, zeros, scales, 4)


# ------------------------------------------------------------------------ the C++ kernel test

def _cmake_build(build: Path, *extra: str) -> None:
    cfg = subprocess.run(["cmake", "-S", str(REPO / "runtime_ops"), "-B", str(build), *extra],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    jobs = str(max(1, os.cpu_count() or 1))
    proc = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_kernel_test_native(tmp_path):
    """The CMake build of the kernels (no onnxruntime needed) and its C++ test: every kernel this CPU runs
    equals the scalar kernel and the int64 definition bit for bit, and every attention loop set the
    portable one. Each instruction-set object file defines only its entry points (no inline code compiled with its -m flags can leak to other files)."""
    _cmake_build(tmp_path / "build")
    proc = subprocess.run([str(tmp_path / "build" / "int_linear_test")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   scalar" in proc.stdout and "FAIL" not in proc.stdout
    attn = subprocess.run([str(tmp_path / "build" / "attention_test")], capture_output=True, text=True)
    assert attn.returncode == 0 and "ok   scalar" in attn.stdout, attn.stdout + attn.stderr
    if os.uname().machine == "x86_64" and shutil.which("nm"):
        objs = sorted((tmp_path / "build").rglob("*_avx*.o"))
        assert len(objs) == 5
        for obj in objs:
            syms = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
            exported = [line for line in syms.splitlines() if line.split()[1:2] and line.split()[1] in "TWVuw"]
            names = sorted(line.split(" ", 2)[2].split("(")[0] for line in exported)
            want = (["baseq::attn::BlockScores", "baseq::attn::Butterfly", "baseq::attn::ExpSum", "baseq::attn::MixFactor",
                     "baseq::attn::Scores",
                     "baseq::attn::Softmax", "baseq::attn::SwiGLU", "baseq::attn::WeightedAdd", "baseq::attn::Weighted"]
                    if "attention" in obj.name
                    else ["baseq::intlin::Codes", "baseq::intlin::Tiles"])
            assert len(names) == len(want) and all(n.startswith(w) for n, w in zip(names, want)), exported


CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64")


@pytest.mark.skipif(not (CROSS and QEMU and shutil.which("cmake")),
                    reason="needs aarch64-linux-gnu-g++, qemu-aarch64 and cmake (apt install g++-aarch64-linux-gnu qemu-user)")
def test_aarch64_cross_build_and_kernel_test_under_qemu(tmp_path):
    """The library and the kernel test cross-built for aarch64; under qemu-user the NEON dot-product kernel
    (qemu's default CPU has it) and the plain NEON kernel (a Cortex-A53 lacks dot product: skipped there,
    chosen by the run-time check) both equal the scalar kernel."""
    build = tmp_path / "arm64"
    _cmake_build(build, f"-DCMAKE_TOOLCHAIN_FILE={REPO / 'runtime_ops/toolchains/aarch64-linux-gnu.cmake'}",
                 f"-DORT_INCLUDE_DIR={runtime_ops.include_dir()}")
    lib = subprocess.run(["file", str(build / "libbaseq_ops.so")], capture_output=True, text=True).stdout \
        if shutil.which("file") else "aarch64"
    assert (build / "libbaseq_ops.so").is_file() and ("aarch64" in lib)
    sysroot = "/usr/aarch64-linux-gnu"
    full = subprocess.run([QEMU, "-L", sysroot, str(build / "int_linear_test")], capture_output=True, text=True)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "ok   neon " in full.stdout and "ok   neondot" in full.stdout and "best kernel here: neondot" in full.stdout
    attn = subprocess.run([QEMU, "-L", sysroot, str(build / "attention_test")], capture_output=True, text=True)
    assert attn.returncode == 0 and "ok   scalar" in attn.stdout, attn.stdout + attn.stderr
    a53 = subprocess.run([QEMU, "-cpu", "cortex-a53", "-L", sysroot, str(build / "int_linear_test")],
                         capture_output=True, text=True)
    assert a53.returncode == 0, a53.stdout + a53.stderr
    assert "skip neondot" in a53.stdout and "ok   neon " in a53.stdout and "best kernel here: neon\n" in a53.stdout


# ------------------------------------------------------------------------------ baseq.Attention

def attention_chain(cfg, packed: bool):
    """The op chain baseq.Attention replaces, spelled out here (the exporter's graph before it used the op):
    the additive float64 mask (0 / -1e9: causal from the past length, sliding window, attention_mask), Concat of
    past and new rows (KVQuantPack before and KVUnpack after for the packed cache), then in float64: q k^T
    (grouped heads by reshaping q to [B, kvH, groups, T, hd]), * 1/sqrt(hd), + mask, MaskedSoftmax, @ v;
    rounded once and transposed to [B, T, H * hd]."""
    from baseq_export.targets.onnx.graph import to_double, to_float

    g = Graph()
    i64 = lambda v: g.const(v, np.int64)  # noqa: E731
    past_len = g.op("Gather", [g.op("Shape", ["past_k"]), i64(2)], axis=0)
    total = g.op("Add", [past_len, g.op("Gather", [g.op("Shape", ["ids"]), i64(1)], axis=0)])
    q_pos = g.op("Unsqueeze", [g.op("Range", [past_len, total, i64(1)]), i64([1])])
    k_pos = g.op("Range", [i64(0), total, i64(1)])
    allowed = g.op("LessOrEqual", [k_pos, q_pos])
    if cfg.sliding_window:
        allowed = g.op("And", [allowed, g.op("Greater", [k_pos, g.op("Sub", [q_pos, i64(cfg.sliding_window)])])])
    keep = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), i64([1, 2])])
    mask = g.op("Where", [g.op("And", [allowed, keep]), g.const(0.0, np.float64), g.const(-1e9, np.float64)])
    k, v = "k", "v"
    if packed:
        k = g.op("KVQuantPack", [k, "k_clip"], domain=OPS_DOMAIN, bits=4)
        v = g.op("KVQuantPack", [v, "v_clip"], domain=OPS_DOMAIN, bits=4)
    pk, pv = g.op("Concat", ["past_k", k], axis=2), g.op("Concat", ["past_v", v], axis=2)
    k_all, v_all = pk, pv
    if packed:
        k_all = g.op("KVUnpack", [pk], domain=OPS_DOMAIN, head_dim=cfg.head_dim)
        v_all = g.op("KVUnpack", [pv], domain=OPS_DOMAIN, head_dim=cfg.head_dim)
    groups = cfg.num_heads // cfg.num_kv_heads
    axis2 = i64([2])
    q5 = g.op("Reshape", [to_double(g, "q"), i64([0, cfg.num_kv_heads, groups, -1, cfg.head_dim])])
    k5 = g.op("Unsqueeze", [to_double(g, k_all), axis2])
    v5 = g.op("Unsqueeze", [to_double(g, v_all), axis2])
    scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])
    scores = g.op("Add", [g.op("Mul", [scores, g.const(1.0 / np.sqrt(cfg.head_dim), np.float64)]),
                          g.op("Unsqueeze", [mask, axis2])])
    a = g.op("MatMul", [g.op("MaskedSoftmax", [scores], domain=OPS_DOMAIN), v5])
    a = to_float(g, g.op("Reshape", [a, i64([0, cfg.num_heads, -1, cfg.head_dim])]))
    a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), i64([0, 0, cfg.num_heads * cfg.head_dim])])
    for src, dst in ((a, "y"), (pk, "present_k"), (pv, "present_v")):
        g.nodes.append(helper.make_node("Identity", [src], [dst]))
    return g


def attention_session(g, packed: bool):
    kv = TensorProto.UINT8 if packed else F32
    inputs = [("q", F32), ("k", F32), ("v", F32), ("past_k", kv), ("past_v", kv), ("attention_mask", TensorProto.INT64),
              ("ids", TensorProto.INT64)] + ([("k_clip", F32), ("v_clip", F32)] if packed else [])
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info("y", F32, None), helper.make_tensor_value_info("present_k", kv, None),
                               helper.make_tensor_value_info("present_v", kv, None)], g.inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(OPS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), runtime_ops.session_options(2), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    run = lambda feeds: sess.run(None, {k: v for k, v in feeds.items() if k in names})  # noqa: E731
    run.session = sess
    return run


def attention_op(packed: bool, window: int = 0):
    g = Graph()
    ins = ["q", "k", "v", "past_k", "past_v", "attention_mask"] + (["k_clip", "v_clip"] if packed else [])
    g.nodes.append(helper.make_node("AttentionKV4" if packed else "Attention", ins, ["y", "present_k", "present_v"],
                                    domain=OPS_DOMAIN, window=window))
    return attention_session(g, packed)


def attention_feeds(b, h, kvh, t, past, hd, packed, seed=0, pad=0):
    rng = np.random.default_rng(seed)
    f = {"q": rng.standard_normal((b, h, t, hd)).astype(np.float32) * 2,
         "k": rng.standard_normal((b, kvh, t, hd)).astype(np.float32),
         "v": rng.standard_normal((b, kvh, t, hd)).astype(np.float32),
         "attention_mask": np.ones((b, past + t), np.int64), "ids": np.zeros((b, t), np.int64)}
    if pad:  # left padding in the last batch row: its first `pad` positions are hidden, those queries see nothing
        f["attention_mask"][-1, :pad] = 0
    if packed:
        row = packed_kv_row_width(hd)
        cache = []
        for _ in range(2):
            p = np.empty((b, kvh, past, row), np.uint8)
            p[..., : hd // 2] = rng.integers(0, 256, (b, kvh, past, hd // 2))
            p[..., hd // 2:hd // 2 + 4] = (rng.random((b, kvh, past, 1)) * 0.3 + 0.01).astype(np.float32).view(np.uint8)
            p[..., hd // 2 + 4:] = rng.integers(0, 16, (b, kvh, past, 1)).astype(np.float32).view(np.uint8)
            cache.append(p)
        f["past_k"], f["past_v"] = cache
        f["k_clip"] = np.linspace(0.8, 1.0, kvh).astype(np.float32)
        f["v_clip"] = np.array([0.9], np.float32)
    else:
        f["past_k"] = rng.standard_normal((b, kvh, past, hd)).astype(np.float32)
        f["past_v"] = rng.standard_normal((b, kvh, past, hd)).astype(np.float32)
    return f


ATTN_CASES = [  # batch, heads, kv heads, new tokens, past, head_dim, left padding
    (1, 9, 3, 1, 37, 64, 0),     # decode, grouped heads (the default model's layout)
    (2, 4, 2, 13, 0, 32, 3),     # prefill from an empty cache, a padded batch row (queries with no visible key)
    (2, 6, 2, 5, 7, 16, 2),      # a chunk after a past, padding inside the past
    (1, 2, 2, 40, 3, 8, 0),      # more queries than one parallel chunk, no grouping
    (1, 9, 3, 1, 600, 64, 0),    # decode over more keys than one unpacked chunk of the packed cache (256)
    (2, 4, 2, 1, 520, 16, 7),    # the same with a padded batch row
]


@pytest.mark.parametrize("packed", [False, True], ids=["float-cache", "packed-cache"])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_op_equals_the_op_chain(case, packed):
    from types import SimpleNamespace

    b, h, kvh, t, past, hd, pad = case
    cfg = SimpleNamespace(num_heads=h, num_kv_heads=kvh, head_dim=hd, sliding_window=None)
    feeds = attention_feeds(b, h, kvh, t, past, hd, packed, seed=t + past, pad=pad)
    got = attention_op(packed)(feeds)
    ref = attention_session(attention_chain(cfg, packed), packed)(feeds)
    assert got[0].shape == (b, t, h * hd) and got[0].dtype == np.float32
    for g_, r_ in zip(got, ref):
        assert g_.shape == r_.shape and g_.dtype == r_.dtype
        np.testing.assert_array_equal(g_, r_)


def test_attention_sliding_window_equals_the_op_chain():
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=5)
    feeds = attention_feeds(2, 4, 2, 9, 6, 16, False, seed=4, pad=2)
    got = attention_op(False, window=5)(feeds)
    ref = attention_session(attention_chain(cfg, False), False)(feeds)
    for g_, r_ in zip(got, ref):
        np.testing.assert_array_equal(g_, r_)


@pytest.mark.parametrize("packed", [False, True], ids=["float-cache", "packed-cache"])
def test_attention_writes_into_a_kv_buffer(packed):
    """onnxruntime-genai's shared past/present buffer: past_K holds C rows of which the mask's length minus the new
    tokens are filled. present has the buffer's shape, the new rows land after the past ones and the output equals
    the growing cache's; bound to the past's own memory (IO binding, as genai does) only the new rows are written."""
    import onnxruntime as ort

    b, h, kvh, t, past, hd, capacity = 2, 4, 2, 3, 5, 16, 12
    feeds = attention_feeds(b, h, kvh, t, past, hd, packed, seed=3, pad=1)
    run = attention_op(packed)
    grown = run(feeds)
    buffers = {}
    for name in ("past_k", "past_v"):
        buf = np.full(feeds[name].shape[:2] + (capacity,) + feeds[name].shape[3:], 0xFF if packed else np.nan,
                      feeds[name].dtype)  # rows past the mask's length: garbage that must not be read
        buf[:, :, :past] = feeds[name]
        buffers[name] = buf
    out = run({**feeds, **buffers})
    np.testing.assert_array_equal(out[0], grown[0])
    for got, want in zip(out[1:], grown[1:]):
        assert got.shape == buffers["past_k"].shape
        np.testing.assert_array_equal(got[:, :, :past + t], want)
        assert not got[:, :, past + t:].any()  # a fresh present: the rows after the filled ones are zero
    sess, binding = run.session, run.session.io_binding()
    shared = {n: ort.OrtValue.ortvalue_from_numpy(buffers[n].copy()) for n in buffers}
    for n, v in feeds.items():
        if n in {i.name for i in sess.get_inputs()} and n not in shared:
            binding.bind_cpu_input(n, v)
    binding.bind_output("y")
    for n, out_name in (("past_k", "present_k"), ("past_v", "present_v")):
        binding.bind_ortvalue_input(n, shared[n])
        binding.bind_ortvalue_output(out_name, shared[n])
    sess.run_with_iobinding(binding)
    np.testing.assert_array_equal(binding.get_outputs()[0].numpy(), grown[0])
    for n, want in (("past_k", grown[1]), ("past_v", grown[2])):
        got = shared[n].numpy()
        np.testing.assert_array_equal(got[:, :, :past + t], want)
        np.testing.assert_array_equal(got[:, :, past + t:], buffers[n][:, :, past + t:])  # untouched: written in place


def test_rope_attention_rejects_bad_inputs():
    from onnx import TensorProto as TP

    g = Graph()
    g.nodes.append(helper.make_node("RopeAttentionKV4", ["qkv", "cos", "sin", "past_k", "past_v", "attention_mask", "k_clip",
                                                         "v_clip"], ["y", "pk", "pv"], domain=OPS_DOMAIN, heads=4,
                                    kv_heads=2, rotate=1))
    ins = [("qkv", TP.FLOAT), ("cos", TP.FLOAT), ("sin", TP.FLOAT), ("past_k", TP.UINT8), ("past_v", TP.UINT8),
           ("attention_mask", TP.INT64), ("k_clip", TP.FLOAT), ("v_clip", TP.FLOAT)]
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info(n, t, None) for n, t in ins],
                              [helper.make_tensor_value_info(n, t, None) for n, t in (("y", TP.FLOAT), ("pk", TP.UINT8), ("pv", TP.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(OPS_DOMAIN, 1)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), runtime_ops.session_options(1), providers=["CPUExecutionProvider"])
    hd, t = 16, 3
    good = {"qkv": np.ones((1, t, 8 * hd), np.float32), "cos": np.ones((t, hd), np.float32), "sin": np.zeros((t, hd), np.float32),
            "past_k": np.zeros((1, 2, 0, packed_kv_row_width(hd)), np.uint8), "past_v": np.zeros((1, 2, 0, packed_kv_row_width(hd)), np.uint8),
            "attention_mask": np.ones((1, t), np.int64), "k_clip": np.ones(1, np.float32), "v_clip": np.ones(1, np.float32)}
    assert sess.run(None, good)[0].shape == (1, t, 4 * hd)
    err = run_error_fn(lambda: sess.run(None, {**good, "qkv": np.ones((1, t, 8 * hd + 8), np.float32)}))
    assert "qkv must be [batch, seq, (heads + 2 kv_heads) x head_dim] with an even head_dim, got [1, 3, 136]" in err
    err = run_error_fn(lambda: sess.run(None, {**good, "cos": np.ones((t + 1, hd), np.float32)}))
    assert "cos and sin must be [seq, head_dim] = [3, 16], got [4, 16]" in err
    err = run_error_fn(lambda: sess.run(None, {**good, "qkv": np.ones((1, t, 8 * 12), np.float32),
                                               "cos": np.ones((t, 12), np.float32), "sin": np.ones((t, 12), np.float32)}))
    assert "rotate = 1 needs a power-of-two head_dim, got 12" in err


def test_attention_equals_the_torch_exact_reference():
    """models.base.attend(exact=True) on the concatenated cache with K/V heads repeated per group."""
    import torch

    from baseq_export.models.base import attend

    b, h, kvh, t, past, hd = 2, 6, 2, 4, 9, 32
    feeds = attention_feeds(b, h, kvh, t, past, hd, False, seed=11, pad=3)
    out, pk, pv = attention_op(False)(feeds)
    k_all = np.concatenate([feeds["past_k"], feeds["k"]], axis=2)
    v_all = np.concatenate([feeds["past_v"], feeds["v"]], axis=2)
    np.testing.assert_array_equal(pk, k_all)
    np.testing.assert_array_equal(pv, v_all)
    s = past + t
    allowed = (np.arange(s)[None, :] <= (past + np.arange(t))[:, None])[None, None] & (feeds["attention_mask"][:, None, None, :] != 0)
    mask = torch.from_numpy(np.where(allowed, 0.0, -1e9))
    rep = lambda x: torch.from_numpy(np.repeat(x, h // kvh, axis=1))  # noqa: E731
    ref = attend(torch.from_numpy(feeds["q"]), rep(k_all), rep(v_all), mask, exact=True)
    ref = ref.transpose(1, 2).reshape(b, t, h * hd).numpy()
    np.testing.assert_array_max_ulp(out, ref, maxulp=1)  # torch sums in its own float64 order: a rare last-bit tie
    assert (out != ref).mean() < 1e-3


def test_attention_rejects_bad_inputs():
    for packed in (False, True):
        run = attention_op(packed)
        feeds = attention_feeds(1, 4, 2, 3, 5, 16, packed)
        name = "AttentionKV4" if packed else "Attention"
        bad = {**feeds, "attention_mask": np.ones((1, 7), np.int64)}
        assert (f"baseq.{name}: attention_mask must be [batch, past + seq] = [1, 8] (a growing cache) or at most [1, 5] "
                "(past_K a KV buffer of 5 rows), got [1, 7]") in run_error_fn(lambda: run(bad))
        bad = {**feeds, "k": np.ones((1, 3, 3, 16), np.float32), "v": np.ones((1, 3, 3, 16), np.float32)}
        assert "heads a multiple of kv_heads" in run_error_fn(lambda: run(bad))
        bad = {**feeds, "q": np.ones((1, 4, 16), np.float32)}
        assert "Q must be [batch, heads, seq, head_dim]" in run_error_fn(lambda: run(bad))
        bad = {**feeds, "past_v": feeds["past_v"][:, :, :4].copy()}
        assert "past_V must have past_K's shape" in run_error_fn(lambda: run(bad))
        if packed:
            bad = {**feeds, "past_k": np.zeros((1, 2, 5, 12), np.uint8), "past_v": np.zeros((1, 2, 5, 12), np.uint8)}
            assert "past_K must be [1, 2, past, 16] (packed rows" in run_error_fn(lambda: run(bad))
            bad = {**feeds, "k_clip": np.ones(3, np.float32)}
            assert "k_clip and v_clip must hold 1 value or one per KV head (2)" in run_error_fn(lambda: run(bad))
        assert run(feeds)[0].shape == (1, 3, 64)  # the session lives on
    with pytest.raises(Exception, match="window must be >= 0"):
        attention_op(False, window=-1)


def run_error_fn(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)
