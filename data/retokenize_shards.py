"""Re-tokenize challenge shards with a new tokenizer: decode every document, train a tokenizer with the
challenge recipe on the training documents, encode, write shards.

Made for PRESET=pr1204, whose record ran on SP1024 data, when only SP8192 shards are at hand (the
offline proxy): each document of the source shards (``[BOS] + ids``, split at every BOS; a document
cut by a shard boundary is joined again) is decoded with the source tokenizer, a ``--vocab-size``
tokenizer is trained on the training documents only (validation text never shapes it) with the recipe
of build_shards.py (BPE, byte_fallback, split_digits, nmt_nfkc, no dummy prefix, coverage 0.999,
pad/bos/eos/unk 0/1/2/3), and every document is encoded again into the same split, in the same order,
as ``[BOS] + ids``. The text is what the source pieces spell (NFKC-normalised, as the source tokenizer
saw it); SP1024 pieces carry it byte for byte (byte fallback).

    python3 data/retokenize_shards.py data/datasets/proxy_sp8192 --tokenizer data/tokenizers/fineweb_8192_bpe.model \\
        --vocab-size 1024 --out data/proxy_sp1024

writes OUT/datasets/fineweb10B_sp{V}/fineweb_{val,train}_%06d.bin and OUT/tokenizers/fineweb_{V}_bpe.model
(+ .vocab). Train shards: as many as the source had (so every rank of a multi-GPU run still owns one),
of equal size, unless --shard-tokens is given. The decoded text is held in memory (the proxy: ~130 MB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_shards import (BOS_ID, ShardWriter, dataset_dir_name, encode_documents, load_tokenizer,  # noqa: E402
                          train_tokenizer)
from shard_io import ShardFormatError, die, read_shard  # noqa: E402


def split_shards(folder: Path, split: str) -> list[Path]:
    files = sorted(folder.glob(f"fineweb_{split}_*.bin"))
    if not files:
        die(f"{folder} has no fineweb_{split}_*.bin shards: give the folder of the source shards")
    return files


def read_documents(files: list[Path]) -> list[np.ndarray]:
    """The documents of one split: its shards joined in name order and cut before every BOS (a shard may
    end inside a document), each without its BOS."""
    try:
        tokens = np.concatenate([read_shard(f) for f in files])
    except ShardFormatError as e:
        die(f"{e}: not a challenge shard")
    if len(tokens) == 0 or tokens[0] != BOS_ID:
        die(f"{files[0]} does not start with BOS (id {BOS_ID}): a split must start at a document")
    starts = np.flatnonzero(tokens == BOS_ID)
    return [tokens[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def decode(sp, docs: list[np.ndarray]) -> list[str]:
    return sp.decode([d.tolist() for d in docs])


def write_split(sp, texts: list[str], folder: Path, split: str, shard_tokens: int | None, shards: int) -> dict:
    """Encode texts as [BOS] + ids and write them as shards of shard_tokens (None: `shards` equal ones)."""
    encoded = list(encode_documents(sp, texts))
    total = sum(len(t) for t in encoded)
    writer = ShardWriter(folder, split, shard_tokens or max(1, -(-total // shards)))
    for tokens in encoded:
        writer.add(tokens)
    writer.flush()
    return {"docs": len(texts), "tokens": writer.tokens, "shards": writer.shards}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="folder of the source fineweb_{val,train}_*.bin shards")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model the source shards were made with")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces of the new tokenizer (pr1204: 1024)")
    p.add_argument("--out", required=True, help="output root; writes OUT/datasets/ and OUT/tokenizers/")
    p.add_argument("--shard-tokens", type=int,
                   help="max tokens per shard (default: the source's number of train shards, equal sizes)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.shard_tokens is not None and args.shard_tokens < 1:
        die("--shard-tokens must be at least 1")
    t0 = time.perf_counter()
    source, out = Path(args.source), Path(args.out)
    files = {split: split_shards(source, split) for split in ("val", "train")}  # both checked before slow work
    source_sp = load_tokenizer(args.tokenizer)
    texts = {split: decode(source_sp, read_documents(f)) for split, f in files.items()}
    t_decode = time.perf_counter()
    model = train_tokenizer(texts["train"], args.vocab_size, out / "tokenizers")
    sp = load_tokenizer(model)
    t_train = time.perf_counter()
    dataset = out / "datasets" / dataset_dir_name(sp.get_piece_size())
    dataset.mkdir(parents=True, exist_ok=True)
    for stale in dataset.glob("fineweb_*_*.bin"):  # shards of an earlier, larger build would join this one
        stale.unlink()
    stats = {split: write_split(sp, texts[split], dataset, split, args.shard_tokens, len(files[split]))
             for split in ("val", "train")}
    t_end = time.perf_counter()
    for split, st in stats.items():
        print(f"{split}: {st['docs']} docs, {st['tokens']} tokens, {st['shards']} shards")
    print(f"tokenizer: {model} (trained on the {stats['train']['docs']} train docs)")
    print(f"wrote {dataset} seconds: decode {t_decode - t0:.1f} train_tokenizer {t_train - t_decode:.1f} "
          f"encode_write {t_end - t_train:.1f} total {t_end - t0:.1f}")
    return dict(stats, tokenizer=str(model), dataset=str(dataset))


if __name__ == "__main__":
    main()
