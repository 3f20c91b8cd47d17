#!/usr/bin/env python3
"""Ablation table: each feature switched on against one baseline, training-side features at equal steps
over several seeds, evaluation-side features on one fixed artifact. Resumable, with a time budget per call.

    # training side: 300 steps of 98,304 tokens (29.5M tokens, inside one epoch of the 32.8M-token proxy)
    python3 tools/ablate.py train --seeds 1337,42 --nproc 1 --log-dir logs/ablate
    # evaluation side: every evaluation feature on the baseline's artifact of one seed
    python3 tools/ablate.py eval --artifact logs/ablate/base_seed1337.ptz --nproc 1 --log-dir logs/ablate
    # the table, from the logs alone (markdown): each row's settings are what its log differs in from
    # its reference's; a --feature's reference other than base is given again with --feature
    python3 tools/ablate.py table --log-dir logs/ablate [--out docs/ablation.md]

    --only smear,min_lr             a subset of the built-in features (the baseline always runs; none: only
                                    the --feature ones)
    --feature NAME=K=V,K=V[@REF]    a feature of your own (repeatable): its settings, and the row it is
                                    compared with (default: base), e.g. --feature lr26=MATRIX_LR=0.026
    --budget-seconds 540            start no run that would end after this many seconds of this call (the
                                    estimate is the longest run so far in the call, failed ones included);
                                    rerun to continue
    --script pinned.py              run this copy of train_gpt.py (a study spread over sessions keeps one
                                    source while the checkout moves on; finished logs count only for it)
    --no-base                       run no baseline: its finished logs (base_seed<S>.txt, eval_base.txt) of
                                    this source and settings must be in --log-dir already, e.g. carried to
                                    the GPU machine from an earlier one; checked before any run starts
    --parallel 8                    8 runs at once: on an 8-GPU box each gets its own GPU(s); where they
                                    must share one, the scores hold but the step times do not
    KEY=VALUE ...                   settings every run takes (after the regime, before the feature)

Each run is train_gpt.py with RUN_ID=<feature>_seed<S> (train) or eval_<feature> (eval) in --log-dir; a
finished log of the same settings and source is reused, so a command that stopped (budget, crash, a
10-minute limit) resumes where it was. The baseline is run `base`. Training rows compare the quantized
artifact's val_bpb (no sliding window, no TTT: the model, not the evaluation) of the same seed, so each
row's delta is paired by seed; evaluation rows compare the final val_bpb of the same artifact, every
evaluation setting pinned to this environment's (and preset's) value rather than the artifact's stored one.
Columns: mean delta, each seed's delta, mean step time delta, artifact bytes delta, and the evaluation's
8-GPU full-validation estimate delta (train_gpt.py's eval_budget line); training rows also give the steps
made, the live model's val_bpb at the last step (before the EMA and quantization) and the quantization tax
(the quantized score less the unquantized post-EMA one), each as a delta. A row
whose artifact is over the challenge's 16,000,000 B (a feature that lifts its own ARTIFACT_LIMIT_BYTES to keep
its score) has its bytes marked so.

Not a test: the figures depend on the machine and the data. Say which regime a figure comes from.
"""
import argparse
import os
import queue
import re
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import runlog  # noqa: E402
import seeds as seeds_tool  # noqa: E402
import train_gpt as tg  # noqa: E402

