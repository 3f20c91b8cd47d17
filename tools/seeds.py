#!/usr/bin/env python3
"""Run one configuration for several seeds in sequence, resumably, with a summary table as it goes.

    python3 tools/seeds.py --name mytrick --seeds 1337,42,2025 MATRIX_LR=0.025    # torchrun on 8 GPUs
    python3 tools/seeds.py --name mytrick --seeds 1337,42 --nproc 1 ...           # torchrun on 1 GPU
    python3 tools/seeds.py --name smoke3 --seeds 1,2,3 --nproc 0 ...              # plain python3 (CPU)

Seed S runs with SEED=S and RUN_ID=<name>_seed<S>, so its log is LOG_DIR/<name>_seed<S>.txt and its
artifact LOG_DIR/<name>_seed<S>.ptz. The configuration is the environment plus the KEY=VALUE
arguments. Running the same command again resumes: a seed whose log is complete (it reached `final
val_bpb`) is skipped, after checking that it ran this configuration and this train_gpt.py; an
incomplete log is moved aside to <log>.partial<N> (train_gpt.py appends to an existing log) and the
seed runs again. After each seed the table of every seed so far is printed: seed, val_bpb, artifact
bytes, training time (training + GPTQ calibration) and evaluation time.

Then: `python3 tools/significance.py --new LOG_DIR/<name>_seed*.txt --baseline ...` and
`python3 tools/record.py --name <name> ...` (or `make record NAME=<name> ...`).
"""
import argparse
import hashlib
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import runlog  # noqa: E402
import significance  # noqa: E402
import train_gpt as tg  # noqa: E402

SET_BY_THIS_TOOL = ("SEED", "RUN_ID")
SCRIPT = ROOT / "train_gpt.py"  # what runs; --script replaces it (use_script)


def use_script(path: str | None):
    """Run another copy of train_gpt.py (--script), and read the settings it takes from that copy. A study
    spread over sessions pins its source this way (`git show REV:train_gpt.py > pinned.py`) while the
    checkout moves on: a finished log counts only for the source that wrote it."""
    global tg, SCRIPT
    if path is None:
        return
    script = Path(path).resolve()
    if not script.is_file():
        sys.exit(f"error: --script {path}: no such file; give a copy of train_gpt.py, e.g. from "
                 f"`git show <revision>:train_gpt.py > {path}`")
    spec = importlib.util.spec_from_file_location(f"train_gpt_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.exit(f"error: --script {path} is not a loadable train_gpt.py: {type(e).__name__}: {e}")
    if not hasattr(module, "Settings") or not hasattr(module, "SETTINGS_BY_NAME"):
        sys.exit(f"error: --script {path} defines no Settings: it is not a copy of train_gpt.py")
    tg, SCRIPT = module, script


def script_sha256() -> str:
    """The source hash a run of SCRIPT logs (train_gpt.py hashes the file it runs from)."""
    return hashlib.sha256(SCRIPT.read_bytes()).hexdigest()


def shown_script() -> str:
    try:
        return str(SCRIPT.relative_to(Path.cwd()))
    except ValueError:
        return str(SCRIPT)


def parse_seeds(text: str) -> list:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"error: --seeds {text!r} must be comma-separated integers, e.g. 1337,42,2025")
    if not seeds or len(set(seeds)) != len(seeds):
        sys.exit(f"error: --seeds {text!r} must list distinct seeds, e.g. 1337,42,2025")
    return seeds


def parse_overrides(items: list) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in tg.SETTINGS_BY_NAME:
            sys.exit(f"error: {item!r} is not a train_gpt.py setting as KEY=VALUE (see the settings table in README.md)")
        if key in SET_BY_THIS_TOOL:
            sys.exit(f"error: {key} is set per seed by this tool: use --seeds and --name instead")
        out[key] = value
    return out


def launcher(nproc: int) -> tuple:
    """(argv, the same as it would be typed): plain python for --nproc 0, torchrun otherwise."""
    script, shown = str(SCRIPT), shown_script()
    if nproc == 0:
        return [sys.executable, script], f"python3 {shown}"
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script],
            f"torchrun --standalone --nproc_per_node={nproc} {shown}")


def expected_settings(env: dict) -> dict:
    """The settings header a run with this environment writes, as strings (run-specific ones left out)."""
    try:
        s = tg.Settings(environ=env)
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    return {k: str(v) for k, v in s.items() if k not in runlog.RUN_SPECIFIC_SETTINGS}


def config_mismatch(log, expected: dict, source_sha: str) -> str | None:
    """Why a finished log is not a run of this configuration, or None."""
    logged = log.settings_without_run_specifics()
    differ = [f"{k}={logged.get(k)} (now {v})" for k, v in expected.items() if logged.get(k) != v]
    if differ:
        return "it ran other settings: " + ", ".join(differ[:4]) + (" ..." if len(differ) > 4 else "")
    if log.source_sha256 != source_sha:
        return f"it ran another train_gpt.py (source sha256 {str(log.source_sha256)[:12]}, now {source_sha[:12]})"
    return None


