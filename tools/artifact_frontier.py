#!/usr/bin/env python3
"""Artifact frontier: bytes, quantization tax and seconds of quantization/compression options on one checkpoint.

    # a trained state, once (any run with SAVE_CHECKPOINT saves its post-EMA weights)
    SAVE_CHECKPOINT=ckpt/proxy.pt SLIDING_WINDOW_ENABLED=0 TTT_ENABLED=0 MAX_WALLCLOCK_SECONDS=240 \\
        DATA_PATH=./data/datasets/proxy_sp8192 torchrun --standalone --nproc_per_node=1 train_gpt.py
    # the table: every combination of the built-in list, tax on the first 4,194,304 validation targets
    DATA_PATH=./data/datasets/proxy_sp8192 python3 tools/artifact_frontier.py --checkpoint ckpt/proxy.pt \\
        --out docs/artifact_frontier.md
    # or chosen combinations: NAME=SETTING=value,SETTING=value (repeatable)
    python3 tools/artifact_frontier.py --checkpoint ckpt/proxy.pt --combo base= --combo e7=EMBED_BITS=7
    # inside a time-limited call: --out is rewritten after every row, and no row starts past the budget
    python3 tools/artifact_frontier.py --checkpoint ckpt/proxy.pt --only base,embed7,lqer8 --budget-seconds 200 \
        --out frontier.md
    # the next call goes on where that one stopped: rows of the same checkpoint, prefix and settings are kept
    python3 tools/artifact_frontier.py --checkpoint ckpt/proxy.pt --only base,embed7,lqer8 --out frontier.md --resume

For each combination it collects the GPTQ Hessians on training batches (cached per calibration source and
count), quantizes the checkpoint with train_gpt.py's own functions, packs the artifact exactly as a training
run would (same settings header, so the base row's bytes are the training run's model_bytes), decodes it again
(decode seconds = unpack + dequantize, what EVAL_ONLY spends), rebuilds the model from the decoded state and
scores the validation prefix. Tax = that val_bpb minus the unquantized checkpoint's on the same prefix.
Model settings come from the checkpoint; everything else from the environment, as for train_gpt.py: set
TRAIN_BATCH_TOKENS, EVAL_SEQ_LEN and the like as the training run had them (its micro-batch is the calibration
batch). Optional compressors (zpaq, constriction) that are not installed are skipped with a message.
"""
import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import torch  # noqa: E402

import runlog  # noqa: E402
import train_gpt as tg  # noqa: E402

