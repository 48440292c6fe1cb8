import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from baseq_export import artifact, tensor_files
from baseq_export.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from baseq_export.quant import pack_int4, unpack_int4


def sample_artifact() -> Artifact:
    """A whole one-layer artifact (RTN, groups of 32) with tensors of several dtypes: float16, float64, uint8."""
    from baseq_export.gptq_model import quantize_model
    from baseq_export.models import from_hf_model
    from baseq_export.settings import QuantSettings
    from conftest import tiny_hf_model

    model = from_hf_model(tiny_hf_model("llama", dtype=torch.float32, num_hidden_layers=1, vocab_size=10))
    art = quantize_model(model, QuantSettings(method="rtn", bits="w4a16", group_size=32))
    gen = torch.Generator().manual_seed(0)
    tensors = dict(art.tensors)
    tensors["layers.0.q.bias"] = torch.randn(64, generator=gen)
    tensors["layers.0.o_in.shift"] = torch.randn(64, generator=gen, dtype=torch.float64)
    tensors["embed"] = tensors["embed"].half()
    return Artifact(model=art.model, quant=art.quant, tensors=tensors, source={"model": "test"},
                    calibration={"blocks": [{"loss": 0.5}]})


def test_round_trip_is_bit_exact(tmp_path):
    a = sample_artifact()
    assert a.path is None  # held in memory only
    path = save_artifact(tmp_path / "m.baseq", a, write_extra=lambda d: (d / "tokenizer.json").write_text("{}"))
    b = load_artifact(path)
    assert a.path == b.path == path  # where its tokenizer files are, for exporters given the loaded artifact
    assert b.model == a.model and b.quant == a.quant and b.source == a.source and b.calibration == a.calibration
    assert set(b.tensors) == set(a.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].dtype == t.dtype
        assert torch.equal(b.tensors[name], t), name
    assert (path / "tokenizer.json").is_file()
    assert torch.equal(unpack_int4(b.tensors["layers.0.q.qweight"], 64), unpack_int4(a.tensors["layers.0.q.qweight"], 64))
    assert not list(tmp_path.glob(".*tmp-*"))  # no temp dir left behind


def test_published_directory_has_the_umask_modes_not_mkdtemps_0700(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_pack_int4_layout_low_nibble_is_even_element():
    codes = torch.tensor([[1, 2, 3, 4, 15]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[1 | 2 << 4, 3 | 4 << 4, 15]]
    assert torch.equal(unpack_int4(packed, 5), codes)


def test_corrupted_tensor_file_is_rejected(tmp_path):
    path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    f = path / artifact.TENSORS
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="fails its checksum"):
        load_artifact(path)


@pytest.mark.parametrize("checksums", [None, {}, {artifact.TENSORS: 7}])
def test_a_config_without_the_tensor_files_checksum_is_refused_and_a_null_source_loads(tmp_path, checksums):
    """Found by tests/fuzz_files.py: "checksums": null raised AttributeError out of load_artifact."""
    path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    cfg_file = path / artifact.CONFIG
    good = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**good, "checksums": checksums}))
    with pytest.raises(ArtifactError, match="records no checksum") as e:
        load_artifact(path)
    assert str(cfg_file) in str(e.value)
    cfg_file.write_text(json.dumps({**good, "source": None}))
    assert load_artifact(path).source == {}


def test_truncated_tensor_file_is_rejected(tmp_path):
    path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    f = path / artifact.TENSORS
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupted or truncated"):
        load_artifact(path)


def test_wrong_version_and_foreign_directories_are_rejected(tmp_path):
    path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    cfg = json.loads((path / artifact.CONFIG).read_text())
    cfg["format_version"] = 99
    (path / artifact.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="format version 99.*reads version 1"):
        load_artifact(path)
    (path / artifact.CONFIG).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="not a directory"):
        load_artifact(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="has no config.json"):
        load_artifact(tmp_path / "plain")


def test_missing_tensor_is_named(tmp_path):
    path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    f = path / artifact.TENSORS
    tensors = load_file(str(f))
    del tensors["layers.0.q.zeros"]
    save_file(tensors, str(f))
    cfg = json.loads((path / artifact.CONFIG).read_text())
    cfg["checksums"][artifact.TENSORS] = tensor_files.sha256_file(f)  # a consistent but incomplete file
    (path / artifact.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="missing tensors.*layers.0.q.zeros"):
        load_artifact(path)


def test_existing_paths_are_never_clobbered(tmp_path):
    user_dir = tmp_path / "notes"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a baseq artifact; refusing"):
        save_artifact(user_dir, sample_artifact(), overwrite=True)
    assert (user_dir / "keep.txt").read_text() == "mine"

    path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    with pytest.raises(ArtifactError, match="already exists"):
        save_artifact(path, sample_artifact())
    newer = sample_artifact()
    newer.quant["group_size"] = 64
    save_artifact(path, newer, overwrite=True)
    assert load_artifact(path).quant["group_size"] == 64


