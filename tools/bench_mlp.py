#!/usr/bin/env python3
"""Time the MLP's forward + backward on the GPU for each MLP_KERNEL path, at the full config's shape.

    python3 tools/bench_mlp.py                 # 98,304 tokens x 512 -> 2048 -> 512, bf16, eager and compiled
    python3 tools/bench_mlp.py --tokens 16384 --no-compile

Paths: torch (plain PyTorch), triton (Triton up-projection + LeakyReLU(0.5)^2, plain backward) and cutlass
(triton's forward, CUTLASS EVT backward; needs `pip install --no-build-isolation ./cutlass_evt_fusion`).
Prints plain-text tables: ms per forward + backward (median of --iters, CUDA events), effective TFLOP/s
(the six GEMMs' 12 * tokens * dim * hidden FLOPs over that time) and peak memory above the inputs; then
the two fused pieces alone against what they replace. Not a test: the figures depend on the machine."""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def timed(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over iters runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def paths_available() -> list:
    paths = ["torch"]
    if tg.triton_mlp_up_act():
        paths.append("triton")
        try:
            tg.pick_mlp_kernel("cutlass")
            paths.append("cutlass")
        except tg.UserError as e:
            print(f"cutlass path skipped: {e}")
    else:
        print("triton and cutlass paths skipped: Triton does not import")
    try:
        paths.append(tg.pick_mlp_kernel("fp8"))
    except tg.UserError as e:
        print(f"fp8 path skipped: {e}")
    return paths


def bench_paths(args, paths, compile_it: bool):
    tokens, dim, hidden = args.tokens, args.dim, args.hidden
    seq = min(args.seq_len, tokens)
    flops = 12.0 * tokens * dim * hidden
    rows = []
    for path in paths:
        torch.manual_seed(0)
        mlp = tg.MLP(dim, hidden, kernel=path).cuda()
        torch.nn.init.normal_(mlp.proj.weight, std=0.02)
        x = torch.randn(tokens // seq, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        fn = torch.compile(mlp, fullgraph=True, dynamic=False) if compile_it else mlp

        def step():
            x.grad = None
            mlp.zero_grad(set_to_none=True)
            fn(x).backward(grad)
        try:
            step()  # compiles, autotunes
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = timed(step, args.iters, args.warmup)
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            rows.append((path, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}", f"{peak:.0f}"))
        except Exception as e:  # one path failing must not hide the others
            rows.append((path, "failed", "-", "-"))
            print(f"{path}{' (compiled)' if compile_it else ''} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        del mlp, x, grad, fn
        torch.cuda.empty_cache()
    return rows


def bench_pieces(args, paths):
    tokens, dim, hidden = args.tokens, args.dim, args.hidden
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    w_up = (torch.randn(hidden, dim, device="cuda", generator=g) / dim ** 0.5).bfloat16()
    w_down = (torch.randn(dim, hidden, device="cuda", generator=g) / hidden ** 0.5).bfloat16()
    grad = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    pre = F.linear(x, w_up)
    gemm_flops = 2.0 * tokens * dim * hidden
    rows = []

    def add(name, fn):
        try:
            ms = timed(fn, args.iters, args.warmup)
            rows.append((name, f"{ms:.3f}", f"{gemm_flops / ms / 1e9:.0f}"))
        except Exception as e:
            rows.append((name, "failed", "-"))
            print(f"{name} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")

    add("up+act torch (cuBLAS GEMM, then leaky_relu().square())", lambda: F.leaky_relu(F.linear(x, w_up), 0.5).square())
    if "triton" in paths:
        add("up+act triton (one kernel, writes pre and post)", lambda: torch.ops.pgolf.mlp_up_act(x, w_up))
    add("dpre torch ((g @ W_down) * phi'(pre))", lambda: (grad @ w_down) * torch.where(pre > 0, 2.0 * pre, 0.5 * pre))
    if "cutlass" in paths:
        add("dpre cutlass (EVT epilogue)", lambda: torch.ops.cutlass_evt_fusion.mlp_down_backward(grad, w_down, pre))
    return rows


def table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=98304, help="tokens per forward (one GPU's micro-batch: 48 x 2048)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_mlp.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True  # as train_gpt.py sets it (bf16 GEMMs are unaffected)
    print(f"device: {torch.cuda.get_device_name()} torch: {torch.__version__} shape: {args.tokens} tokens x "
          f"{args.dim} -> {args.hidden} -> {args.dim} bf16, median of {args.iters}")
    paths = paths_available()
    header = ["path", "fwd+bwd ms", "TFLOP/s", "peak MiB"]
    print("\nMLP forward + backward, eager")
    print(table(header, bench_paths(args, paths, compile_it=False)))
    if not args.no_compile:
        print("\nMLP forward + backward, torch.compile(fullgraph=True)")
        print(table(header, bench_paths(args, paths, compile_it=True)))
    print("\nfused pieces alone (TFLOP/s of the one GEMM inside)")
    print(table(["piece", "ms", "TFLOP/s"], bench_pieces(args, paths)))


if __name__ == "__main__":
    main()