# Equal steps inside one epoch of the proxy: 300 x 98,304 = 29.5M of its 32.8M training tokens, so no
# token is seen twice and every run sees the same ones. No wallclock stop (the schedule follows the
# step count). EMA 0.955: the records' 0.997 averages over ~333 of their ~4,500 steps, the last ~7%; the
# same share of 300 steps is ~22, a decay of 0.955. (At 0.997 the average would still weigh the initial
# weights by 0.997^300 = 0.41. The 0.99 used until 2026-12-06 weighed the steep early part of the curve
# so much that it cost 0.09 bpb against the live weights and rewarded features for shrinking that cost: the
# frontier-against-pr1529 runs, records/proxy_1gpu_frontier_vs_pr1529/: frontier won by 0.049 bpb at EMA 0.99
# (seeds 1337, 42) and lost by 0.0058 at 0.93 (seed 1337).) The training runs skip the sliding and TTT passes:
# they measure the model.
# One micro-batch a step (GRAD_ACCUM_STEPS=1): the default 8 / WORLD_SIZE would cut 48 windows into 8
# micro-batches of 6 on one GPU (247 ms a step on the H200, 2026-12-04), the same windows and mean gradient.
TRAIN_REGIME = dict(ITERATIONS="300", TRAIN_BATCH_TOKENS="98304", GRAD_ACCUM_STEPS="1", MAX_WALLCLOCK_SECONDS="0",
                    EMA_DECAY="0.955", VAL_LOSS_EVERY="0", SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0")


# The challenge's artifact limit (train_gpt.py's default ARTIFACT_LIMIT_BYTES): a row may lift a run's own limit to
# keep its score, and the table then marks its bytes.
CHALLENGE_LIMIT_BYTES = tg.SETTINGS_BY_NAME["ARTIFACT_LIMIT_BYTES"].default


@dataclass
class Feature:
    name: str
    settings: dict
    reference: str = "base"
    note: str = ""


# Training-side features of the records after PR #1529 (../shared/spec/frontier.md section 1.4).
TRAIN_FEATURES = [
    Feature("smear", {"SMEAR_GATE": "1"}, note="SmearGate, BOS-masked (#1667, #1851)"),
    Feature("attn_gate", {"ATTN_GATE_DIMS": "12"}, note="sparse attention output gate, 12 dims (#1787)"),
    Feature("min_lr", {"MIN_LR": "0.1"}, note="LR floor at 10% of the peak (#1787)"),
    Feature("polar_express", {"MUON_NS_COEFFS": "polar_express"}, note="Polar Express Newton-Schulz (#1787)"),
    Feature("greedy_1855", {"WARMDOWN_FRAC": "0.85", "BETA2": "0.99"}, note="#1855's greedy warm-down and AdamW beta2"),
    # #1855's clips pack 600 KB over the limit on this stack (16,599,457 B at 300 steps, H200, 2026-12-06), so
    # this row lifts the limit to keep its score; the table marks its bytes as over the challenge's limit.
    Feature("greedy_clips", {"EMBED_CLIP_SIGMAS": "14", "MLP_CLIP_SIGMAS": "11.5", "ARTIFACT_LIMIT_BYTES": "17000000"},
            note="#1855's clip sigmas (embedding 14, MLP 11.5), scored although over 16,000,000 B"),
    Feature("seq_schedule", {"TRAIN_SEQ_SCHEDULE": "1024@0,2048@0.1,3072@0.7", "TRAIN_SEQ_LEN": "3072"},
            note="progressive context 1k -> 2k -> 3k (#2014)"),
    # Every record from #1530 on attends within documents (FA3 varlen); here flex attention on CUDA.
    Feature("doc_mask", {"DOC_MASK": "1"}, note="document-masked attention (#1530's VarLen)"),
]

# Evaluation-side features on one artifact. The LoRA refinements are compared with plain LoRA TTT.
EVAL_FEATURES = [
    Feature("ctx2560", {"EVAL_SEQ_LEN": "2560"}, note="evaluation and TTT context 2560 (#1953)"),
    Feature("ngram_tilt", {"NGRAM_TILT": "1"}, note="token-only prefix n-gram tilt (#1514, #2135)"),
    Feature("lora", {"TTT_MODE": "lora", "SLIDING_WINDOW_ENABLED": "0"}, note="per-document LoRA TTT (#1530)"),
    Feature("lora_b_only", {"TTT_MODE": "lora", "SLIDING_WINDOW_ENABLED": "0", "TTT_LORA_RESET": "b_only"},
            reference="lora", note="warm-start A, reset only B (#1767)"),
    Feature("lora_1855", {"TTT_MODE": "lora", "SLIDING_WINDOW_ENABLED": "0", "TTT_LORA_ALPHA": "144",
                          "TTT_LORA_RANK": "80", "TTT_LORA_WD": "1.0"}, reference="lora",
            note="alpha 144, rank 80, WD 1.0 (#1767, #1855)"),
    Feature("lora_no_qv", {"TTT_MODE": "lora", "SLIDING_WINDOW_ENABLED": "0", "TTT_LORA_TARGETS": "k,o,mlp,head"},
            reference="lora", note="no Q/V adapters (#1953)"),
    Feature("lora_short_docs", {"TTT_MODE": "lora", "SLIDING_WINDOW_ENABLED": "0", "TTT_SHORT_DOC_TOKENS": "256",
                                "TTT_SHORT_DOC_CHUNK_SIZE": "8"}, reference="lora",
            note="8-token score-first chunks over each document's first 256 targets (#2014)"),
    Feature("lora_phased", {"TTT_MODE": "lora", "SLIDING_WINDOW_ENABLED": "0", "TTT_PHASES": "1"}, reference="lora",
            note="one phase of global SGD over the scored prefix (#1610)"),
]


def env_text(value) -> str:
    """A setting's typed value as its environment variable would spell it (True -> "1")."""
    return str(int(value)) if isinstance(value, bool) else str(value)


# The preset's whole evaluation side at once, against the same base: the rows above change one thing each,
# and what they give together need not be their sum (LoRA alone is worse than chunk TTT on the proxy; its
# refinements gain against it). Read from train_gpt.py's preset, so it follows the preset as it changes.
EVAL_FEATURES.append(Feature(
    "frontier_eval", {name: env_text(value) for name, value in tg.PRESETS["frontier"].items()
                      if tg.SETTINGS_BY_NAME[name].role == "score"},
    note="PRESET=frontier's evaluation settings together"))


@dataclass
class Row:
    feature: Feature
    deltas: dict = field(default_factory=dict)    # seed -> feature minus reference, val_bpb
    step_ms: list = field(default_factory=list)   # per seed: feature minus reference
    artifact_bytes: list = field(default_factory=list)
    eval_seconds: list = field(default_factory=list)
    steps: list = field(default_factory=list)     # per seed: feature minus reference (a wallclock regime differs)
    live: list = field(default_factory=list)      # per seed: the live model's val_bpb at the last step, difference
    quant_tax: list = field(default_factory=list)  # per seed: difference of what quantization cost each run, bpb
    over_limit: bool = False                      # a seed's artifact was over the challenge's 16,000,000 B


def parse_feature(text: str) -> Feature:
    """NAME=K=V,K=V[@REF] -> Feature, every key a train_gpt.py setting."""
    name, sep, rest = text.partition("=")
    # '@' also appears inside values (TRAIN_SEQ_SCHEDULE=1024@0,2048@0.5): only a trailing feature name
    # (a letter first) is a reference
    head, at, tail = rest.rpartition("@")
    reference = ""
    if at and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", tail):
        rest, reference = head, tail
    if not sep or not name.replace("_", "").replace("-", "").isalnum():
        sys.exit(f"error: --feature {text!r} must read NAME=KEY=VALUE[,KEY=VALUE...][@REFERENCE], e.g. lr26=MATRIX_LR=0.026")
    settings = {}
    for key, value in runlog.settings_items(rest):
        if value is None:
            sys.exit(f"error: --feature {text!r}: {key!r} is not KEY=VALUE")
        settings[key] = value
    return Feature(name, settings, reference or "base", note="from the command line")


def check_features(features: list, defined: set):
    """Every setting exists and every reference is a run of the plan, before any run starts."""
    for f in features:
        unknown = [k for k in f.settings if k not in tg.SETTINGS_BY_NAME]
        if unknown:
            sys.exit(f"error: feature {f.name}: {', '.join(unknown)} is not a train_gpt.py setting (see README.md)")
        if f.reference not in defined:
            sys.exit(f"error: feature {f.name} is compared with {f.reference!r}, which is not a feature of this plan "
                     f"(base or one of: {', '.join(sorted(defined - {'base'}))})")


def plan_features(builtin: list, only: str | None, extra: list) -> list:
    features = {f.name: f for f in builtin}
    if only is not None:
        wanted = [] if only == "none" else [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in features]
        if unknown:
            sys.exit(f"error: --only {only!r}: no built-in feature {', '.join(unknown)} (known: {', '.join(features)})")
        chosen = {n: features[n] for n in wanted}
        # a chosen feature's reference runs too (lora_b_only needs lora)
        for f in list(chosen.values()):
            if f.reference != "base" and f.reference in features:
                chosen.setdefault(f.reference, features[f.reference])
        features = chosen
    for f in extra:
        features[f.name] = f
    if "base" in features:
        sys.exit("error: 'base' names the baseline run; give the feature another name")
    ordered = sorted(features.values(), key=lambda f: f.reference != "base")  # references before what uses them
    check_features(ordered, {"base"} | {f.name for f in ordered})
    return [Feature("base", {}, note="the baseline")] + ordered


def check_base_logs(mode: str, seeds: list, base_env: dict, log_dir: Path):
    """--no-base: every seed's baseline log must be a finished run of this source and these settings, or the
    tool stops before its first run. Without the flag a missing baseline is trained, which on the GPU machine
    cost a call 200 s when the logs meant to be carried had not been (2026-12-07)."""
    source_sha = seeds_tool.script_sha256()
    for seed in seeds:
        rid = run_id(mode, "base", seed)
        path = log_dir / f"{rid}.txt"
        env = dict(base_env, LOG_DIR=str(log_dir), RUN_ID=rid, **({} if seed is None else {"SEED": str(seed)}))
        log, why = seeds_tool.logged_run(path, env, source_sha)
        if log is None or not log.complete:
            state = "missing" if log is None else f"unfinished ({log.incomplete_reason})"
            sys.exit(f"error: --no-base: the baseline's log {path} is {state}: copy (carry) it into {log_dir}, "
                     f"or drop --no-base to run it")
        if why:
            sys.exit(f"error: --no-base: the baseline's log {path} is a finished run but {why}: it cannot be this "
                     f"call's baseline; drop --no-base to run one")


def pin_score_settings(env: dict):
    """Set every evaluation ("score") setting explicitly to this environment's value. EVAL_ONLY otherwise
    adopts the values stored in the artifact, and an artifact from `ablate.py train` stores its regime's
    (no sliding window, no TTT): the baseline must be the evaluation the environment and preset describe."""
    settings = tg.Settings(environ=env)
    for x in tg.SETTINGS:
        if x.role == "score" and not env.get(x.name):
            env[x.name] = str(getattr(settings, x.name.lower()))


def run_id(mode: str, feature: str, seed: int | None) -> str:
    return f"eval_{feature}" if mode == "eval" else f"{feature}_seed{seed}"


class Budget:
    """Starts no run that would end past the call's budget, by the longest run seen: in this call, or logged in
    the log directory by an earlier call (`longest`). The earlier runs count because a later feature may have
    to compile afresh: on 2026-12-06 a call that had seen only 100 s runs from the inductor's cache started
    SmearGate's, which compiled for 2 minutes, and the call's 600 s limit killed it and the tool's output."""

    def __init__(self, seconds: float | None, longest: float = 0.0):
        self.seconds, self.start, self.longest = seconds, time.monotonic(), longest

    def allows_another(self) -> bool:
        return self.seconds is None or time.monotonic() - self.start + self.longest <= self.seconds

    def record(self, seconds: float):
        self.longest = max(self.longest, seconds)


def run_plan(mode: str, features: list, seeds: list, base_env: dict, argv_run: list, log_dir: Path,
             budget: Budget, quiet: bool, gpu_slots: list | None = None) -> bool:
    """Run every (feature, seed) not finished yet, a feature's seeds back to back, as many at once as gpu_slots
    has entries (each a CUDA_VISIBLE_DEVICES value, or None to share what is visible); False when the budget
    stopped it."""
    source_sha = seeds_tool.script_sha256()
    slots = queue.Queue()
    for slot in gpu_slots or [None]:
        slots.put(slot)
    lock, stopped = threading.Lock(), threading.Event()

    def one(f: Feature, seed):
        rid = run_id(mode, f.name, seed)
        done = (log_dir / f"{rid}.txt").exists() and runlog.read_log(log_dir / f"{rid}.txt").complete
        with lock:  # run_or_resume checks a finished run's configuration and reuses it without a budget check
            if stopped.is_set():
                return
            if not done and not budget.allows_another():
                print(f"budget: {budget.seconds:.0f} s would be exceeded by {rid} (the longest run seen took "
                      f"{budget.longest:.0f} s): stopped; rerun the same command to continue", flush=True)
                stopped.set()
                return
        slot = slots.get()
        try:
            env = dict(base_env, **f.settings)
            if seed is not None:
                env["SEED"] = str(seed)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            started, status = time.monotonic(), "failed"
            try:
                _, status = seeds_tool.run_or_resume(f"{f.name} (seed {seed})" if seed is not None else f.name, rid,
                                                     env, argv_run, log_dir, source_sha, quiet)
            finally:
                if status != "done earlier":  # a failed run spent its time too: the budget must count it
                    with lock:
                        budget.record(time.monotonic() - started)
            print(f"{rid}: {status}", flush=True)
        finally:
            slots.put(slot)

    # Feature-major: a feature's seeds run back to back, so the second finds the first's compiled graphs in
    # the inductor's on-disk cache (same shapes and code, only the seed differs) instead of compiling afresh.
    jobs = [(f, seed) for f in features for seed in seeds]
    with ThreadPoolExecutor(max_workers=slots.qsize()) as pool:
        for future in [pool.submit(one, f, seed) for f, seed in jobs]:
            future.result()  # a failed run's SystemExit surfaces here, after the runs already started finish
    return not stopped.is_set()


def gpu_slots(parallel: int, nproc: int) -> list:
    """CUDA_VISIBLE_DEVICES for each of `parallel` concurrent runs: disjoint groups of max(nproc, 1) GPUs when the
    visible ones suffice (8 one-GPU ablation runs on an 8-GPU box), else None for each (they share)."""
    if parallel == 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(tg.torch.cuda.device_count())]
    per_run = max(nproc, 1)
    if len(gpus) >= parallel * per_run:
        return [",".join(gpus[i * per_run:(i + 1) * per_run]) for i in range(parallel)]
    print(f"note: {parallel} runs at once share {len(gpus) or 'no'} GPU(s): their timings (the Δ step ms and Δ eval s "
          f"columns) measure contention, not the feature; compare timings from runs made with --parallel 1", flush=True)
    return [None] * parallel


