#!/usr/bin/env python3
"""Training-throughput benchmark: run train_gpt.py for a fixed number of steps and report tokens/s
before and after depth recurrence switches on, step time and peak memory.

    python3 tools/bench.py                       # full config, 1 process, 60 steps, loop at step 30
    python3 tools/bench.py --steps 80 --nproc 8  # through torchrun
    python3 tools/bench.py KEY=VALUE ...         # any train_gpt.py setting, e.g. PARALLEL_RESIDUAL_MODE=split
    python3 tools/bench.py --ablate              # the config, then each speed feature flipped, one run each
    python3 tools/bench.py --ablate lean mlp     # only those flips (names: see SPEED_FEATURES)

Not a test: the figures depend on the machine. The first steps after each graph switch are left out
of the averages (they can still include allocator warm-up)."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import runlog  # noqa: E402


# Speed features and the flip --ablate times against the run's own settings (one full run each; torch's
# compile cache, shared by the runs of one call, makes the repeated graphs compile faster).
SPEED_FEATURES = {
    "lean": ("the step without host syncs, off: the ranks check the clock every step", {"CLOCK_CHECK_EVERY": "1"}),
    "mlp": ("fused MLP: Triton forward + CUTLASS EVT backward instead of the plain path", {"MLP_KERNEL": "cutlass"}),
    "fp8": ("the MLP's four GEMMs in FP8 (e4m3 values, e5m2 gradients) instead of bf16", {"MLP_KERNEL": "fp8"}),
    "loss": ("fused softcapped cross-entropy off: the plain loss", {"LOSS_KERNEL": "torch"}),
    "qk": ("fused q/k RMS norm + partial RoPE + query gain (Triton) instead of inductor's kernels", {"QK_KERNEL": "triton"}),
    "coordinate": ("inductor coordinate-descent tuning of the fused kernels", {"COMPILE_MODE": "coordinate"}),
    "autotune": ("max-autotune: Triton GEMM templates with fused epilogues", {"COMPILE_MODE": "max-autotune"}),
    "docmask": ("document-masked attention (flex) instead of causal SDPA", {"DOC_MASK": "1"}),
    "varlen": ("document-masked attention, the training step through PyTorch's varlen kernel", {"DOC_MASK": "1", "ATTN_BACKEND": "varlen"}),
}


def summarize(lines, skip_after_switch: int):
    """Step time before and after the recurrence switches on (RunLog.phase_rates: from step 5 on, and from one
    logging interval after the switch), peak memory, last loss, from the run's output lines."""
    log = runlog.parse_log("\n".join(lines))
    result = {}
    rates = log.phase_rates(skip_steps=5, skip_after_switch=skip_after_switch)
    for name, phase in (("before_loop", "before_looping"), ("after_loop", "looping")):
        if phase in rates:
            r = rates[phase]
            result[name] = {"steps": r["steps"], "step_ms": r["ms_per_step"], "tokens_per_s": r["tokens_per_s"]}
    if log.peak_memory_mib:
        result["peak_allocated_mib"], result["peak_reserved_mib"] = log.peak_memory_mib
    result["last_train_loss"] = log.steps[-1].train_loss if log.steps else None
    return result, log


def run_until_training_ends(cmd, env, steps: int) -> list:
    """The run's stdout lines up to its last training step (and the peak-memory line after it); the run is
    then stopped, since quantization and evaluation say nothing about training throughput."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, last_step = [], f"step:{steps}/{steps} train_loss:"
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(("peak_memory", "ema:applied")) and any(x.startswith(last_step) for x in lines):
            proc.terminate()
            break
    proc.wait()
    if not any(x.startswith(last_step) for x in lines):
        print("\n".join(lines[-40:]))
        sys.exit(f"bench: train_gpt.py exited with {proc.returncode} before step {steps}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--loop-at", type=float, default=0.5, help="ENABLE_LOOPING_AT as a fraction of --steps")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=10, help="log (and so check the clock) every N steps")
    ap.add_argument("--json", help="also write the summary here (with --ablate a list, rewritten after each run)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE settings for train_gpt.py")
    ap.add_argument("--ablate", nargs="*", choices=sorted(SPEED_FEATURES), metavar="FEATURE",
                    help=f"also time each speed feature flipped ({', '.join(SPEED_FEATURES)}; default all)")
    args = ap.parse_args()
    base = dict(kv.partition("=")[::2] for kv in args.overrides)
    variants = [("as configured", base)]
    if args.ablate is not None:
        variants += [(name, dict(base, **SPEED_FEATURES[name][1])) for name in (args.ablate or SPEED_FEATURES)]
    results = []
    for name, overrides in variants:
        result = bench_once(args, overrides)
        result["variant"] = name
        results.append(result)
        if args.json:  # after every run: a call stopped by its time limit keeps the variants that finished
            Path(args.json).write_text(json.dumps(results if args.ablate is not None else result, indent=2))
        print(json.dumps(result, indent=2), flush=True)
    if len(results) > 1:
        print(ablation_table(results))


def bench_once(args, overrides: dict) -> dict:
    env = dict(os.environ, ITERATIONS=str(args.steps), MAX_WALLCLOCK_SECONDS="0", ENABLE_LOOPING_AT=str(args.loop_at),
               TRAIN_LOG_EVERY=str(args.log_every), WARMUP_STEPS=str(args.warmup_steps), VAL_LOSS_EVERY="0",
               RUN_ID=f"bench_{time.time_ns()}", **overrides)
    cmd = [sys.executable, "train_gpt.py"] if args.nproc == 1 else \
        ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", "train_gpt.py"]
    t0 = time.time()
    lines = run_until_training_ends(cmd, env, args.steps)
    result, log = summarize(lines, skip_after_switch=args.log_every)
    result.update(wall_seconds=time.time() - t0, command=" ".join(cmd), overrides=overrides,
                  device=" ".join(f"{k}: {v}" for k, v in log.versions.items()),
                  paths={k: log.info.get(k, "") for k in ("attention_backend", "mlp_kernel", "loss_kernel", "qk_kernel")},
                  mfu=mean_mfu(lines))
    return result


def mean_mfu(lines) -> str:
    values = [float(x.split("mfu:")[1].split("%")[0]) for x in lines if " mfu:" in x]
    return f"{sum(values) / len(values):.1f}%" if values else "n/a"


def ablation_table(results) -> str:
    def rate(r, phase):
        return r.get(phase, {}).get("tokens_per_s")
    first = results[0]
    rows = ["| variant | tokens/s before looping | vs first | tokens/s looping | vs first | peak allocated MiB |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        cells = []
        for phase in ("before_loop", "after_loop"):
            now, ref = rate(r, phase), rate(first, phase)
            cells += [f"{now / 1e6:.3f}M" if now else "-", f"{100 * (now / ref - 1):+.1f}%" if now and ref else "-"]
        rows.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r.get('peak_allocated_mib', '-')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
