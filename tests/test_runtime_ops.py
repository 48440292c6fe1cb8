"""The online ops (Hadamard, per-token quantizers) in onnxruntime, as our C++ custom ops and as
standard-op subgraphs, against independent numpy references; bad inputs give onnxruntime errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from baseq_export import runtime_ops
from baseq_export.targets.onnx.graph import (MS_DOMAIN, OPS_DOMAIN, Graph, emit_fake_quant, emit_hadamard,
                                            emit_hadamard_op, emit_quant_dequant_op, emit_quant_levels,
                                            emit_quant_levels_op)
from baseq_export.hadamard import hadamard_matrix
from baseq_export.quant import packed_kv_row_width

IMPLS = ["custom", "standard"]


def session(build, input_names=("x",), custom: bool = True, extra_outputs=()):
    """An onnxruntime session for the graph `build(g)` with float inputs `input_names`, output y
    (float) and `extra_outputs` (name, elem_type) that build() connects itself."""
    g = Graph()
    out = build(g)
    out = out if isinstance(out, str) else out[0]  # a node with several outputs: y is the first
    g.nodes.append(helper.make_node("Identity", [out], ["y"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in input_names]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(n, t, None) for n, t in extra_outputs]
    graph = helper.make_graph(g.nodes, "t", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(OPS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    opts = runtime_ops.session_options() if custom else ort.SessionOptions()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def np_quant_levels(x, bits, clip, shift=None, gain=None):
    """Numpy float32 reference of the per-token quantizer (quant.fake_quant_per_token's recipe):
    x' = x*gain - shift; scale = max(range*clip/qmax, 1e-8); zero = round(-lo/scale) with lo the
    clipped range's bottom; q = clamp(round(x'/scale) + zero, 0, qmax); returns (q - zero, scale).
    A token holding NaN or Inf comes out all NaN (min/max propagate NaN)."""
    f = np.float32
    x = x.astype(f)
    if gain is not None:
        x = x * gain.astype(f)
    if shift is not None:
        x = x - shift.astype(f)
    clip = np.asarray(clip, f)
    qmax = f(2**bits - 1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        xmin, xmax = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        rng = xmax - xmin
        scale = (rng * clip) / qmax
        scale = np.where(scale < f(1e-8), f(1e-8), scale)
        lo = (xmax + xmin) * f(0.5) - (rng * f(0.5)) * clip
        zero = np.round(-lo / scale)
        q = np.round(x / scale) + zero
        q = np.where(q < 0, f(0), np.where(q > qmax, qmax, q))
        return (q - zero).astype(f), scale.astype(f)


def np_fake_quant(x, bits, clip, shift=None, gain=None):
    """(q - zero) * scale of np_quant_levels."""
    levels, scale = np_quant_levels(x, bits, clip, shift, gain)
    with np.errstate(invalid="ignore"):
        return (levels * scale).astype(np.float32)


def hadamard_graph(impl, n):
    return session(lambda g: emit_hadamard_op(g, "x", n) if impl == "custom" else emit_hadamard(g, "x", n),
                   custom=impl == "custom")


def quant_graph(impl, bits, clip, shift=None, gain=None):
    def build(g):
        c = g.init("clip", np.asarray(clip, np.float32))
        s = g.init("shift", shift) if shift is not None else None
        w = g.init("gain", gain) if gain is not None else None
        if impl == "custom":
            return emit_quant_dequant_op(g, "x", bits, c, s, w, None if gain is None else gain.shape[-1])
        x = g.op("Mul", ["x", w]) if w else "x"
        x = g.op("Sub", [x, s]) if s else x
        return emit_fake_quant(g, x, bits, c)

    return session(build, custom=impl == "custom")


def levels_graph(impl, bits, clip, shift=None, gain=None):
    """Session with outputs y = levels and scale of the per-token quantizer."""
    def build(g):
        c = g.init("clip", np.asarray(clip, np.float32))
        s = g.init("shift", shift) if shift is not None else None
        w = g.init("gain", gain) if gain is not None else None
        if impl == "custom":
            levels, scale = emit_quant_levels_op(g, "x", bits, c, s, w, None if gain is None else gain.shape[-1])
        else:
            x = g.op("Mul", ["x", w]) if w else "x"
            levels, scale = emit_quant_levels(g, g.op("Sub", [x, s]) if s else x, bits, c)
        g.nodes.append(helper.make_node("Identity", [scale], ["scale"]))
        return levels

    sess = session(build, custom=impl == "custom", extra_outputs=[("scale", TensorProto.FLOAT)])
    return lambda x: sess.run(["y", "scale"], {"x": x})


@pytest.mark.filterwarnings("ignore:no exact Hadamard")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 3, 896), (1, 2, 1536), (1, 2, 4864), (1, 2, 11008), (2, 3, 3776),
                                   (2, 9, 5, 64), (1, 4, 3, 128)])
def test_hadamard_matches_dense_numpy(impl, shape):
    """Both implementations compute in float64 and round once: the float32 result of a float64 dense
    matmul, up to the rare element whose float64 value lies within rounding error of a float32 tie."""
    n = shape[-1]
    x = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
    got = hadamard_graph(impl, n).run(None, {"x": x})[0]
    ref = (x.astype(np.float64) @ hadamard_matrix(n).numpy()).astype(np.float32)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_array_max_ulp(got, ref, maxulp=1)
    assert (got != ref).mean() < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_hadamard_zero_size_nan_inf(impl):
    sess = hadamard_graph(impl, 64)
    for shape in [(0, 64), (2, 0, 64), (0, 3, 0, 64)]:
        assert sess.run(None, {"x": np.zeros(shape, np.float32)})[0].shape == shape
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    x[0, 5], x[1, 9] = np.nan, np.inf
    got = sess.run(None, {"x": x})[0]
    with np.errstate(invalid="ignore"):
        ref = (x.astype(np.float64) @ hadamard_matrix(64).numpy()).astype(np.float32)
    assert np.isnan(got[0]).all() and np.isinf(got[1]).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)  # NaN == NaN, inf signs equal


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 896), (3, 5, 1536), (1, 2, 4864), (1, 3, 11008), (2, 4, 64)])
@pytest.mark.parametrize("bits, clip", [(4, 0.88), (8, 1.0)])
def test_quant_dequant_matches_numpy(impl, shape, bits, clip):
    rng = np.random.default_rng(shape[-1] + bits)
    x = (rng.standard_normal(shape) * 3 + 0.5).astype(np.float32)
    x[..., 0] = 40.0  # outlier channel
    n = shape[-1]
    shift = rng.standard_normal(n).astype(np.float32)
    gain = (rng.random(n) + 0.5).astype(np.float32)
    for s, w in [(None, None), (shift, None), (shift, gain), (None, gain)]:
        got = quant_graph(impl, bits, [clip], s, w).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, np_fake_quant(x, bits, clip, s, w))
        levels, scale = levels_graph(impl, bits, [clip], s, w)(x)
        ref_levels, ref_scale = np_quant_levels(x, bits, clip, s, w)
        np.testing.assert_array_equal(levels, ref_levels)
        np.testing.assert_array_equal(scale, ref_scale)
        assert scale.shape == (*shape[:-1], 1) and np.all(levels == np.round(levels))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads, head_dim", [(3, 64), (2, 128)])
def test_kv_quant_per_head_clip(impl, heads, head_dim):
    x = np.random.default_rng(heads).standard_normal((2, heads, 5, head_dim)).astype(np.float32)
    x[0, 1, 2] = 1.5  # a constant token: scale hits the floor, output == input
    clip = np.linspace(0.7, 1.0, heads).astype(np.float32).reshape(heads, 1, 1)
    got = quant_graph(impl, 4, clip).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np_fake_quant(x, 4, clip))
    np.testing.assert_array_equal(got[0, 1, 2], x[0, 1, 2])


@pytest.mark.parametrize("impl", IMPLS)
def test_quant_dequant_zero_size_nan_inf(impl):
    sess = quant_graph(impl, 4, [0.9])
    for shape in [(0, 576), (2, 0, 576), (1, 3, 0, 64)]:
        assert sess.run(None, {"x": np.zeros(shape, np.float32)})[0].shape == shape
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    x[0, 3], x[1, 5], x[2, 7] = np.nan, np.inf, -np.inf
    got = sess.run(None, {"x": x})[0]
    ref = np_fake_quant(x, 4, 0.9)
    assert np.isnan(ref[:3]).all() and np.isfinite(ref[3]).all()
    np.testing.assert_array_equal(got, ref)
    run_levels = levels_graph(impl, 4, [0.9])
    for shape in [(0, 576), (2, 0), (1, 3, 0, 64)]:
        levels, scale = run_levels(np.zeros(shape, np.float32))
        assert levels.shape == shape and scale.shape == (*shape[:-1], 1)
    levels, scale = run_levels(x)
    ref_levels, ref_scale = np_quant_levels(x, 4, 0.9)
    np.testing.assert_array_equal(levels[3], ref_levels[3])
    np.testing.assert_array_equal(scale[3], ref_scale[3])
    assert np.isnan(levels[:3] * scale[:3]).all()  # the bad tokens stand for all NaN, as in fake quant


def run_error(sess, feeds) -> str:
    with pytest.raises(Exception) as info:
        sess.run(None, feeds)
    return str(info.value)


def test_custom_ops_reject_bad_inputs():
    qd = session(lambda g: g.op("QuantDequant", ["x", "clip"], domain=OPS_DOMAIN, bits=4), ("x", "clip"))
    x = np.ones((2, 3, 576), np.float32)
    assert "one per head" in run_error(qd, {"x": x, "clip": np.ones(3, np.float32)})
    assert "rank >= 1" in run_error(qd, {"x": np.array(1.0, np.float32), "clip": np.ones(1, np.float32)})
    qds = session(lambda g: g.op("QuantDequant", ["x", "clip", "shift"], domain=OPS_DOMAIN, bits=4), ("x", "clip", "shift"))
    assert "shift must have 576" in run_error(qds, {"x": x, "clip": np.ones(1, np.float32), "shift": np.ones(5, np.float32)})
    had = session(lambda g: emit_hadamard_op(g, "x", 1536))
    assert "size 1536" in run_error(had, {"x": np.ones((2, 1024), np.float32)})
    hs = session(lambda g: g.op("Hadamard", ["x", g.op("Cast", ["s"], to=TensorProto.DOUBLE)], domain=OPS_DOMAIN),
                 ("x", "s"))
    assert "square" in run_error(hs, {"x": x, "s": np.ones((3, 4), np.float32)})
    assert "power of two" in run_error(hs, {"x": np.ones((2, 36), np.float32), "s": np.ones((3, 3), np.float32)})
    with pytest.raises(Exception):  # wrong dtype: refused by onnxruntime at run time
        had.run(None, {"x": np.ones((2, 1536), np.float64)})
    ql = session(lambda g: g.op("QuantLevels", ["x", "clip", "shift"], domain=OPS_DOMAIN, n_out=2, bits=4),
                 ("x", "clip", "shift"))
    assert "QuantLevels: shift must have 576" in run_error(ql, {"x": x, "clip": np.ones(1, np.float32),
                                                                "shift": np.ones(5, np.float32)})
    for op in ("QuantDequant", "QuantLevels"):
        for attrs in [{"bits": 0}, {"bits": 9}, {}]:  # bad attributes: refused when the session is made
            with pytest.raises(Exception, match=f"{op}: attribute bits must be in 1..8"):
                session(lambda g: g.op(op, ["x", "clip"], domain=OPS_DOMAIN, n_out=1 + (op == "QuantLevels"),
                                       **attrs), ("x", "clip"))
    with pytest.raises(Exception, match="blocks must be >= 1"):
        session(lambda g: g.op("Hadamard", ["x"], domain=OPS_DOMAIN, blocks=0))
    assert had.run(None, {"x": np.ones((1, 1536), np.float32)})[0].shape == (1, 1536)  # the process and session live on


def test_library_is_cached_and_honours_ort_include_dir(tmp_path):
    lib = runtime_ops.library_path()
    assert lib.is_file() and runtime_ops.library_path() == lib  # built once, then found
    env = {**os.environ, "ORT_INCLUDE_DIR": str(tmp_path)}
    code = "from baseq_export.runtime_ops import include_dir; include_dir()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and f"ORT_INCLUDE_DIR={tmp_path} does not contain" in proc.stderr
    env = {**os.environ, "ORT_INCLUDE_DIR": str(runtime_ops.include_dir())}
    code = "from baseq_export.runtime_ops import library_path; print(library_path())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str(lib)


def test_library_path_honours_baseq_ops_library(tmp_path, monkeypatch):
    lib = runtime_ops.library_path()
    monkeypatch.setenv("BASEQ_OPS_LIBRARY", str(lib))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # nothing is built: the named file is used
    assert runtime_ops.library_path() == lib.resolve()
    monkeypatch.setenv("BASEQ_OPS_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(runtime_ops.BuildError, match="BASEQ_OPS_LIBRARY=.*missing.so is not a file"):
        runtime_ops.library_path()


REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    """pyproject.toml lists the packages by hand (runtime_ops/ is mapped into the package): none may be missing."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "baseq_export").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "baseq_export.runtime_ops.src" in listed


