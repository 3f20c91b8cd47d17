"""Generate a small, deterministic, English-like corpus for smoke tests.

No download is needed: documents come from a tiny grammar (names, places,
subjects, verbs, objects, adjectives, numbers, dates, prices, temperatures)
plus a fixed set of "facts" that recur across documents, so a tiny model's
loss falls quickly and it can memorise something. Paragraphs are separated by
blank lines and some words are non-ASCII (café, naïve, Zürich, €, °C) so byte
counting is exercised. Document lengths vary from about 20 to 600 words.

    python3 data/make_smoke_corpus.py --out data/smoke --docs 4000 --seed 0

writes ``data/smoke/docs.jsonl`` (one ``{"text": ...}`` per line). With
``--build`` it also trains a tokenizer and writes challenge-format shards via
build_shards:

    python3 data/make_smoke_corpus.py --out data/smoke --build --vocab-size 1024

gives ``data/smoke/datasets/fineweb10B_sp1024/fineweb_{val,train}_*.bin`` and
``data/smoke/tokenizers/fineweb_1024_bpe.model``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_shards  # noqa: E402
from shard_io import die  # noqa: E402

NAMES = ["Alice", "Bruno", "Chloé", "Dmitri", "Elena", "Farid", "Greta", "Hiro",
         "Ingrid", "José", "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya"]
PLACES = ["Paris", "Zürich", "Oslo", "Kyoto", "Lima", "Cairo", "São Paulo",
          "the old café", "the harbour", "the market", "the library", "the mountain village"]
SUBJECTS = ["the farmer", "a young teacher", "my neighbour", "the engineer", "an old sailor",
            "the baker", "a curious child", "the mayor", "our doctor", "the musician"]
VERBS = ["built", "painted", "sold", "found", "carried", "repaired", "visited", "cooked",
         "borrowed", "described", "cleaned", "measured"]
OBJECTS = ["a wooden boat", "the red bicycle", "three loaves of bread", "a small garden",
           "the broken clock", "an old map", "a basket of apples", "the blue door",
           "a crème brûlée", "the village bridge", "a pair of boots", "the school roof"]
ADJECTIVES = ["quiet", "bright", "naïve", "clever", "tired", "happy", "careful", "strange",
              "cold", "generous", "patient", "busy"]
NOUNS = ["morning", "winter", "journey", "market", "river", "story", "garden", "festival"]
PLURALS = ["chairs", "letters", "baskets", "candles", "fences", "stories", "gardens", "boxes"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
CONNECTORS = ["Later,", "After that,", "Meanwhile,", "In the evening,", "Of course,", "Still,"]
# Recurring facts: the same sentences in many documents give a model something to memorise.
FACTS = [
    "The river Alder flows north for 212 kilometres before it reaches the sea.",
    "Mount Veyra is 3481 metres high and is covered in snow from November to April.",
    "The café on Rue Lemoine opens at 7:30 every morning and closes at 18:00.",
    "A ticket on the night train from Oslo to Bergen costs 64 € for students.",
    "The town of Elmsbury was founded in 1284 by a family of weavers.",
    "Honey bees visit about 2000 flowers on a warm day in June.",
    "The lighthouse at Cape Morrow has guided ships since 1871.",
    "The annual Zürich book fair sells more than 40000 books in a single weekend.",
    "Water boils at 100 °C at sea level and freezes at 0 °C.",
    "The naïve painter Rosa Kell sold her first picture for 12 € in 1953.",
]


# Sentence templates; each {slot} is filled by a fresh random choice (see sentence()).
TEMPLATES = [
    "{name} {verb} {obj} in {place} on {date}.",
    "The {adj} {noun} was long, and {name} said it cost {price} €.",
    "In {year}, {subj} {verb} {count} {plural}.",
    "{Subj} was {adj} because {name} had {verb} {obj}.",
    '"Did you see {obj}?" asked {name}. "Yes, in {place}," said {name2}.',
    "It was {temp} °C in {place} when {subj} arrived ({date}).",
    "{connector} {subj} {verb} {obj} and met {name} at {place}.",
    "{fact}",
    "{name} thinks that {subj} is {adj}, but {name2} does not agree.",
]


def sentence(rng: random.Random) -> str:
    """One sentence: a random template with its slots filled."""
    subj = rng.choice(SUBJECTS)
    slots = {
        "name": rng.choice(NAMES), "name2": rng.choice(NAMES), "place": rng.choice(PLACES),
        "subj": subj, "Subj": subj.capitalize(), "verb": rng.choice(VERBS),
        "obj": rng.choice(OBJECTS), "adj": rng.choice(ADJECTIVES), "noun": rng.choice(NOUNS),
        "plural": rng.choice(PLURALS), "connector": rng.choice(CONNECTORS), "fact": rng.choice(FACTS),
        "date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1950, 2024)}",
        "year": rng.randint(1950, 2024), "count": rng.randint(2, 40),
        "price": rng.randint(2, 90), "temp": rng.randint(-5, 35),
    }
    return rng.choice(TEMPLATES).format(**slots)


def document(rng: random.Random) -> str:
    """A titled document of 2-6 sentence paragraphs, about 20-600 words long."""
    # Log-uniform length: many short documents, some long ones, like web text.
    target_words = int(20 * 30 ** rng.random())
    paragraphs = [f"Notes from {rng.choice(PLACES)}"]
    words = 0
    while words < target_words:
        para = " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))
        paragraphs.append(para)
        words += len(para.split())
    return "\n\n".join(paragraphs)


def generate_documents(n_docs: int, seed: int) -> list[str]:
    """``n_docs`` documents; the same (n_docs, seed) always gives the same list."""
    rng = random.Random(seed)
    return [document(rng) for _ in range(n_docs)]


def write_jsonl(docs: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (docs.jsonl, and datasets/ tokenizers/ with --build)")
    p.add_argument("--docs", type=int, default=4000, help="number of documents (4000 gives ~1.1M train tokens)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same corpus")
    p.add_argument("--build", action="store_true", help="also train a tokenizer and write shards")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocab size for --build")
    p.add_argument("--allow-smaller-vocab", action="store_true",
                   help="with --build: keep a smaller tokenizer when the corpus supports fewer pieces (named by its size)")
    p.add_argument("--num-val-docs", type=int, default=150, help="leading documents that form the val split")
    p.add_argument("--shard-tokens", type=int, default=400_000,
                   help="max tokens per shard (small, so loaders see several train shards)")
    return p


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.docs < 2:
        die("--docs must be at least 2")
    out = Path(args.out)
    docs = generate_documents(args.docs, args.seed)
    write_jsonl(docs, out / "docs.jsonl")
    print(f"wrote {len(docs)} documents to {out / 'docs.jsonl'}")
    if not args.build:
        return None
    model_path = build_shards.train_tokenizer(docs, args.vocab_size, out / "tokenizers", args.allow_smaller_vocab)
    sp = build_shards.load_tokenizer(model_path)
    dataset_dir = out / "datasets" / build_shards.dataset_dir_name(sp.get_piece_size())
    stats = build_shards.build_shards(docs, sp, dataset_dir, args.num_val_docs, args.shard_tokens)
    print(f"tokenizer {model_path} ({sp.get_piece_size()} pieces)")
    build_shards.print_stats(stats, dataset_dir)
    return stats


if __name__ == "__main__":
    main()