def test_failed_write_leaves_old_artifact_intact(tmp_path):
    path = save_artifact(tmp_path / "m.baseq", sample_artifact())
    before = (path / artifact.TENSORS).read_bytes()

    def boom(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_artifact(path, sample_artifact(), overwrite=True, write_extra=boom)
    assert (path / artifact.TENSORS).read_bytes() == before
    assert not list(tmp_path.glob(".*tmp-*"))


def test_streamed_safetensors_file_is_what_safetensors_reads(tmp_path):
    """save_tensors (one tensor in memory at a time) writes a file that safetensors' own reader loads to the
    same tensors, for every dtype an artifact or a checkpoint uses, scalars and empty tensors included; the
    returned digest is the file's."""
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "f64": torch.randn(3, 5, generator=gen, dtype=torch.float64), "f32": torch.randn(7, generator=gen),
        "f16": torch.randn(2, 3, generator=gen).half(), "bf16": torch.randn(4, 4, generator=gen).bfloat16(),
        "u8": torch.randint(0, 256, (9,), generator=gen, dtype=torch.uint8), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "i32": torch.tensor([[1, -2]], dtype=torch.int32), "i64": torch.tensor(5), "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4), "strided": torch.arange(12.0).reshape(3, 4).T,
    }
    digest = tensor_files.save_tensors(tensors, tmp_path / "a.safetensors")
    assert digest == tensor_files.sha256_file(tmp_path / "a.safetensors")
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_tensor_store_spools_to_disk_and_reads_back(tmp_path):
    """A TensorStore with a spool keeps only names in memory: each put goes to its own file; reading, metadata,
    overriding and deleting behave as a dict of the same tensors; without a spool it is a dict."""
    gen = torch.Generator().manual_seed(2)
    a = {"x.weight": torch.randn(4, 8, generator=gen), "x.codes": torch.randint(0, 16, (4, 4), generator=gen, dtype=torch.uint8)}
    b = {"y": torch.randn(3, generator=gen).half()}
    spooled, memory = tensor_files.TensorStore(tmp_path / "spool"), tensor_files.TensorStore()
    for store in (spooled, memory):
        store.put(a, "block_0.safetensors")
        store.put(b, "outside.safetensors")
    assert sorted((tmp_path / "spool").iterdir()) == [tmp_path / "spool" / "block_0.safetensors", tmp_path / "spool" / "outside.safetensors"]
    assert not spooled._memory and set(spooled) == set(memory) == {"x.weight", "x.codes", "y"} and len(spooled) == 3
    for k, t in {**a, **b}.items():
        assert torch.equal(spooled[k], t) and torch.equal(memory[k], t)
        assert spooled.meta(k) == memory.meta(k) == (tensor_files.SAFETENSORS_DTYPES[t.dtype], list(t.shape))
    spooled["y"] = torch.ones(2)
    del spooled["x.codes"]
    assert torch.equal(spooled["y"], torch.ones(2)) and "x.codes" not in spooled and set(spooled) == {"x.weight", "y"}
    with pytest.raises(KeyError):
        spooled["x.codes"]


def test_lazy_and_eager_loads_agree_and_both_check_the_index(tmp_path):
    """load_artifact(lazy=True) reads tensors from the file when asked, equal to the eager load; a tensor whose
    header disagrees with config.json is refused either way."""
    a = sample_artifact()
    path = save_artifact(tmp_path / "m.baseq", a)
    lazy, eager = load_artifact(path, lazy=True), load_artifact(path)
    assert isinstance(lazy.tensors, tensor_files.TensorStore) and isinstance(eager.tensors, dict)
    assert set(lazy.tensors) == set(eager.tensors) == set(a.tensors)
    assert all(torch.equal(lazy.tensors[k], a.tensors[k]) and torch.equal(eager.tensors[k], a.tensors[k]) for k in a.tensors)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tensors"]["layers.0.o_in.shift"]["shape"] = [65]
    (path / "config.json").write_text(json.dumps(cfg))
    for lazy_load in (True, False):
        with pytest.raises(ArtifactError, match="tensor layers.0.o_in.shift is float64 \\[64\\], config.json says float64 \\[65\\]"):
            load_artifact(path, lazy=lazy_load)
    cfg["tensors"]["layers.0.o_in.shift"]["shape"] = [64]
    cfg["tensors"]["embed"]["shape"] = [11, 64]  # the index against the model's dimensions: refused before reading
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="tensors.embed\" has shape \\[11, 64\\], but the model's dimensions give \\[10, 64\\]"):
        load_artifact(path)


def test_a_signal_inside_a_safetensors_call_is_held_until_it_returns():
    """Ctrl-C during signals_held: the block runs to its end, then KeyboardInterrupt is raised (not swallowed)."""
    import os
    import signal

    from baseq_export.tensor_files import signals_held

    finished = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored where pytest runs as a background job
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                finished.append(True)
        assert finished == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
