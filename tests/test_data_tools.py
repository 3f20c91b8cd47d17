"""Tests for the data tools: shard_io, build_shards, make_smoke_corpus and the downloader.

Everything runs for real on small inputs (tokenizers are trained, shards
written and read back). The only stand-in is the network: the downloader's
``hf_hub_download`` is replaced by a fake that serves files from a folder.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA_DIR))

import build_shards  # noqa: E402
import cached_challenge_fineweb as ccf  # noqa: E402
import make_smoke_corpus  # noqa: E402
import retokenize_shards  # noqa: E402
import shard_io  # noqa: E402
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError  # noqa: E402


def raw_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a shard with plain numpy, independently of shard_io."""
    blob = path.read_bytes()
    header = np.frombuffer(blob[:1024], dtype="<i4")
    tokens = np.frombuffer(blob[1024:], dtype="<u2")
    return header, tokens


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, repr(err)
    return err


# ---------------------------------------------------------------- shard_io


def test_shard_round_trip_matches_the_challenge_layout(tmp_path):
    tokens = np.array([0, 1, 2, 500, 65535, 7], dtype=np.int64)
    path = tmp_path / "s.bin"
    assert shard_io.write_shard(path, tokens) == 6

    header, raw = raw_read(path)
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens)
    assert not header[3:].any()
    assert raw.tolist() == tokens.tolist()
    assert shard_io.read_shard(path).tolist() == tokens.tolist()
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b[:1000], "shorter than"),
        (lambda b: (123).to_bytes(4, "little") + b[4:], "bad magic"),
        (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "version"),
        (lambda b: b[:-2], "header says"),
        (lambda b: b + b"\0\0", "header says"),
    ],
)
def test_read_shard_rejects_malformed_files(tmp_path, corrupt, message):
    path = tmp_path / "s.bin"
    shard_io.write_shard(path, np.arange(10))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(shard_io.ShardFormatError, match=message):
        shard_io.read_shard(path)


@pytest.mark.parametrize("bad", [[65536], [-1], [[1, 2]], [1.5]])
def test_write_shard_rejects_tokens_that_do_not_fit(tmp_path, bad):
    with pytest.raises(ValueError):
        shard_io.write_shard(tmp_path / "s.bin", np.array(bad))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- tokenizer and sharding

VOCAB = 512


@pytest.fixture(scope="module")
def docs():
    return make_smoke_corpus.generate_documents(300, seed=0)


