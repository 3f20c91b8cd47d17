#!/usr/bin/env python3
"""Write a submission folder from a set of seed logs, in one command, or refuse with a one-line reason.

    python3 tools/record.py --name MyTrick --author "Ada Lovelace" --github-id ada \\
        --summary "What the runs changed, in a paragraph." [--logs logs/MyTrick_seed*.txt]
    make record NAME=MyTrick AUTHOR="Ada Lovelace" GITHUB_ID=ada SUMMARY="..."

writes records/track_10min_16mb/<date>_<name>/ with
  README.md          results per seed, mean and std, compliance table, the command, hardware and versions,
                     the technique summary, the loss curves
  submission.json    author, github_id, name, date, track, val_bpb (mean), val_bpb_std, seeds, per-seed
                     results (val_bpb, val_loss, artifact bytes, steps, times), hardware, pytorch_version,
                     technique_summary, compliance
  train_seed<S>.log  each seed's log as train_gpt.py wrote it
  train_gpt.py       the packed, counted script (train_gpt.pack_script of --source)
  cutlass_evt_fusion/ its sources, when the logs say the CUTLASS MLP path ran
  requirements.txt   the repository's, with the versions the runs used
  train_curves.png   tools/plot.py of every seed (skipped, and said so, without matplotlib)

--logs defaults to logs/<name>_seed*.txt (what tools/seeds.py writes). The command shown in README.md is
--command, else the one rebuilt from the logs' settings (every setting that differs from its default).

It refuses, writing nothing, when a log is incomplete or holds two runs, seeds repeat, any artifact is
over 16,000,000 bytes, the logs disagree on code bytes, on a setting other than SEED, RUN_ID and
paths, on the source, the GPU count or the torch version, the packed --source is not the size the logs
counted (or not the source they ran), the CUTLASS sources are missing when they ran, or the folder
exists. The folder is built under a temporary name beside its destination and renamed at the end.
"""
import argparse
import datetime
import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import compliance  # noqa: E402
import runlog  # noqa: E402
import significance  # noqa: E402

TRACK = "10min_16mb"
DEFAULT_OUT = ROOT / "records" / f"track_{TRACK}"
CUTLASS_DIR = ROOT / "cutlass_evt_fusion"
CUTLASS_SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".cc", ".h", ".hpp", ".py", ".txt", ".toml", ".cfg")


class Refusal(Exception):
    """A reason not to write the folder: printed as `error: ...`, exit status 1."""


# --- checks --------------------------------------------------------------------------------------------


def read_logs(paths) -> list:
    if not paths:
        raise Refusal("no logs: give --logs, or run tools/seeds.py --name <name> first (it writes logs/<name>_seed<S>.txt)")
    logs = []
    for p in paths:
        if not Path(p).is_file():
            raise Refusal(f"log {p} does not exist")
        log = runlog.read_log(p)
        if log.runs_in_file > 1:
            raise Refusal(f"log {p} holds {log.runs_in_file} runs appended under one RUN_ID: rerun that seed under a fresh RUN_ID")
        if log.eval_only:
            raise Refusal(f"log {p} is an EVAL_ONLY log, not a training run: give the training logs")
        if not log.complete:
            raise Refusal(f"log {p} is incomplete: {log.incomplete_reason}; rerun that seed (tools/seeds.py resumes)")
        logs.append(log)
    seeds = [log.seed for log in logs]
    if len(set(seeds)) != len(seeds):
        raise Refusal(f"seeds repeat among the logs ({', '.join(map(str, seeds))}): give one log per seed")
    return logs


def check_consistent(logs):
    """One configuration, one source, one machine; every artifact under the limit."""
    first = logs[0]
    for log in logs:
        if log.artifact_bytes > runlog.ARTIFACT_LIMIT:
            raise Refusal(f"log {log.path}: artifact {log.artifact_bytes:,} bytes is over the {runlog.ARTIFACT_LIMIT:,} limit "
                          f"(seed {log.seed}): shrink the model or its quantization")
    for log in logs[1:]:
        if log.code_bytes != first.code_bytes:
            raise Refusal(f"logs disagree on code bytes: {first.path} counted {first.code_bytes}, {log.path} {log.code_bytes}: "
                          f"every seed must run the same train_gpt.py")
        a, b = first.settings_without_run_specifics(), log.settings_without_run_specifics()
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differ:
            k = differ[0]
            raise Refusal(f"logs disagree on {k}: {a.get(k)} in {first.path}, {b.get(k)} in {log.path}"
                          + (f" (and {len(differ) - 1} more settings)" if len(differ) > 1 else "")
                          + ": a record is one configuration run with several SEEDs")
        for what, x, y in (("the train_gpt.py source (sha256)", first.source_sha256, log.source_sha256),
                           ("the number of processes", first.world_size, log.world_size),
                           ("the torch version", first.versions.get("torch"), log.versions.get("torch")),
                           ("the device", first.device, log.device)):
            if x != y:
                raise Refusal(f"logs disagree on {what}: {x} in {first.path}, {y} in {log.path}")


