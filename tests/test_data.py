import pytest
import torch

from baseq_export import data


def test_split_is_disjoint_complete_and_deterministic():
    calib, evals = data.split_topics("calib"), data.split_topics("eval")
    assert set(calib).isdisjoint(evals)
    assert set(calib) | set(evals) == set(data.embedded_topics())
    assert 0.1 < len(evals) / (len(calib) + len(evals)) < 0.45
    assert data.split_topics("eval") == evals
    assert data.embedded_text("eval") == data.embedded_text("eval")
    # no evaluation paragraph appears in the calibration text (topics share paragraphs)
    calib_paras = set(data.paragraphs(data.embedded_text("calib")))
    eval_paras = data.paragraphs(data.embedded_text("eval"))
    assert len(eval_paras) > 100 and calib_paras.isdisjoint(eval_paras)
    assert len(set(eval_paras)) == len(eval_paras)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split must be one of"):
        data.split_topics("train")


def test_token_windows_are_non_overlapping_prefix():
    tokens = torch.arange(103)
    w = data.token_windows(tokens, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w.flatten(), tokens[:100])
    assert data.token_windows(tokens, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="fewer than one window"):
        data.token_windows(tokens[:5], 10)


def test_calibration_windows_are_seeded_slices():
    tokens = torch.arange(1000)
    a = data.calibration_windows(tokens, 8, 32, seed=5)
    assert torch.equal(a, data.calibration_windows(tokens, 8, 32, seed=5))
    assert not torch.equal(a, data.calibration_windows(tokens, 8, 32, seed=6))
    for row in a:  # each window is a contiguous slice of the stream
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 32))


def test_user_text_files(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("hello world", encoding="utf-8")
    assert data.corpus_text("eval", good) == "hello world"
    assert data.corpus_text("eval", None) == data.embedded_text("eval")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.read_text_file(empty)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.read_text_file(binary)


def test_several_calibration_files_are_joined_in_order(tmp_path):
    from baseq_export.cli import build_parser, check_text_files

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first file\n")
    b.write_text("second file\n")
    assert data.corpus_text("calib", [a, b]) == "first file\n\n\nsecond file\n"
    assert data.corpus_text("calib", []) == data.embedded_text("calib")
    args = build_parser().parse_args(["quantize", "--calib-text", str(a), str(b), "--out", str(tmp_path / "o")])
    assert args.calib_text == [str(a), str(b)]
    check_text_files(args)
    args.calib_text.append(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        check_text_files(args)
