"""Build challenge-format token shards from local documents.

Inputs are ``.txt`` files (one document per file, or one per non-empty line
with ``--txt-split-lines``) and ``.jsonl`` files (one JSON object per line,
the text in ``--text-field``). Documents are tokenized with an existing
SentencePiece model (``--tokenizer``) or with one trained here using the
challenge recipe (``--train-tokenizer --vocab-size V``).

Each document becomes ``[BOS] + sp.encode(text)`` (no EOS) and documents are
concatenated. The first ``--num-val-docs`` documents go to
``fineweb_val_*.bin``, the rest to ``fineweb_train_*.bin`` (the output says how
many documents and tokens of each input became validation); a shard holds at
most ``--shard-tokens`` tokens and is cut wherever that limit falls, even in
the middle of a document, as in the official export. Output:

    OUT/datasets/fineweb10B_sp{V}/fineweb_{val,train}_%06d.bin
    OUT/tokenizers/fineweb_{V}_bpe.model (+ .vocab)

V is the tokenizer's real size: a corpus too small for ``--vocab-size`` pieces
is refused, or with ``--allow-smaller-vocab`` V is what it supports.

The document texts are held in memory (needed for shuffling and for counting
the split); tokens are streamed to disk shard by shard.

    python3 data/build_shards.py docs.jsonl --train-tokenizer --vocab-size 1024 --out data/mine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_io import MAX_TOKEN_ID, die, write_shard  # noqa: E402

BOS_ID = 1
MAX_VOCAB = MAX_TOKEN_ID + 1  # ids must fit in uint16
ENCODE_BATCH = 512  # documents per sp.encode call; batching lets sentencepiece use threads


def dataset_dir_name(vocab_size: int) -> str:
    return f"fineweb10B_sp{vocab_size}"


def tokenizer_file_name(vocab_size: int) -> str:
    return f"fineweb_{vocab_size}_bpe.model"


def read_documents(paths, text_field: str = "text", txt_split_lines: bool = False) -> list[str]:
    """Read documents from .txt and .jsonl files, in the order given."""
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            die(f"input {path} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        die(f"{path}:{lineno}: invalid JSON ({e.msg})")
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        die(f"{path}:{lineno}: no string field '{text_field}' (set --text-field)")
                    docs.append(text)
        elif path.suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            if txt_split_lines:
                docs.extend(line for line in text.splitlines() if line.strip())
            else:
                docs.append(text)
        else:
            die(f"input {path} must end in .txt or .jsonl")
    return docs


def train_tokenizer(docs: list[str], vocab_size: int, tokenizers_dir: str | Path,
                    allow_smaller: bool = False) -> Path:
    """Train a SentencePiece BPE model with the challenge recipe; return its path.

    Writes ``tokenizers_dir/fineweb_{V}_bpe.model`` and ``.vocab``. One thread
    and a fixed seed make the result depend only on the documents. A corpus too
    small for ``vocab_size`` pieces (sentencepiece runs out of merges) is an
    error, unless ``allow_smaller``: then V is the size the corpus supports, so
    the file names never claim pieces the model lacks.
    """
    if not 1 <= vocab_size <= MAX_VOCAB:
        die(f"--vocab-size {vocab_size} must be between 1 and {MAX_VOCAB} (ids are stored as uint16)")
    # Trained in a scratch folder and copied out only once its size is known to be right, so a
    # refusal leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="build_shards-") as scratch:
        model = train_in(docs, vocab_size, Path(scratch))
        pieces = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
        if pieces < vocab_size:
            if not allow_smaller:
                die(f"--vocab-size {vocab_size}: these documents support only {pieces} pieces; pass --vocab-size "
                    f"{pieces} (or less), add documents, or pass --allow-smaller-vocab to write a {pieces}-piece "
                    f"tokenizer named {tokenizer_file_name(pieces)}")
            # Retrained at the size it reached (the same pieces), so the .model records its real size.
            model = train_in(docs, pieces, Path(scratch))
        tokenizers_dir = Path(tokenizers_dir)
        tokenizers_dir.mkdir(parents=True, exist_ok=True)
        for suffix in (".model", ".vocab"):
            shutil.copyfile(model.with_suffix(suffix), tokenizers_dir / model.with_suffix(suffix).name)
    return tokenizers_dir / model.name


def train_in(docs: list[str], vocab_size: int, folder: Path) -> Path:
    """Train with the challenge recipe into ``folder/fineweb_{V}_bpe.model`` (+ .vocab)."""
    name = tokenizer_file_name(vocab_size).removesuffix(".model")
    spm.set_random_generator_seed(1337)
    longest = max((len(d.encode("utf-8")) for d in docs), default=0)
    try:
        # The .model records its model_prefix; a bare name (trained from inside the
        # folder) keeps the file byte-identical wherever it is built.
        with contextlib.chdir(folder):
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(docs),
                model_prefix=name,
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                split_digits=True,
                normalization_rule_name="nmt_nfkc",
                add_dummy_prefix=False,
                character_coverage=0.999,
                pad_id=0,
                bos_id=1,
                eos_id=2,
                unk_id=3,
                hard_vocab_limit=False,
                # The default (4192 bytes) silently drops longer documents from training.
                max_sentence_length=max(4192, longest + 1),
                num_threads=1,
                minloglevel=2,
            )
    except RuntimeError as e:  # e.g. a vocab too small for the 256 byte pieces
        die(f"sentencepiece could not train the tokenizer: {str(e).strip()}")
    return folder / f"{name}.model"


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    if not Path(path).is_file():
        die(f"tokenizer {path} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        die(f"tokenizer {path} is not a SentencePiece model ({str(e).strip()})")
    if sp.get_piece_size() > MAX_VOCAB:
        die(f"tokenizer {path} has {sp.get_piece_size()} pieces; shards store uint16 ids, so at most {MAX_VOCAB}")
    if sp.bos_id() != BOS_ID:
        die(f"tokenizer {path} has bos_id {sp.bos_id()}; the challenge format needs bos_id={BOS_ID}")
    return sp


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str]):
    """Yield ``[BOS] + ids`` as a uint16 array for each document, in order."""
    for start in range(0, len(docs), ENCODE_BATCH):
        for ids in sp.encode(docs[start : start + ENCODE_BATCH]):
            tokens = np.empty(len(ids) + 1, dtype=np.int64)
            tokens[0] = BOS_ID
            tokens[1:] = ids
            if tokens.max() > MAX_TOKEN_ID:
                die(f"token id {int(tokens.max())} does not fit in uint16 (max {MAX_TOKEN_ID})")
            yield tokens.astype(np.uint16)


class ShardWriter:
    """Accumulates tokens and writes ``fineweb_{split}_%06d.bin`` every ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.shards = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill:
            name = f"fineweb_{self.split}_{self.shards:06d}.bin"
            write_shard(self.out_dir / name, self.buf[: self.fill])
            self.shards += 1
            self.tokens += self.fill
            self.fill = 0


