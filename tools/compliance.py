#!/usr/bin/env python3
"""Compliance summary of a run log or a record folder: each challenge rule, pass or fail, with its figure.

    python3 tools/compliance.py logs/<RUN_ID>.txt [more logs]
    python3 tools/compliance.py records/track_10min_16mb/<folder>      # its train_seed*.log files
    python3 tools/compliance.py --strict ...                            # exit 1 when a check fails

The checks, read from the log alone:
  hardware        8 processes on H100s (the track's machine); other hardware fails
  train_time      training + GPTQ Hessian collection <= 600 s (the gptq:hessians line's train+calibration)
  eval_time       evaluation of the artifact <= 600 s: the quantized pass plus the sliding/TTT passes as
                  measured; only a full-validation 8-GPU run measures the real thing, so on anything
                  else this is n.a. with the eval budget's 8-GPU estimate as the figure
  artifact        code + compressed model <= 16,000,000 bytes (the artifact: line's total)
  ttt_protocol    score-first, each target scored once in one pass (the ttt:protocol line, one TTT pass
                  whose scored targets are the whole validation); n.a. without TTT
  scored_targets  every pass on the artifact scored 40,540,160 targets (the official SP8192 validation)
  byte_check      the byte tables matched the decoded validation text (the byte_check: line)
  complete        the log reaches `final val_bpb`
Non-official runs (test logs, proxy data, one GPU) fail or show n.a. where they do not meet the rule.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402
from runlog import ARTIFACT_LIMIT, FULL_VAL_TARGETS  # noqa: E402

TRAIN_LIMIT_SECONDS = 600.0
EVAL_LIMIT_SECONDS = 600.0
TRACK_GPUS = 8
TRACK_GPU = "H100"
PASS, FAIL, NA = "pass", "fail", "n.a."


@dataclass
class Check:
    name: str
    status: str  # pass, fail or n.a.
    figure: str  # what the log says, e.g. "587.3 s of 600"

    def __str__(self):
        return f"{self.name:<15} {self.status:<5} {self.figure}"


def official_machine(log) -> bool:
    return log.world_size == TRACK_GPUS and TRACK_GPU in (log.device or "")


def check_log(log) -> list:
    """Every check on one parsed log, in a fixed order."""
    checks = [Check("hardware", PASS if official_machine(log) else FAIL,
                    f"{log.world_size or '?'} x {log.device or 'unknown'} (track: {TRACK_GPUS} x {TRACK_GPU})")]

    seconds = log.train_calibration_seconds
    if seconds is None:
        checks.append(Check("train_time", NA if log.eval_only else FAIL,
                            "no training in this log (EVAL_ONLY)" if log.eval_only else "no gptq:hessians line"))
    else:
        checks.append(Check("train_time", PASS if seconds <= TRAIN_LIMIT_SECONDS else FAIL,
                            f"{seconds:.1f} s training + GPTQ calibration (limit {TRAIN_LIMIT_SECONDS:.0f})"))

    seconds, estimate = log.eval_seconds, log.estimated_8gpu_eval_seconds
    full = log.val_targets == FULL_VAL_TARGETS
    if seconds is None:
        checks.append(Check("eval_time", FAIL, "no quantized pass in this log"))
    elif official_machine(log) and full:
        counted = log.eval_counted_seconds
        how = "" if counted == seconds else (f", {counted:.1f} s without the passes' compile warm-ups and first "
                                             "batches, as the records count (EVAL_BUDGET_COUNTS=records)")
        checks.append(Check("eval_time", PASS if counted <= EVAL_LIMIT_SECONDS else FAIL,
                            f"{seconds:.1f} s (quantized + {log.eval_total.get('passes', 'no passes')}{how}; "
                            f"limit {EVAL_LIMIT_SECONDS:.0f})"))
    else:
        est = "no 8-GPU estimate" if estimate is None else f"8-GPU full-validation estimate of the passes {estimate} s"
        checks.append(Check("eval_time", NA, f"{seconds:.1f} s measured here, not a full 8-GPU run; {est}"))

    total = log.artifact_bytes
    checks.append(Check("artifact", FAIL, "no artifact: line") if total is None else
                  Check("artifact", PASS if total <= ARTIFACT_LIMIT else FAIL,
                        f"{total:,} bytes = {log.model_bytes:,} model + {log.code_bytes:,} code (limit {ARTIFACT_LIMIT:,})"))

    checks.append(check_ttt(log))

    passes = log.scoring_passes
    counts = sorted({m.scored_targets for m in passes if m.scored_targets is not None})
    if not counts:
        checks.append(Check("scored_targets", FAIL, "no scored_targets on the passes"))
    else:
        figure = ", ".join(f"{c:,}" for c in counts) + f" of {FULL_VAL_TARGETS:,}"
        scored_bytes = sorted({m.scored_bytes for m in passes if m.scored_bytes is not None})
        if scored_bytes:
            figure += "; scored_bytes " + ", ".join(f"{b:,}" for b in scored_bytes)
        checks.append(Check("scored_targets", PASS if counts == [FULL_VAL_TARGETS] else FAIL, figure))

    bc = log.byte_check
    if bc is None:
        checks.append(Check("byte_check", FAIL, "not run (BYTE_CHECK_DOCS=0?)"))
    elif bc.get("skipped"):
        checks.append(Check("byte_check", FAIL, "skipped: no whole validation document"))
    else:
        checks.append(Check("byte_check", PASS if bc.get("ok") else FAIL,
                            f"docs={bc.get('docs')} mismatched_docs={bc.get('mismatched_docs')}"))

    checks.append(Check("complete", PASS if log.complete else FAIL, "final val_bpb logged" if log.complete else log.incomplete_reason))
    return checks


def check_ttt(log) -> Check:
    protocols = log.ttt_protocols
    ttt_passes = [m for m in log.metrics.values() if m.name.startswith("quantized_ttt")]
    if not protocols and not ttt_passes:
        return Check("ttt_protocol", NA, "no TTT in this run")
    problems = []
    if len(protocols) != 1 or len(ttt_passes) != 1:
        problems.append(f"{len(protocols)} ttt:protocol lines and {len(ttt_passes)} TTT passes (one of each expected)")
    if not all(p.get("score_first") for p in protocols):
        problems.append("the protocol is not score-first")
    scored = {m.scored_targets for m in ttt_passes}
    if log.val_targets is not None and scored != {log.val_targets}:
        problems.append(f"TTT scored {sorted(s for s in scored if s is not None)} targets, validation has {log.val_targets}")
    mode = protocols[0].get("mode", "?") if protocols else "?"
    figure = f"score-first mode:{mode}, each of {log.val_targets} targets scored once" if not problems else "; ".join(problems)
    return Check("ttt_protocol", FAIL if problems else PASS, figure)


def table(logs, names=None) -> str:
    """A markdown table: one row per check, one column per log (a record's seeds side by side)."""
    names = names or [str(log.seed if log.seed is not None else log.run_id) for log in logs]
    results = [check_log(log) for log in logs]
    rows = ["| check | " + " | ".join(names) + " |", "|---|" + "---|" * len(logs)]
    for i, check in enumerate(results[0]):
        rows.append(f"| {check.name} | " + " | ".join(f"**{r[i].status}** {r[i].figure}" for r in results) + " |")
    return "\n".join(rows)


def failures(logs) -> list:
    return [(log, c) for log in logs for c in check_log(log) if c.status == FAIL]


def logs_of(paths) -> list:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("train_seed*.log")) or sorted(p.glob("*.txt"))
            if not found:
                sys.exit(f"error: {p} holds no train_seed*.log or *.txt logs")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            sys.exit(f"error: {p} does not exist: give logs/<RUN_ID>.txt files or a record folder")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run logs or record folders")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any check fails")
    args = parser.parse_args(argv)
    logs = [runlog.read_log(p) for p in logs_of(args.paths)]
    for log in logs:
        print(f"{log.path}  (seed {log.seed}, run {log.run_id})")
        for check in check_log(log):
            print(f"  {check}")
    if args.strict and failures(logs):
        sys.exit(1)


if __name__ == "__main__":
    main()
