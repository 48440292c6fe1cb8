"""Microbenchmark of baseq.Attention / AttentionKV4 against the exporter's op chain (Concat of past and
new rows [+ KVQuantPack/KVUnpack], float64 MatMul, MaskedSoftmax, MatMul), the default model's layout
(9 heads, 3 KV heads, head_dim 64), 2 threads, medians; same process, same inputs.

    python runtime_ops/bench/bench_attention.py

Uses the graph builders of tests/test_kernels.py. On a shared machine the figures are indicative.
"""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_kernels as tk  # noqa: E402


def median_ms(fn, feeds, reps):
    fn(feeds)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main():
    cfg = SimpleNamespace(num_heads=9, num_kv_heads=3, head_dim=64, sliding_window=None)
    for packed in (False, True):
        for new, past, reps in [(1, 512, 30), (1, 1024, 20), (512, 0, 3)]:
            feeds = tk.attention_feeds(1, 9, 3, new, past, 64, packed)
            op = tk.attention_op(packed)
            chain = tk.attention_session(tk.attention_chain(cfg, packed), packed)
            a, c = median_ms(op, feeds, reps), median_ms(chain, feeds, reps)
            print(f"{'packed' if packed else 'float '} cache  new={new:4d} past={past:5d}:  op {a:8.3f} ms   "
                  f"chain {c:8.3f} ms   ({c / a:.2f}x)")


if __name__ == "__main__":
    main()
