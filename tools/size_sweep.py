#!/usr/bin/env python3
"""How big an artifact would a model of this shape make? train_gpt.py's pre-training estimate for each value
of one setting, without data, a GPU or any training: for spending saved bytes on a bigger model.

    python3 tools/size_sweep.py --sweep MLP_MULT=4,5,5.5,5.75,6 MLP_BITS=5
    python3 tools/size_sweep.py --sweep NUM_LAYERS=11,12,13 MLP_BITS=5 EMBED_BITS=7

Each row builds the model on PyTorch's meta device (shapes only) and runs the estimate a real run logs as
`artifact_estimate:` before training (grid values at the Gaussian-on-the-grid cost, corrected by trained
weights; within 1.4% of the measured H200 artifacts). Code bytes are this checkout's packed train_gpt.py.
A run stops before training when its estimate is more than 2.5% over ARTIFACT_LIMIT_BYTES; aim a little
under the limit, since the real bytes come out within about 1.5% of the estimate either way.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def parse_setting(item: str) -> tuple:
    key, sep, value = item.partition("=")
    if not sep or key not in tg.SETTINGS_BY_NAME:
        sys.exit(f"error: {item!r} is not a train_gpt.py setting as KEY=VALUE (see the settings table in README.md)")
    return key, value


def estimate(env: dict) -> dict:
    """Parameters, estimated model bytes and the limit for one configuration (its settings validated)."""
    try:
        s = tg.Settings(environ=env)
        s.validate(1)
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    with torch.device("meta"):
        model = tg.GPT(s)
    return {"params": sum(p.numel() for p in model.parameters()),
            "model_bytes": tg.estimate_model_bytes_of(model, s),
            "limit": s.artifact_limit_bytes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="KEY=v1,v2,...: the setting to vary and its values")
    parser.add_argument("settings", nargs="*", help="KEY=VALUE settings every row takes (commas allowed)")
    args = parser.parse_args(argv)
    key, values = parse_setting(args.sweep)
    values = [v for v in values.split(",") if v]
    if not values:
        sys.exit(f"error: --sweep {args.sweep!r} lists no values, e.g. --sweep MLP_MULT=4,5,6")
    fixed = dict(parse_setting(item) for item in args.settings)
    if key in fixed:
        sys.exit(f"error: {key} is both swept and fixed: give it once")
    rows = [estimate(dict(fixed, **{key: value})) for value in values]  # every value valid before any output
    code = tg.packed_source_bytes()  # what a run counts as its code bytes (CODE_BYTES_FROM=packed)
    shown = " ".join(f"{k}={v}" for k, v in fixed.items()) or "(defaults)"
    print(f"settings: {shown}; code bytes (packed train_gpt.py): {code:,}")
    print(f"| {key} | parameters | estimated model bytes | estimated total | vs limit | fits |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for value, row in zip(values, rows):
        total = row["model_bytes"] + code
        margin = row["limit"] - total
        fits = "yes" if margin >= 0 else "no (refused)" if total > row["limit"] * (1 + tg.ARTIFACT_ESTIMATE_MARGIN) \
            else "no (trains, then over)"
        print(f"| {value} | {row['params']:,} | {row['model_bytes']:,} | {total:,} | {margin:+,} | {fits} |")


if __name__ == "__main__":
    main()
