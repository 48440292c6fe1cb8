"""Fuzz the files baseq-export reads, with hypothesis: each case mutates one file of a real tiny checkpoint, artifact
or export (JSON fields deleted, added, retyped, set out of range or to paths; or the file's bytes cut or replaced)
and opens it with the loader the CLI uses.

    python tests/fuzz_files.py --cases 10000 [--formats checkpoint-config,baseq-config,...] [--seed 0] [--json F]
        [--max-memory-gb 10]

The property: the loader returns, or raises what the CLI turns into a one-line refusal (ValueError,
FileNotFoundError, FileExistsError, OSError) with a message that names the file; and nothing is written anywhere
(every file under the parent of the format's directory has the same SHA-256 after the case). Anything else (a
TypeError, KeyError, IndexError, ... out of a loader, or a message that does not say which file) is a failure that
hypothesis shrinks and prints. Prints one line of counts per format; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_reliability import tree_state  # noqa: E402

REFUSALS = (ValueError, FileNotFoundError, FileExistsError, OSError)  # cli.main: exit 1, one line

NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "../outside.bin", "../../etc/passwd", "/etc/passwd", "model.onnx", "float", "int4", "llama",
                     "custom", "\x00", "F32", "I8", "nan"]),
    st.lists(st.integers(-3, 70), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(-2, 9), max_size=3))


def paths(doc, prefix: tuple = ()):
    """Every path into a JSON document (dict keys and list indices), the root first."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


def at(doc, path: tuple):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated_json(draw, doc) -> bytes:
    """The bytes of doc after 1-3 mutations (replace / delete / add at a random path), or, now and then, raw bytes:
    the text cut short, or random bytes."""
    raw = draw(st.integers(0, 15))
    text = json.dumps(doc).encode()
    if raw == 0:
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if raw == 1:
        return draw(st.binary(max_size=64))
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(doc))))
        kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:
            doc = draw(NASTY) if kind == "replace" else doc
            continue
        parent, key = at(doc, path[:-1]), path[-1]
        if kind == "replace":
            parent[key] = draw(NASTY)
        elif kind == "delete":
            del parent[key]
        else:
            target = at(doc, path)
            if isinstance(target, dict):
                target[draw(st.text(max_size=8))] = draw(NASTY)
            elif isinstance(target, list):
                target.append(draw(NASTY))
            else:
                parent[key] = [target, draw(NASTY)]
        if not isinstance(doc, (dict, list)):
            break
    return json.dumps(doc).encode()


@st.composite
def mutated_safetensors(draw, original: bytes) -> bytes:
    """A safetensors file whose JSON header (dtypes, shapes, offsets, metadata) is mutated as mutated_json does,
    with its length prefix rewritten to match, or now and then left stale."""
    n = int.from_bytes(original[:8], "little")
    header, body = json.loads(original[8 : 8 + n]), original[8 + n :]
    new = draw(mutated_json(header))
    prefix = len(new) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    return prefix.to_bytes(8, "little") + new + body


@st.composite
def mutated_bytes(draw, original: bytes, region: int) -> bytes:
    """original with 1-8 bytes of its first `region` bytes replaced, or cut short, or a span repeated."""
    data = bytearray(original)
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return bytes(data[: draw(st.integers(0, region))])
    for _ in range(draw(st.integers(1, 8))):
        at_ = draw(st.integers(0, region - 1))
        data[at_] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# The formats: (the file to mutate inside a built directory, the loader the CLI uses on that directory)


def build(root: Path) -> dict[str, Path]:
    """A tiny checkpoint, its artifact, its ONNX export (custom ops where they build) and a GGUF model file of it
    alone in a folder (what --model FILE.gguf reads), under root."""
    from baseq_export.cli import main
    from baseq_export.models import load_model
    from baseq_export.targets import gguf as G
    from test_cli import bpe_checkpoint, tiny_checkpoint

    ckpt, _ = tiny_checkpoint(root / "ckpt")
    art, onnx_dir = root / "t.baseq", root / "t.onnx"
    assert main(["quantize", "--model", str(ckpt), "--method", "rtn", "--bits", "w4a16", "--out", str(art)]) == 0
    assert main(["export", str(art), "--out", str(onnx_dir)]) == 0
    bpe, _ = bpe_checkpoint(root / "bpe")  # a GGUF vocabulary needs a byte-level BPE tokenizer
    (root / "gguf").mkdir()
    G.write_model(load_model(str(bpe)), root / "gguf" / "m.gguf", weights="f16", head="f16")
    return {"ckpt": ckpt, "art": art, "onnx": onnx_dir, "gguf": root / "gguf"}