def packed_script(source: Path, logs) -> bytes:
    """The packed script of source, refused unless it is the source the logs ran and the size they counted."""
    if not source.is_file():
        raise Refusal(f"--source {source} does not exist")
    import pack_submission  # imports train_gpt (and torch): only needed here
    text = source.read_text(encoding="utf-8")
    packed = pack_submission.tg.pack_script(text)
    shipped = pack_submission.tg.shipping_source(text)
    if pack_submission.unpack_script(packed) != shipped:
        raise Refusal("the packed stub does not decode to the shipped source (a brotli or Python bug?)")
    logged_sha = logs[0].source_sha256  # of the readable file, or of the shipped code when the packed stub ran
    if logged_sha not in (hashlib.sha256(source.read_bytes()).hexdigest(), hashlib.sha256(shipped.encode()).hexdigest()):
        raise Refusal(f"--source {source} is not the train_gpt.py the logs ran (source sha256 {logged_sha}): "
                      f"check out the commit that trained them, or pass that file as --source")
    counted = logs[0].code_bytes
    if len(packed) != counted:
        how = logs[0].artifact.get("code_from", "?")
        raise Refusal(f"the packed {source.name} is {len(packed)} bytes but the logs counted {counted} code bytes "
                      f"(code_from:{how}): the counted bytes must be the shipped file's; rerun with CODE_BYTES_FROM=packed "
                      f"and the same brotli version")
    return packed


def cutlass_sources(logs) -> list:
    """Files of cutlass_evt_fusion/ to ship when the logs say the CUTLASS EVT MLP ran; [] otherwise."""
    if not any(log.uses_cutlass for log in logs):
        return []
    files = sorted(p for p in CUTLASS_DIR.rglob("*") if p.is_file() and p.suffix in CUTLASS_SOURCE_SUFFIXES
                   and "__pycache__" not in p.parts and "build" not in p.parts) if CUTLASS_DIR.is_dir() else []
    if not files:
        raise Refusal(f"the logs ran the CUTLASS MLP path (mlp_backend: {logs[0].mlp_backend}) but {CUTLASS_DIR} holds no "
                      f"sources to ship: check out the commit that has them")
    return files


# --- contents -------------------------------------------------------------------------------------------


def mean_std(values):
    s = significance.Sample.of(values)
    return s.mean, (None if math.isnan(s.std) else s.std)


def shell_value(header_value: str, setting) -> str:
    """A header value as the environment variable train_gpt.py reads (True/False -> 1/0)."""
    if isinstance(setting.default, bool):
        return "1" if header_value == "True" else "0"
    return header_value if re.fullmatch(r"[\w.,:/+-]*", header_value) else "'" + header_value.replace("'", "'\\''") + "'"


def rebuilt_command(logs) -> str:
    """SEED=<S> plus every setting that differs from train_gpt.py's default, and the launcher for the logged GPU count."""
    import train_gpt as tg
    log = logs[0]
    skip = ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_PATH", "SAVE_CHECKPOINT", "LOAD_CHECKPOINT", "EVAL_ONLY")
    env = [f"{k}={shell_value(v, tg.SETTINGS_BY_NAME[k])}" for k, v in sorted(log.settings.items())
           if k in tg.SETTINGS_BY_NAME and k not in skip and v != str(tg.SETTINGS_BY_NAME[k].default)]
    n = log.world_size or 1
    launch = f"torchrun --standalone --nproc_per_node={n} train_gpt.py"
    seeds = ",".join(str(x.seed) for x in logs)
    return f"# for SEED in {seeds}:\n" + " ".join(["SEED=$SEED"] + env + [launch])


def seed_result(log) -> dict:
    pre = log.metrics.get("pre_quantization_post_ema")
    quant = log.metrics.get("quantized")
    return {"val_bpb": log.final_val_bpb, "val_loss": log.final_val_loss,
            "pre_quant_val_bpb": pre.val_bpb if pre else None, "quantized_val_bpb": quant.val_bpb if quant else None,
            "artifact_bytes": log.artifact_bytes, "model_bytes": log.model_bytes, "steps": log.steps_done,
            "step_avg_ms": log.step_avg_ms, "train_time_s": None if log.train_ms is None else round(log.train_ms / 1000, 3),
            "train_plus_calibration_s": log.train_calibration_seconds, "eval_time_s": log.eval_seconds}


