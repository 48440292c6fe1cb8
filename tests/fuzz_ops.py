"""Fuzz every op of the `baseq` domain through real onnxruntime sessions.

    python tests/fuzz_ops.py --cases 3000 [--seed 0]

Each case draws an op, attributes, input ranks, shapes and dtypes at random, often breaks one of them
(a wrong width, rank or dtype, an attribute out of range), and sometimes plants NaN/Inf, empty axes or a
large (bounded) input. A case passes when the op returns the right result, checked against an independent
numpy/torch reference wherever the inputs are valid, or when onnxruntime reports an error for invalid
inputs; a crash ends the process, which is what the calling test (tests/test_reliability_ops.py) and the
sanitizer run (tools/sanitize_ops.py) look for. Inputs with NaN/Inf are checked where the reference
defines them (the quantizers) and otherwise only for shape and for not crashing.
Prints one line of counts per op and `fuzz: N cases ok`; exits 1 on a wrong result.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseq_export import runtime_ops  # noqa: E402
from baseq_export.targets.onnx.graph import MS_DOMAIN, OPS_DOMAIN  # noqa: E402
from baseq_export.quant import packed_kv_row_width  # noqa: E402
from test_kernels import attention_feeds, make_weights, np_int_linear  # noqa: E402
from test_runtime_ops import np_fake_quant, np_quant_levels  # noqa: E402

F32, F64, U8, I64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.UINT8, TensorProto.INT64
NP = {F32: np.float32, F64: np.float64, U8: np.uint8, I64: np.int64}
_sessions: dict = {}
_last: list[str] = [""]  # the op, attributes and input shapes of the latest run, for error messages


class WrongResult(AssertionError):
    pass


def session(op: str, inputs: tuple, outputs: tuple, **attrs):
    """A cached session of one `op` node; inputs/outputs are (name, elem type); "" skips an optional input.
    Returns the session, or the exception onnxruntime raised making it (a refused attribute)."""
    key = (op, inputs, outputs, tuple(sorted(attrs.items())))
    if key not in _sessions:
        names = [n for n, _ in inputs]
        node = helper.make_node(op, names, [n for n, _ in outputs], domain=OPS_DOMAIN, **attrs)
        graph = helper.make_graph([node], "fuzz", [helper.make_tensor_value_info(n, t, None) for n, t in inputs if n],
                                  [helper.make_tensor_value_info(n, t, None) for n, t in outputs])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1),
                                                        helper.make_opsetid(OPS_DOMAIN, 1)])
        model.ir_version = 9
        opts = runtime_ops.session_options(2)
        opts.log_severity_level = 4  # the refusals are expected: keep onnxruntime's error log quiet
        try:
            _sessions[key] = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            _sessions[key] = e
    return _sessions[key]


def run(op: str, feeds: dict[str, np.ndarray], outputs: tuple, **attrs):
    """('error', message) or ('ok', outputs) of one op on feeds (None values: optional inputs left out)."""
    order = tuple((k, _elem(v)) if v is not None else ("", F32) for k, v in feeds.items())
    while order and order[-1][0] == "":
        order = order[:-1]
    sess = session(op, order, outputs, **attrs)
    _last[:] = [f"{op} {attrs} " + ", ".join(f"{k}={v.dtype}{list(v.shape)}" for k, v in feeds.items() if v is not None)]
    if isinstance(sess, Exception):
        return "error", str(sess)
    try:
        return "ok", sess.run(None, {k: v for k, v in feeds.items() if v is not None})
    except Exception as e:  # noqa: BLE001
        return "error", str(e)


def _elem(a: np.ndarray) -> int:
    return {np.dtype(np.float32): F32, np.dtype(np.float64): F64, np.dtype(np.uint8): U8, np.dtype(np.int64): I64}[a.dtype]


def expect(valid: bool | None, outcome, check=None) -> str:
    """Judge one case: a valid one must run (and pass `check` on its outputs), an invalid one must be refused;
    valid None: either is right (a mismatch in the width of an axis that holds no elements)."""
    status, value = outcome
    if valid is None:
        return "ok" if status == "ok" else "refused"
    if valid:
        if status != "ok":
            raise WrongResult(f"valid inputs refused: {value}")
        if check is not None:
            check(value)
        return "ok"
    if status == "ok":
        raise WrongResult("invalid inputs accepted")
    return "refused"


def _close(got: np.ndarray, ref: np.ndarray, what: str, ulp: int | None = None, exact: bool = False) -> None:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise WrongResult(f"{what}: {got.dtype}{got.shape} instead of {ref.dtype}{ref.shape}")
    if exact:
        np.testing.assert_array_equal(got, ref, err_msg=what)
    elif ulp is not None:
        np.testing.assert_array_max_ulp(got, ref, maxulp=ulp)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=what)


# ---------------------------------------------------------------------------------------------
# Random inputs


def shape_with_last(rng, last: int, rank: int | None = None, big: bool = False) -> tuple[int, ...]:
    rank = rank or int(rng.integers(1, 5))
    lead = [int(rng.integers(0 if rng.random() < 0.08 else 1, 4)) for _ in range(rank - 1)]
    if big and rank > 1:
        lead[0] = int(rng.integers(200, 600))
    return tuple(lead) + (last,)


def values(rng, shape, poison: bool) -> np.ndarray:
    x = (rng.standard_normal(shape) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
    if poison and x.size:
        flat = x.reshape(-1)
        for _ in range(int(rng.integers(1, 4))):
            flat[int(rng.integers(0, flat.size))] = rng.choice([np.nan, np.inf, -np.inf])
    return x


def sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


# ---------------------------------------------------------------------------------------------
# One generator per op: draws a case, runs it, returns "ok" or "refused" (raises WrongResult)


def fuzz_hadamard(rng, poison, big):
    n = int(rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]))
    blocks = int(rng.choice([1, 1, 1, 1, 1, 2, 3, 0, -1]))
    size = int(rng.choice([0, n, n, n, n + 2]))
    width = n if rng.random() < 0.8 else int(rng.integers(1, 70))
    x = values(rng, shape_with_last(rng, width, big=big), poison)
    if rng.random() < 0.05:
        x = x.astype(np.float64)
    if rng.random() < 0.03:
        x = np.float32(1.0).reshape(())
    k = width // blocks if blocks >= 1 else 0
    valid = (blocks >= 1 and x.dtype == np.float32 and x.ndim >= 1 and width % blocks == 0 and k >= 1
             and k & (k - 1) == 0 and size in (0, width))

    def check(out):
        with np.errstate(all="ignore"):
            ref = (x.astype(np.float64) @ np.kron(np.eye(blocks), sylvester(k) / np.sqrt(k))).astype(np.float32)
        if np.isfinite(x).all():
            _close(out[0], ref, "Hadamard", ulp=2)
        elif out[0].shape != x.shape:
            raise WrongResult("Hadamard: shape")

    return expect(valid, run("Hadamard", {"x": x}, (("y", F32),), blocks=blocks, size=size), check)


def fuzz_quantizer(rng, poison, big, op: str):
    bits = int(rng.choice([1, 2, 3, 4, 4, 8, 0, 9]))
    n = int(rng.integers(1, 300))
    rank = int(rng.integers(1, 5))
    x = values(rng, shape_with_last(rng, n, rank, big), poison)
    per_head = rank == 4 and rng.random() < 0.4
    clip_len = max(1, x.shape[1]) if per_head else 1
    if rng.random() < 0.1:
        clip_len += int(rng.integers(1, 3))
    clip = (rng.random(clip_len) * 0.5 + 0.5).astype(np.float32)
    shift = gain = None
    if rng.random() < 0.5:
        shift = (rng.standard_normal(n if rng.random() < 0.9 else n + 1) * 0.1).astype(np.float32)
        if rng.random() < 0.5:
            gain = (rng.random(n if rng.random() < 0.9 else max(1, n - 1)) + 0.5).astype(np.float32)
    if rng.random() < 0.04:
        x = x.astype(np.float64)
    valid = (1 <= bits <= 8 and x.dtype == np.float32 and (clip_len == 1 or (x.ndim == 4 and clip_len == x.shape[1]))
             and (shift is None or shift.size == n) and (gain is None or gain.size == n))
    c = clip.reshape(-1, 1, 1) if clip_len > 1 else clip[0]

    def check(out):
        if op == "QuantDequant":
            _close(out[0], np_fake_quant(x, bits, c, shift, gain), op, exact=True)
        else:
            levels, scale = np_quant_levels(x, bits, c, shift, gain)
            _close(out[0], levels, op, exact=True)
            _close(out[1], scale, op, exact=True)

    outs = (("y", F32),) if op == "QuantDequant" else (("levels", F32), ("scale", F32))
    return expect(valid, run(op, {"x": x, "clip": clip, "shift": shift, "gain": gain}, outs, bits=bits), check)


def fuzz_scale_sums(rng, poison, big):
    n = int(rng.integers(1, 200))
    shape = shape_with_last(rng, n, big=big)
    y = np.round(values(rng, shape, poison) * 50)
    s = (rng.random(shape[:-1] + (1,)) + 0.01).astype(np.float32)
    if rng.random() < 0.1:
        s = s[..., :0] if s.ndim else s
    c = (rng.random(n if rng.random() < 0.9 else n + 1) + 0.01).astype(np.float32)
    b = rng.standard_normal(n if rng.random() < 0.9 else 1).astype(np.float32) if rng.random() < 0.5 else None
    valid = s.shape == shape[:-1] + (1,) and c.size == n and (b is None or b.size == n)
    if y.size == 0 and not valid and c.size == n and (b is None or b.size == n):
        valid = None

    def check(out):
        ref = ((y.astype(np.float64) * s.astype(np.float64)) * c.astype(np.float64)).astype(np.float32)
        ref = ref + b if b is not None else ref
        if np.isfinite(y).all():
            _close(out[0], ref, "ScaleSums", exact=True)

    return expect(valid, run("ScaleSums", {"y": y, "s": s, "c": c, "b": b}, (("out", F32),)), check)


def fuzz_rms_norm(rng, poison, big):
    n = int(rng.integers(1, 600))
    x = values(rng, shape_with_last(rng, n, big=big), poison)
    eps = np.array(float(rng.choice([1e-6, 1e-5, 0.0])), np.float64)
    if rng.random() < 0.1:
        eps = eps.astype(np.float32)
    w = (rng.random(n if rng.random() < 0.9 else n + 3) + 0.5).astype(np.float32) if rng.random() < 0.7 else None
    valid = eps.dtype == np.float64 and (w is None or w.size == n)

    def check(out):
        x64 = x.astype(np.float64)
        with np.errstate(all="ignore"):
            ref = (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + float(eps))).astype(np.float32)
            ref = ref * w if w is not None else ref
        if np.isfinite(x).all() and (float(eps) > 0 or np.all(np.abs(x).max(-1) > 0)):
            _close(out[0], ref, "RmsNorm", ulp=2)

    return expect(valid, run("RmsNorm", {"x": x, "eps": eps, "w": w}, (("y", F32),)), check)


def fuzz_swiglu(rng, poison, big):
    n = int(rng.integers(1, 500))
    shape = shape_with_last(rng, n, big=big)
    gate, up = values(rng, shape, poison), values(rng, shape, False)
    stacked = rng.random() < 0.4
    if stacked:
        gu = np.concatenate([gate, up], -1)
        if rng.random() < 0.1:
            gu = gu[..., 1:]
        feeds, valid = {"gu": gu}, gu.shape[-1] % 2 == 0
    else:
        if rng.random() < 0.1:
            up = up[..., :-1] if n > 1 else up[..., :0]
        feeds, valid = {"gate": gate, "up": up}, up.shape == gate.shape

    def check(out):
        g64, u64 = gate.astype(np.float64), up.astype(np.float64)
        with np.errstate(all="ignore"):
            ref = (g64 / (1 + np.exp(-g64)) * u64).astype(np.float32)
        if np.isfinite(gate).all():
            _close(out[0], ref, "SwiGLU", ulp=2)

    return expect(valid, run("SwiGLU", feeds, (("y", F32),)), check)


def fuzz_masked_softmax(rng, poison, big):
    s = int(rng.integers(1, 300))
    x = values(rng, shape_with_last(rng, s, big=big), poison).astype(np.float64)
    x[rng.random(x.shape) < 0.3] = -1e9
    if rng.random() < 0.1:
        x = x.astype(np.float32)
    valid = x.dtype == np.float64

    def check(out):
        if not np.isfinite(x).all():
            return
        live = x > -1e8
        all_masked = ~live.any(-1, keepdims=True)
        m = np.where(live | all_masked, x, -np.inf).max(-1, keepdims=True)
        e = np.where(live | all_masked, np.exp(x - m), 0.0)
        _close(out[0], e / e.sum(-1, keepdims=True), "MaskedSoftmax")

    return expect(valid, run("MaskedSoftmax", {"x": x}, (("y", F64),)), check)


def fuzz_kv(rng, poison, big):
    b, h, t = int(rng.integers(0, 3)), int(rng.integers(1, 5)), int(rng.integers(0, 200 if big else 9))
    hd = int(rng.choice([2, 8, 16, 64, 128, 7]))
    x = values(rng, (b, h, t, hd), poison) if rng.random() < 0.93 else values(rng, (b, h, hd), poison)
    clip_len = h if rng.random() < 0.5 else 1
    clip = (rng.random(clip_len if rng.random() < 0.92 else clip_len + 1) * 0.5 + 0.5).astype(np.float32)
    head_dim_attr = hd if rng.random() < 0.9 else hd + 2
    valid = x.ndim == 4 and hd % 2 == 0 and clip.size in (1, h) and head_dim_attr == hd
    status, packed = run("KVQuantPack", {"x": x, "clip": clip}, (("p", U8),), bits=4)
    pack_valid = x.ndim == 4 and hd % 2 == 0 and clip.size in (1, h)
    if not pack_valid:
        return expect(False, (status, packed))
    expect(True, (status, packed))
    outcome = run("KVUnpack", {"p": packed[0]}, (("y", F32),), head_dim=head_dim_attr)

    def check(out):
        _close(out[0], np_fake_quant(x, 4, clip.reshape(-1, 1, 1) if clip.size > 1 else clip[0]), "KVQuantPack/KVUnpack",
               exact=True)

    return expect(valid, outcome, check)


def fuzz_int_linear(rng, poison, big):
    bits = int(rng.choice([4, 8, 2, 0]))
    k = int(rng.integers(1, 300))
    n = int(rng.integers(1, 80))
    group = int(rng.choice([0, 0, 32, 64, 16, 48]))
    gs = k if group == 0 or group >= k else group
    groups = -(-k // gs)
    codes, zeros, scales, packed = make_weights(n, k, groups, seed=int(rng.integers(1 << 30)))
    x = values(rng, shape_with_last(rng, k if rng.random() < 0.9 else k + 2, big=big), poison)  # +2: one byte more
    clip = np.array([0.9], np.float32)
    shift = (rng.standard_normal(k) * 0.1).astype(np.float32) if rng.random() < 0.3 else None
    gain = (rng.random(k) + 0.5).astype(np.float32) if shift is not None and rng.random() < 0.5 else None
    bias = rng.standard_normal(n).astype(np.float32) if rng.random() < 0.5 else None
    if rng.random() < 0.05:
        zeros = zeros[:, :-1] if zeros.shape[1] > 1 else zeros[:0]
    valid = 1 <= bits <= 8 and x.shape[-1] == k and zeros.shape == (n, groups)  # a ragged last group is allowed
    feeds = {"x": x, "clip": clip, "shift": shift, "gain": gain, "B": packed, "zeros": zeros, "scales": scales, "bias": bias}
    outcome = run("IntLinear", feeds, (("y", F32),), bits=bits, group_size=group)
    return expect(valid, outcome, lambda out: _close(out[0], np_int_linear(x, codes, zeros, scales, bits, group, 0.9, shift,
                                                                        gain, bias), "IntLinear", exact=True))


def _attention_reference(feeds, h, kvh):
    import torch

    from baseq_export.models.base import attend

    b, _, t, hd = feeds["q"].shape
    past = feeds["past_k"].shape[2]
    k_all = np.concatenate([feeds["past_k"], feeds["k"]], axis=2)
    v_all = np.concatenate([feeds["past_v"], feeds["v"]], axis=2)
    s = past + t
    allowed = ((np.arange(s)[None, :] <= (past + np.arange(t))[:, None])[None, None]
               & (feeds["attention_mask"][:, None, None, :] != 0))
    mask = torch.from_numpy(np.where(allowed, 0.0, -1e9))
    rep = lambda a: torch.from_numpy(np.repeat(a, h // kvh, axis=1))  # noqa: E731
    out = attend(torch.from_numpy(feeds["q"]), rep(k_all), rep(v_all), mask, exact=True)
    return out.transpose(1, 2).reshape(b, t, h * hd).numpy(), k_all, v_all


def fuzz_attention(rng, poison, big):
    packed = rng.random() < 0.4
    kvh = int(rng.integers(1, 4))
    h = kvh * int(rng.integers(1, 4))
    b, t = int(rng.integers(1, 3)), int(rng.integers(1, 40 if big else 6))
    past, hd = int(rng.integers(0, 12)), int(rng.choice([8, 16, 32, 64]))
    feeds = attention_feeds(b, h, kvh, t, past, hd, packed, seed=int(rng.integers(1 << 30)),
                            pad=int(rng.integers(0, 2)) * int(rng.integers(0, past + t)))
    feeds.pop("ids")
    if poison:
        feeds["q"] = values(rng, feeds["q"].shape, True)
    mutation = int(rng.integers(0, 12))
    valid = True
    if mutation == 0:
        feeds["attention_mask"] = np.ones((b, past + t + 1), np.int64)
        valid = False
    elif mutation == 1 and h > 1:
        feeds["q"] = feeds["q"][:, :-1].copy()
        valid = (h - 1) % kvh == 0
    elif mutation == 2:
        feeds["past_v"] = feeds["past_v"][:, :, : max(0, past - 1)].copy()
        valid = past == 0
    elif mutation == 3:
        feeds["q"] = feeds["q"][0]
        valid = False
    names = ("q", "k", "v", "past_k", "past_v", "attention_mask") + (("k_clip", "v_clip") if packed else ())
    kv = U8 if packed else F32
    op = "AttentionKV4" if packed else "Attention"
    outcome = run(op, {n: feeds[n] for n in names}, (("y", F32), ("pk", kv), ("pv", kv)), window=0)

    def check(out):
        bq, hq, tq, _ = feeds["q"].shape
        if out[0].shape != (bq, tq, hq * hd):
            raise WrongResult(f"{op}: output shape {out[0].shape}")
        if not packed and not poison:
            ref, k_all, v_all = _attention_reference(feeds, hq, kvh)
            np.testing.assert_array_equal(out[1], k_all)
            np.testing.assert_array_equal(out[2], v_all)
            _close(out[0], ref, op, ulp=2)

    return expect(valid, outcome, check)


def fuzz_rope_attention(rng, poison, big):
    packed = rng.random() < 0.5
    kvh = int(rng.integers(1, 3))
    h = kvh * int(rng.integers(1, 3))
    hd = int(rng.choice([8, 16, 32, 12]))
    rotate = int(rng.integers(0, 2))
    b, t, past = int(rng.integers(1, 3)), int(rng.integers(1, 30 if big else 5)), int(rng.integers(0, 6))
    width = (h + 2 * kvh) * hd
    qkv = values(rng, (b, t, width if rng.random() < 0.9 else width + 2), poison)
    ct = t if rng.random() < 0.92 else t + 1
    ang = rng.random((ct, hd)).astype(np.float32)
    row = packed_kv_row_width(hd) if packed else hd
    past_k = (rng.integers(0, 16, (b, kvh, past, row)).astype(np.uint8) if packed
              else rng.standard_normal((b, kvh, past, hd)).astype(np.float32))
    if packed and past:  # plausible scale / zero bytes
        past_k[..., hd // 2:hd // 2 + 4] = np.float32(0.05).reshape(1).view(np.uint8)
        past_k[..., hd // 2 + 4:] = np.float32(7).reshape(1).view(np.uint8)
    feeds = {"qkv": qkv, "cos": np.cos(ang), "sin": np.sin(ang), "past_k": past_k, "past_v": past_k.copy(),
             "attention_mask": np.ones((b, past + t), np.int64)}
    if packed or rng.random() < 0.3:
        feeds["k_clip"] = np.ones(1, np.float32)
        feeds["v_clip"] = np.ones(1, np.float32)
    valid = qkv.shape[-1] == width and ct == t and (not rotate or hd & (hd - 1) == 0)
    kv = U8 if packed else F32
    op = "RopeAttentionKV4" if packed else "RopeAttention"
    outcome = run(op, feeds, (("y", F32), ("pk", kv), ("pv", kv)), heads=h, kv_heads=kvh, rotate=rotate)

    def check(out):
        if out[0].shape != (b, t, h * hd) or out[1].shape[:3] != (b, kvh, past + t):
            raise WrongResult(f"{op}: output shapes {out[0].shape}, {out[1].shape}")

    return expect(valid, outcome, check)


FUZZERS = {
    "Hadamard": fuzz_hadamard,
    "QuantDequant": lambda rng, p, b: fuzz_quantizer(rng, p, b, "QuantDequant"),
    "QuantLevels": lambda rng, p, b: fuzz_quantizer(rng, p, b, "QuantLevels"),
    "ScaleSums": fuzz_scale_sums,
    "RmsNorm": fuzz_rms_norm,
    "SwiGLU": fuzz_swiglu,
    "MaskedSoftmax": fuzz_masked_softmax,
    "KVQuantPack+KVUnpack": fuzz_kv,
    "IntLinear": fuzz_int_linear,
    "Attention+AttentionKV4": fuzz_attention,
    "RopeAttention+RopeAttentionKV4": fuzz_rope_attention,
}


def fuzz(cases: int, seed: int = 0) -> dict[str, collections.Counter]:
    """Run `cases` random cases; returns per-op counts of ok / refused; raises WrongResult naming the case."""
    ort.set_default_logger_severity(4)
    rng = np.random.default_rng(seed)
    counts: dict[str, collections.Counter] = {name: collections.Counter() for name in FUZZERS}
    names = list(FUZZERS)
    for i in range(cases):
        name = names[i % len(names)]
        poison, big = rng.random() < 0.15, rng.random() < 0.05
        state = rng.bit_generator.state
        try:
            counts[name][FUZZERS[name](rng, poison, big)] += 1
        except (WrongResult, AssertionError) as e:
            raise WrongResult(f"case {i} ({name}, poison={poison}, big={big}, rng state {state['state']}): {e}; "
                              f"last run: {_last[0]}") from e
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        counts = fuzz(args.cases, args.seed)
    except WrongResult as e:
        print(f"fuzz: WRONG RESULT: {e}", flush=True)
        return 1
    for name, c in counts.items():
        print(f"{name}: {c['ok']} ok, {c['refused']} refused", flush=True)
    print(f"fuzz: {sum(sum(c.values()) for c in counts.values())} cases ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