def logged_run(path: Path, env: dict, source_sha: str):
    """(log, why): the log at path (None when there is none) and, when it is a finished run, why it is not a
    run of env's configuration (RUN_ID and LOG_DIR included) and this source; why is None otherwise."""
    log = runlog.read_log(path) if path.exists() else None
    why = config_mismatch(log, expected_settings(env), source_sha) if log is not None and log.complete else None
    return log, why


def move_aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.partial{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.partial{n}")
    path.rename(target)
    return target


def run_or_resume(label: str, run_id: str, env: dict, argv_run: list, log_dir: Path, source_sha: str, quiet: bool = False):
    """(log, "done earlier" | "ran"): run train_gpt.py as RUN_ID=run_id unless LOG_DIR/<run_id>.txt is already
    a finished run of this configuration and source. A finished log of another configuration stops the tool;
    an incomplete one is moved aside and the run starts again; a failed run stops the tool, naming the run
    by label ("seed 2") and its log."""
    env = dict(env, RUN_ID=run_id, LOG_DIR=str(log_dir))
    path = log_dir / f"{run_id}.txt"
    log, why = logged_run(path, env, source_sha)
    if why:
        sys.exit(f"error: {path} is a finished run but {why}: use another name, or move that log away to rerun it")
    if log is not None and log.complete:
        return log, "done earlier"
    if log is not None:
        print(f"{path} is incomplete ({log.incomplete_reason}); moved to {move_aside(path)}", flush=True)
    expected_settings(env)  # a bad value stops here, before the run starts
    print(f"--- {label}: {run_id}", flush=True)
    result = subprocess.run(argv_run, env=env, stdout=subprocess.DEVNULL if quiet else None)
    if result.returncode != 0:
        where = f"see {path} and the output above" if path.exists() else \
            "a start-up check refused it (its error is above; such a run leaves no log)"
        sys.exit(f"error: {label} failed (exit {result.returncode}): {where}; rerun the same command to resume from it")
    log = runlog.read_log(path)
    if not log.complete:
        sys.exit(f"error: {label} exited 0 but {path} is incomplete: {log.incomplete_reason}")
    return log, "ran"


def row(seed: int, log, status: str) -> list:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    return [str(seed), fmt(log.final_val_bpb, ".8f"), fmt(log.artifact_bytes, ","), fmt(log.train_calibration_seconds, ".1f"),
            fmt(log.eval_seconds, ".1f"), status]


def table(rows: list) -> str:
    head = ["seed", "val_bpb", "artifact_bytes", "train_s", "eval_s", "status"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    bpbs = [float(r[1]) for r in rows if r[1] != "-"]
    if len(bpbs) > 1:
        s = significance.Sample.of(bpbs)
        lines.append(f"mean val_bpb {s.mean:.8f}  std {s.std:.8f}  n={s.n}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="configuration name: runs are <name>_seed<S>")
    parser.add_argument("--seeds", required=True, help="comma-separated seeds, run in this order")
    parser.add_argument("--nproc", type=int, default=8, help="processes per run through torchrun; 0: plain python3 (default 8)")
    parser.add_argument("--log-dir", help="where logs and artifacts go (default: $LOG_DIR or logs)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output (the logs have it)")
    parser.add_argument("--script", help="run this copy of train_gpt.py instead of the checkout's (a pinned source)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE settings of train_gpt.py")
    args = parser.parse_args(argv)
    use_script(args.script)
    if not args.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        sys.exit(f"error: --name {args.name!r} must be letters, digits, '-', '_' or '.' (it names files)")
    if args.nproc < 0 or (args.nproc and 8 % args.nproc):
        sys.exit(f"error: --nproc {args.nproc} must be 0 (plain python) or divide 8 (1, 2, 4, 8)")
    seeds, overrides = parse_seeds(args.seeds), parse_overrides(args.overrides)
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(overrides)
    if base.get("ARTIFACT_PATH"):
        sys.exit("error: ARTIFACT_PATH is set, so every seed would write the same artifact: unset it "
                 "(each seed's artifact goes to LOG_DIR/<RUN_ID>.ptz)")
    log_dir = Path(args.log_dir or base.get("LOG_DIR") or "logs")
    base["LOG_DIR"] = str(log_dir)
    argv_run, typed = launcher(args.nproc)
    shown = {k: v for k, v in base.items() if k in tg.SETTINGS_BY_NAME and k not in SET_BY_THIS_TOOL}
    print("command per seed: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items()))
          + f" SEED=<S> RUN_ID={args.name}_seed<S> {typed}", flush=True)
    source_sha = script_sha256()

    rows = []
    for seed in seeds:
        try:
            log, status = run_or_resume(f"seed {seed}", f"{args.name}_seed{seed}", dict(base, SEED=str(seed)), argv_run,
                                        log_dir, source_sha, args.quiet)
        except SystemExit:
            if rows:
                print(table(rows), flush=True)
            raise
        rows.append(row(seed, log, status))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