def longest_logged_run(log_dir: Path, mode: str) -> float:
    """The longest time of the finished runs of this mode (train or eval) in log_dir, 0 without any: what a run
    may take here, cold compile included. A training run's whole process (`run_phases total_s`); an evaluation
    run's passes (`eval_total_time`: it logs no run_phases). The launcher's start-up and the artifact's loading
    come on top."""
    def seconds(log) -> float:
        if mode == "eval":
            return log.eval_seconds or 0.0
        return runlog.number(log.phases.get("run_phases", {}).get("total_s")) or 0.0
    totals = [seconds(log) for (m, _, _), log in read_runs(log_dir).items() if m == mode]
    return max(totals, default=0.0)


def metric_of(log, mode: str) -> float | None:
    """What a row compares: the final score for evaluation rows, the artifact's plain round-trip score for training rows."""
    if mode == "eval":
        return log.final_val_bpb
    m = log.metrics.get("quantized")
    return m.val_bpb if m else None


def read_runs(log_dir: Path) -> dict:
    """(mode, feature, seed) -> RunLog for every finished run in log_dir that this tool names."""
    runs = {}
    for path in sorted(log_dir.glob("*.txt")):
        log = runlog.read_log(path)
        if not log.complete or not log.run_id:
            continue
        if log.run_id.startswith("eval_") and log.eval_only:
            runs[("eval", log.run_id[len("eval_"):], None)] = log
        elif "_seed" in log.run_id and not log.eval_only:
            name, _, seed = log.run_id.rpartition("_seed")
            if seed.isdigit():
                runs[("train", name, int(seed))] = log
    return runs


