#!/usr/bin/env python3
"""Time PyTorch SDPA forward + backward on a stream of new shapes, with and without the cuDNN backend
(not a test; meant for one GPU). LoRA TTT batches change shape almost every step; cuDNN builds an
execution plan for each new shape, which is why evaluate_ttt_lora turns it off.

    python3 tools/bench_sdpa_shapes.py [--shapes 24]
"""
import argparse
import time

import torch
import torch.nn.functional as F


def time_new_shapes(n: int, heads: int = 8, kv_heads: int = 4, head_dim: int = 64, seed: int = 0) -> float:
    """Mean milliseconds of one causal GQA attention forward + backward, each at a shape not seen before
    (rows 2..199, widths 64..2048 in steps of 64); the first 4 calls are left out as warm-up."""
    g = torch.Generator().manual_seed(seed)
    seen, times = set(), []
    while len(times) < n:
        rows, width = int(torch.randint(2, 200, (), generator=g)), 64 * int(torch.randint(1, 33, (), generator=g))
        if (rows, width) in seen:
            continue
        seen.add((rows, width))
        q = torch.randn(rows, heads, width, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(rows, kv_heads, width, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * sum(times[4:]) / len(times[4:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=int, default=24, help="new shapes to time per setting")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: tools/bench_sdpa_shapes.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch: {torch.__version__}")
    print(f"cuDNN allowed: {time_new_shapes(args.shapes):.1f} ms per new shape")
    torch.backends.cuda.enable_cudnn_sdp(False)
    print(f"cuDNN off:     {time_new_shapes(args.shapes):.1f} ms per new shape")


if __name__ == "__main__":
    main()
