#!/usr/bin/env python3
"""Time the attention's q/k RMS norm + partial RoPE + query gain, forward + backward, for each QK_KERNEL path
at the full config's shape, on the GPU.

    python3 tools/bench_qk.py                        # 98,304 tokens, 8 query / 4 KV heads of 64, RoPE on 16 dims
    python3 tools/bench_qk.py --tokens 16384 --iters 50

Paths: torch compiled (the plain chain as a training step runs it: inductor fuses it), torch eager, and
triton (torch.ops.pgolf.qk_norm_rope), eager and compiled. The output gradients come in SDPA's heads-first
layout, as in training. Prints ms per forward + backward (median of --iters, CUDA events) and the effective
bandwidth: the 5 passes over q and k's bf16 bytes that a fused forward + backward needs at least (read x, write
out; read x and d out, write dx). Not a test: the figures depend on the machine."""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import train_gpt as tg  # noqa: E402
from bench_mlp import table, timed  # noqa: E402


def plain(q, k, cos, sin, gain):
    q = tg.apply_partial_rope(tg.rms_norm(q), cos, sin) * gain.to(q.dtype)[:, None]
    return q, tg.apply_partial_rope(tg.rms_norm(k), cos, sin)


def fused(q, k, cos, sin, gain):
    return torch.ops.pgolf.qk_norm_rope(q, k, cos, sin, gain.to(q.dtype))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=98304)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rope-dims", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_qk: needs a CUDA GPU")
    B, T = args.tokens // args.seq_len, args.seq_len
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    gain = torch.full((H,), 5.0, device="cuda", requires_grad=True)
    cos, sin = tg.rope_tables(T, args.rope_dims, 10000.0, T, "cuda", torch.bfloat16)
    dq_out = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    dk_out = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    moved = 5 * 2 * (q.numel() + k.numel())

    paths = [("torch, compiled (inductor)", torch.compile(plain, fullgraph=True, dynamic=False)), ("torch, eager", plain)]
    if tg.triton_qk_norm_rope():
        paths += [("triton", fused), ("triton, compiled", torch.compile(fused, fullgraph=True, dynamic=False))]
    else:
        print("triton path skipped: Triton does not import")
    rows = []
    for name, fn in paths:
        def step():
            q.grad = k.grad = gain.grad = None
            torch.autograd.backward(fn(q, k, cos, sin, gain), (dq_out, dk_out))
        try:
            step()  # compiles, autotunes
            ms = timed(step, args.iters, args.warmup)
            rows.append((name, f"{ms:.3f}", f"{moved / ms / 1e6:.0f}"))
        except Exception as e:  # one path failing must not hide the others
            rows.append((name, "failed", "-"))
            print(f"{name} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    print(f"device: {torch.cuda.get_device_name()}  q [{B}, {T}, {H}, {D}]  k [{B}, {T}, {Hkv}, {D}]  "
          f"rope dims {args.rope_dims}  bf16")
    print(table(["path", "ms fwd+bwd", "GB/s (5 passes)"], rows))


if __name__ == "__main__":
    main()
