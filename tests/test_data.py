"""DATA section: shard format and its errors, the training loader, validation tokens, tokenizer checks."""
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tg

sys.path.insert(0, str(ROOT / "data"))
import shard_io  # noqa: E402  (the data tools' own writer: an independent implementation)


def test_shard_round_trip_between_trainer_and_data_tools(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65535, size=5000)
    tg.write_shard(tmp_path / "a.bin", tokens)
    shard_io.write_shard(tmp_path / "b.bin", tokens)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    header = np.fromfile(tmp_path / "a.bin", dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 5000] and not header[3:].any()
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * 5000
    np.testing.assert_array_equal(tg.read_shard(tmp_path / "b.bin"), tokens)
    np.testing.assert_array_equal(tg.read_shard(tmp_path / "b.bin", mmap=False), tokens)


def _corrupt(path, kind):
    data = bytearray(path.read_bytes())
    if kind == "magic":
        data[0:4] = np.array([1234], dtype="<i4").tobytes()
    elif kind == "version":
        data[4:8] = np.array([2], dtype="<i4").tobytes()
    elif kind == "truncated":
        data = data[:-2]
    elif kind == "short_header":
        data = data[:100]
    elif kind == "count":
        data[8:12] = np.array([999999], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind,message", [
    ("magic", "magic 1234, expected 20240520"),
    ("version", "version 2, expected 1"),
    ("truncated", "truncated or corrupt"),
    ("short_header", "shorter than its 1024-byte header"),
    ("count", "promises 999999 tokens"),
])
def test_each_corrupt_shard_error_names_the_file_and_the_fix(tmp_path, kind, message):
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(path, np.arange(100))
    _corrupt(path, kind)
    with pytest.raises(tg.UserError) as err:
        tg.read_shard(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "re-download" in str(err.value) and "\n" not in str(err.value)


def test_missing_shards_and_missing_split(tmp_path):
    with pytest.raises(tg.UserError, match="does not exist"):
        tg.read_shard(tmp_path / "nope.bin")
    with pytest.raises(tg.UserError, match=r"no fineweb_train_\*\.bin shards in DATA_PATH"):
        tg.shard_files(str(tmp_path), "train")


def _loader(files, seed, rank=0, world=1, accum=8, seq_len=16, global_seqs=16):
    return tg.TrainLoader(files, seq_len, global_seqs, seed, rank, world, accum)


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(1)
    files = []
    for i, n in enumerate((3000, 2100, 900)):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        tg.write_shard(path, rng.integers(0, 1000, size=n))
        files.append(str(path))
    return files


def test_loader_is_deterministic_per_seed_and_differs_across_seeds(shards):
    a, b, c = _loader(shards, 7), _loader(shards, 7), _loader(shards, 8)
    for _ in range(30):  # crosses several epochs
        sa, sb, sc = a.next_step(), b.next_step(), c.next_step()
        assert all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert not all(torch.equal(x, y) for x, y in zip(sa, sc))


def test_loader_windows_are_real_consecutive_shard_tokens(shards):
    loader = _loader(shards, 3)
    texts = [tg.read_shard(f) for f in shards]
    for batch in loader.next_step():
        assert batch.shape == (2, 17) and batch.dtype == torch.int64
        for row in batch.numpy():
            assert any(_contains(t, row) for t in texts)


def _contains(tokens, row):
    starts = np.flatnonzero(tokens[: len(tokens) - len(row) + 1] == row[0])
    return any(np.array_equal(tokens[s:s + len(row)], row) for s in starts)


def test_global_batch_is_the_same_for_any_world_size(shards):
    """8 ranks x 1 micro-batch, 2 ranks x 4 and 1 rank x 8 read exactly the same windows per step."""
    def step_windows(world):
        loaders = [_loader(shards, 5, rank=r, world=world, accum=8 // world) for r in range(world)]
        steps = []
        for _ in range(12):
            rows = [tuple(row.tolist()) for ld in loaders for mb in ld.next_step() for row in mb]
            steps.append(sorted(rows))
        return steps
    one = step_windows(1)
    assert step_windows(2) == one and step_windows(8) == one
    # and within a step no window is read twice (ranks never overlap)
    assert all(len(set(rows)) == len(rows) for rows in one)


def test_loader_rejects_data_smaller_than_one_batch(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(path, np.arange(100))
    with pytest.raises(tg.UserError, match="fewer than one batch"):
        _loader([str(path)], 0)


def test_validation_tokens_are_cut_to_whole_windows(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(50))
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(50, 75))
    val = tg.load_validation_tokens(str(tmp_path), 16)
    assert val.tolist() == list(range(65))  # 64 targets = 4 windows of 16, +1 input token


def test_val_docs_keeps_the_first_documents_then_whole_windows(tmp_path, monkeypatch):
    bos = 1
    docs = [[bos] + list(range(10 + i, 10 + i + n)) for i, n in enumerate((20, 30, 25, 40))]
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.concatenate(docs))
    stream = np.concatenate(docs)
    for k in (1, 2, 3):
        prefix = np.concatenate(docs[:k])
        val = tg.load_validation_tokens(str(tmp_path), 16, max_docs=k, bos_id=bos)
        usable = ((len(prefix) - 1) // 16) * 16
        assert val.tolist() == prefix[:usable + 1].tolist() and len(val) < len(stream)
    # more documents asked than there are, or 0: the whole split
    whole = tg.load_validation_tokens(str(tmp_path), 16)
    assert tg.load_validation_tokens(str(tmp_path), 16, max_docs=9, bos_id=bos).tolist() == whole.tolist()
    assert tg.load_validation_tokens(str(tmp_path), 16, max_docs=0, bos_id=bos).tolist() == whole.tolist()
    no_bos = type("NoBos", (), {"bos_id": lambda self: -1, "vocab_size": lambda self: 16})()
    monkeypatch.setattr(tg, "load_tokenizer", lambda path, vocab: no_bos)
    with pytest.raises(tg.UserError, match="VAL_DOCS=2 finds documents by their BOS token"):
        tg.load_eval_data(tg.Settings(environ={"VAL_DOCS": "2", "DATA_PATH": str(tmp_path)}), None)
    with pytest.raises(tg.UserError, match="VAL_DOCS=2 scores a prefix"):
        tg.validate_eval_settings(tg.Settings(environ={"VAL_DOCS": "2", "VAL_TOKENS_EXPECTED": "40540160"}))


def test_validation_shorter_than_one_window_is_an_error(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    with pytest.raises(tg.UserError, match="fewer than one EVAL_SEQ_LEN=16 window"):
        tg.load_validation_tokens(str(tmp_path), 16)


def test_tokenizer_size_must_match_vocab_size(tiny_data):
    sp = tg.load_tokenizer(tiny_data["TOKENIZER_PATH"], 384)
    assert sp.vocab_size() == 384
    with pytest.raises(tg.UserError, match="has 384 pieces but VOCAB_SIZE=8192: set VOCAB_SIZE=384"):
        tg.load_tokenizer(tiny_data["TOKENIZER_PATH"], 8192)


def test_missing_or_bogus_tokenizer(tmp_path):
    with pytest.raises(tg.UserError, match="does not exist"):
        tg.load_tokenizer(str(tmp_path / "none.model"), 8)
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(tg.UserError, match="is not a SentencePiece model"):
        tg.load_tokenizer(str(bogus), 8)
