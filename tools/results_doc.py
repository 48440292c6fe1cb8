"""Write the measured tables of docs/results.md and README.md from tools/results/*.json, so figures cannot drift.

    python tools/results_doc.py            # rewrite every generated block in place
    python tools/results_doc.py --check    # exit 1 (and name the files) when a committed file differs

A generated block lies between `<!-- generated:NAME -->` and `<!-- end:NAME -->` on lines of their own; the text
around it is written by hand and kept. NAME is a key of SECTIONS, a function that reads its JSON and returns markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

from bench_baseq import closure_spread, format_spread, gap_closure, markdown_table, seed_groups

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
DOCS = (REPO / "README.md", REPO / "docs" / "results.md")
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end:(?P=name) -->)", re.S)


def load(name: str) -> dict:
    """One results file of tools/results/."""
    return json.loads((RESULTS / name).read_text())


def machine(data: dict) -> str:
    """The line that names where a table was measured, from the file's own `machine` record."""
    m = data["machine"]
    return (f"Measured on: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), Python {m['python']}, "
            f"torch {m['torch']} (raw output `tools/results/{data['_file']}`).")


def with_name(name: str) -> dict:
    """load() that also remembers the file's name for machine()."""
    return {**load(name), "_file": name}


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def num(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def seconds(x: float | None) -> str:
    return "" if x is None else f"{x:.0f} s"


def quarot() -> str:
    """QuaRot baselines: perplexity and quantize time per configuration."""
    d = with_name("bench-quarot.json")
    rows = [[r["name"], num(r["ppl"]), seconds(r["quantize_s"])] for r in d["rows"]]
    return table(["configuration", "perplexity", "quantize time"], rows) + "\n\n" + machine(d)


def baseq(name: str = "bench-baseq-seeds3.json") -> str:
    """BASE-Q over 3 seeds and two texts (bench_baseq's own table) and each seed's gap closure."""
    d = with_name(name)
    rows = d["rows"]
    per_seed = []
    for group, rs in seed_groups(rows).items():
        if group in closure_spread(rows):
            cells = [" / ".join(f"{c:.3f}" for c in r["gap_closure_vs_quarot_gptq"].values()) for r in rs]
            per_seed.append([group] + cells)
    texts = " / ".join(next(iter(rows.values()))["ppl"])
    seeds = [f"seed {s}: {texts}" for s in range(d["seeds"])]
    return (markdown_table(rows) + "\n\nGap closure per seed:\n\n" + table(["configuration"] + seeds, per_seed)
            + "\n\n" + machine(d))


def w4a8kv8() -> str:
    """One seed at W4A8KV8: perplexity per text and gap closure against QuaRot-GPTQ."""
    d = with_name("baseq-w4a8kv8-seed0.json")
    texts = list(d["fp32"])
    base = next(r for k, r in d["rows"].items() if k.startswith("QuaRot-GPTQ"))["ppl"]
    out = [["FP32"] + [num(d["fp32"][t]) for t in texts] + [""]]
    for name, r in d["rows"].items():
        closure = "" if name.startswith("QuaRot-RTN") else " / ".join(
            f"{gap_closure(base[t], r['ppl'][t], d['fp32'][t]):.2f}" for t in texts)
        out.append([name] + [num(r["ppl"][t]) for t in texts] + [closure])
    head = ["configuration"] + [f"perplexity, {t}" for t in texts] + [f"gap closure vs QuaRot-GPTQ, {' / '.join(texts)}"]
    return table(head, out) + "\n\n" + machine(d)


def error_budget() -> str:
    """The main job's artifact with one kind of quantizer left out at a time."""
    d = with_name("error-budget-main-job.json")
    rows = [[name, num(r["ppl"]), f"{r['share_of_gap']:.2f}"] for name, r in d["rows"].items()]
    return (table(["run in float (rounding left out)", "perplexity", "share of the gap to FP"], rows)
            + f"\n\n{d['windows']} windows of the embedded split. " + machine(d))


def onnx_parity() -> str:
    """Each artifact in torch and in onnxruntime (custom and standard ops), perplexity and greedy tokens."""
    d = with_name("onnx-parity.json")
    rows = []
    for r in d["rows"]:
        c, s = r["custom"], r["standard"]
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        rows.append([f"{r['method']} {r['bits']} (`{Path(r['artifact']).name}`)", f"{r['torch']['ppl']:.4f}",
                     f"{c['ppl']:.4f} ({c['rel_diff']:+.0e})", f"{s['ppl']:.4f} ({s['rel_diff']:+.0e})",
                     f"{yes(c['tokens_equal_torch'])} / {yes(s['tokens_equal_torch'])}",
                     f"{yes(c['genai_tokens_equal'])} / {yes(s['genai_tokens_equal'])}"])
    head = ["artifact", "torch", "onnxruntime, custom ops (relative)", "onnxruntime, standard ops (relative)",
            f"{len(d['rows'][0]['torch']['tokens'])} greedy tokens = torch (custom / standard)",
            "genai = onnxruntime (custom / standard)"]
    return table(head, rows) + "\n\n" + machine(d)


def onnx_speed() -> str:
    """Our ONNX exports against onnxruntime-genai's builder: size, KV bytes, decode and prefill speed, perplexity."""
    d = with_name("bench-onnx.json")
    rows = []
    for r in d["rows"]:
        def speed(key: str) -> str:
            ours = f" / {r['ort_' + key]:.1f}" if "ort_" + key in r else ""
            return f"{r['genai_' + key]:.1f} ({r['genai_' + key + '_vs_genai_int4']:.2f}x){ours}"
        rows.append([r["label"], mb(r["bytes"]), str(r.get("graph_nodes", "")), f"{r['kv_bytes_per_token']:,}",
                     speed("decode_tok_s_short"), speed("decode_tok_s_1024"), speed("prefill_tok_s_512"), num(r["ppl"])])
    head = ["export", "size", "graph nodes", "KV bytes/token", "decode tok/s, short prompt: genai (vs genai int4) / our runner",
            "decode tok/s at 1024 context", "prefill 512, tok/s", f"perplexity ({d['windows']} windows)"]
    return (table(head, rows) + f"\n\n{d['threads']} threads, medians of {d['repeats']} rounds, {d['new_tokens']} greedy "
            f"tokens a decode. " + machine(d))


def onnx_offgrid() -> str:
    """Accuracy of the same exports on the off-grid copy of the default model."""
    d = with_name("bench-onnx-offgrid.json")
    rows = [[r["label"], mb(r["bytes"]), num(r["ppl"])] for r in d["rows"]]
    return table(["export", "size", f"perplexity ({d['windows']} windows)"], rows) + "\n\n" + machine(d)


def gguf(name: str) -> Callable[[], str]:
    """A bench_gguf.py table: perplexity in llama.cpp, file size, bits per weight, decode speed, quantize time."""
    def section() -> str:
        d = with_name(name)
        rows = [[r["name"], num(r["ppl"]), mb(r["bytes"]), num(r["bpw"]), num(r["decode_tok_s"], 1), seconds(r["quantize_s"])]
                for r in d["rows"]]
        head = ["GGUF", f"perplexity ({d['eval_windows']} x {d['ctx']})", "file", "bits/weight", "decode tok/s", "quantize"]
        return (table(head, rows) + f"\n\n{d['threads']} threads, {d['decode_new_tokens']} greedy tokens, median of "
                f"{d.get('decode_rounds', d['repeats'])} round(s). " + machine(d))
    return section


def gguf_mix() -> str:
    """bench_gguf_mix.py: each of our mixes beside llama.cpp's own file of that type (with an importance matrix),
    perplexity on llama.cpp-tokenized text, size and decode speed ratios."""
    d = with_name("bench-gguf-mix.json")
    by = {r["key"]: r for r in d["rows"]}
    texts = [t for t in ("eval", "GPL-3") if t in d["rows"][0]]
    head = ["GGUF", "file"] + [f"perplexity, {t} ({d['rows'][0][t]['windows']} x {d['ctx']})" for t in texts]
    head += ["decode tok/s", "bytes over llama.cpp's", "decode ratio (paired)"]
    rows = []
    for key, r in by.items():
        mix = d.get("main_job_mix", "q4_k_m") if key == "main-job" else key.removeprefix("ours-").split("-")[0]
        peer = by.get(f"llama-{mix}") if key.startswith("ours-") or key == "main-job" else None
        name = {"f32": "F32", "main-job": f"main job (`--format gguf`, {mix.upper()})"}.get(
            key, key.replace("llama-", "llama.cpp ").replace("ours-", "ours ").upper()
            .replace("LLAMA.CPP", "llama.cpp").replace("OURS", "ours").replace("-SENSITIVITY", ", sensitivity choice"))
        paired = r.get("decode_ratio_paired")
        ratio = ([f"{r['bytes'] - peer['bytes']:+d}", num(paired, 3) if paired else
                  f"{r['decode_tok_s'] / peer['decode_tok_s']:.3f} (medians)"] if peer else ["", ""])
        rows.append([name, mb(r["bytes"])] + [num(r[t]["ppl"], 3) for t in texts]
                    + [num(r.get("decode_tok_s"), 1)] + ratio)
    return (table(head, rows) + f"\n\nCalibration: {d['nsamples']} windows of {d['calib_ctx']} tokens of "
            f"{d['calib_text']} (llama.cpp's importance matrix from the same windows). " + machine(d))


def kld() -> str:
    """bench_kld.py: every 4-bit file against the FP model in its own runtime, on two texts: perplexity, KL
    divergence per token (mean, 99th percentile) and top-1 agreement, with the file's size."""
    d = with_name("bench-kld.json")
    texts = list(d["texts"])
    head = ["file, runtime", "size"]
    for t in texts:
        w = d["texts"][t]
        head += [f"{t}: ppl (FP {w['fp_ppl']:.3f})", f"{t}: KLD mean", f"{t}: KLD p99", f"{t}: top-1"]
    rows = []
    for r in d["rows"]:
        cells = [r["label"], mb(r["bytes"])]
        for t in texts:
            x = r[t]
            cells += [num(x["ppl"], 3), num(x["kld_mean"], 4), num(x["kld_p99"], 3), f"{100 * x['top1']:.1f}%"]
        rows.append(cells)
    windows = ", ".join(f"{t} {w['windows']} x {d['ctx']} tokens" for t, w in d["texts"].items())
    return table(head, rows) + f"\n\nWindows: {windows}. " + machine(d)


def scale() -> str:
    """Peak memory and time of each stage on Llama-2-7B-shaped checkpoints of 2, 4 and 8 layers."""
    d = with_name("bench-scale.json")
    layers = sorted(d["checkpoints"], key=int)
    head = ["stage"] + [f"{n} layers (checkpoint {d['checkpoints'][n]['bytes'] / 2**30:.2f} GiB)" for n in layers]
    head += [f"peak growth {layers[0]} -> {layers[-1]}", f"output at {layers[-1]} layers"]
    rows = []
    for stage, runs in d["stages"].items():
        cells = [f"{runs[n]['peak_rss_mib']:.0f} MiB, {runs[n]['seconds']:.0f} s" for n in layers]
        rows.append([f"`{stage}`"] + cells + [f"{d['growth'][stage]['growth']:+.1%}",
                                              f"{runs[layers[-1]]['output_bytes'] / 2**30:.2f} GiB"])
    return table(head, rows) + "\n\n" + machine(d)


def extrapolation() -> str:
    """Hours per stage for Llama-3-8B and 70B from the measured time per block (bench_scale.extrapolate)."""
    d = with_name("bench-scale.json")
    models = [k for k in next(iter(d["extrapolation"].values())) if k.startswith("Llama")]
    def secs(x: float) -> str:
        return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"
    rows = [[f"`{stage}`", secs(e["seconds_per_block"])]
            + [f"{e[m]['hours']:.2f} h ({secs(e[m]['seconds_per_block'])} a block)" for m in models]
            for stage, e in d["extrapolation"].items()]
    return table(["stage", "measured s a block (7B dims)"] + models, rows) + "\n\n" + machine(d)


def headline() -> str:
    """The README's one table: what each shipped file costs and scores, beside the runtimes' own quantizers."""
    onnx = with_name("bench-onnx.json")
    by = {r["label"]: r for r in onnx["rows"]}
    gm = {r["key"]: r for r in load("bench-gguf-mix.json")["rows"]}
    rows = []
    for label, what in (("ours quick-w4a4kv4", "ONNX W4A4KV4, `baseq-export --format onnx`"),
                        ("ours w4a16-g64", "ONNX W4A16, `quantize --profile onnx-w4a16`"),
                        ("genai builder int4", "onnxruntime-genai builder int4 (peer)")):
        r = by[label]
        rows.append([what, mb(r["bytes"]), num(r["ppl"]), f"{r['genai_decode_tok_s_short']:.0f} (genai)", "Xeon, default model"])
    for key, what in (("main-job", "GGUF Q4_K_M, `baseq-export --format gguf`"),
                      ("llama-q4_k_m", "llama.cpp Q4_K_M + imatrix (peer)"),
                      ("llama-q4_0", "llama.cpp Q4_0 + imatrix (peer)")):
        r = gm[key]
        rows.append([what, mb(r["bytes"]), num(r["eval"]["ppl"]), f"{r['decode_tok_s']:.0f} (llama.cpp)",
                     "EPYC, off-grid copy"])
    cl = closure_spread(load("bench-baseq-seeds3.json")["rows"])
    quick, std = cl["BASE-Q quick + learned R1 w4a4kv4"], cl["BASE-Q standard + learned R1 + end-to-end w4a4kv4"]
    main = closure_spread(load("bench-baseq-main-job.json")["rows"])
    main = main["BASE-Q main job (quick preset as shipped, 4-bit head) w4a4kv4"]
    return (table(["file", "size", "perplexity (38 x 512)", "decode tok/s, 2 threads", "machine, model"], rows)
            + "\n\nBASE-Q W4A4KV4 closes this share of QuaRot-GPTQ's perplexity gap to FP (3 seeds, embedded / GPL-3 "
            f"text): the main job (quick preset with its end-to-end pass, 4-bit head) "
            f"{format_spread(main['embedded'], 3, False)} / {format_spread(main['GPL-3'], 3, False)}, "
            f"quick preset without its end-to-end pass {format_spread(quick['embedded'], 3, False)} / "
            f"{format_spread(quick['GPL-3'], 3, False)}, standard preset {format_spread(std['embedded'], 3, False)} / "
            f"{format_spread(std['GPL-3'], 3, False)}.")


PROFILES = {"before (d1a33ab)": "profile-calibration-d1a33ab.json",
            "after (clip search, reused block output)": "profile-calibration-reused-output.json"}
"""The calibration profiles side by side (tools/profile_calibration.py): column label -> results file."""


def calibration_profile(profiles: dict[str, str] = PROFILES, per_block: bool = False) -> str:
    """Seconds per calibration stage of the main job's BASE-Q quick run, before and after the speedups (per_block:
    with the seconds a block and the peak RSS of each run)."""
    from profile_calibration import markdown_table as stage_table, per_block_seconds

    runs = {label: with_name(name) for label, name in profiles.items()}
    first = next(iter(runs.values()))
    extra = ""
    if per_block:
        before, after = (per_block_seconds(r) for r in runs.values())
        peaks = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in runs.values())
        extra = (f"Per block (the stages run once a block, over {first['settings']['layers']} blocks): **{before:.1f} s "
                 f"before, {after:.1f} s after ({after / before:.2f}x)**. Peak RSS of the profiling process before / "
                 f"after: {peaks} MiB.\n\n")
    return (stage_table(runs) + "\n\n" + extra + machine(first) + " Also "
            + ", ".join(f"`tools/results/{n}`" for n in list(profiles.values())[1:]) + ".")