def check_split(n_docs: int, num_val_docs: int, shard_tokens: int) -> None:
    if n_docs < 2:
        die(f"need at least 2 documents (one for val, one for train), got {n_docs}")
    if num_val_docs < 1:
        die("--num-val-docs must be at least 1")
    if shard_tokens < 1:
        die("--shard-tokens must be at least 1")


def build_shards(docs, sp, dataset_dir, num_val_docs: int, shard_tokens: int, sources=None) -> dict:
    """Tokenize ``docs`` into val/train shards under ``dataset_dir``; return counts.

    ``sources`` (one label per document, e.g. its input file) adds ``val_from``:
    {label: {"docs", "tokens", "of"}}, what each input gave to validation out of
    its ``of`` documents.
    """
    check_split(len(docs), num_val_docs, shard_tokens)
    # Cap so that at least one document is left for training.
    num_val = min(num_val_docs, len(docs) - 1)
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    # Shards left from an earlier, larger build would silently join this one.
    for stale in dataset_dir.glob("fineweb_*_*.bin"):
        stale.unlink()
    writers = {s: ShardWriter(dataset_dir, s, shard_tokens) for s in ("val", "train")}
    val_from = {}
    for i, tokens in enumerate(encode_documents(sp, docs)):
        writers["val" if i < num_val else "train"].add(tokens)
        if sources is not None and i < num_val:
            part = val_from.setdefault(sources[i], {"docs": 0, "tokens": 0})
            part["docs"] += 1
            part["tokens"] += len(tokens)
    for w in writers.values():
        w.flush()
    stats = {"docs_val": num_val, "docs_train": len(docs) - num_val}
    for split, w in writers.items():
        stats[f"tokens_{split}"], stats[f"shards_{split}"] = w.tokens, w.shards
    if sources is not None:
        totals = Counter(sources)
        stats["val_from"] = {src: dict(part, of=totals[src]) for src, part in val_from.items()}
    return stats


