#!/usr/bin/env python3
"""Where a training step's time goes: a torch.profiler trace of a few compiled steps before and after
depth recurrence switches on, summarised as a table of kernel categories (GEMMs, attention, fused
elementwise/norm kernels, reductions, copies, communication) against the step's wall time, whose
remainder is host time and idle GPU.

    python3 tools/profile_step.py                       # full config from the environment (DATA_PATH, ...)
    python3 tools/profile_step.py --steps 3 --trace t.json KEY=VALUE ...

Not a test: the figures depend on the machine. It trains for real (warm-up, then the profiled steps)
but writes no artifact and evaluates nothing."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Kernel name fragments -> category, first match wins (names are lower-cased first).
CATEGORIES = [
    ("communication", ("nccl", "allreduce", "all_gather", "reduce_scatter")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "attn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "sm90_", "matmul", "mlp_up_act")),
    ("q/k norm + RoPE and loss kernels (QK_KERNEL, LOSS_KERNEL: triton)", ("qk_norm_rope", "softcap_ce")),
    ("fused kernels (inductor: casts, norms, activations)", ("triton_",)),
    ("copy/memset", ("memcpy", "memset", "copy_", "copykernel")),
    ("reduction", ("reduce", "norm", "sum_", "softmax", "cross_entropy", "nll")),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled")),
]


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in lowered for f in fragments):
            return label
    return "other"


def profile(trainer, optimizers, loader, steps: int, trace_path=None) -> dict:
    """Profile `steps` optimizer steps; returns {category: ms per step} plus wall and kernel totals."""
    import torch
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    trainer.rt.sync()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for k in range(steps):
            trainer.forward_backward(trainer.fetch(loader))
            optimizers.step(k, 1.0)
            optimizers.zero_grad()
        trainer.rt.sync()
        wall_ms = 1000 * (time.perf_counter() - t0) / steps
    if trace_path:
        prof.export_chrome_trace(str(trace_path))
    totals = {}
    for event in prof.key_averages():
        # GPU kernels and copies only: an operator's device time is also its kernels', so counting
        # operators as well would count every kernel twice.
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        label = category(event.key)
        totals[label] = totals.get(label, 0.0) + device_us / 1000 / steps
    kernels = sum(totals.values())
    top = sorted(((e.key, getattr(e, "self_device_time_total", 0) / 1000 / steps, e.count // steps)
                  for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda t: -t[1])
    return {"wall_ms": wall_ms, "kernel_ms": kernels, "categories": totals,
            "host_or_idle_ms": max(0.0, wall_ms - kernels), "top_kernels": top}


def table(results: dict) -> str:
    labels = [c for c, _ in CATEGORIES] + ["other"]
    phases = list(results)
    rows = ["| category | " + " | ".join(f"{p} ms/step | share" for p in phases) + " |",
            "|---|" + "---:|---:|" * len(phases)]
    for label in labels + ["host/idle (wall - kernels)"]:
        cells = []
        for p in phases:
            r = results[p]
            ms = r["host_or_idle_ms"] if label.startswith("host") else r["categories"].get(label, 0.0)
            cells.append(f"{ms:.1f} | {100 * ms / r['wall_ms']:.0f}%")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append("| **step wall time** | " + " | ".join(f"**{results[p]['wall_ms']:.1f}** | 100%" for p in phases) + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per phase")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps per phase first (compile, allocator)")
    ap.add_argument("--trace", type=Path, help="also write the looping phase's Chrome trace here")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--top", type=int, default=0, help="also list the N kernels that take the most time per step")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE settings for train_gpt.py")
    args = ap.parse_args()
    for kv in args.overrides:
        key, _, value = kv.partition("=")
        os.environ[key] = value
    os.environ.setdefault("RUN_ID", f"profile_{int(time.time())}")
    import train_gpt as tg
    s = tg.Settings()
    rt = tg.Runtime(s, dry_run=True)  # prints, writes no log
    tg.use_tf32(rt)
    trainer = tg.Trainer(s, rt)
    optimizers, loader = tg.Optimizers(trainer.model, s, rt), trainer.new_loader()
    results = {}
    for phase, looping in (("before looping", False), ("looping", True)):
        if looping and not trainer.can_loop:
            continue
        trainer.model.looping = looping
        for k in range(args.warmup):
            trainer.forward_backward(trainer.fetch(loader))
            optimizers.step(k, 1.0)
            optimizers.zero_grad()
        results[phase] = profile(trainer, optimizers, loader, args.steps, args.trace if looping else None)
    print(f"device: {tg.torch.cuda.get_device_name() if tg.torch.cuda.is_available() else 'cpu'}  "
          f"tokens/step: {s.train_batch_tokens}  attention: {trainer.attention_backend}  "
          f"mlp_kernel: {trainer.model.mlp_kernel}  loss_kernel: {trainer.model.loss_kernel}  "
          f"qk_kernel: {trainer.model.qk_kernel}")
    print(table(results))
    for phase, r in results.items():
        if args.top:
            print(f"\n{phase}: top {args.top} kernels (ms per step, launches per step, category)")
            for name, ms, count in r["top_kernels"][:args.top]:
                print(f"{ms:8.2f} {count:6d}  {category(name)[:12]:12s}  {name[:110]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    rt.close()


if __name__ == "__main__":
    main()
