#!/usr/bin/env python3
"""Optimizer-step benchmark: time Optimizers.step (gradient reduction, clipping, Muon, AdamW) of the
full model with random gradients, without the forward and backward around it.

    python3 tools/bench_optimizer.py                                  # this train_gpt.py, 1 process
    python3 tools/bench_optimizer.py --script train_gpt.py --script old_train_gpt.py   # before / after
    torchrun --standalone --nproc_per_node=8 tools/bench_optimizer.py MUON_COMM_DTYPE=fp32

Per script it prints one line `optimizer_step script:... ms:... host_ms:... kernels:... kernel_ms:...`:
ms is the GPU time of a step (CUDA events, median), host_ms the time the host needs to queue it,
kernels the GPU kernels (and copies) one step launches, kernel_ms their summed time (torch.profiler).
An old train_gpt.py to compare with: `git show REV:train_gpt.py > old_train_gpt.py`. Not a test: the
figures depend on the machine. On a CPU it runs too (for checking the tool), with CPU times."""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """train_gpt.py (or an older copy of it) as a module of its own name."""
    name = "bench_" + Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Clock:
    """Elapsed time of queued work: CUDA events on a GPU, the wall clock (after the work) on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop_ms(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end)
        return (time.perf_counter() - self.t0) * 1000


def kernel_profile(step, device) -> tuple:
    """(GPU kernels and copies one call of step() launches, their summed ms); (0, 0.0) on a CPU."""
    if device.type != "cuda":
        return 0, 0.0
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    count, us = 0, 0.0
    for event in prof.key_averages():  # device-side entries only: operators would count their kernels twice
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count += event.count
            us += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    return count, us / 1000


def bench(path: str, overrides: dict, steps: int, warmup: int, rank: int, world_size: int, device) -> dict:
    tg = load_script(path)
    s = tg.Settings(environ=dict(overrides))
    rt = type("BenchRuntime", (), dict(rank=rank, world_size=world_size, device=device))()
    torch.manual_seed(0)
    model = tg.GPT(s).to(device)
    opt = tg.Optimizers(model, s, rt)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]

    def fresh_grads():  # as after a backward: the step scales its gradients in place when it clips
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()

    def step(k=0):
        fresh_grads()
        opt.step(k, 1.0)

    for k in range(warmup):  # AdamW state, compilation of the Muon graphs
        step(k)
    clock, gpu_ms, host_ms = Clock(device), [], []
    for k in range(steps):
        fresh_grads()
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock.start()
        t0 = time.perf_counter()
        opt.step(warmup + k, 1.0)
        host_ms.append((time.perf_counter() - t0) * 1000)
        gpu_ms.append(clock.stop_ms())
    kernels, kernel_ms = kernel_profile(step, device)
    return dict(ms=statistics.median(gpu_ms), host_ms=statistics.median(host_ms), kernels=kernels,
                kernel_ms=kernel_ms, params=sum(p.numel() for p in model.parameters()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", action="append", help="a train_gpt.py to time (repeat to compare; default: this one)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per script")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, AdamW state)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE settings for train_gpt.py (default: the full config)")
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    for path in args.script or [str(ROOT / "train_gpt.py")]:
        r = bench(path, overrides, args.steps, args.warmup, rank, world_size, device)
        if rank == 0:
            print(f"optimizer_step script:{path} world_size:{world_size} params:{r['params']} ms:{r['ms']:.3f} "
                  f"host_ms:{r['host_ms']:.3f} kernels:{r['kernels']} kernel_ms:{r['kernel_ms']:.3f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
