#!/usr/bin/env python3
"""Write the shipped, self-extracting train_gpt.py of a submission folder.

    python3 tools/pack_submission.py --out records/track_10min_16mb/<folder>/train_gpt.py

The packed file is a two-line stub (train_gpt.pack_script) that decompresses the source less its
comments, docstrings and blank lines (train_gpt.shipping_source: the same program) and runs it, with
tracebacks showing those lines. Its size is what a run's artifact accounting
counts by default (CODE_BYTES_FROM=packed computes the same bytes from the running source), so pack
the exact source that trained the submission's runs. The readable train_gpt.py stays the one to edit.
"""
import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def unpack_script(packed: bytes) -> str:
    """The source text a packed stub runs, read back without running it."""
    import brotli
    tree = ast.parse(packed.decode("latin-1"))
    # the payload: the string literal whose .encode('l1') the stub hands to brotli.decompress
    literal = next(node.value.value for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "encode"
                   and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))
    return brotli.decompress(literal.encode("latin-1")).decode("utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT / "train_gpt.py", help="readable source (default: the repo's train_gpt.py)")
    parser.add_argument("--out", type=Path, required=True, help="where the packed train_gpt.py goes")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        sys.exit(f"error: --source {args.source} does not exist")
    if args.out.resolve() == args.source.resolve():
        sys.exit(f"error: --out {args.out} is the readable source itself: pack into a submission folder instead")
    source = args.source.read_text(encoding="utf-8")
    packed = tg.pack_script(source)
    if unpack_script(packed) != tg.shipping_source(source):  # the stub must hand back exactly the shipped code
        sys.exit("error: the packed stub does not decode to the shipped source (a brotli or Python bug?): nothing written")
    tg.write_atomic(args.out, packed)
    print(f"packed: source_bytes:{len(source.encode('utf-8'))} packed_bytes:{len(packed)} out:{args.out}")


if __name__ == "__main__":
    main()