PROFILES_7B = {"before (d1a33ab)": "profile-calibration-7b-d1a33ab.json",
               "after": "profile-calibration-7b.json"}
"""The same profile at Llama-2-7B dimensions (bench_scale's 2-layer checkpoint, --nsamples 8 --calib-ctx 128)."""

SECTIONS: dict[str, Callable[[], str]] = {
    "headline": headline, "quarot": quarot, "baseq": baseq, "w4a8kv8": w4a8kv8, "error-budget": error_budget,
    "onnx-parity": onnx_parity, "onnx-speed": onnx_speed, "onnx-offgrid": onnx_offgrid,
    "gguf-offgrid": gguf("bench-gguf-offgrid.json"), "gguf-offgrid-tuned": gguf("bench-gguf-offgrid-tuned.json"),
    "gguf-default": gguf("bench-gguf-default.json"), "gguf-default-tuned": gguf("bench-gguf-default-tuned.json"),
    "gguf-mix": gguf_mix, "kld": kld, "scale": scale, "extrapolation": extrapolation,
    "main-job-closure": lambda: baseq("bench-baseq-main-job.json"), "calibration-profile": calibration_profile, "calibration-profile-7b": lambda: calibration_profile(PROFILES_7B, per_block=True),
}


def render(text: str) -> str:
    """The text with every generated block rewritten from the JSON (an unknown NAME raises KeyError)."""
    return BLOCK.sub(lambda m: m.group(1) + SECTIONS[m.group("name")]() + "\n" + m.group(4), text)


def block_names(text: str) -> list[str]:
    """The NAMEs of the generated blocks in a text, in order."""
    return [m.group("name") for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file differs from the JSON")
    args = ap.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    verb = "differ from tools/results/*.json" if args.check else "rewritten"
    for path in stale:
        print(f"{path.relative_to(REPO)}: {verb}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