def features_of_runs(mode: str, runs: dict, known: list) -> list:
    """The features the logs hold, each with its reference (a built-in's, a --feature's, else base) and,
    as its settings, what its log's settings header differs in from its reference's (first seed)."""
    by_name = {f.name: f for f in known}
    names = sorted({name for (m, name, _) in runs if m == mode and name != "base"},
                   key=lambda n: (n not in by_name, list(by_name).index(n) if n in by_name else 0, n))
    features = []
    for name in names:
        reference = by_name[name].reference if name in by_name else "base"
        seed = min((s for (m, n, s) in runs if m == mode and n == name), key=lambda s: (s is None, s))
        mine, theirs = runs[(mode, name, seed)], runs.get((mode, reference, seed))
        ignore = set(runlog.RUN_SPECIFIC_SETTINGS)
        settings = {} if theirs is None else {
            k: v for k, v in mine.settings.items() if k not in ignore and theirs.settings.get(k) != v}
        features.append(Feature(name, settings, reference, note=by_name[name].note if name in by_name else ""))
    return features


def rows_of(mode: str, features: list, runs: dict) -> list:
    """One Row per feature with each seed's paired deltas against its reference (seeds where both finished)."""
    rows = []
    seeds = sorted({s for (m, _, s) in runs if m == mode}, key=lambda s: (s is None, s))
    for f in features:
        if f.name == "base":
            continue
        row = Row(f)
        for seed in seeds:
            a, b = runs.get((mode, f.name, seed)), runs.get((mode, f.reference, seed))
            if a is None or b is None or metric_of(a, mode) is None or metric_of(b, mode) is None:
                continue
            row.deltas[seed] = metric_of(a, mode) - metric_of(b, mode)
            for out, value in ((row.step_ms, lambda x: x.step_avg_ms), (row.artifact_bytes, lambda x: x.artifact_bytes),
                               (row.eval_seconds, lambda x: x.estimated_8gpu_counted_eval_seconds),
                               (row.steps, lambda x: x.steps_done), (row.live, live_bpb),
                               (row.quant_tax, quantization_tax)):
                if value(a) is not None and value(b) is not None:
                    out.append(value(a) - value(b))
            row.over_limit |= (a.artifact_bytes or 0) > CHALLENGE_LIMIT_BYTES
        if row.deltas:
            rows.append(row)
    return rows


