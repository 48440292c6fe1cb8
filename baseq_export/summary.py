"""The main job's closing summary: one table (FP, torch reference, export: perplexity, KL divergence from FP, top-1
agreement, size, decode speed) and the FP model's and the export's answers to one chat prompt, side by side."""

from __future__ import annotations

import itertools
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One line of the summary table (None: not measured for this row)."""

    name: str
    ppl: float
    kld_mean: float | None
    top1: float | None
    size_bytes: int | None
    decode_tok_s: float | None = None


def path_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def decode_speed(backend, prompt_ids: list[int], new_tokens: int = 64, warmup: int = 8) -> float | None:
    """Greedy tokens per second of a runner after prompt_ids, timed from the warmup-th new token on (the first
    steps pay for allocation and caches); None when the context ends before two tokens are timed."""
    stamps = [time.perf_counter() for _ in itertools.islice(backend.greedy(prompt_ids, warmup + new_tokens),
                                                            warmup + new_tokens)]
    timed = stamps[warmup - 1:]
    return (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 2 else None


def table(rows: list[Row], ctx: int, windows: int) -> str:
    """The rows as an aligned text table."""
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ["", f"perplexity ({windows} x {ctx})", "mean KLD", "top-1 agreement", "size", "decode tok/s"]
    body = [[r.name, cell(r.ppl, ".4f"), cell(r.kld_mean, ".5f"), "-" if r.top1 is None else f"{100 * r.top1:.2f}%",
             "-" if r.size_bytes is None else f"{r.size_bytes / 1e6:.1f} MB", cell(r.decode_tok_s, ".1f")]
            for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head)] + [line(b) for b in body])


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 56) -> str:
    """Two texts in columns of `width` characters (their own line breaks kept, long lines wrapped)."""
    def lines(title: str, text: str) -> list[str]:
        out = [title, "-" * min(width, len(title))]
        for raw in text.splitlines() or [""]:
            out += textwrap.wrap(raw, width, replace_whitespace=False, drop_whitespace=False) or [""]
        return out

    a, b = lines(left_title, left), lines(right_title, right)
    return "\n".join(f"{x:<{width}}   {y}".rstrip() for x, y in itertools.zip_longest(a, b, fillvalue=""))