@pytest.fixture(scope="module")
def sp_model(docs, tmp_path_factory):
    return build_shards.train_tokenizer(docs, VOCAB, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sp(sp_model):
    return build_shards.load_tokenizer(sp_model)


def test_trained_tokenizer_follows_the_recipe(sp, sp_model):
    assert sp_model.name == f"fineweb_{VOCAB}_bpe.model"
    assert sp_model.with_suffix(".vocab").is_file()
    assert sp.get_piece_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    # byte_fallback: a character never seen in training becomes UTF-8 byte pieces, not <unk>.
    pieces = sp.encode("漢", out_type=str)
    assert pieces == ["<0xE6>", "<0xBC>", "<0xA2>"]
    assert sp.unk_id() not in sp.encode("漢 ж ☃")
    # add_dummy_prefix=False: no word boundary is invented before the first word.
    assert not sp.encode("Alice", out_type=str)[0].startswith("▁")


def test_digits_are_never_merged(tmp_path):
    # Numbers this frequent would become multi-digit pieces without split_digits.
    docs = [f"in {1900 + i % 50} the price was {i * 37 % 1000} euros and 2024 came" for i in range(3000)]
    sp = build_shards.load_tokenizer(build_shards.train_tokenizer(docs, 300, tmp_path))
    pieces = [p.lstrip("▁") for p in sp.encode("1984 2024 737", out_type=str)]
    assert "".join(pieces) == "19842024737"
    assert all(len(p) <= 1 for p in pieces)


def test_tokenizer_training_is_deterministic(docs, sp_model, tmp_path):
    # Another folder, same documents: byte-identical files (no path is baked into the .model).
    again = build_shards.train_tokenizer(docs, VOCAB, tmp_path / "elsewhere")
    assert again.read_bytes() == sp_model.read_bytes()
    assert again.with_suffix(".vocab").read_bytes() == sp_model.with_suffix(".vocab").read_bytes()


def test_vocab_over_uint16_is_refused(docs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_shards.train_tokenizer(docs, 70000, tmp_path)
    assert exit_info.value.code == 1
    assert "70000" in one_line_error(capsys)


def read_split(dataset_dir: Path, split: str) -> list[np.ndarray]:
    return [shard_io.read_shard(p) for p in sorted(dataset_dir.glob(f"fineweb_{split}_*.bin"))]


def test_shards_split_at_the_token_limit_and_val_by_doc_count(sp, docs, tmp_path):
    docs = docs[:60]
    limit = 1000
    stats = build_shards.build_shards(docs, sp, tmp_path, num_val_docs=10, shard_tokens=limit)

    # Expected stream computed independently: [BOS] + ids per document, no EOS.
    per_doc = [[1] + ids for ids in sp.encode(docs)]
    expect_val = [t for d in per_doc[:10] for t in d]
    expect_train = [t for d in per_doc[10:] for t in d]
    val, train = read_split(tmp_path, "val"), read_split(tmp_path, "train")

    for shards, expected in ((val, expect_val), (train, expect_train)):
        assert np.concatenate(shards).tolist() == expected
        assert [len(s) for s in shards[:-1]] == [limit] * (len(shards) - 1)
        assert 0 < len(shards[-1]) <= limit
    assert len(train) == -(-len(expect_train) // limit) and len(train) > 2
    assert stats == {
        "docs_val": 10, "docs_train": 50,
        "tokens_val": len(expect_val), "tokens_train": len(expect_train),
        "shards_val": len(val), "shards_train": len(train),
    }
    all_tokens = np.concatenate(val + train)
    assert (all_tokens == 1).sum() == len(docs)  # one BOS per document
    assert (all_tokens == 2).sum() == 0  # and never an EOS


def test_val_docs_are_capped_and_stale_shards_removed(sp, docs, tmp_path):
    (tmp_path / "fineweb_train_000099.bin").write_bytes(b"old")
    stats = build_shards.build_shards(docs[:5], sp, tmp_path, num_val_docs=50_000, shard_tokens=10**6)
    assert (stats["docs_val"], stats["docs_train"]) == (4, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_cli_reads_jsonl_and_txt_inputs(docs, tmp_path, capsys):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[:100])) + "\n")
    lines = tmp_path / "b.txt"
    lines.write_text("First line document.\n\n  \nSecond line document, café.\n")
    whole = tmp_path / "c.txt"
    whole.write_text("A whole file\nis one document.\n")
    out = tmp_path / "out"

    stats = build_shards.main([str(jsonl), str(whole), "--out", str(out), "--train-tokenizer",
                               "--vocab-size", "400", "--text-field", "body", "--num-val-docs", "5"])
    assert stats["docs_val"] + stats["docs_train"] == 101
    stats = build_shards.main([str(jsonl), str(lines), "--txt-split-lines", "--out", str(out),
                               "--train-tokenizer", "--vocab-size", "400", "--text-field", "body",
                               "--num-val-docs", "5", "--shuffle-seed", "3"])
    assert stats["docs_val"] + stats["docs_train"] == 102
    printed = capsys.readouterr().out
    assert f"train: 97 docs, {stats['tokens_train']} tokens, 1 shards" in printed

    dataset = out / "datasets" / "fineweb10B_sp400"
    model = out / "tokenizers" / "fineweb_400_bpe.model"
    assert model.is_file()
    tokens = np.concatenate(read_split(dataset, "val") + read_split(dataset, "train"))
    assert (tokens == 1).sum() == 102 and tokens.max() < 400


def test_shuffle_seed_reorders_documents_reproducibly(sp_model, docs, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    make_smoke_corpus.write_jsonl(docs[:40], jsonl)

    def val_tokens(name, *extra):
        out = tmp_path / name
        build_shards.main([str(jsonl), "--tokenizer", str(sp_model), "--out", str(out), "--num-val-docs", "5", *extra])
        return read_split(out / "datasets" / f"fineweb10B_sp{VOCAB}", "val")[0].tolist()

    plain, shuffled = val_tokens("plain"), val_tokens("s1", "--shuffle-seed", "1")
    assert shuffled != plain and shuffled == val_tokens("s1again", "--shuffle-seed", "1")


def test_cli_with_existing_tokenizer_copies_it(sp_model, docs, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    make_smoke_corpus.write_jsonl(docs[:20], jsonl)
    out = tmp_path / "out"
    build_shards.main([str(jsonl), "--tokenizer", str(sp_model), "--out", str(out), "--num-val-docs", "2"])
    assert (out / "tokenizers" / sp_model.name).read_bytes() == sp_model.read_bytes()
    assert len(read_split(out / "datasets" / f"fineweb10B_sp{VOCAB}", "val")) == 1


def small_corpus_files(tmp_path: Path) -> list[str]:
    """Two inputs far too small for 1024 pieces: a .txt that is one document, a .jsonl of three."""
    whole = tmp_path / "a.txt"
    whole.write_text("The quick brown fox jumps over the lazy dog.\nIt is one document.\n")
    lines = tmp_path / "b.jsonl"
    lines.write_text("".join(json.dumps({"text": f"A short note number {i} about a cat."}) + "\n" for i in range(3)))
    return [str(whole), str(lines)]


def test_vocab_the_corpus_cannot_fill_is_refused_with_the_fix(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        build_shards.main([*small_corpus_files(tmp_path), "--train-tokenizer", "--vocab-size", "1024", "--out", str(out)])
    assert exit_info.value.code == 1
    err = one_line_error(capsys)
    supported = int(re.search(r"support only (\d+) pieces", err).group(1))
    assert 256 < supported < 1024
    assert f"pass --vocab-size {supported}" in err and "--allow-smaller-vocab" in err
    assert not out.exists()  # nothing written under a name that claims 1024 pieces


def test_allow_smaller_vocab_names_the_outputs_by_the_real_size(tmp_path, capsys):
    out = tmp_path / "out"
    build_shards.main([*small_corpus_files(tmp_path), "--train-tokenizer", "--vocab-size", "1024", "--out", str(out),
                       "--allow-smaller-vocab"])
    models = list((out / "tokenizers").glob("*.model"))
    assert len(models) == 1
    pieces = build_shards.load_tokenizer(models[0]).get_piece_size()
    assert pieces < 1024 and models[0].name == f"fineweb_{pieces}_bpe.model"
    assert [p.name for p in (out / "datasets").iterdir()] == [f"fineweb10B_sp{pieces}"]
    tokens = np.concatenate(read_split(out / "datasets" / f"fineweb10B_sp{pieces}", "val"))
    assert tokens.max() < pieces
    assert f"support {pieces} pieces, not --vocab-size 1024" in capsys.readouterr().out


def test_output_says_which_documents_became_validation(sp_model, sp, tmp_path, capsys):
    files = small_corpus_files(tmp_path)
    stats = build_shards.main([*files, "--tokenizer", str(sp_model), "--out", str(tmp_path / "out")])
    # The default --num-val-docs takes all but one document: all of a.txt and two of b.jsonl's three.
    a_tokens = 1 + len(sp.encode(Path(files[0]).read_text()))
    b_tokens = sum(1 + len(sp.encode(f"A short note number {i} about a cat.")) for i in range(2))
    assert stats["val_from"] == {files[0]: {"docs": 1, "tokens": a_tokens, "of": 1},
                                 files[1]: {"docs": 2, "tokens": b_tokens, "of": 3}}
    assert stats["tokens_val"] == a_tokens + b_tokens
    printed = capsys.readouterr().out
    assert (f"val is the first 3 docs in input order (--num-val-docs 50000 capped to leave one for train): "
            f"all of the 1 docs of {files[0]} ({a_tokens} tokens); 2 of the 3 docs of {files[1]} ({b_tokens} tokens)") in printed

    stats = build_shards.main([*files, "--tokenizer", str(sp_model), "--out", str(tmp_path / "shuffled"),
                               "--num-val-docs", "2", "--shuffle-seed", "5"])
    assert sum(p["docs"] for p in stats["val_from"].values()) == 2
    assert sum(p["tokens"] for p in stats["val_from"].values()) == stats["tokens_val"]
    assert "val is the first 2 docs after --shuffle-seed 5: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.jsonl", '{"text": "ok"}\n{"title": "no text"}\n', "x.jsonl:2: no string field 'text'"),
        ("y.jsonl", "{not json\n", "y.jsonl:1: invalid JSON"),
        ("z.csv", "a,b\n", "must end in .txt or .jsonl"),
    ],
)
def test_bad_inputs_fail_with_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        build_shards.read_documents([path])
    assert exit_info.value.code == 1
    assert message in one_line_error(capsys)


def test_too_few_documents_fail_before_training(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(SystemExit):
        build_shards.main([str(one), "--train-tokenizer", "--vocab-size", "300", "--out", str(tmp_path / "out")])
    assert "need at least 2 documents" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- make_smoke_corpus


def test_smoke_corpus_is_deterministic_and_varied(tmp_path):
    a = make_smoke_corpus.generate_documents(200, seed=0)
    assert a == make_smoke_corpus.generate_documents(200, seed=0)
    assert a != make_smoke_corpus.generate_documents(200, seed=1)
    words = [len(d.split()) for d in a]
    assert min(words) >= 20 and max(words) <= 700 and max(words) > 300
    text = "\n".join(a)
    assert all(s in text for s in ("café", "naïve", "€", "\n\n"))
    assert sum(f in text for f in make_smoke_corpus.FACTS) == len(make_smoke_corpus.FACTS)

    for out in ("one", "two"):
        make_smoke_corpus.main(["--out", str(tmp_path / out), "--docs", "50", "--seed", "4"])
    assert (tmp_path / "one/docs.jsonl").read_bytes() == (tmp_path / "two/docs.jsonl").read_bytes()


def test_smoke_build_gives_readable_predictable_shards(tmp_path):
    vocab = 512
    stats = make_smoke_corpus.main(["--out", str(tmp_path), "--docs", "400", "--build", "--vocab-size",
                                    str(vocab), "--num-val-docs", "30", "--shard-tokens", "30000"])
    dataset = tmp_path / "datasets" / f"fineweb10B_sp{vocab}"
    assert (tmp_path / "tokenizers" / f"fineweb_{vocab}_bpe.model").is_file()
    val, train = read_split(dataset, "val"), read_split(dataset, "train")
    assert len(train) == stats["shards_train"] > 1
    assert sum(map(len, val)) == stats["tokens_val"] > 5000
    assert val[0][0] == 1 and train[0][0] == 1

    # Learnable: a bigram model fitted on train predicts val far better than uniform.
    tr, va = np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64)
    counts = np.ones((vocab, vocab))
    np.add.at(counts, (tr[:-1], tr[1:]), 1)
    probs = counts / counts.sum(1, keepdims=True)
    bits = -np.log2(probs[va[:-1], va[1:]]).mean()
    assert bits < 0.6 * np.log2(vocab), bits


# ---------------------------------------------------------------- downloader

REPO = "tester/golf-data"
DS = "datasets/fineweb10B_sp8192"


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download, serving files from a folder."""

    def __init__(self, root: Path, fail_on: str | None = None, error: Exception | None = None):
        self.root, self.fail_on, self.error = root, fail_on, error
        self.calls: list[str] = []

    def __call__(self, repo_id, filename, *, repo_type=None, local_dir=None, **kwargs):
        assert (repo_id, repo_type) == (REPO, "dataset")
        self.calls.append(filename)
        src = self.root / filename
        if not src.is_file():
            raise EntryNotFoundError(f"404: {filename}")
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.fail_on and filename.endswith(self.fail_on):
            dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # a partial write, then the line drops
            raise self.error or ConnectionError("connection reset by peer")
        shutil.copyfile(src, dst)
        return str(dst)


def make_remote(root: Path, n_val=2, n_train=5, manifest=True, sizes=True) -> Path:
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("val", n_val), ("train", n_train)):
        for i in range(n):
            path = root / DS / f"fineweb_{split}_{i:06d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            shard_io.write_shard(path, rng.integers(0, 8192, size=100 + 10 * i))
            files[path.name] = path.stat().st_size
    (root / "tokenizers").mkdir(parents=True)
    (root / "tokenizers/fineweb_8192_bpe.model").write_bytes(b"model-bytes" * 10)
    (root / "tokenizers/fineweb_8192_bpe.vocab").write_text("<pad>\t0\n")
    if manifest:
        tokenizer_sizes = [{"path": f"tokenizers/fineweb_8192_bpe.{ext}",
                            "bytes": (root / f"tokenizers/fineweb_8192_bpe.{ext}").stat().st_size}
                           for ext in ("model", "vocab")]
        doc = {
            "datasets": [
                {"name": "fineweb10B_sp1024", "stats": {"files_val": 1, "files_train": 1}},
                {"name": "fineweb10B_sp8192", "tokenizer_name": "sp8192_bpe",
                 "stats": {"files_val": n_val, "files_train": n_train}, **({"files": files} if sizes else {})},
            ],
            "tokenizers": [{"name": "sp8192_bpe", "model_path": "tokenizers/fineweb_8192_bpe.model",
                            "vocab_path": "tokenizers/fineweb_8192_bpe.vocab",
                            **({"files": tokenizer_sizes} if sizes else {})}],
        }
        (root / "manifest.json").write_text(json.dumps(doc))
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", REPO)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    fake = FakeHub(make_remote(tmp_path / "remote"))
    monkeypatch.setattr(ccf, "hf_hub_download", fake)
    return fake


def download(local: Path, *extra: str) -> None:
    ccf.main(["--variant", "sp8192", "--local-dir", str(local), *extra])


def local_files(local: Path) -> list[str]:
    return sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())


EXPECTED_3 = sorted([
    "manifest.json", "tokenizers/fineweb_8192_bpe.model", "tokenizers/fineweb_8192_bpe.vocab",
    f"{DS}/fineweb_val_000000.bin", f"{DS}/fineweb_val_000001.bin",
    f"{DS}/fineweb_train_000000.bin", f"{DS}/fineweb_train_000001.bin", f"{DS}/fineweb_train_000002.bin",
])


def test_download_fetches_all_val_first_train_shards_and_tokenizer(hub, tmp_path):
    local = tmp_path / "data"
    download(local, "--train-shards", "3")
    assert local_files(local) == EXPECTED_3  # also: no staging folders left
    for rel in EXPECTED_3:
        assert (local / rel).read_bytes() == (hub.root / rel).read_bytes()
    assert sorted(hub.calls) == EXPECTED_3


def test_second_run_skips_complete_files(hub, tmp_path, capsys):
    local = tmp_path / "data"
    download(local, "--train-shards", "3")
    hub.calls.clear()
    download(local, "--train-shards", "3")
    assert hub.calls == []
    assert "0 downloaded, 8 already complete" in capsys.readouterr().out
    download(local, "--train-shards", "4")
    assert hub.calls == [f"{DS}/fineweb_train_000003.bin"]


def test_wrong_size_local_file_is_downloaded_again(hub, tmp_path):
    local = tmp_path / "data"
    download(local, "--train-shards", "2")
    victim = local / DS / "fineweb_train_000001.bin"
    victim.write_bytes(victim.read_bytes()[:-10])
    hub.calls.clear()
    download(local, "--train-shards", "2")
    assert hub.calls == [f"{DS}/fineweb_train_000001.bin"]
    assert victim.read_bytes() == (hub.root / DS / victim.name).read_bytes()


def test_remote_size_mismatch_is_a_clear_error(hub, tmp_path, capsys):
    manifest = json.loads((hub.root / "manifest.json").read_text())
    manifest["datasets"][1]["files"]["fineweb_val_000001.bin"] += 2
    (hub.root / "manifest.json").write_text(json.dumps(manifest))
    local = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_info:
        download(local, "--train-shards", "1")
    assert exit_info.value.code == 1
    err = one_line_error(capsys)
    assert "fineweb_val_000001.bin" in err and "delete" in err and "manifest.json" in err
    assert not (local / DS / "fineweb_val_000001.bin").exists()


def test_wrong_size_tokenizer_is_caught_by_the_manifest_size(hub, tmp_path):
    local = tmp_path / "data"
    download(local, "--train-shards", "1")
    model = local / "tokenizers/fineweb_8192_bpe.model"
    model.write_bytes(b"stale")
    hub.calls.clear()
    download(local, "--train-shards", "1")
    assert hub.calls == ["tokenizers/fineweb_8192_bpe.model"]
    assert model.read_bytes() == (hub.root / "tokenizers/fineweb_8192_bpe.model").read_bytes()


def test_corrupt_local_manifest_says_delete_and_rerun(hub, tmp_path, capsys):
    local = tmp_path / "data"
    local.mkdir()
    (local / "manifest.json").write_text("{truncated")
    with pytest.raises(SystemExit):
        download(local)
    err = one_line_error(capsys)
    assert "manifest.json is not valid JSON" in err and "delete it and rerun" in err


def test_failure_mid_download_leaves_no_partial_file(hub, tmp_path, capsys):
    local = tmp_path / "data"
    hub.fail_on = "fineweb_train_000002.bin"
    with pytest.raises(SystemExit) as exit_info:
        download(local, "--train-shards", "4")
    assert exit_info.value.code == 1
    err = one_line_error(capsys)
    assert "fineweb_train_000002.bin" in err and "rerun" in err
    # Finished files stay; the interrupted one is nowhere, not even in a staging folder.
    assert local_files(local) == sorted(set(EXPECTED_3) - {f"{DS}/fineweb_train_000002.bin"})
    assert not [p for p in local.rglob(".download-*")]

    hub.fail_on = None
    hub.calls.clear()
    download(local, "--train-shards", "4")
    assert hub.calls == [f"{DS}/fineweb_train_000002.bin", f"{DS}/fineweb_train_000003.bin"]


def test_offline_is_an_error_not_a_missing_file(hub, tmp_path, capsys):
    hub.fail_on = "manifest.json"
    hub.error = LocalEntryNotFoundError("no connection")
    with pytest.raises(SystemExit):
        download(tmp_path / "data")
    assert "cannot reach Hugging Face" in one_line_error(capsys)


def test_bad_remote_shard_header_is_rejected(hub, tmp_path, capsys):
    bad = hub.root / DS / "fineweb_train_000000.bin"
    bad.write_bytes((7).to_bytes(4, "little") + bad.read_bytes()[4:])  # same size, wrong magic
    with pytest.raises(SystemExit):
        download(tmp_path / "data", "--train-shards", "1")
    err = one_line_error(capsys)
    assert "fineweb_train_000000.bin" in err and "bad magic" in err
    assert not (tmp_path / "data" / DS / "fineweb_train_000000.bin").exists()


def test_more_train_shards_than_the_manifest_lists_is_refused(hub, tmp_path, capsys):
    with pytest.raises(SystemExit):
        download(tmp_path / "data", "--train-shards", "6")
    assert "--train-shards 5 or fewer" in one_line_error(capsys)
    assert hub.calls == ["manifest.json"]


def test_without_manifest_conventional_names_and_a_root_prefix_work(tmp_path, monkeypatch, capsys):
    remote = tmp_path / "remote"
    make_remote(remote / "export", n_val=3, manifest=False)
    fake = FakeHub(remote)
    monkeypatch.setattr(ccf, "hf_hub_download", fake)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", REPO)
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "export")
    local = tmp_path / "data"

    download(local, "--train-shards", "2")
    assert len(list((local / DS).glob("fineweb_val_*.bin"))) == 3
    assert len(list((local / DS).glob("fineweb_train_*.bin"))) == 2
    assert (local / "tokenizers/fineweb_8192_bpe.model").is_file()
    assert all(call.startswith("export/") for call in fake.calls)

    fake.calls.clear()
    download(local, "--train-shards", "2")
    # Only the probes that no local file can answer: the manifest, and whether a 4th val shard exists.
    assert fake.calls == ["export/manifest.json", f"export/{DS}/fineweb_val_000003.bin"]

    with pytest.raises(SystemExit):
        download(local, "--train-shards", "9")
    assert "only 5 train shards exist; pass --train-shards 5" in one_line_error(capsys)


def test_unknown_variant_exits_nonzero_with_one_line():
    result = subprocess.run([sys.executable, str(DATA_DIR / "cached_challenge_fineweb.py"), "--variant", "sp999"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown variant 'sp999'") and result.stderr.count("\n") == 1
    assert "sp1024, sp4096, sp8192" in result.stderr


# ---------------------------------------------------------------- retokenize_shards (SP1024 from SP8192)


@pytest.fixture(scope="module")
def source_shards(docs, sp, tmp_path_factory):
    """Shards of `docs` in the VOCAB tokenizer: 40 val docs, the train docs in 3 shards cut mid-document."""
    folder = tmp_path_factory.mktemp("source")
    train_tokens = sum(len(ids) + 1 for ids in sp.encode(docs[40:]))
    build_shards.build_shards(docs, sp, folder, num_val_docs=40, shard_tokens=train_tokens // 3 + 1)
    return folder


def test_retokenized_shards_hold_the_same_documents_in_the_same_order(source_shards, sp, sp_model, docs, tmp_path,
                                                                       capsys):
    train_files = sorted(source_shards.glob("fineweb_train_*.bin"))
    assert len(train_files) == 3 and raw_read(train_files[1])[1][0] != build_shards.BOS_ID  # cut inside a doc
    stats = retokenize_shards.main([str(source_shards), "--tokenizer", str(sp_model), "--vocab-size", "400",
                                    "--out", str(tmp_path)])
    new_sp = build_shards.load_tokenizer(tmp_path / "tokenizers" / "fineweb_400_bpe.model")
    assert new_sp.get_piece_size() == 400 and stats["dataset"].endswith("fineweb10B_sp400")
    for split, expected in (("val", docs[:40]), ("train", docs[40:])):
        files = sorted(Path(stats["dataset"]).glob(f"fineweb_{split}_*.bin"))
        tokens = np.concatenate([raw_read(f)[1] for f in files])
        assert tokens.max() < 400 and tokens[0] == build_shards.BOS_ID
        starts = np.flatnonzero(tokens == build_shards.BOS_ID)
        texts = new_sp.decode([tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])])
        assert texts == sp.decode(sp.encode(expected))  # each document's text, as the source pieces spell it
        assert len(files) == (1 if split == "val" else 3)  # as many shards as the source, every rank owns one
        assert stats[split]["docs"] == len(expected) and stats[split]["tokens"] == len(tokens)
    out = capsys.readouterr().out
    assert "train: 260 docs" in out and "trained on the 260 train docs" in out and "seconds: decode" in out


def test_retokenizer_trains_on_train_documents_only(source_shards, sp_model, tmp_path, monkeypatch):
    seen = []
    real = retokenize_shards.train_tokenizer
    monkeypatch.setattr(retokenize_shards, "train_tokenizer",
                        lambda texts, *a: seen.append(len(texts)) or real(texts, *a))
    retokenize_shards.main([str(source_shards), "--tokenizer", str(sp_model), "--vocab-size", "400",
                            "--out", str(tmp_path), "--shard-tokens", "5000"])
    assert seen == [260]
    assert len(list((tmp_path / "datasets" / "fineweb10B_sp400").glob("fineweb_train_*.bin"))) > 3


def test_retokenizer_refuses_a_folder_without_shards(sp_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        retokenize_shards.main([str(tmp_path), "--tokenizer", str(sp_model), "--vocab-size", "400",
                                "--out", str(tmp_path / "out")])
    assert "has no fineweb_val_*.bin shards: give the folder of the source shards" in one_line_error(capsys)