def test_sources_are_one_copy_at_the_top_level():
    names = runtime_ops.sources()
    assert runtime_ops.source_dir() == REPO / "runtime_ops"
    assert names and all((REPO / "runtime_ops" / n).is_file() for n in names)
    assert not list((REPO / "baseq_export").rglob("*.cc")) and not list((REPO / "baseq_export").rglob("*.h"))
    for machine in ("x86_64", "aarch64"):  # every per-CPU source of either build exists too
        assert all((REPO / "runtime_ops" / n).is_file() for n in runtime_ops.sources(machine))


def test_installed_package_finds_the_sources_and_builds(tmp_path):
    """A non-editable install (pip install --target, from a copy of the source tree) carries the C++
    sources inside the package, and library_path() there builds a library onnxruntime loads."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("baseq_export", "runtime_ops"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "build*"))
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import importlib.resources as r, onnxruntime as ort\n"
            "from baseq_export import runtime_ops as o\n"
            "d = r.files('baseq_export.runtime_ops') / 'src'\n"
            "assert all((d / n).is_file() for n in o.sources()), 'missing sources'\n"
            "print(o.source_dir()); lib = o.library_path(); print(lib)\n"
            "ort.SessionOptions().register_custom_ops_library(str(lib))\n")
    env = {**os.environ, "PYTHONPATH": str(site), "BASEQ_CACHE_DIR": str(tmp_path / "cache"),
           "ORT_INCLUDE_DIR": str(runtime_ops.include_dir())}
    env.pop("BASEQ_OPS_LIBRARY", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, lib = proc.stdout.split()
    assert Path(where) == site / "baseq_export" / "runtime_ops" / "src"
    assert Path(lib).is_file() and Path(lib).is_relative_to(tmp_path / "cache")


def kv_pack_session(head_dim: int):
    def build(g):
        packed = g.op("KVQuantPack", ["x", "clip"], domain=OPS_DOMAIN, bits=4)
        g.nodes.append(helper.make_node("Identity", [packed], ["packed"]))
        return g.op("KVUnpack", [packed], domain=OPS_DOMAIN, head_dim=head_dim)

    sess = session(build, ("x", "clip"), extra_outputs=[("packed", TensorProto.UINT8)])
    return lambda x, clip: sess.run(["y", "packed"], {"x": x, "clip": np.asarray(clip, np.float32)})


@pytest.mark.parametrize("shape", [(1, 3, 7, 64), (2, 2, 5, 128), (1, 2, 3, 48), (1, 3, 0, 64), (0, 3, 4, 64)])
def test_kv_pack_unpack_matches_numpy(shape):
    heads, hd = shape[1], shape[3]
    x = np.random.default_rng(hd).standard_normal(shape).astype(np.float32) * 2
    clip = np.linspace(0.8, 1.0, heads).astype(np.float32)
    if x.size:
        x[0, 0, 1] = np.nan
        x[0, 1, 2] = 0.25  # constant token
    y, packed = kv_pack_session(hd)(x, clip)
    ref = np_fake_quant(x, 4, clip.reshape(heads, 1, 1))
    np.testing.assert_array_equal(y, ref)  # the same floats as QuantDequant, NaN rows included
    assert packed.dtype == np.uint8 and packed.shape == shape[:3] + (packed_kv_row_width(hd),)
    if x.size:  # the stored codes are the quantizer's integer codes, low nibble = even element
        scale, zero = packed[..., hd // 2 : hd // 2 + 4].copy().view(np.float32), packed[..., hd // 2 + 4 :].copy().view(np.float32)
        codes = np.stack([packed[..., : hd // 2] & 15, packed[..., : hd // 2] >> 4], -1).reshape(*shape[:3], hd)
        finite = np.isfinite(scale[..., 0])
        expect = np.clip(np.round(x / scale) + zero, 0, 15)
        np.testing.assert_array_equal(codes[finite], expect[finite])


def test_kv_pack_rejects_bad_inputs():
    pack = kv_pack_session(64)
    x = np.ones((1, 3, 2, 64), np.float32)
    assert "one per head" in run_error_fn(lambda: pack(x, np.ones(2)))
    assert "[batch, heads, seq, head_dim]" in run_error_fn(lambda: pack(np.ones((3, 2, 64), np.float32), [1.0]))
    def unpack_with(head_dim):
        return lambda g: g.op("KVUnpack", [g.op("KVQuantPack", ["x", "clip"], domain=OPS_DOMAIN)], domain=OPS_DOMAIN,
                              head_dim=head_dim)

    with pytest.raises(Exception, match="head_dim \\(even, > 0\\) is required"):
        session(unpack_with(63), ("x", "clip"))
    wrong = session(unpack_with(32), ("x", "clip"))
    assert "must be [batch, heads, seq, 24] for head_dim 32" in run_error(wrong, {"x": x, "clip": np.ones(1, np.float32)})
    with pytest.raises(Exception, match="invalid"):  # a float tensor where the packed uint8 cache belongs
        session(lambda g: g.op("KVUnpack", ["x"], domain=OPS_DOMAIN, head_dim=64))
    with pytest.raises(Exception, match="only bits = 4"):
        session(lambda g: g.op("KVUnpack", [g.op("KVQuantPack", ["x", "clip"], domain=OPS_DOMAIN, bits=8)],
                               domain=OPS_DOMAIN, head_dim=64), ("x", "clip"))


def run_error_fn(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


def test_export_falls_back_to_standard_ops_when_the_library_cannot_build(tmp_path, monkeypatch):
    """--ops auto exports with standard ops (and warns why) when our library cannot be built here;
    --ops custom fails with a message that names the problem and the way out."""
    import json

    import torch

    from baseq_export.targets.onnx import OnnxModel, write as export_onnx
    from baseq_export.models import from_hf_model
    from baseq_export.gptq_model import quantize_model
    from baseq_export.settings import QuantSettings
    from baseq_export.artifact import save_artifact
    from baseq_export.reference import reference_model
    from conftest import tiny_hf_model

    m = from_hf_model(tiny_hf_model("llama", dtype=torch.float32))
    art = quantize_model(m, QuantSettings(method="quarot-rtn", bits="w4a8kv8"))
    path = save_artifact(tmp_path / "m.baseq", art)
    monkeypatch.setenv("BASEQ_CACHE_DIR", str(tmp_path / "cache"))  # nothing built here yet
    monkeypatch.delenv("BASEQ_OPS_LIBRARY", raising=False)  # nor a library from elsewhere
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(runtime_ops.include_dir()))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(runtime_ops.BuildError, match="not an executable C\\+\\+ compiler.*--ops standard"):
        export_onnx(path, tmp_path / "custom", ops="custom")
    assert not (tmp_path / "custom").exists()
    with pytest.warns(UserWarning, match="exporting with standard ONNX ops instead"):
        out = export_onnx(path, tmp_path / "auto")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ops"] == "standard" and not (out / "libbaseq_ops.so").exists()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    got, ref = OnnxModel(out, threads=1).logits(ids), reference_model(art).logits(ids)
    assert float((got - ref).norm() / ref.norm()) < 5e-3


# ------------------------------------------------------------ the float64 steps of the exact mode

def run_ops(build, feeds: dict, custom: bool = True, out=np.float32):
    """Run graph build(g) -> output name (of dtype `out`) on feeds (float32 / float64 numpy arrays)."""
    g = Graph()
    g.nodes.append(helper.make_node("Identity", [build(g)], ["y"]))
    dt = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}
    inputs = [helper.make_tensor_value_info(k, dt[v.dtype], None) for k, v in feeds.items()]
    graph = helper.make_graph(g.nodes, "t", inputs, [helper.make_tensor_value_info("y", dt[np.dtype(out)], None)], g.inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(OPS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    opts = runtime_ops.session_options() if custom else ort.SessionOptions()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def assert_rounded_once(got: np.ndarray, ref64: np.ndarray) -> None:
    """got is the float32 rounding of a float64 computation of ref64's value: within one unit in the
    last place everywhere and equal in all but rare near-tie elements."""
    ref = ref64.astype(np.float32)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_max_ulp(got, ref, maxulp=1)
    assert (got != ref).mean() < 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_and_swiglu_round_once_from_float64(impl):
    import torch

    from baseq_export.targets.onnx.graph import emit_rms_norm, emit_swiglu
    from baseq_export.models.base import rms_norm, swiglu

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 5, 576)) * 3).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    eps = 1e-5
    if impl == "custom":
        got = run_ops(lambda g: g.op("RmsNorm", ["x", g.const(eps, np.float64), g.init("w", w)], domain=OPS_DOMAIN), {"x": x})
    else:
        got = run_ops(lambda g: emit_rms_norm(g, "x", g.init("w", w), eps), {"x": x}, custom=False)
    x64 = x.astype(np.float64)
    normed = (x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps)).astype(np.float32)
    ref = normed.astype(np.float64) * w  # the gain is applied in float32 after rounding
    assert_rounded_once(got, ref)
    assert_rounded_once(rms_norm(torch.from_numpy(x), torch.from_numpy(w), eps, exact=True).numpy(), ref)

    gate, up = (rng.standard_normal((2, 3, 1536)) * 4).astype(np.float32), rng.standard_normal((2, 3, 1536)).astype(np.float32)
    if impl == "custom":
        got = run_ops(lambda g: g.op("SwiGLU", ["g", "u"], domain=OPS_DOMAIN), {"g": gate, "u": up})
    else:
        got = run_ops(lambda g: emit_swiglu(g, "g", "u"), {"g": gate, "u": up}, custom=False)
    g64 = gate.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * up.astype(np.float64)
    assert_rounded_once(got, ref)
    if impl == "custom":  # one input: the stacked gate/up projection's two halves, the same values
        stacked = run_ops(lambda g: g.op("SwiGLU", ["gu"], domain=OPS_DOMAIN), {"gu": np.concatenate([gate, up], -1)})
        np.testing.assert_array_equal(stacked, got)
    assert_rounded_once(swiglu(torch.from_numpy(gate), torch.from_numpy(up), exact=True).numpy(), ref)


def test_scale_sums_is_the_integer_linear_epilogue():
    import torch

    from baseq_export.models.base import linear
    from baseq_export.quant import IntActivation

    rng = np.random.default_rng(3)
    levels = rng.integers(-8, 8, (2, 4, 96)).astype(np.float32)
    w_levels = rng.integers(-8, 8, (40, 96)).astype(np.float32)
    scale = (rng.random((2, 4, 1)) + 0.1).astype(np.float32)
    c = (rng.random(40) + 0.01).astype(np.float16).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    sums = levels @ w_levels.T  # integers, exact in float32
    got = run_ops(lambda g: g.op("ScaleSums", ["sums", "s", g.init("c", c), g.init("b", bias)], domain=OPS_DOMAIN),
                  {"sums": sums, "s": scale})
    ref = ((sums.astype(np.float64) * scale.astype(np.float64)) * c.astype(np.float64)).astype(np.float32) + bias
    np.testing.assert_array_equal(got, ref)  # every float64 step is exact here: one rounding, so equal
    w = {"p.levels": torch.from_numpy(w_levels), "p.scales": torch.from_numpy(c), "p.bias": torch.from_numpy(bias)}
    np.testing.assert_array_equal(linear(IntActivation(torch.from_numpy(levels), torch.from_numpy(scale)), w, "p").numpy(), ref)
    no_bias = run_ops(lambda g: g.op("ScaleSums", ["sums", "s", g.init("c", c)], domain=OPS_DOMAIN), {"sums": sums, "s": scale})
    np.testing.assert_array_equal(no_bias + bias, ref)


def test_masked_softmax_skips_masked_keys_exactly():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 9)) * 5
    x[..., 5:] += -1e9  # masked keys, as the exporter's additive mask makes them
    x[1, 2, 4] = rng.standard_normal(9) - 1e9  # a row with every key masked (a padding query)
    got = run_ops(lambda g: g.op("MaskedSoftmax", ["x"], domain=OPS_DOMAIN), {"x": x}, out=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    ref = e / e.sum(-1, keepdims=True)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-14, atol=0)
    masked = got[..., 5:].copy()
    masked[1, 2, 4] = 0.0  # (the fully masked row is the exception)
    assert np.all(masked == 0.0)  # exactly 0, as exp(-1e9) is
    np.testing.assert_allclose(got[1, 2, 4].sum(), 1.0, rtol=1e-15)  # the fully masked row: the standard formula


def test_exact_mode_ops_reject_bad_inputs():
    y = np.ones((2, 8), np.float32)
    c5 = np.ones(5, np.float32)
    assert "C must have 8 values" in run_error_fn(
        lambda: run_ops(lambda g: g.op("ScaleSums", ["sums", "s", g.init("c", c5)], domain=OPS_DOMAIN), {"sums": y, "s": np.ones((2, 1), np.float32)}))
    assert "one scale per row" in run_error_fn(
        lambda: run_ops(lambda g: g.op("ScaleSums", ["sums", "s", g.init("c", np.ones(8, np.float32))], domain=OPS_DOMAIN),
                        {"sums": y, "s": np.ones((3, 1), np.float32)}))
    assert "W must have 8 values" in run_error_fn(
        lambda: run_ops(lambda g: g.op("RmsNorm", ["x", g.const(1e-5, np.float64), g.init("w", c5)], domain=OPS_DOMAIN), {"x": y}))
    assert "must have one shape" in run_error_fn(
        lambda: run_ops(lambda g: g.op("SwiGLU", ["g", "u"], domain=OPS_DOMAIN), {"g": y, "u": np.ones((2, 4), np.float32)}))
    assert "with one input, GU must have an even last dimension (gate and up halves), got [2, 7]" in run_error_fn(
        lambda: run_ops(lambda g: g.op("SwiGLU", ["gu"], domain=OPS_DOMAIN), {"gu": np.ones((2, 7), np.float32)}))
