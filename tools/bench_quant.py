#!/usr/bin/env python3
"""Quantization benchmark table (not a test).

    python3 tools/bench_quant.py logs/<run>.txt [more logs]   # figures a training run logged
    python3 tools/bench_quant.py --synthetic [--batches 64]   # time the stages on this machine's device

From logs (through tools/runlog.py) it reads the lines train_gpt.py writes (gptq:hessians, gptq:quantize,
serialize:, artifact:, pre-quantization / quantized val_bpb, quantization_tax). --synthetic builds the full default model
(shapes follow the environment's settings, e.g. MODEL_DIM=...), runs Hessian collection on random
tokens in the per-rank micro-batch of an 8-GPU run, GPTQ and packing, and prints the same stages.
Bars for the full model on an H100: Hessians over 64 batches <= 13 s; GPTQ + compression < 60 s.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import runlog  # noqa: E402
import train_gpt as tg  # noqa: E402

COLUMNS = [  # (column, where tools/runlog.py puts the line, field)
    ("hessian_s", "gptq:hessians", "seconds"),
    ("batches", "gptq:hessians", "batches"),
    ("train+calib_s", "gptq:hessians", "train+calibration"),
    ("gptq_s", "gptq:quantize", "seconds"),
    ("compress_s", "serialize", "seconds"),
    ("raw_B", "serialize", "raw_bytes"),
    ("model_B", "serialize", "compressed_bytes"),
    ("ratio", "serialize", "ratio"),
    ("code_B", "artifact", "code_bytes"),
    ("total_B", "artifact", "total"),
    ("margin_B", "artifact", "margin"),
    ("prequant_bpb", "pre_quantization_post_ema", "val_bpb"),
    ("quant_bpb", "quantized", "val_bpb"),
]


def parse_log(text: str) -> dict:
    """{column: the figure as logged} of one run log (tools/runlog.py reads it); "" where the log lacks it."""
    log = runlog.parse_log(text)
    lines = dict(log.phases, artifact=log.artifact, **{name: m.fields for name, m in log.metrics.items()})
    row = {column: lines.get(where, {}).get(key, "") for column, where, key in COLUMNS}
    row["tax_bpb"] = "" if log.quantization_tax is None else f"{log.quantization_tax:+.8f}"
    return row


def synthetic(batches: int) -> dict:
    s = tg.Settings()
    rt = tg.Runtime(s)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = tg.GPT(s).to(rt.device)
    with torch.no_grad():  # trained-like weights: zero-initialised projections would compress unrealistically fast
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.use_attention(s.attn_backend, rt.device)
    model.looping = s.num_loops > 0
    rows = s.train_batch_tokens // (8 * s.train_seq_len)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, s.vocab_size, (rows, s.train_seq_len + 1), generator=g) for _ in range(batches)]
    row = {"batches": str(batches)}
    rt.sync()
    t0 = time.perf_counter()
    hessians = tg.collect_hessians(model, data, rt)
    rt.sync()
    row["hessian_s"] = f"{time.perf_counter() - t0:.1f}"
    t0 = time.perf_counter()
    qstate = tg.quantize_model(model.state_dict(), hessians, s)
    rt.sync()
    row["gptq_s"] = f"{time.perf_counter() - t0:.1f}"
    t0 = time.perf_counter()
    streams = tg.serialize_quantized(qstate, {})
    blob, _ = tg.pack_artifact(streams, s.compressor, min(32, len(tg.os.sched_getaffinity(0))))
    row["compress_s"] = f"{time.perf_counter() - t0:.1f}"
    raw = sum(map(len, streams))
    code = tg.code_bytes(s)
    row.update(raw_B=str(raw), model_B=str(len(blob)), ratio=f"{raw / len(blob):.3f}", code_B=str(code),
               total_B=str(len(blob) + code), margin_B=str(s.artifact_limit_bytes - len(blob) - code))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="*", type=Path, help="run logs (logs/<RUN_ID>.txt)")
    parser.add_argument("--synthetic", action="store_true", help="time the stages on random data instead")
    parser.add_argument("--batches", type=int, default=64, help="calibration batches for --synthetic")
    args = parser.parse_args(argv)
    if not args.logs and not args.synthetic:
        parser.error("give run logs or --synthetic")
    rows = [("synthetic", synthetic(args.batches))] if args.synthetic else []
    rows += [(p.stem, parse_log(p.read_text())) for p in args.logs]
    columns = [c for c, _, _ in COLUMNS] + ["tax_bpb"]
    print(" | ".join(["run"] + columns))
    for name, row in rows:
        print(" | ".join([name] + [row.get(c, "") or "-" for c in columns]))


if __name__ == "__main__":
    main()
