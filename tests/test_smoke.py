"""`make smoke` is step-bounded and deterministic: two runs print the same scores, and a rerun starts
a fresh log (the recipe removes the last run's log and artifact first). The real recipe runs, with
fewer steps and its outputs in tmp_path; `make setup` is skipped (-o setup), pytest already runs."""
import re
import subprocess
import sys

from conftest import ROOT, subprocess_env

SCORES = re.compile(r"^(?:pre-quantization post-ema|quantized|quantized_sliding_window|final_ttt|final) .*?val_bpb:\S+", re.M)


def make_smoke(tmp_path) -> tuple:
    cmd = ["make", "-o", "setup", "smoke", f"PY={sys.executable}", f"SMOKE_DIR={tmp_path / 'smoke'}",
           f"SMOKE_LOG_DIR={tmp_path / 'logs'}", "SMOKE_ITERATIONS=6"]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env({}), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, (tmp_path / "logs" / "smoke.txt").read_text()


def test_make_smoke_is_deterministic_and_starts_a_fresh_log(tmp_path):
    out1, log1 = make_smoke(tmp_path)
    out2, log2 = make_smoke(tmp_path)
    scores = SCORES.findall(log1)
    assert len(scores) == 5 and scores[-1].startswith("final val_bpb:"), scores
    assert SCORES.findall(log2) == scores and SCORES.findall(out2) == SCORES.findall(out1) == scores
    # Step-bounded: the schedule ran all its steps with no wallclock cap.
    events = log2.partition("\nheader:end\n")[2]  # the header holds the source, which names every event
    assert re.search(r"^step:6/6 val_loss:", events, re.M) and "wallclock:budget" not in events
    assert "stopping_early" not in events
    # The second log holds the second run only: one settings dump, one final line.
    lines = log2.splitlines()
    assert lines.count("Hyperparameters:") == 1 and sum(x.startswith("final val_bpb:") for x in lines) == 1
    assert not log2.startswith(log1)
