#!/usr/bin/env python3
"""Compare byte layouts and compressors for a quantized model (not a test; prints a table).

    python3 tools/measure_packing.py --artifact logs/<run>.ptz      # a trained model's real statistics
    python3 tools/measure_packing.py --random                       # random-normal weights, full shapes
    python3 tools/measure_packing.py --random --only shipped,one-stream --threads 1,16

Each row is one way to store the same grid values and scales; "shipped" is train_gpt.py's format,
byte for byte what a training run writes (settings header included, the artifact's own compressor).
The order-0 entropy row is the bound an ideal per-tensor coder of independent values would reach.
The figures behind the format's choices are in the comment above ARTIFACT_MAGIC in train_gpt.py.
"""
import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def artifact_settings(s) -> dict:
    """The settings header a training run with settings s stores in its artifact (as build_artifact does)."""
    return {n: getattr(s, n.lower()) for n in tg.artifact_setting_names()}


def read_artifact(path: Path) -> tuple:
    """(qstate, stored settings, compressor) of an artifact file."""
    qstate, settings, _ = tg.read_artifact(path)  # every defect is a one-line UserError
    with open(path, "rb") as f:
        head = f.read(6)  # pack_artifact's header: magic (4 bytes), format version (1), compressor index (1), ...
    return qstate, settings, tg.COMPRESSORS[head[5]]


def random_qstate(seed: int) -> dict:
    """The full-size model's state, weights ~ N(0, 1), rounded with SDClip scales (identity Hessian)."""
    s = tg.Settings(environ={})
    g = torch.Generator().manual_seed(seed)
    qstate = {}
    model = tg.GPT(s)
    calibrated = {*tg.quantized_linears(model), "tok_emb.weight"}
    for name, t in model.state_dict().items():
        kind, bits, clip = tg.quantization_plan(name, t, s, name in calibrated)
        if kind != "int":
            qstate[name] = tg.QTensor("fp16", t.half(), t.dtype)
            continue
        W = torch.randn(t.shape, generator=g)
        scale = tg.sdclip_scales(W, bits, clip)
        q = tg.round_to_grid(W, scale.float()[:, None], 2 ** (bits - 1) - 1).to(torch.int8)
        qstate[name] = tg.QTensor("int", q, t.dtype, scale, bits)
    return qstate


def entropy_bytes(qstate) -> float:
    total = 0.0
    for qt in qstate.values():
        if qt.kind == "int":
            counts = np.bincount(qt.data.numpy().ravel().astype(np.int64) + 128, minlength=256)
            p = counts[counts > 0] / counts.sum()
            total += -(p * np.log2(p)).sum() * qt.data.numel() / 8
    return total


def with_int_streams(qstate, settings, transform):
    """The shipped streams with every matrix stream replaced by transform(q int8 [rows, cols]) -> bytes."""
    streams = tg.serialize_quantized(qstate, settings)
    ints = [qt.data for qt in qstate.values() if qt.kind == "int"]
    return streams[:1] + [transform(q) for q in ints]


def bitpack6(q):
    u = (q.numpy().ravel().astype(np.int64) + 32).astype(np.uint32)
    u = np.concatenate([u, np.zeros(-len(u) % 4, np.uint32)]).reshape(-1, 4)
    word = u[:, 0] | u[:, 1] << 6 | u[:, 2] << 12 | u[:, 3] << 18
    return np.stack([(word >> k) & 255 for k in (0, 8, 16)], 1).astype(np.uint8).tobytes()


def bit_planes(q):
    z = q.numpy().ravel().astype(np.int16)
    z = np.where(z >= 0, 2 * z, -2 * z - 1).astype(np.uint8)  # zigzag: small magnitudes -> small codes
    return np.concatenate([z & 7, z >> 3]).tobytes()


def reference_container(qstate) -> bytes:
    """torch.save of {name.q, name.scale, passthrough} + stride-2 byte shuffle: the records' container."""
    w = {}
    for name, qt in qstate.items():
        if qt.kind == "int":
            w[name + ".q"], w[name + ".scale"] = qt.data, qt.scale
        else:
            w[name] = qt.data
    buf = io.BytesIO()
    torch.save({"w": w}, buf)
    raw = buf.getvalue()
    return b"BSHF\x02" + tg.byte_shuffle(raw[:len(raw) // 2 * 2], 2) + raw[len(raw) // 2 * 2:]


def layouts(qstate, settings: dict, compressor: str):
    """{name: (list of uncompressed streams, compressor)}, built lazily. The layouts of this format all
    carry the shipped settings header, so they differ only in how the tensors are laid out and
    compressed; "reference" is the records' container, which has no header."""
    shipped = lambda: tg.serialize_quantized(qstate, settings)  # noqa: E731
    other = next(c for c in tg.COMPRESSORS if c != compressor)
    return {
        "shipped": lambda: (shipped(), compressor),
        "row-major": lambda: (with_int_streams(qstate, settings, lambda q: q.numpy().tobytes()), compressor),
        "one-stream": lambda: ([b"".join(shipped())], compressor),
        "bitpack6": lambda: (with_int_streams(qstate, settings, lambda q: bitpack6(q) if q.abs().max() < 32 else q.numpy().tobytes()), compressor),
        "bit-planes": lambda: (with_int_streams(qstate, settings, bit_planes), compressor),
        f"shipped-{other}": lambda: (shipped(), other),
        "reference": lambda: ([reference_container(qstate)], compressor),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", type=Path, help="an artifact written by train_gpt.py")
    source.add_argument("--random", action="store_true", help="random-normal weights of the full default shapes")
    parser.add_argument("--only", default="", help="comma-separated layouts (default: all)")
    parser.add_argument("--threads", default="0", help="comma-separated thread counts for the timing (0: all cores)")
    args = parser.parse_args(argv)
    try:
        qstate, settings, compressor = (read_artifact(args.artifact) if args.artifact else
                                        (random_qstate(0), artifact_settings(tg.Settings(environ={})), "brotli"))
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    n_values = sum(qt.data.numel() for qt in qstate.values() if qt.kind == "int")
    print(f"quantized values: {n_values:,}  order-0 entropy bound: {entropy_bytes(qstate):,.0f} B (grid values only)")
    wanted = [x for x in args.only.split(",") if x]
    cores = len(tg.os.sched_getaffinity(0))
    print(f"{'layout':14s} {'threads':>7s} {'raw B':>12s} {'compressed B':>13s} {'vs shipped':>10s} {'seconds':>8s}")
    shipped = None
    for name, build in layouts(qstate, settings, compressor).items():
        if wanted and name not in wanted:
            continue
        streams, kind = build()
        for threads in [int(t) or cores for t in args.threads.split(",")]:
            t0 = time.perf_counter()
            blob, _ = tg.pack_artifact(streams, kind, threads)
            seconds = time.perf_counter() - t0
            shipped = shipped or (len(blob) if name == "shipped" else None)
            rel = f"{100 * (len(blob) / shipped - 1):+.2f}%" if shipped else ""
            print(f"{name:14s} {threads:7d} {sum(map(len, streams)):12,d} {len(blob):13,d} {rel:>10s} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
