#!/usr/bin/env python3
"""Benchmark the evaluation passes of train_gpt.py on a trained model (not a test; meant for one H100).

    # a trained state, once: any run with SAVE_CHECKPOINT saves its post-EMA weights
    SAVE_CHECKPOINT=ckpt/proxy.pt SLIDING_WINDOW_ENABLED=0 TTT_ENABLED=0 DATA_PATH=./data/datasets/proxy_sp8192 \\
        torchrun --standalone --nproc_per_node=1 train_gpt.py
    # the benchmark: every pass on the first 1,048,576 validation targets
    DATA_PATH=./data/datasets/proxy_sp8192 python3 tools/bench_eval.py --checkpoint ckpt/proxy.pt

Without --checkpoint it first trains one for --train-seconds through train_gpt.py. The model settings
come from the checkpoint; everything else (COMPILE, EVAL_*, TTT_*, DATA_PATH, TOKENIZER_PATH) from the
environment, as for train_gpt.py. `torchrun --nproc_per_node=N tools/bench_eval.py ...` works too.

Prints, per pass, val_bpb, seconds, seconds per million scored targets and the estimate for the full
40,540,160-target validation on 8 GPUs, then sliding + chunk TTT against the 480 s bar. The eval
budget is not enforced here (EVAL_FORCE=1), so an over-budget pass is measured rather than refused.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

PASSES = ("plain", "sliding", "ttt_chunk", "ttt_lora")
BAR_SECONDS = 480.0  # sliding + chunk TTT on 8xH100, leaving room for the quantized pass and start-up


def train_checkpoint(path: Path, seconds: float):
    """Train for `seconds` through train_gpt.py (environment as given) and save the post-EMA weights."""
    env = dict(os.environ, SAVE_CHECKPOINT=str(path), MAX_WALLCLOCK_SECONDS=str(seconds),
               SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0", RUN_ID=os.environ.get("RUN_ID", "bench_eval_train"))
    subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, check=True)


def load(args):
    """(model, settings, runtime, evaluation data, label) from a checkpoint or an artifact."""
    if args.artifact:
        s = tg.Settings(eval_force=True, eval_only=str(args.artifact))
        rt = tg.Runtime(s)
        qstate, s = tg.load_artifact_settings(s, rt, str(args.artifact))
        tg.use_tf32(rt)
        return tg.model_from_artifact(qstate, s, rt, str(args.artifact)), s, rt, tg.load_eval_data(s, rt), \
            f"artifact={args.artifact}"
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    overrides = {name.lower(): value for name, value in ckpt["settings"].items()}
    s = tg.Settings(eval_force=True, **overrides)
    rt = tg.Runtime(s)
    tg.log_header(s, rt)
    trainer = tg.Trainer(s, rt)
    tg.load_checkpoint(trainer.model, s, rt, args.checkpoint)
    trainer.model.looping = trainer.can_loop
    return trainer.model, s, rt, trainer.data, f"checkpoint={args.checkpoint}"


def bench(args):
    """Run the passes; returns (summary dict, runtime)."""
    model, s, rt, data, label = load(args)
    try:
        n = min(args.val_tokens, len(data.val_tokens) - 1) // s.eval_seq_len * s.eval_seq_len
        data.val_tokens = data.val_tokens[:n + 1]
        rt.log(f"bench_eval: {label} val_targets={n} passes={','.join(args.passes)} world_size={rt.world_size}")
        results = tg.run_evaluation_passes(model, s, rt, data, passes=args.passes, label_prefix="bench")
        return {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
                "world_size": rt.world_size, "val_targets": n,
                "passes": {name: {"val_loss": r.loss, "val_bpb": r.bpb, "seconds": r.seconds,
                                  "seconds_per_mtok": 1e6 * r.seconds / r.targets,
                                  "estimated_8gpu_full_val_seconds": r.estimated_8gpu_seconds}
                           for name, r in results.items()}}, rt
    except tg.UserError as e:
        rt.close()
        sys.exit(f"error: {e}")


def report(summary: dict) -> str:
    lines = [f"device: {summary['device']} x{summary['world_size']}  val_targets: {summary['val_targets']}", "",
             "| pass | val_bpb | val_loss | seconds | s per M targets | est. 8-GPU full val s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in summary["passes"].items():
        lines.append(f"| {name} | {p['val_bpb']:.6f} | {p['val_loss']:.6f} | {p['seconds']:.1f} | {p['seconds_per_mtok']:.2f} "
                     f"| {p['estimated_8gpu_full_val_seconds']:.0f} |")
    scored = [n for n in ("sliding", "ttt_chunk") if n in summary["passes"]]
    if scored:
        total = sum(summary["passes"][n]["estimated_8gpu_full_val_seconds"] for n in scored)
        lines += ["", f"{' + '.join(scored)} estimated on 8 GPUs: {total:.0f} s (bar {BAR_SECONDS:.0f} s: "
                      f"{'within' if total <= BAR_SECONDS else 'OVER'})"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="state saved by SAVE_CHECKPOINT (default: train one)")
    parser.add_argument("--artifact", type=Path, help="a quantized artifact (.ptz) to evaluate instead of a checkpoint")
    parser.add_argument("--train-seconds", type=float, default=300.0, help="training time when there is no checkpoint")
    parser.add_argument("--val-tokens", type=int, default=1 << 20, help="validation targets to evaluate (a prefix)")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated subset of {','.join(PASSES)}")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.passes = [p for p in args.passes.split(",") if p]
    if set(args.passes) - set(PASSES):
        parser.error(f"--passes must be a subset of {','.join(PASSES)}")
    if args.checkpoint is None and args.artifact is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            parser.error("with several processes pass --checkpoint (train one first with SAVE_CHECKPOINT)")
        args.checkpoint = ROOT / "artifacts" / "bench_eval_checkpoint.pt"
        if not args.checkpoint.exists():
            train_checkpoint(args.checkpoint, args.train_seconds)
    summary, rt = bench(args)
    if rt.master:
        print(report(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    rt.close()


if __name__ == "__main__":
    main()