# The issue-14 list: today's default first (the reference row), each option alone, then the calibration sweep
# and the frontier records' stacks (#1626/#1769 clips with int7 embedding; #1797 LQER; #1908 AWQ; #1855 rows+ZPAQ);
# GPTQ_TCQ (trellis-coded GPTQ) at three fine steps, and with 64 and 128 states.
COMBOS = {
    "base": {},
    "lzma": {"COMPRESSOR": "lzma"},
    "zpaq": {"COMPRESSOR": "zpaq"},
    "ans": {"COMPRESSOR": "ans"},
    "rows": {"ROW_ORDER": "similarity"},
    "rows+zpaq": {"ROW_ORDER": "similarity", "COMPRESSOR": "zpaq"},
    "embed7": {"EMBED_BITS": "7"},
    "embed7_clip15": {"EMBED_BITS": "7", "EMBED_CLIP_SIGMAS": "15"},
    "role_clips": {"ATTN_CLIP_SIGMAS": "13", "MLP_CLIP_SIGMAS": "12", "EMBED_CLIP_SIGMAS": "15", "EMBED_BITS": "7"},
    "mixed56": {"GPTQ_MIXED_BITS": "5,6"},
    "mlp5": {"MLP_BITS": "5"},
    "attn7": {"ATTN_BITS": "7"},
    "lqer8": {"LQER_TOP_K": "8", "LQER_RANK": "4"},
    "awq64": {"AWQ_GROUP": "64"},
    "tcq": {"GPTQ_TCQ": "1"},
    "tcq_step50": {"GPTQ_TCQ": "1", "GPTQ_TCQ_STEP": "0.5"},
    "tcq_step64": {"GPTQ_TCQ": "1", "GPTQ_TCQ_STEP": "0.64"},
    "tcq+rows+zpaq": {"GPTQ_TCQ": "1", "ROW_ORDER": "similarity", "COMPRESSOR": "zpaq"},
    # more trellis states (GPTQ_TCQ_STATES) at the step that matched the 8-state error on a synthetic layer
    "tcq64_step587": {"GPTQ_TCQ": "1", "GPTQ_TCQ_STATES": "64", "GPTQ_TCQ_STEP": "0.587"},
    "tcq128_step592": {"GPTQ_TCQ": "1", "GPTQ_TCQ_STATES": "128", "GPTQ_TCQ_STEP": "0.592"},
    "calib8": {"GPTQ_CALIBRATION_BATCHES": "8"},
    "calib16": {"GPTQ_CALIBRATION_BATCHES": "16"},
    "calib32": {"GPTQ_CALIBRATION_BATCHES": "32"},
    "stack": {"EMBED_BITS": "7", "ATTN_CLIP_SIGMAS": "13", "MLP_CLIP_SIGMAS": "12", "EMBED_CLIP_SIGMAS": "15",
              "LQER_TOP_K": "8", "AWQ_GROUP": "64"},
    "stack+ans": {"EMBED_BITS": "7", "ATTN_CLIP_SIGMAS": "13", "MLP_CLIP_SIGMAS": "12", "EMBED_CLIP_SIGMAS": "15",
                  "LQER_TOP_K": "8", "AWQ_GROUP": "64", "COMPRESSOR": "ans"},
    "stack+rows+zpaq": {"EMBED_BITS": "7", "ATTN_CLIP_SIGMAS": "13", "MLP_CLIP_SIGMAS": "12",
                        "EMBED_CLIP_SIGMAS": "15", "LQER_TOP_K": "8", "AWQ_GROUP": "64", "ROW_ORDER": "similarity",
                        "COMPRESSOR": "zpaq"},
}
# Only quantization settings may vary: everything else would change the model being measured.
VARIABLE = {x.name for x in tg.SETTINGS if x.group == "quantization"} - {"ARTIFACT_PATH", "ARTIFACT_LIMIT_BYTES"}


def parse_combo(text: str) -> tuple:
    """'name=SETTING=value,SETTING=value' -> (name, {SETTING: value}); 'name=' is the defaults.

    A value may hold commas itself (GPTQ_MIXED_BITS=5,6): see runlog.settings_items."""
    name, _, rest = text.partition("=")
    settings = {}
    for key, value in runlog.settings_items(rest):
        if value is None or key not in VARIABLE:
            raise SystemExit(f"error: --combo {text!r}: {key!r} is not a quantization setting "
                             f"({', '.join(sorted(VARIABLE))}); write NAME=SETTING=value,SETTING=value")
        settings[key] = value
    if not name:
        raise SystemExit(f"error: --combo {text!r} has no name: write NAME=SETTING=value,...")
    return name, settings


def combo_text(combo: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in combo.items()) or "(defaults)"


def combo_settings(model_settings: dict, combo: dict) -> tg.Settings:
    """The run's settings for one combination: the environment, the checkpoint's model settings, the combo."""
    s = tg.Settings(environ={**os.environ, **combo}, **{k.lower(): v for k, v in model_settings.items()})
    s.validate(int(os.environ.get("WORLD_SIZE", "1")))
    return s