def submission(logs, args, date: str) -> dict:
    first = logs[0]
    bpb, bpb_std = mean_std([log.final_val_bpb for log in logs])
    loss, loss_std = mean_std([log.final_val_loss for log in logs])
    sizes = [log.artifact_bytes for log in logs]
    checks = {log.seed: compliance.check_log(log) for log in logs}
    names = [c.name for c in next(iter(checks.values()))]
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.summary.split(". ")[0].strip(),
        "date": date, "track": TRACK,
        "val_bpb": round(bpb, 8), "val_bpb_std": None if bpb_std is None else round(bpb_std, 8),
        "val_loss": round(loss, 8), "val_loss_std": None if loss_std is None else round(loss_std, 8),
        "std_note": "sample standard deviation over seeds (n - 1)",
        "seeds": [log.seed for log in logs],
        "seed_results": {str(log.seed): seed_result(log) for log in logs},
        "artifact_bytes_mean": round(sum(sizes) / len(sizes)), "artifact_bytes_max": max(sizes),
        "bytes_total": max(sizes), "code_bytes": first.code_bytes,
        "evaluation": first.final.name if first.final else "final",
        "hardware": f"{first.world_size}x {first.device}", "pytorch_version": first.versions.get("torch"),
        "python_version": first.versions.get("python"), "cuda_version": first.versions.get("cuda"),
        "source_sha256": first.source_sha256,
        "technique_summary": args.summary,
        # true: every seed passes; false: a seed fails; null: not applicable to these runs (e.g. no TTT)
        "compliance": {n: (None if all(c[i].status == compliance.NA for c in checks.values()) else
                           not any(c[i].status == compliance.FAIL for c in checks.values())) for i, n in enumerate(names)},
    }