def describe_val(stats: dict, num_val_docs: int, shuffle_seed: int | None) -> str:
    """One line saying which documents became validation: how many of each input, and their tokens."""
    order = "in input order" if shuffle_seed is None else f"after --shuffle-seed {shuffle_seed}"
    capped = (f" (--num-val-docs {num_val_docs} capped to leave one for train)"
              if stats["docs_val"] < num_val_docs else "")
    parts = [f"{'all' if p['docs'] == p['of'] else p['docs']} of the {p['of']} docs of {src} ({p['tokens']} tokens)"
             for src, p in stats["val_from"].items()]
    return f"val is the first {stats['docs_val']} docs {order}{capped}: " + "; ".join(parts)


def print_stats(stats: dict, dataset_dir: Path) -> None:
    for split in ("val", "train"):
        print(
            f"{split}: {stats['docs_' + split]} docs, {stats['tokens_' + split]} tokens, "
            f"{stats['shards_' + split]} shards"
        )
    print(f"wrote {dataset_dir}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help=".txt and/or .jsonl files with the documents")
    p.add_argument("--out", required=True, help="output root; writes OUT/datasets/ and OUT/tokenizers/")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="existing SentencePiece .model to encode with")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer on the documents")
    p.add_argument("--vocab-size", type=int, help="vocab size for --train-tokenizer")
    p.add_argument("--allow-smaller-vocab", action="store_true",
                   help="when the documents support fewer than --vocab-size pieces, keep that many and name the "
                        "outputs by the real size (default: refuse)")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    p.add_argument("--txt-split-lines", action="store_true", help="one document per non-empty line of .txt inputs")
    p.add_argument("--num-val-docs", type=int, default=50_000, help="leading documents that form the val split")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="max tokens per shard")
    p.add_argument("--shuffle-seed", type=int, help="shuffle documents with this seed before splitting")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        die("--train-tokenizer needs --vocab-size")
    if args.tokenizer and args.vocab_size is not None:
        die("--vocab-size goes with --train-tokenizer; --tokenizer brings its own vocab")
    docs, sources = [], []  # sources: the input file of each document, to say what became validation
    for path in args.inputs:
        got = read_documents([path], args.text_field, args.txt_split_lines)
        docs += got
        sources += [path] * len(got)
    check_split(len(docs), args.num_val_docs, args.shard_tokens)  # before any slow training
    if args.shuffle_seed is not None:
        pairs = list(zip(docs, sources))
        random.Random(args.shuffle_seed).shuffle(pairs)
        docs, sources = [d for d, _ in pairs], [s for _, s in pairs]

    out = Path(args.out)
    if args.train_tokenizer:
        model_path = train_tokenizer(docs, args.vocab_size, out / "tokenizers", args.allow_smaller_vocab)
        sp = load_tokenizer(model_path)
        vocab_size = sp.get_piece_size()
        if vocab_size < args.vocab_size:
            print(f"tokenizer: the documents support {vocab_size} pieces, not --vocab-size {args.vocab_size} "
                  f"(--allow-smaller-vocab): wrote {model_path}")
    else:
        sp = load_tokenizer(args.tokenizer)
        vocab_size = sp.get_piece_size()
        # Keep the output self-contained: the shards travel with their tokenizer.
        dest = out / "tokenizers" / tokenizer_file_name(vocab_size)
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = Path(args.tokenizer)
        for s, d in ((src, dest), (src.with_suffix(".vocab"), dest.with_suffix(".vocab"))):
            if s.is_file() and s.resolve() != d.resolve():
                shutil.copyfile(s, d)

    dataset_dir = out / "datasets" / dataset_dir_name(vocab_size)
    stats = build_shards(docs, sp, dataset_dir, args.num_val_docs, args.shard_tokens, sources)
    print_stats(stats, dataset_dir)
    print(describe_val(stats, args.num_val_docs, args.shuffle_seed))
    return stats


if __name__ == "__main__":
    main()