class Frontier:
    """One checkpoint loaded once; Hessians cached per calibration; one row per combination."""

    def __init__(self, checkpoint: Path, val_tokens: int):
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model_settings = ckpt["settings"]
        self.s = combo_settings(self.model_settings, {})
        self.rt = tg.Runtime(self.s)
        tg.use_tf32(self.rt)
        self.trainer = tg.Trainer(self.s, self.rt)
        tg.load_checkpoint(self.trainer.model, self.s, self.rt, str(checkpoint))
        self.trainer.model.looping = self.trainer.can_loop
        data = self.trainer.data
        n = min(val_tokens, len(data.val_tokens) - 1) // self.s.eval_seq_len * self.s.eval_seq_len
        self.val_tokens, self.tables, self.targets = data.val_tokens[:n + 1], data.tables, n
        self.hessians = {}
        self.baseline = self.score(self.trainer.model, self.trainer.eval_losses)
        # One model receives every combination's decoded weights in place, so its compiled loss compiles once.
        self.quantized = copy.deepcopy(self.trainer.model)
        self.quantized_losses = tg.compiled(self.quantized.token_losses, self.s.compile)

    def score(self, model, losses) -> float:
        return tg.evaluate(model, losses, self.val_tokens, self.tables, self.s.eval_seq_len,
                           tg.val_batch_seqs(self.s, self.rt), self.rt).bpb

    def hessians_for(self, s) -> tuple:
        key = (s.gptq_calibration, s.gptq_calibration_batches)
        if key not in self.hessians:
            model, rt = self.trainer.model, self.rt
            rt.sync()
            t0 = time.perf_counter()
            if s.gptq_calibration == "selfgen":
                batches = tg.selfgen_batches(model, s.gptq_calibration_batches, s.train_seq_len, s.vocab_size,
                                             s.seed + rt.rank, rt.device)
            else:
                batches = tg.calibration_batches(self.trainer.new_loader(), s.gptq_calibration_batches)
            hessians = tg.collect_hessians(model, batches, rt)
            rt.sync()
            self.hessians[key] = (hessians, time.perf_counter() - t0)
        return self.hessians[key]

    def row(self, name: str, combo: dict) -> dict:
        s, rt = combo_settings(self.model_settings, combo), self.rt
        hessians, hessian_seconds = self.hessians_for(s)
        t0 = time.perf_counter()
        qstate = tg.quantize_model(self.trainer.model.state_dict(), hessians, s)
        rt.sync()
        t1 = time.perf_counter()
        streams = tg.serialize_quantized(qstate, {n: getattr(s, n.lower()) for n in tg.artifact_setting_names()},
                                         s.row_order)
        blob, _ = tg.pack_artifact(streams, s.compressor, min(32, len(os.sched_getaffinity(0))))
        t2 = time.perf_counter()
        decoded, _ = tg.unpack_artifact(blob, name)
        with torch.no_grad():
            self.quantized.load_state_dict(tg.dequantize_state(decoded), strict=True)
        rt.sync()
        t3 = time.perf_counter()
        bpb = self.score(self.quantized, self.quantized_losses)
        # train_gpt.py's pre-training estimate of the same bytes, from shapes and settings alone: each row
        # cross-checks it on real weights
        estimate = tg.estimate_model_bytes(self.trainer.model.state_dict(), set(hessians), s)
        return {"name": name, "settings": combo_text(combo),
                "model_bytes": len(blob), "estimate": estimate, "val_bpb": bpb, "tax": bpb - self.baseline,
                "hessian_s": hessian_seconds, "gptq_s": t1 - t0, "encode_s": t2 - t1, "decode_s": t3 - t2}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(out: Path) -> Path:
    """Where --out's rows are also kept as JSON, with what they were measured on: --resume reads them."""
    return out.with_name(out.name + ".json")


def resumable_rows(out: Path, measured_on: dict) -> dict:
    """{name: row} measured earlier on this checkpoint and validation prefix by this train_gpt.py, from --out's
    sidecar (none if the sidecar is missing or was measured on something else)."""
    path = sidecar(out)
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if any(saved.get(k) != v for k, v in measured_on.items()):
        print(f"artifact_frontier: {path} holds rows of another checkpoint, prefix or train_gpt.py: measuring "
              "afresh", flush=True)
        return {}
    return {r["name"]: r for r in saved["rows"]}