def load_checkpoint(d: Path) -> None:
    """load_model as eval / quantize call it: config, tokenizer, the checks, then every weight read."""
    from baseq_export.models import load_model

    weights = load_model(str(d), lazy=True).weights
    weights.read_all()


def load_gguf(d: Path) -> None:
    from baseq_export.models import load_model

    load_model(str(d / "m.gguf"), lazy=True).weights.read_all()


def load_baseq(d: Path) -> None:
    from baseq_export.artifact import load_artifact
    from baseq_export.reference import reference_model

    reference_model(load_artifact(d, lazy=True))


def load_onnx(d: Path) -> None:
    from baseq_export.targets.onnx import OnnxModel

    OnnxModel(d)


def load_genai(d: Path) -> None:
    from baseq_export.targets.onnx.genai import GenaiBackend

    GenaiBackend(d)


FORMATS: dict[str, tuple[str, str, str, Callable[[Path], None]]] = {  # folder, file, how it is mutated, loader
    "checkpoint-config": ("ckpt", "config.json", "json", load_checkpoint),
    "safetensors-header": ("ckpt", "model.safetensors", "safetensors", load_checkpoint),
    "tokenizer-json": ("ckpt", "tokenizer.json", "json", load_checkpoint),
    "tokenizer-config": ("ckpt", "tokenizer_config.json", "json", load_checkpoint),
    "baseq-config": ("art", "config.json", "json", load_baseq),
    "onnx-manifest": ("onnx", "manifest.json", "json", load_onnx),
    "genai-config": ("onnx", "genai_config.json", "json", load_genai),
    "gguf-header": ("gguf", "m.gguf", "bytes", load_gguf),
}


def mutations(kind: str, original: bytes):
    """The hypothesis strategy of a format's mutated file."""
    if kind == "json":
        return mutated_json(json.loads(original))
    if kind == "safetensors":
        return mutated_safetensors(original)
    from baseq_export.gguf_file import read_header

    return mutated_bytes(original, read_header_size(original, read_header))


def read_header_size(original: bytes, read_header) -> int:
    """Bytes of a GGUF file before its tensor data (header, metadata, tensor infos): the region to mutate."""
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(original)
        f.flush()
        return min(t.offset for t in read_header(f.name).tensors)


def names_the_file(message: str, d: Path, file: str) -> bool:
    return str(d) in message or file in message


def fuzz(fmt: str, dirs: dict[str, Path], cases: int, seed: int, counts: Counter) -> None:
    """Run `cases` hypothesis cases of one format; raises (hypothesis prints the shrunk case) on a failure."""
    which, file, kind, load = FORMATS[fmt]
    d = dirs[which]
    f = d / file
    original = f.read_bytes()
    load(d)  # the unmutated file loads
    before = tree_state(d.parent)

    @settings(max_examples=cases, deadline=None, database=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(mutations(kind, original))
    def case(data: bytes) -> None:
        f.write_bytes(data)
        try:
            load(d)
            counts[(fmt, "loaded")] += 1
        except REFUSALS as e:
            assert names_the_file(str(e), d, file) or names_the_file(str(e), d, ""), \
                f"{type(e).__name__} does not name the file: {e}"
            counts[(fmt, "refused")] += 1
        finally:
            f.write_bytes(original)
        assert tree_state(d.parent) == before, "a file was written, changed or removed"

    case()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200, help="cases per format")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--seed", type=int, default=0, help="0: derandomized (the same cases every run)")
    ap.add_argument("--json", default=None, help="write the counts per format here (tools/results/fuzz-files.json)")
    ap.add_argument("--max-memory-gb", type=float, default=10.0,
                    help="address-space cap of this process (0: none): a case that allocates by a damaged size then "
                    "fails with MemoryError, which the property reports, instead of the kernel killing the run")
    args = ap.parse_args(argv)
    if args.max_memory_gb:
        cap = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    counts: Counter = Counter()
    results = {"cases_per_format": args.cases, "seed": args.seed, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build(Path(tmp))
        for fmt in args.formats.split(","):
            t0 = time.time()
            fuzz(fmt, dirs, args.cases, args.seed, counts)
            results["formats"][fmt] = {"cases": counts[(fmt, "loaded")] + counts[(fmt, "refused")],
                                       "loaded": counts[(fmt, "loaded")], "refused": counts[(fmt, "refused")],
                                       "seconds": round(time.time() - t0, 1)}
            print(f"{fmt}: {counts[(fmt, 'loaded')] + counts[(fmt, 'refused')]} cases, {counts[(fmt, 'loaded')]} "
                  f"loaded, {counts[(fmt, 'refused')]} refused naming the file, {time.time() - t0:.0f} s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"fuzz: {sum(counts.values())} cases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