def readme(logs, sub: dict, command: str, command_source: str, plot_note: str, cutlass: list) -> str:
    first = logs[0]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    rows = ["| seed | val_bpb | val_loss | pre-quant bpb | quantized bpb | steps | train + calib (s) | eval (s) | artifact bytes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for log in logs:
        r = sub["seed_results"][str(log.seed)]
        rows.append(f"| {log.seed} | {f(r['val_bpb'], '.8f')} | {f(r['val_loss'], '.8f')} | {f(r['pre_quant_val_bpb'], '.5f')} "
                    f"| {f(r['quantized_val_bpb'], '.5f')} | {f(r['steps'], 'd')} | {f(r['train_plus_calibration_s'], '.1f')} "
                    f"| {f(r['eval_time_s'], '.1f')} | {r['artifact_bytes']:,} |")
    std = "n/a (one seed)" if sub["val_bpb_std"] is None else f"{sub['val_bpb_std']:.8f}"
    rows.append(f"| **mean** | **{sub['val_bpb']:.8f}** | {sub['val_loss']:.8f} | | | | | | max {sub['artifact_bytes_max']:,} |")
    failing = [n for n, ok in sub["compliance"].items() if ok is False]
    lines = [
        f"# {sub['name']}", "",
        f"**val_bpb {sub['val_bpb']:.8f}** (std {std}, {len(logs)} seeds) · {sub['hardware']} · {sub['date']} · "
        f"{sub['author']} (@{sub['github_id']})", "",
        sub["technique_summary"], "",
        "## Results", "",
        f"Score: the `{sub['evaluation']}` pass (the line behind `final val_bpb`). Std is the sample standard deviation "
        f"(n - 1). Artifact = packed `train_gpt.py` ({first.code_bytes:,} bytes) + compressed model.", "",
        *rows, "",
    ]
    if plot_note:
        lines += [plot_note, ""]
    lines += [
        "## Compliance", "",
        "Read from each seed's log by `tools/compliance.py`"
        + (": every check passes." if not failing else f"; failing: {', '.join(failing)}."), "",
        compliance.table(logs), "",
        "## Command", "",
        command_source, "", "```bash", command, "```", "",
        "## Hardware and versions", "",
        f"- hardware: {sub['hardware']}",
        f"- python {first.versions.get('python')}, torch {first.versions.get('torch')}, CUDA {first.versions.get('cuda')}",
        f"- attention: {first.info.get('attention_backend', 'not logged')}; MLP path: {first.mlp_backend or 'not logged'}",
        f"- train_gpt.py source sha256: `{first.source_sha256}`", "",
        "## Files", "",
        f"- `train_gpt.py`: the shipped, self-extracting script ({first.code_bytes:,} bytes; it decompresses and runs the "
        f"readable source with sha256 above)",
        *[f"- `train_seed{log.seed}.log`: seed {log.seed}'s log" for log in logs],
        "- `submission.json`, `requirements.txt`",
    ]
    if cutlass:
        lines.append(f"- `cutlass_evt_fusion/`: the CUTLASS EVT MLP sources the runs built ({len(cutlass)} files; not part "
                     f"of the counted code bytes)")
    return "\n".join(lines) + "\n"


def requirements(logs) -> str:
    base = (ROOT / "requirements.txt").read_text(encoding="utf-8").rstrip("\n")
    v = logs[0].versions
    return base + f"\n# the runs used python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('cuda')})\n"


# --- the folder ----------------------------------------------------------------------------------------


def build(args) -> Path:
    """Check everything, then write the folder atomically; returns its path or raises Refusal."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise Refusal(f"--name {args.name!r} must be letters, digits, '_', '-' or '.' (it names the folder)")
    date = args.date or datetime.date.today().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise Refusal(f"--date {date!r} must be YYYY-MM-DD")
    paths = args.logs or sorted(Path("logs").glob(f"{args.name}_seed*.txt"),
                                key=lambda p: int(p.stem.rsplit("_seed", 1)[1]) if p.stem.rsplit("_seed", 1)[1].isdigit() else 0)
    logs = read_logs(paths)
    check_consistent(logs)
    packed = packed_script(Path(args.source), logs)
    cutlass = cutlass_sources(logs)
    out_root = Path(args.out)
    dest = out_root / f"{date}_{args.name}"
    if dest.exists():
        raise Refusal(f"{dest} already exists: pick another --name or --date, or remove it")

    sub = submission(logs, args, date)
    command, command_source = (args.command, "As run:") if args.command else \
        (rebuilt_command(logs), "Rebuilt from the logs' settings (every setting that differs from its default):")
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=out_root))
    try:
        (tmp / "train_gpt.py").write_bytes(packed)
        for log in logs:
            shutil.copyfile(log.path, tmp / f"train_seed{log.seed}.log")
        for src in cutlass:
            target = tmp / "cutlass_evt_fusion" / src.relative_to(CUTLASS_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        plot_note = write_plot(logs, tmp / "train_curves.png")
        (tmp / "requirements.txt").write_text(requirements(logs), encoding="utf-8")
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(logs, sub, command, command_source, plot_note, cutlass), encoding="utf-8")
        tmp.chmod(0o755)
        tmp.rename(dest)  # same parent folder: atomic, and it fails rather than merge if dest appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def write_plot(logs, path: Path) -> str:
    try:
        import plot
        plot.save(logs, path, labels=[f"seed {log.seed}" for log in logs])
    except ImportError:
        return "(Loss curves not drawn: matplotlib is not installed; `python3 tools/plot.py train_seed*.log --out train_curves.png`.)"
    return "![train loss, val_bpb and tokens/s of every seed](train_curves.png)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="descriptive name: the folder is <date>_<name>")
    parser.add_argument("--author", required=True, help="your name, as submission.json shows it")
    parser.add_argument("--github-id", required=True, help="your GitHub handle")
    parser.add_argument("--summary", help="the technique summary, a paragraph (README.md and submission.json)")
    parser.add_argument("--summary-file", type=Path, help="read the technique summary from this file instead")
    parser.add_argument("--logs", nargs="+", help="the seeds' logs (default: logs/<name>_seed*.txt)")
    parser.add_argument("--date", help="YYYY-MM-DD of the folder name (default: today)")
    parser.add_argument("--command", help="the exact command as run (default: rebuilt from the logs' settings)")
    parser.add_argument("--source", default=str(ROOT / "train_gpt.py"), help="the readable train_gpt.py the runs ran")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"parent folder (default: records/track_{TRACK})")
    args = parser.parse_args(argv)
    if args.summary_file:
        if not args.summary_file.is_file():
            sys.exit(f"error: --summary-file {args.summary_file} does not exist")
        args.summary = args.summary_file.read_text(encoding="utf-8").strip()
    if not args.summary or not args.summary.strip():
        sys.exit("error: give the technique summary with --summary \"...\" or --summary-file FILE (it goes in README.md)")
    try:
        dest = build(args)
    except Refusal as e:
        sys.exit(f"error: {e}")
    logs = [runlog.read_log(p) for p in sorted(dest.glob("train_seed*.log"))]
    print(f"wrote {dest}")
    for log in logs:
        for check in compliance.check_log(log):
            if check.status == compliance.FAIL:
                print(f"  seed {log.seed}: {check}")


if __name__ == "__main__":
    main()