def table(rows: list, frontier: Frontier, command: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    base = rows[0]["model_bytes"]
    lines = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {device}; "
             f"command: `{command}`; validation prefix {frontier.targets:,} targets; unquantized val_bpb "
             f"{frontier.baseline:.6f}; bytes vs the first row ({rows[0]['name']}).", "",
             "| combination | settings | model bytes | vs first | val_bpb | tax bpb | Hessian s | GPTQ s "
             "| encode s | decode s | estimated before training |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        miss = (r["estimate"] - r["model_bytes"]) / r["model_bytes"]
        lines.append(f"| {r['name']} | {r['settings']} | {r['model_bytes']:,} | {r['model_bytes'] - base:+,} "
                     f"| {r['val_bpb']:.6f} | {r['tax']:+.6f} | {r['hessian_s']:.1f} | {r['gptq_s']:.1f} "
                     f"| {r['encode_s']:.1f} | {r['decode_s']:.1f} | {r['estimate']:,} ({miss:+.1%}) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="state saved by SAVE_CHECKPOINT")
    parser.add_argument("--combo", action="append", default=[],
                        help="NAME=SETTING=value,... (repeatable; default: the built-in issue-14 list)")
    parser.add_argument("--only", default="", help="comma-separated names of the built-in list to run")
    parser.add_argument("--val-tokens", type=int, default=1 << 22, help="validation targets scored (a prefix)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here (rewritten after every row)")
    parser.add_argument("--budget-seconds", type=float,
                        help="after the first row, start no combination that would end after this many seconds "
                             "(estimate: the longest so far); the table holds the rows measured")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows --out already holds for this checkpoint and prefix (its .json sidecar) "
                             "whose settings are unchanged, and measure only the others")
    args = parser.parse_args(argv)
    if args.resume and not args.out:
        raise SystemExit("error: --resume reads the rows of an earlier --out: give --out")
    if not args.checkpoint.is_file():
        raise SystemExit(f"error: --checkpoint {args.checkpoint} does not exist: make one with SAVE_CHECKPOINT=path")
    combos = dict(parse_combo(c) for c in args.combo) if args.combo else dict(COMBOS)
    if args.only:
        unknown = set(args.only.split(",")) - set(COMBOS)
        if unknown:
            raise SystemExit(f"error: --only names {', '.join(sorted(unknown))} are not in the built-in list "
                             f"({', '.join(COMBOS)})")
        combos = {k: v for k, v in COMBOS.items() if k in args.only.split(",")}
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    started, longest, rows, stopped = time.monotonic(), 0.0, [], None
    measured_on = {"checkpoint_sha256": file_sha256(args.checkpoint), "val_tokens": args.val_tokens,
                   "source_sha256": tg.source_sha256()}
    earlier = resumable_rows(args.out, measured_on) if args.resume else {}

    def save(text: str):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        sidecar(args.out).write_text(json.dumps({**measured_on, "rows": rows}, indent=1))
    try:
        frontier = Frontier(args.checkpoint, args.val_tokens)
        for name, combo in combos.items():
            if name in earlier and earlier[name]["settings"] == combo_text(combo):
                rows.append(earlier[name])
                longest = max(longest, earlier[name].get("seconds", 0.0))
                print(f"artifact_frontier combo:{name} resumed (measured by an earlier call)", flush=True)
                continue
            # the first row always runs: it is the reference every other row's bytes are compared with
            if rows and args.budget_seconds is not None and time.monotonic() - started + longest > args.budget_seconds:
                stopped = (f"budget: {args.budget_seconds:.0f} s would be exceeded by {name} (the longest combination "
                           f"so far took {longest:.0f} s): stopped before it")
                print(stopped, flush=True)
                break
            t0 = time.monotonic()
            try:
                rows.append(frontier.row(name, combo))
            except tg.UserError as e:  # e.g. an optional compressor that is not installed: say so, go on
                print(f"artifact_frontier: skipped {name}: {e}", file=sys.stderr, flush=True)
                continue
            rows[-1]["seconds"] = time.monotonic() - t0
            longest = max(longest, rows[-1]["seconds"])
            r = rows[-1]
            print(f"artifact_frontier combo:{name} model_bytes:{r['model_bytes']} tax_bpb:{r['tax']:+.6f} "
                  f"encode_s:{r['encode_s']:.1f} decode_s:{r['decode_s']:.1f}", flush=True)
            if args.out:  # rewritten after every row: a call cut short keeps what it measured
                save(table(rows, frontier, command) + "\n(partial: more combinations follow)\n")
    except tg.UserError as e:
        raise SystemExit(f"error: {e}") from None
    if not rows:
        raise SystemExit("error: no combination could be measured")
    resumed = sum(r is earlier.get(r["name"]) for r in rows)
    text = (table(rows, frontier, command) + (f"\n({resumed} of these rows were measured by an earlier call of the "
                                               f"same checkpoint and prefix)\n" if resumed else "")
            + (f"\n(partial: {stopped})\n" if stopped else ""))
    print(text)
    if args.out:
        save(text)
    frontier.rt.close()
    return rows


if __name__ == "__main__":
    main()
