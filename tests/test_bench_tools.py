"""The benchmarks' shared bookkeeping: atomic result files and bench_baseq's summaries over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_baseq import closure_spread, gap_closure, markdown_table, perplexity_spread  # noqa: E402
from benchutil import write_json  # noqa: E402


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    """The old file stays whole when the write fails half-way; a good write replaces it and leaves nothing beside it."""
    out = tmp_path / "bench.json"
    write_json(out, {"rows": {"a": 1}})
    assert json.loads(out.read_text()) == {"rows": {"a": 1}}

    real_write_text = Path.write_text

    def interrupted_write(self, text, *a, **k):  # half the text reaches the disk, then the run is interrupted
        real_write_text(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        write_json(out, {"rows": {"a": 1, "b": 2}})
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"rows": {"a": 1}}
    write_json(out, {"rows": {"a": 1, "b": 2}}, indent=2)
    assert json.loads(out.read_text()) == {"rows": {"a": 1, "b": 2}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_perplexity_spread_groups_a_rows_seeds_and_matches_numpy():
    """Rows "NAME BITS, seed S" are grouped over S per text; mean, sample std, min and max agree with numpy; a row
    without seeds (FP32) is its own group of one with std 0; gap closure is the share of the baseline's gap closed."""
    rng = np.random.default_rng(0)
    vals = {s: {"embedded": float(rng.uniform(18, 22)), "GPL-3": float(rng.uniform(30, 40))} for s in range(3)}
    rows = {"FP32": {"ppl": {"embedded": 13.5, "GPL-3": 23.0}}}
    rows.update({f"BASE-Q quick, no LAC w4a4kv4, seed {s}": {"ppl": v} for s, v in vals.items()})
    got = perplexity_spread(rows)
    assert set(got) == {"FP32", "BASE-Q quick, no LAC w4a4kv4"}
    for text in ("embedded", "GPL-3"):
        x = np.array([vals[s][text] for s in range(3)])
        g = got["BASE-Q quick, no LAC w4a4kv4"][text]
        assert g["n"] == 3 and g["mean"] == pytest.approx(x.mean(), abs=1e-4)
        assert g["std"] == pytest.approx(x.std(ddof=1), abs=1e-4)
        assert (g["min"], g["max"]) == (round(x.min(), 4), round(x.max(), 4))
    assert got["FP32"]["embedded"] == {"mean": 13.5, "std": 0.0, "min": 13.5, "max": 13.5, "n": 1}
    assert closure_spread(rows) == {}  # no row carries a gap closure
    for s, c in enumerate([0.41, 0.47, 0.38]):
        rows[f"BASE-Q quick, no LAC w4a4kv4, seed {s}"]["gap_closure_vs_quarot_gptq"] = {"embedded": c}
    c = closure_spread(rows)["BASE-Q quick, no LAC w4a4kv4"]["embedded"]
    assert set(closure_spread(rows)) == {"BASE-Q quick, no LAC w4a4kv4"} and c["n"] == 3
    assert (c["mean"], c["std"]) == (round(np.mean([0.41, 0.47, 0.38]), 4), round(np.std([0.41, 0.47, 0.38], ddof=1), 4))
    assert gap_closure(24.0, 19.0, 14.0) == pytest.approx(0.5)


def test_markdown_table_reports_each_groups_seeds():
    """One line per row group: its seed count, perplexity mean +- sample std, gap closure mean +- std [min, max] and
    the median quantize time, computed from the rows (numpy here)."""
    closures = [0.41, 0.47, 0.38]
    rows = {"FP32": {"quantize_s": None, "ppl": {"embedded": 13.5}}}
    for s, (ppl, c, t) in enumerate(zip([19.5, 19.3, 19.9], closures, [224.0, 230.0, 5000.0])):
        rows[f"BASE-Q quick w4a4kv4, seed {s}"] = {"quantize_s": t, "ppl": {"embedded": ppl},
                                                   "gap_closure_vs_quarot_gptq": {"embedded": c}}
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| FP32 | 1 | 13.50 |")
    x, c = np.array([19.5, 19.3, 19.9]), np.array(closures)
    assert lines[3] == (f"| BASE-Q quick w4a4kv4 | 3 | {x.mean():.2f} +- {x.std(ddof=1):.2f} | "
                        f"{c.mean():.3f} +- {c.std(ddof=1):.3f} [{c.min():.3f}, {c.max():.3f}] | 230 |")