def live_bpb(log):
    """The live (pre-EMA, unquantized) model's val_bpb at the run's last step, or None. Beside the quantized
    score it separates what training did from what the EMA did: a decay too slow for the run's length (0.99
    over ~300 steps) averages in early weights, and a run that made fewer steps loses there too."""
    return log.val_points[-1].val_bpb if log.val_points else None


def quantization_tax(log):
    """What GPTQ and packing cost the run: the quantized plain pass's val_bpb less the unquantized post-EMA
    model's, or None. A feature can change it (one whose weights quantize worse pays here what its training
    gained), and the quantized score alone does not say so."""
    quantized, unquantized = log.metrics.get("quantized"), log.metrics.get("pre_quantization_post_ema")
    if quantized is None or unquantized is None or quantized.val_bpb is None or unquantized.val_bpb is None:
        return None
    return quantized.val_bpb - unquantized.val_bpb


def mean(values: list):
    return sum(values) / len(values) if values else None


def seed_label(seed) -> str:
    """"1337: " before a training run's figure; nothing for the evaluation side's one artifact."""
    return "" if seed is None else f"{seed}: "


def markdown(mode: str, rows: list, runs: dict) -> str:
    def fmt(v, spec, signed=True):
        return "-" if v is None else format(v, ("+" if signed else "") + spec)
    # seeds in one order (ascending) and named, in the base scores and in every row's per-seed deltas
    base_runs = sorted(((seed, log) for (m, name, seed), log in runs.items() if m == mode and name == "base"),
                       key=lambda x: (x[0] is None, x[0]))
    base_scores = ", ".join(seed_label(seed) + f"{metric_of(log, mode):.4f}" for seed, log in base_runs
                            if metric_of(log, mode) is not None)
    what = "final val_bpb of one artifact" if mode == "eval" else "quantized val_bpb (no sliding window, no TTT), paired by seed"
    # training rows also say how many more steps the feature made: 0 at equal steps; with a wallclock stop
    # (MAX_WALLCLOCK_SECONDS as an override) the steps a slower or faster feature gave up or gained
    steps_column = mode == "train"
    lines = [f"{mode} side: {what}; base {base_scores or '-'}", "",
             "| feature | settings | vs | seeds | Δ val_bpb (mean) | Δ per seed | Δ step ms | Δ artifact bytes | Δ eval s (8-GPU est., counted) |"
             + (" Δ steps | Δ live bpb (last step) | Δ quantization tax |" if steps_column else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if steps_column else "")]
    for r in rows:
        settings = " ".join(f"{k}={v}" for k, v in r.feature.settings.items())
        per_seed = ", ".join(seed_label(seed) + f"{d:+.4f}" for seed, d in r.deltas.items())
        if len(r.deltas) > 1:  # the seed spread: how far apart the seeds' deltas are
            per_seed += f" (spread {max(r.deltas.values()) - min(r.deltas.values()):.4f})"
        mean_bytes = mean(r.artifact_bytes)
        over = f" (over {CHALLENGE_LIMIT_BYTES:,} B)" if r.over_limit else ""
        lines.append(f"| {r.feature.name} | `{settings}` | {r.feature.reference} | {len(r.deltas)} | "
                     f"{fmt(mean(list(r.deltas.values())), '.4f')} | {per_seed or '-'} | {fmt(mean(r.step_ms), '.1f')} | "
                     f"{fmt(None if mean_bytes is None else round(mean_bytes), ',')}{over} | {fmt(mean(r.eval_seconds), '.0f')} |"
                     + (f" {fmt(mean(r.steps), '.0f')} | {fmt(mean(r.live), '.4f')} | {fmt(mean(r.quant_tax), '.4f')} |"
                        if steps_column else ""))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("train", "eval", "table"))
    parser.add_argument("--seeds", default="1337,42", help="train: comma-separated seeds (default 1337,42)")
    parser.add_argument("--artifact", help="eval: the artifact every evaluation row scores")
    parser.add_argument("--only", help="a comma-separated subset of the built-in features, or none")
    parser.add_argument("--feature", action="append", default=[], help="NAME=KEY=VALUE[,KEY=VALUE...][@REFERENCE]")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run through torchrun; 0: plain python3 (default 1)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once (default 1): each gets its own GPUs when enough are visible, else they share")
    parser.add_argument("--log-dir", default="logs/ablate")
    parser.add_argument("--budget-seconds", type=float, help="start no run that would end after this many seconds")
    parser.add_argument("--out", help="table: also write the markdown here")
    parser.add_argument("--no-base", action="store_true",
                        help="run no baseline: its finished logs must be in --log-dir already (checked before any run)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output (the logs have it)")
    parser.add_argument("--script", help="run this copy of train_gpt.py instead of the checkout's: pins the source "
                        "of a study spread over sessions (`git show REV:train_gpt.py > pinned.py`)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE settings of train_gpt.py for every run")
    args = parser.parse_intermixed_args(argv)
    global tg
    seeds_tool.use_script(args.script)
    tg = seeds_tool.tg  # the settings the runs take are the script's
    log_dir = Path(args.log_dir)
    extra = [parse_feature(t) for t in args.feature]

    if args.mode == "table":
        runs = read_runs(log_dir)
        if not runs:
            sys.exit(f"error: {log_dir} holds no finished run of this tool: run `ablate.py train` or `ablate.py eval` first")
        known = TRAIN_FEATURES + EVAL_FEATURES + extra
        text = "\n\n".join(markdown(mode, rows_of(mode, features_of_runs(mode, runs, known), runs), runs)
                           for mode in ("train", "eval") if any(m == mode for (m, _, _) in runs))
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return

    if args.nproc < 0 or (args.nproc and 8 % args.nproc):
        sys.exit(f"error: --nproc {args.nproc} must be 0 (plain python) or divide 8 (1, 2, 4, 8)")
    if args.parallel < 1:
        sys.exit(f"error: --parallel {args.parallel} must be at least 1 (runs at once)")
    features = plan_features(TRAIN_FEATURES if args.mode == "train" else EVAL_FEATURES, args.only, extra)
    overrides = seeds_tool.parse_overrides(args.overrides)
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if args.mode == "train":
        seeds = seeds_tool.parse_seeds(args.seeds)
        base_env.update(TRAIN_REGIME)
    else:
        if not args.artifact or not Path(args.artifact).is_file():
            sys.exit(f"error: eval needs --artifact PATH of an existing artifact (got {args.artifact!r}), e.g. "
                     f"{log_dir}/base_seed1337.ptz from `ablate.py train`")
        seeds = [None]
        base_env["EVAL_ONLY"] = str(Path(args.artifact).resolve())
    base_env.update(overrides)
    if args.mode == "eval":
        pin_score_settings(base_env)
    for f in features:  # every run's settings are valid before the first one starts
        env = dict(base_env, **f.settings, LOG_DIR=str(log_dir), RUN_ID=run_id(args.mode, f.name, seeds[0]))
        seeds_tool.expected_settings(env)
    if args.no_base:
        check_base_logs(args.mode, seeds, base_env, log_dir)
        features = [f for f in features if f.name != "base"]
    log_dir.mkdir(parents=True, exist_ok=True)
    argv_run, typed = seeds_tool.launcher(args.nproc)
    shown = {k: v for k, v in base_env.items() if k in tg.SETTINGS_BY_NAME and k not in ("SEED", "RUN_ID")}
    print("common settings: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items())) + f" {typed}", flush=True)
    budget = Budget(args.budget_seconds, longest_logged_run(log_dir, args.mode))
    if args.budget_seconds is not None and budget.longest:
        print(f"budget: {args.budget_seconds:.0f} s; the longest run logged in {log_dir} took {budget.longest:.0f} s",
              flush=True)
    finished = run_plan(args.mode, features, seeds, base_env, argv_run, log_dir, budget, args.quiet,
                        gpu_slots(args.parallel, args.nproc))
    runs = read_runs(log_dir)
    print(markdown(args.mode, rows_of(args.mode, features_of_runs(args.mode, runs, features), runs), runs), flush=True)
    if not finished:
        print("(partial: the budget stopped the plan; rerun the same command to continue)", flush=True)


if __name__ == "__main__":
    main()
