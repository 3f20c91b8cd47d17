"""RECORDS AND EXPERIMENT TOOLING: the log parser, the multi-seed runner, the significance test, the
compliance checks, the plots and the submission-folder writer with every refusal.

One module fixture trains two tiny seeds through tools/seeds.py (real train_gpt.py runs on CPU); every
test reads those logs. Tests of refusals and of official-looking figures edit copies of them."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL, subprocess_env

sys.path.insert(0, str(ROOT / "tools"))
import compliance  # noqa: E402
import pack_submission  # noqa: E402
import plot  # noqa: E402
import record  # noqa: E402
import runlog  # noqa: E402
import seeds  # noqa: E402
import significance  # noqa: E402

# Every evaluation pass, cheaply: validation points during training, a sliding pass, three TTT chunks.
RUN = dict(ITERATIONS="4", TRAIN_LOG_EVERY="2", VAL_LOSS_EVERY="2", TTT_CHUNK_TOKENS="8192", TTT_BATCH_SEQS="32",
           TTT_EPOCHS="1")
SEEDS = (1, 2)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    env = subprocess_env(dict(TINY_MODEL, **RUN, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"]))
    cmd = [sys.executable, "tools/seeds.py", "--name", "tiny", "--seeds", ",".join(map(str, SEEDS)), "--nproc", "0",
           "--log-dir", str(tmp / "logs"), "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    paths = [tmp / "logs" / f"tiny_seed{s}.txt" for s in SEEDS]
    return {"tmp": tmp, "env": env, "cmd": cmd, "stdout": r.stdout, "paths": paths, "logs": [runlog.read_log(p) for p in paths]}


def edited(src: Path, dst: Path, old: str, new: str, count: int = 1) -> Path:
    """A copy of a real log with one edit of its settings or events (the edit must apply; the source that
    the header holds is left alone)."""
    text = src.read_text()
    start, end = text.index("\nsource: "), text.index("\nheader:end\n")
    settings, source, events = text[:start], text[start:end], text[end:]
    if old in settings:
        settings = settings.replace(old, new, count)
    else:
        assert old in events, old
        events = events.replace(old, new, count)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(settings + source + events)
    return dst


def line_of(path: Path, prefix: str) -> str:
    events = path.read_text().partition("\nheader:end\n")[2]
    return next(x for x in events.splitlines() if x.startswith(prefix))


# --- the parser ------------------------------------------------------------------------------------------


def test_parser_reads_every_part_of_a_real_log(runs):
    import train_gpt as tg
    log, path = runs["logs"][0], runs["paths"][0]
    assert log.complete and log.runs_in_file == 1
    assert set(log.settings) == {s.name for s in tg.SETTINGS}
    assert log.seed == 1 and log.run_id == "tiny_seed1" and log.settings["ITERATIONS"] == "4"
    assert log.versions["torch"] == torch.__version__ and log.world_size == 1 and log.device
    assert log.source_sha256 == tg.source_sha256()
    # the step curve: steps 1-5 are always logged, then every TRAIN_LOG_EVERY
    assert [s.step for s in log.steps] == [1, 2, 3, 4] and all(s.iterations == 4 for s in log.steps)
    assert all(s.tok_s > 0 and s.step_avg_ms > 0 and math.isfinite(s.train_loss) for s in log.steps)
    assert [s.train_time_ms for s in log.steps] == sorted(s.train_time_ms for s in log.steps)
    assert log.steps[0].looping is False and log.steps[-1].looping is True
    assert [v.step for v in log.val_points] == [2, 4] and all(0 < v.val_bpb < 10 for v in log.val_points)
    # every scored pass, with the counts, and the final score
    assert list(log.metrics) == ["pre_quantization_post_ema", "quantized", "quantized_sliding_window",
                                 "quantized_ttt_chunk", "final_ttt", "final"]
    n = log.val_targets
    assert n == int(runlog.split_line(line_of(path, "data ")).fields["val_tokens"])
    assert all(m.scored_targets == n for m in log.metrics.values() if not m.name.startswith("final"))
    assert log.final.name == "quantized_ttt_chunk" and log.final_val_bpb == log.final.val_bpb
    assert log.final_val_loss == log.metrics["final_ttt"].val_loss
    assert log.quantization_tax == pytest.approx(log.metrics["quantized"].val_bpb - log.metrics["pre_quantization_post_ema"].val_bpb, abs=1e-7)
    # artifact bytes: the file on disk plus the packed source
    artifact = path.with_suffix(".ptz")
    assert log.model_bytes == artifact.stat().st_size and log.artifact_bytes == log.model_bytes + log.code_bytes
    assert log.code_bytes == len(tg.pack_script((ROOT / "train_gpt.py").read_text()))
    # phases, evaluation budget, byte check, TTT protocol
    assert log.phases["gptq:hessians"]["batches"] == "2" and log.train_calibration_seconds > 0
    assert {"gptq:quantize", "serialize", "serialize:breakdown"} <= set(log.phases)
    assert [p["pass"] for p in log.eval_budget["passes"]] == ["plain", "sliding", "ttt_chunk"]
    assert log.eval_budget["summary"]["status"] in ("ok", "over_budget") and log.estimated_8gpu_eval_seconds > 0
    assert log.eval_total["passes"] == "plain,sliding,ttt_chunk"  # the round trip is the first pass
    assert log.eval_seconds == pytest.approx(runlog.number(log.eval_total["eval_total_time"]) / 1000)
    assert log.eval_seconds * 1000 >= sum(log.metrics[m].eval_ms for m in ("quantized", "quantized_sliding_window"))
    assert log.byte_check["ok"] and log.byte_check["mismatched_docs"] == "0"
    assert len(log.ttt_protocols) == 1 and log.ttt_protocols[0]["score_first"] and log.ttt_protocols[0]["mode"] == "chunk"
    assert log.mlp_backend == "torch" and not log.uses_cutlass


def figures(log) -> dict:
    return {"steps": log.steps, "val": log.val_points, "metrics": {k: (m.val_bpb, m.val_loss, m.scored_targets) for k, m in log.metrics.items()},
            "artifact": (log.model_bytes, log.code_bytes, log.artifact_bytes), "train": log.train_calibration_seconds,
            "eval": (log.eval_seconds, log.estimated_8gpu_eval_seconds), "byte_check": log.byte_check["ok"],
            "ttt": [p["score_first"] for p in log.ttt_protocols], "tax": log.quantization_tax, "final": log.final_val_bpb,
            "world": log.world_size, "torch": log.versions["torch"], "complete": log.complete}


def test_parser_keeps_unknown_lines(runs):
    text = runs["paths"][0].read_text()
    lines = text.splitlines()
    at = lines.index(next(x for x in lines if x.startswith("pre-quantization")))
    noisy = lines[:at] + ["some_future_line alpha:1 beta:2.5", "mlp_kernel:torch"] + lines[at:]
    log = runlog.parse_log("\n".join(noisy))
    assert figures(log) == figures(runs["logs"][0])
    assert log.find("some_future_line")[0].fields == {"alpha": "1", "beta": "2.5"}
    assert log.mlp_backend == "torch" and not log.uses_cutlass


def test_parser_says_why_a_log_is_incomplete_and_reads_the_last_of_two_runs(runs):
    text = runs["paths"][0].read_text()
    cut = runlog.parse_log(text.split("quantized_sliding_window")[0])
    assert not cut.complete and "final val_bpb" in cut.incomplete_reason
    assert cut.metrics["quantized"].val_bpb == runs["logs"][0].metrics["quantized"].val_bpb
    assert "no settings header" in runlog.parse_log("").incomplete_reason
    two = runlog.parse_log(text + runs["paths"][1].read_text())
    assert two.runs_in_file == 2 and two.seed == 2 and two.final_val_bpb == runs["logs"][1].final_val_bpb
    assert len(two.steps) == len(runs["logs"][1].steps)


def test_split_line_reads_the_one_form():
    line = runlog.split_line("gptq:hessians batches:2 train+calibration:5.3s budget:600s")
    assert line.kind == "gptq:hessians" and line.fields == {"gptq": "hessians", "batches": "2",
                                                            "train+calibration": "5.3s", "budget": "600s"}
    line = runlog.split_line("pre-quantization post-ema val_loss:1.5 val_bpb:0.7")
    assert line.name == "pre_quantization_post_ema" and line.fields["val_bpb"] == "0.7" and not line.words
    line = runlog.split_line("artifact: model_bytes:1 code_bytes:2")
    assert line.kind == "artifact" and line.label == "artifact" and line.fields == {"model_bytes": "1", "code_bytes": "2"}
    line = runlog.split_line("step:3/20 train_loss:2.5 tok/s:1000")
    assert line.label == "step" and line.fields["step"] == "3/20" and line.fields["tok/s"] == "1000"
    assert runlog.split_line("quantized val_bpb:1.2 stray words").words == ["stray", "words"]  # irregular: kept apart
    assert [runlog.number(v) for v in ("780ms", "312.9s", "29.0%", "+0.5", "1/20", None)] == [780, 312.9, 29.0, 0.5, None, None]


def test_bench_quant_reads_logs_through_the_parser(runs):
    import bench_quant
    row, log = bench_quant.parse_log(runs["paths"][0].read_text()), runs["logs"][0]
    assert row["total_B"] == str(log.artifact_bytes) and row["quant_bpb"] == log.metrics["quantized"].fields["val_bpb"]
    assert float(row["tax_bpb"]) == pytest.approx(log.quantization_tax)


# --- the multi-seed runner -------------------------------------------------------------------------------


def test_seeds_ran_each_seed_apart_with_a_table(runs):
    out = runs["stdout"]
    assert "SEED=<S> RUN_ID=tiny_seed<S> python3 train_gpt.py" in out
    for seed, path, log in zip(SEEDS, runs["paths"], runs["logs"]):
        assert log.seed == seed and path.with_suffix(".ptz").is_file()
        assert re.search(rf"^{seed}\s+{log.final_val_bpb:.8f}\s+{log.artifact_bytes:,}\s+\S+\s+\S+\s+ran", out, re.M)
    assert "mean val_bpb" in out and runs["logs"][0].final_val_bpb != runs["logs"][1].final_val_bpb


def test_seeds_resume_skips_finished_seeds_and_refuses_another_configuration(runs):
    before = [p.stat().st_mtime_ns for p in runs["paths"]]
    r = subprocess.run(runs["cmd"], cwd=ROOT, env=runs["env"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("done earlier") >= len(SEEDS) and "--- seed" not in r.stdout
    assert [p.stat().st_mtime_ns for p in runs["paths"]] == before
    r = subprocess.run(runs["cmd"] + ["MATRIX_LR=0.05"], cwd=ROOT, env=runs["env"], capture_output=True, text=True)
    assert r.returncode == 1 and "MATRIX_LR=0.022 (now 0.05)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_seeds_moves_an_incomplete_log_aside_and_reports_a_failed_seed(runs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(runs["tmp"] / "logs", logs)
    partial = logs / "tiny_seed2.txt"
    partial.write_text(partial.read_text().split("quantized val_loss")[0])
    cmd = runs["cmd"][:runs["cmd"].index("--log-dir")] + ["--log-dir", str(logs), "--quiet"]
    env = dict(runs["env"], DATA_PATH=str(tmp_path / "missing"))  # seed 2 reruns and fails at once
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and (logs / "tiny_seed2.txt.partial1").is_file()
    assert "moved to" in r.stdout and "done earlier" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("error: seed 2 failed (exit 1)")


@pytest.mark.parametrize("args,message", [
    (["--seeds", "1,1"], "distinct"),
    (["--seeds", "1", "SEED=3"], "set per seed"),
    (["--seeds", "1", "NOT_A_SETTING=1"], "not a train_gpt.py setting"),
    (["--seeds", "1", "ARTIFACT_PATH=x.ptz"], "ARTIFACT_PATH"),
    (["--seeds", "1", "--nproc", "3"], "--nproc 3"),
])
def test_seeds_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        seeds.main(["--name", "x", *args])
    assert message in str(e.value) and str(e.value).startswith("error: ")


# --- significance ----------------------------------------------------------------------------------------


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for t in (-40.0, -3.0, -0.5, 0.0, 0.2, 1.0, 2.5, 8.0, 40.0):
        for df in (1.0, 1.7, 2.0, 3.3, 10.0, 57.5, 1e4):
            assert significance.t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-14)


def test_t_inverse_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    # not p = 0.5 (t = 0): there t_sf's incomplete beta is evaluated at x = 1 - t^2/df, which rounds to 1
    # for |t| < 1e-8 * sqrt(df), so the inverse is only good to about that; the bar uses p = 0.01
    for p in (0.001, 0.01, 0.05, 0.25, 0.9, 0.999):
        for df in (1.0, 1.7, 3.3, 10.0, 1e4):
            assert significance.t_isf(p, df) == pytest.approx(stats.t.isf(p, df), rel=1e-8, abs=1e-10)


def test_the_gain_the_bar_needs_just_meets_it():
    """The printed 'gain the bar needs' is the observed gain at which, with the same spreads and seed counts,
    the bar's p-value is alpha: a hair more meets the bar, a hair less does not."""
    S = significance.Sample
    base, new = S(2.7800, 0.0030, 3), S(2.7790, 0.0020, 3)
    needed = significance.compare(base, new).bar.gain_needed(significance.ALPHA)
    assert needed > 0.005
    for shift, met in ((-1e-7, True), (1e-7, False)):
        moved = S(base.mean - needed + shift, new.std, new.n)
        assert significance.compare(base, moved).bar_met is met


def test_welch_test_matches_scipy_ttest_ind():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for trial in range(300):
        nb, nn = rng.integers(2, 8, size=2)
        base = rng.normal(2.78, rng.uniform(2e-4, 3e-3), nb)
        new = rng.normal(2.776, rng.uniform(2e-4, 3e-3), nn)
        margin = (0.0, 0.005)[trial % 2]
        ours = significance.welch_one_sided(significance.Sample.of(base), significance.Sample.of(new), margin)
        ref = stats.ttest_ind(base, new + margin, equal_var=False, alternative="greater")
        assert ours.t == pytest.approx(ref.statistic, rel=1e-9) and ours.p == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-12)
        assert ours.df == pytest.approx(ref.df, rel=1e-9)


def test_paired_test_matches_scipy_ttest_rel():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(2, 8))
        seed_effect = rng.normal(0, 5e-3, n)  # what a seed does to both sides alike
        base = 2.78 + seed_effect + rng.normal(0, 1e-3, n)
        new = 2.774 + seed_effect + rng.normal(0, 1e-3, n)
        margin = (0.0, 0.005)[trial % 2]
        ours = significance.paired_one_sided(list(base - new), margin)
        ref = stats.ttest_rel(base, new + margin, alternative="greater")
        assert ours.t == pytest.approx(ref.statistic, rel=1e-9) and ours.p == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-12)
        assert ours.df == n - 1
    with pytest.raises(ValueError):
        significance.paired_one_sided([0.01], 0.005)


def test_runs_without_spread_make_the_gain_exact():
    """Identical runs on a side (a repeated seed on one machine can be) leave no standard error: the gain is
    then exact, and both tests answer p = 0 above the margin and 1 at or below it, instead of dividing by 0."""
    S = significance.Sample
    welch = significance.welch_one_sided(S(2.78, 0.0, 3), S(2.77, 0.0, 3), margin=0.005)
    assert welch.p == 0.0 and welch.t == math.inf and math.isnan(welch.df) and welch.gain_needed(0.01) == 0.005
    assert significance.welch_one_sided(S(2.78, 0.0, 3), S(2.777, 0.0, 3), margin=0.005).p == 1.0
    paired = significance.paired_one_sided([0.01, 0.01, 0.01], margin=0.005)
    assert paired.p == 0.0 and paired.df == 2
    assert significance.paired_one_sided([0.002, 0.002], margin=0.005).p == 1.0


def test_runs_are_paired_only_when_both_sides_hold_the_same_seeds_once():
    class Log:
        def __init__(self, seed, nats):
            self.seed, self.final_val_loss = seed, nats
    base = [Log(1, 3.0), Log(2, 3.1), Log(3, 3.2)]
    assert significance.paired_by_seed(base, [Log(3, 2.9), Log(1, 2.8), Log(2, 2.7)]) == \
        {1: (3.0, 2.8), 2: (3.1, 2.7), 3: (3.2, 2.9)}
    assert significance.paired_by_seed(base, [Log(1, 2.8), Log(2, 2.7)]) is None          # a seed missing
    assert significance.paired_by_seed(base, [Log(1, 2.8), Log(1, 2.7), Log(3, 2.9)]) is None  # a seed twice
    assert significance.paired_by_seed(base, [Log(None, 2.8), Log(2, 2.7), Log(3, 2.9)]) is None
    assert significance.paired_by_seed(base[:1], [Log(1, 2.8)]) is None                    # one pair: no test


def test_the_bar_is_a_test_of_the_margin_not_of_any_gain():
    S = significance.Sample
    clear = significance.compare(S(2.7800, 0.0005, 3), S(2.7700, 0.0005, 3))
    assert clear.bar_met and clear.bar.gain == pytest.approx(0.01)
    barely = significance.compare(S(2.7800, 0.0010, 3), S(2.7749, 0.0010, 3))  # 0.0051 observed, noisy
    assert not barely.bar_met and barely.improvement.p < 0.01 < barely.bar.p
    small = significance.compare(S(2.7800, 0.00001, 5), S(2.7760, 0.00001, 5))  # certain, but only 0.004
    assert not small.bar_met and small.improvement.p < 1e-6
    with pytest.raises(ValueError):
        significance.welch_one_sided(S(1.0, 0.1, 1), S(1.0, 0.1, 3))


def test_runs_needed_is_the_first_count_at_which_the_observed_gain_passes():
    S = significance.Sample
    base, new = S(3.4788, 0.0089, 2), S(3.4671, 0.0230, 2)
    n = significance.seeds_needed(base, new, 0.005, 0.01)
    assert n is not None and n > 3
    def passes(k):
        return significance.welch_one_sided(S(base.mean, base.std, k), S(new.mean, new.std, k), 0.005).p < 0.01
    assert passes(n) and not passes(n - 1)
    assert significance.seeds_needed(base, S(3.4760, 0.0230, 2), 0.005, 0.01) is None  # gain 0.0028 < margin
    assert significance.seeds_needed(base, S(3.4737, 0.5, 2), 0.005, 0.01, cap=50) is None  # far too noisy
    report = significance.compare(base, new).report()
    assert f"runs a side the observed gain would need at these spreads: {n}" in report
    below_margin = significance.compare(base, S(3.4760, 0.0230, 2)).report()
    assert "would need at these spreads: none suffice (the gain is not above the margin)" in below_margin
    too_noisy = significance.compare(base, S(3.4737, 0.5, 2)).report()
    assert "would need at these spreads: more than 1000" in too_noisy


def test_significance_command_in_nats_and_bpb_from_logs(runs, capsys):
    logs = runs["logs"]
    ratio = logs[0].final_val_loss / logs[0].final_val_bpb
    mean_bpb = sum(log.final_val_bpb for log in logs) / len(logs)
    significance.main(["--new", *map(str, runs["paths"]), "--baseline-stats", f"{mean_bpb + 0.1},0.0001,3"])
    out = capsys.readouterr().out
    assert f"nats per bpb: {ratio:.6f}" in out
    assert f"observed gain (baseline - new): {0.1 * ratio:.5f} nats ({0.1:.5f} bpb)" in out
    assert "gain the bar needs with these spreads and seed counts: " in out
    significance.main(["--new", *map(str, runs["paths"]), "--baseline", *map(str, runs["paths"])])
    out = capsys.readouterr().out
    assert "observed gain (baseline - new): 0.00000 nats" in out and "NOT MET" in out
    with pytest.raises(SystemExit) as e:
        significance.main(["--new-stats", "1,0.1,3", "--baseline-stats", "1.1,0.1,3"])
    assert "--nats-per-bpb" in str(e.value)


# --- compliance ------------------------------------------------------------------------------------------


def statuses(log) -> dict:
    return {c.name: c.status for c in compliance.check_log(log)}


def test_compliance_of_a_small_cpu_run_is_honest(runs):
    log = runs["logs"][0]
    checks = {c.name: c for c in compliance.check_log(log)}
    assert statuses(log) == {"hardware": "fail", "train_time": "pass", "eval_time": "n.a.", "artifact": "pass",
                             "ttt_protocol": "pass", "scored_targets": "fail", "byte_check": "pass", "complete": "pass"}
    assert f"{log.val_targets:,} of 40,540,160" in checks["scored_targets"].figure
    assert f"{log.artifact_bytes:,} bytes" in checks["artifact"].figure
    assert f"{log.train_calibration_seconds:.1f} s" in checks["train_time"].figure


def official(path: Path, dst: Path) -> Path:
    """A copy of a real log with the figures of a full 8-GPU run on the official validation."""
    text = path.read_text()
    n = runlog.read_log(path).val_targets
    text = text.replace(f"scored_targets:{n}", "scored_targets:40540160").replace(f"val_tokens:{n}", "val_tokens:40540160")
    text = re.sub(r"world_size: 1 grad_accum_steps: 8", "world_size: 8 grad_accum_steps: 1", text)
    text = re.sub(r"device: .*", "device: NVIDIA H100 80GB HBM3", text)
    dst.write_text(text)
    return dst


@pytest.mark.parametrize("case,old,new,check", [
    ("train over", "train+calibration:", "train+calibration:600.4s ", "train_time"),
    ("eval over", "eval_total_time:", "eval_total_time:700000ms ", "eval_time"),
    ("artifact over", "total:", "total:16000001 ", "artifact"),
    ("ttt not score-first", "rule:score-first", "rule:train-first", "ttt_protocol"),
    ("no byte check", "byte_check:", "byte_check_removed:", "byte_check"),
])
def test_compliance_fails_each_rule_with_its_figure(runs, tmp_path, case, old, new, check):
    base = runlog.read_log(official(runs["paths"][0], tmp_path / "official.txt"))
    assert set(statuses(base).values()) == {"pass"}, compliance.check_log(base)
    text = (tmp_path / "official.txt").read_text()
    line = next(x for x in text.partition("\nheader:end\n")[2].splitlines() if old in x)
    if new.endswith(" "):  # replace the field's value
        key = old
        changed = re.sub(re.escape(key) + r"\S+", new.strip(), line)
    else:
        changed = line.replace(old, new)
    log = runlog.parse_log(text.replace(line, changed))
    result = statuses(log)
    assert result[check] == "fail" and [k for k, v in result.items() if v != "pass"] == [check]


@pytest.mark.parametrize("counts, status", [("records", "pass"), ("all", "fail")])
def test_compliance_counts_the_evaluation_as_the_run_did(runs, tmp_path, counts, status):
    """700 s of evaluation of which 200 s were compile warm-ups (fixed_seconds): within the limit as the records
    count (EVAL_BUDGET_COUNTS=records: warm-ups left out), over it when the run counted everything."""
    text = official(runs["paths"][0], tmp_path / "official.txt").read_text()
    text = re.sub(r"eval_total_time:\d+ms", "eval_total_time:700000ms", text)
    text = re.sub(r"(?m)^(eval_budget: .*) fixed_seconds:\S+ counts:\S+", rf"\1 fixed_seconds:200.0 counts:{counts}", text)
    log = runlog.parse_log(text)
    assert log.eval_counted_seconds == pytest.approx(500.0 if counts == "records" else 700.0)
    check = {c.name: c for c in compliance.check_log(log)}["eval_time"]
    assert check.status == status and "700.0 s" in check.figure
    assert ("500.0 s without the passes' compile warm-ups" in check.figure) == (counts == "records")


def test_compliance_command_on_a_log_and_strict(runs, capsys):
    compliance.main([str(runs["paths"][0])])
    out = capsys.readouterr().out
    assert "scored_targets  fail" in out and "artifact        pass" in out
    with pytest.raises(SystemExit) as e:
        compliance.main(["--strict", str(runs["paths"][0])])
    assert e.value.code == 1


# --- plots -----------------------------------------------------------------------------------------------


def test_plot_draws_every_panel_with_labelled_axes(runs, tmp_path):
    pytest.importorskip("matplotlib")
    fig = plot.figure(runs["logs"], labels=["one", "two"])
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert labels == [("step", "train loss (nats/token)"), ("training wallclock (s)", "train loss (nats/token)"),
                      ("step", "val_bpb"), ("step", "tokens/s")]
    by_step = fig.axes[0]
    assert [line.get_label() for line in by_step.get_lines()] == ["one", "two"]
    assert list(by_step.get_lines()[0].get_xdata()) == [s.step for s in runs["logs"][0].steps]
    assert len(fig.axes[2].collections) == 2 * 4  # four passes on the artifact, per run
    out = tmp_path / "curves.png"
    plot.main([*map(str, runs["paths"]), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the record folder -----------------------------------------------------------------------------------


def record_args(paths, out, *extra):
    return ["--name", "TinyTest", "--author", "Test Author", "--github-id", "tester", "--date", "2026-12-02",
            "--summary", "Two tiny CPU seeds. Nothing else.", "--out", str(out), "--logs", *map(str, paths), *extra]


def test_record_writes_the_whole_folder(runs, tmp_path, capsys):
    record.main(record_args(runs["paths"], tmp_path))
    folder = tmp_path / "2026-12-02_TinyTest"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "requirements.txt", "submission.json", "train_curves.png",
                                                      "train_gpt.py", "train_seed1.log", "train_seed2.log"]
    logs = runs["logs"]
    sub = json.loads((folder / "submission.json").read_text())
    bpbs = [log.final_val_bpb for log in logs]
    assert sub["author"] == "Test Author" and sub["github_id"] == "tester" and sub["name"] == "TinyTest"
    assert sub["date"] == "2026-12-02" and sub["track"] == "10min_16mb" and sub["seeds"] == list(SEEDS)
    assert sub["val_bpb"] == pytest.approx(np.mean(bpbs), abs=1e-8) and sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1), abs=1e-8)
    for log in logs:
        r = sub["seed_results"][str(log.seed)]
        assert r["val_bpb"] == log.final_val_bpb and r["artifact_bytes"] == log.artifact_bytes and r["steps"] == 4
    assert sub["hardware"] == f"1x {logs[0].device}" and sub["pytorch_version"] == torch.__version__
    assert sub["technique_summary"] == "Two tiny CPU seeds. Nothing else." and sub["code_bytes"] == logs[0].code_bytes
    assert sub["compliance"]["artifact"] is True and sub["compliance"]["scored_targets"] is False
    assert sub["compliance"]["eval_time"] is None  # n.a. on a CPU run
    packed = (folder / "train_gpt.py").read_bytes()
    assert len(packed) == logs[0].code_bytes
    assert pack_submission.unpack_script(packed) == pack_submission.tg.shipping_source((ROOT / "train_gpt.py").read_text())
    for seed, path in zip(SEEDS, runs["paths"]):
        assert (folder / f"train_seed{seed}.log").read_bytes() == path.read_bytes()
    readme = (folder / "README.md").read_text()
    for log in logs:
        assert f"| {log.seed} | {log.final_val_bpb:.8f} |" in readme
    assert f"**val_bpb {sub['val_bpb']:.8f}**" in readme and "Two tiny CPU seeds." in readme
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme and "ITERATIONS=4" in readme
    assert "| scored_targets |" in readme and "train_curves.png" in readme and torch.__version__ in readme
    assert (folder / "requirements.txt").read_text().startswith((ROOT / "requirements.txt").read_text().rstrip("\n"))
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left


def refuse(args, out: Path) -> str:
    with pytest.raises(SystemExit) as e:
        record.main(args)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    assert not out.exists() or list(out.iterdir()) == [], "a refusal must leave nothing behind"
    return message


def test_record_refuses_an_artifact_over_the_limit(runs, tmp_path):
    p1 = runs["paths"][0]
    bad = edited(runs["paths"][1], tmp_path / "in" / "tiny_seed2.txt", f"total:{runs['logs'][1].artifact_bytes}", "total:16000001")
    assert "16,000,001 bytes is over the 16,000,000 limit" in refuse(record_args([p1, bad], tmp_path / "out"), tmp_path / "out")


def test_record_refuses_logs_that_disagree_on_code_bytes(runs, tmp_path):
    code = runs["logs"][1].code_bytes
    bad = edited(runs["paths"][1], tmp_path / "in" / "tiny_seed2.txt", f"code_bytes:{code}", f"code_bytes:{code + 1}")
    assert "disagree on code bytes" in refuse(record_args([runs["paths"][0], bad], tmp_path / "out"), tmp_path / "out")


def test_record_refuses_logs_that_disagree_on_a_setting(runs, tmp_path):
    bad = edited(runs["paths"][1], tmp_path / "in" / "tiny_seed2.txt", "  MATRIX_LR: 0.022", "  MATRIX_LR: 0.03")
    msg = refuse(record_args([runs["paths"][0], bad], tmp_path / "out"), tmp_path / "out")
    assert "disagree on MATRIX_LR: 0.022" in msg and "0.03" in msg


def test_record_allows_run_specific_settings_to_differ(runs, tmp_path):
    moved = edited(runs["paths"][1], tmp_path / "in" / "tiny_seed2.txt", "  LOG_DIR: ", "  LOG_DIR: /elsewhere/")
    record.main(record_args([runs["paths"][0], moved], tmp_path / "out"))
    assert (tmp_path / "out" / "2026-12-02_TinyTest" / "README.md").is_file()


def test_record_refuses_an_incomplete_log(runs, tmp_path):
    text = runs["paths"][1].read_text()
    cut = tmp_path / "in" / "tiny_seed2.txt"
    cut.parent.mkdir()
    cut.write_text(text.split("final val_bpb")[0])
    msg = refuse(record_args([runs["paths"][0], cut], tmp_path / "out"), tmp_path / "out")
    assert f"log {cut} is incomplete" in msg


def test_record_refuses_a_packed_script_of_another_size(runs, tmp_path):
    code = runs["logs"][0].code_bytes
    logs = [edited(p, tmp_path / "in" / p.name, f"code_bytes:{code}", f"code_bytes:{code - 7}") for p in runs["paths"]]
    msg = refuse(record_args(logs, tmp_path / "out"), tmp_path / "out")
    assert f"is {code} bytes but the logs counted {code - 7} code bytes" in msg


def test_record_refuses_a_source_the_logs_did_not_run(runs, tmp_path):
    source = tmp_path / "train_gpt.py"
    source.write_text((ROOT / "train_gpt.py").read_text() + "\n# edited after the runs\n")
    msg = refuse(record_args(runs["paths"], tmp_path / "out", "--source", str(source)), tmp_path / "out")
    assert "is not the train_gpt.py the logs ran" in msg


def test_record_refuses_repeated_seeds_two_runs_in_one_log_and_an_existing_folder(runs, tmp_path):
    p1, p2 = runs["paths"]
    assert "seeds repeat" in refuse(record_args([p1, p1], tmp_path / "out"), tmp_path / "out")
    both = tmp_path / "in" / "both.txt"
    both.parent.mkdir()
    both.write_text(p1.read_text() + p2.read_text())
    assert "holds 2 runs" in refuse(record_args([p1, both], tmp_path / "out"), tmp_path / "out")
    record.main(record_args([p1, p2], tmp_path / "exists"))
    with pytest.raises(SystemExit) as e:
        record.main(record_args([p1, p2], tmp_path / "exists"))
    assert "already exists" in str(e.value)


def test_record_ships_cutlass_sources_only_when_the_run_used_them(runs, tmp_path, monkeypatch):
    logs = [edited(p, tmp_path / "in" / p.name, "mlp_kernel:torch", "mlp_kernel:cutlass") for p in runs["paths"]]
    assert runlog.read_log(logs[0]).uses_cutlass
    empty = tmp_path / "cutlass_empty"
    empty.mkdir()
    (empty / "README.md").write_text("placeholder")
    monkeypatch.setattr(record, "CUTLASS_DIR", empty)
    assert "holds no sources" in refuse(record_args(logs, tmp_path / "out"), tmp_path / "out")
    kit = tmp_path / "cutlass_kit"
    (kit / "csrc").mkdir(parents=True)
    (kit / "csrc" / "evt.cu").write_text("// kernel\n")
    (kit / "setup.py").write_text("# build\n")
    monkeypatch.setattr(record, "CUTLASS_DIR", kit)
    record.main(record_args(logs, tmp_path / "out"))
    shipped = tmp_path / "out" / "2026-12-02_TinyTest" / "cutlass_evt_fusion"
    assert sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()) == ["csrc/evt.cu", "setup.py"]


def test_record_leaves_nothing_when_writing_fails_midway(runs, tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")
    monkeypatch.setattr(record, "write_plot", broken)
    with pytest.raises(OSError):
        record.main(record_args(runs["paths"], tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_make_record_target(runs, tmp_path):
    r = subprocess.run(["make", "-s", "record", f"PY={sys.executable}", "NAME=ViaMake", "AUTHOR=A B", "GITHUB_ID=ab",
                        "SUMMARY=Made by make.", f"LOGS={' '.join(map(str, runs['paths']))}", f"OUT={tmp_path}"],
                       cwd=ROOT, env=subprocess_env({}), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    folder = next(tmp_path.glob("*_ViaMake"))
    assert json.loads((folder / "submission.json").read_text())["technique_summary"] == "Made by make."
    compliance.main([str(folder)])  # a record folder is read through its train_seed*.log files


# --- the frontier-vs-pr1529 proxy comparison's runner (records/proxy_1gpu_frontier_vs_pr1529/run.sh) ----------

H2H = ROOT / "records" / "proxy_1gpu_frontier_vs_pr1529" / "run.sh"


def test_the_comparison_runner_trains_then_evaluates_with_the_presets_own_evaluation(tiny_data, tmp_path):
    """run.sh trains with TTT and the tilt off (STAGE train: no evaluation follows), then evaluates the artifact
    (STAGE eval) with the preset's TTT and tilt switched back on explicitly (EVAL_ONLY would otherwise adopt the
    training run's off), once a deadline leaves it H2H_EVAL_SECONDS; a third call (STAGE all) finds both logs
    finished and runs nothing; a deadline too short for training starts nothing, and STAGE eval does not start
    on a run that is not trained."""
    env = dict(TINY_MODEL, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(tmp_path / "h2h"), OUT=str(tmp_path / "out"), ITERATIONS="3", EVAL_SEQ_LEN="64",
               TTT_CHUNK_TOKENS="256", TTT_BATCH_SEQS="3", TTT_CHUNK_SIZE="16", TTT_BATCH_DOCS="4",
               TTT_LORA_RANK="4", TRAIN_SEQ_SCHEDULE="32@0,64@0.5", H2H_COMPILED_DIR=str(tmp_path / "compiled"))
    def h2h(*args, timeout=900):
        return subprocess.run(["bash", str(H2H), *args], cwd=ROOT, env=subprocess_env(env), capture_output=True,
                              text=True, timeout=timeout)
    trained = h2h("frontier", "5", "900", "train")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert not (tmp_path / "h2h" / "frontier_seed5_eval.txt").exists() and "evaluating" not in trained.stdout
    too_late = h2h("frontier", "5", "120", "eval", timeout=300)  # 100 s left, under the 270 of a first evaluation
    assert too_late.returncode == 0 and re.search(r"frontier_seed5_eval not started: (99|100) s left", too_late.stdout)
    assert not (tmp_path / "h2h" / "frontier_seed5_eval.txt").exists()
    first = h2h("frontier", "5", "900", "eval")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    train, scored = (runlog.read_log(tmp_path / "h2h" / f"frontier_seed5{x}.txt") for x in ("", "_eval"))
    assert train.complete and train.settings["TTT_ENABLED"] == "False" and train.settings["NGRAM_TILT"] == "False"
    assert train.settings["MAX_WALLCLOCK_SECONDS"] == "240.0" and train.settings["VAL_DOCS"] == "782"
    assert train.settings["EMA_DECAY"] == "0.93"
    assert scored.complete and scored.ttt_protocols[0]["mode"] == "lora" and scored.ttt_protocols[0]["ngram_tilt"] == "1"
    assert "eval_only:overridden setting:TTT_ENABLED value:True artifact:False" in first.stdout
    assert scored.final_val_bpb == scored.metrics["final_ttt"].val_bpb != train.final_val_bpb
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"frontier_seed5.txt", "frontier_seed5_eval.txt",
                                                                "frontier_seed5.ptz"}
    again = h2h("frontier", "5", "100", timeout=300)
    assert again.returncode == 0 and "Hyperparameters" not in again.stdout, again.stderr[-2000:]
    assert again.stdout.count("final val_bpb:") == 2
    short = h2h("pr1529", "6", "100", timeout=300)
    assert short.returncode == 0 and "not started: a training run needs 450 s compiled afresh" in short.stdout
    untrained = h2h("pr1529", "6", "900", "eval", timeout=300)
    assert untrained.returncode == 0 and "pr1529_seed6 is not trained yet" in untrained.stdout
    assert not (tmp_path / "h2h" / "pr1529_seed6.txt").exists()
    assert not (tmp_path / "h2h" / "pr1529_seed6_eval.txt").exists()
    wrong = h2h("pr1529", "6", "900", "both", timeout=300)
    assert wrong.returncode == 2 and "STAGE=both is not one of all, train, eval" in wrong.stderr
    # pr1529's evaluation (chunk TTT, 78 s compiled afresh) needs 100 s, frontier's 200: a finished training
    # log (only its last line is read before the evaluation) and 100-101 s left start pr1529's, and 99-100 s do not
    env["LOG_DIR"] = str(tmp_path / "h2h_need")
    (tmp_path / "h2h_need").mkdir()
    (tmp_path / "h2h_need" / "pr1529_seed7.txt").write_text("final val_bpb:1.0\n")
    refused = h2h("pr1529", "7", "119", "eval", timeout=300)
    assert re.search(r"pr1529_seed7_eval not started: (98|99) s left of the deadline, an evaluation needs 100 s",
                     refused.stdout), refused.stdout
    started = h2h("pr1529", "7", "125", "eval", timeout=300)
    assert "h2h: evaluating pr1529_seed7" in started.stdout and started.returncode != 0  # no artifact to score


def test_the_committed_comparison_reproduces_its_readmes_figures(capsys):
    """Series 2 of the frontier-vs-pr1529 comparison (records/proxy_1gpu_frontier_vs_pr1529/): each final the two
    READMEs quote is the one its committed evaluation log ends with, the mean gain is recomputed here from those
    finals on their own, and the p-value quoted is what tools/significance.py computes from the same logs."""
    folder = H2H.parent
    pr1529 = sorted((folder / "ema093").glob("pr1529_seed*_eval.log"))
    frontier = sorted((folder / "ema093_frontier2").glob("frontier_seed*_eval.log"))
    assert len(pr1529) == len(frontier) == 3  # seeds 1337, 42 and 2025
    finals = {p: float(re.findall(r"^final val_bpb:([0-9.]+)$", p.read_text(), re.M)[-1]) for p in pr1529 + frontier}
    readme, main_readme = (folder / "README.md").read_text(), (ROOT / "README.md").read_text()
    for path, final in finals.items():
        assert f"**{final:.8f}**" in readme, path.name
        assert f"{final:.5f}" in main_readme, path.name

    def mean(paths):
        return sum(finals[p] for p in paths) / len(paths)
    gain_bpb = mean(pr1529) - mean(frontier)
    for text in (readme, main_readme):
        assert f"{mean(frontier):.6f}" in text and f"{mean(pr1529):.6f}" in text
        assert f"{gain_bpb:.5f} bpb" in text
    significance.main(["--new", *map(str, frontier), "--baseline", *map(str, pr1529)])
    out = capsys.readouterr().out
    p_bar = float(re.search(r"H0 gain <= 0.005 nats: .* p=([0-9.]+)", out).group(1))
    p_any = float(re.search(r"H0 gain <= 0: .* p=([0-9.]+)", out).group(1))
    gain_nats = float(re.search(r"observed gain \(baseline - new\): ([0-9.]+) nats", out).group(1))
    for text in (readme, main_readme):
        assert f"p = {p_bar:.3f}" in text and f"p = {p_any:.3f}" in text and f"{gain_nats:.5f} nats" in text
    assert "NOT MET" in out
    paired = float(re.search(r"paired H0 gain <= 0.005 nats: .* p=([0-9.]+)", out).group(1))
    assert f"paired by seed, p = {paired:.3f}" in readme


# --- issue 11's speed features on against off at equal wallclock (records/proxy_1gpu_h100_2026-12-07_speed_wallclock/) ---

def test_the_committed_wallclock_comparison_reproduces_its_readmes_table():
    """Each figure of the README's table is what the two committed logs say: the rates recomputed from the step
    clocks (and within 1% of the mean of the log's own tok/s fields over the same steps, an independent count),
    the finals, the steps, the peak memory and the artifact bytes; and the two runs differ only in the speed
    settings the README names."""
    folder = ROOT / "records" / "proxy_1gpu_h100_2026-12-07_speed_wallclock"
    readme = (folder / "README.md").read_text()
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
           for line in readme.splitlines() if line.startswith("| ") and not line.startswith("| ---")}
    logs = {name: runlog.read_log(folder / f"speed_{name}_seed1337.log") for name in ("on", "off")}
    for column, name in enumerate(("on", "off")):
        log, cell = logs[name], (lambda label: row[label][column].replace("**", ""))
        rates = log.phase_rates()
        for phase, label in (("before_looping", "tokens/s before looping (ms a step)"), ("looping", "tokens/s looping")):
            r = rates[phase]
            assert cell(label).startswith(f"{r['tokens_per_s'] / 1e6:.3f}M ({r['ms_per_step']:.1f} ms"), (name, phase)
            fields = [s.tok_s for s in log.steps if s.looping == (phase == "looping")
                      and (phase == "looping" or s.step >= 10)][1:]
            assert sum(fields) / len(fields) == pytest.approx(r["tokens_per_s"], rel=0.01)
        assert cell("steps in 225 s of training (+ 12 s calibration)") == str(log.steps_done)
        assert cell("**quantized (final)**") == f"{log.final_val_bpb:.8f}"
        assert cell("post-EMA, before quantization") == f"{log.metrics['pre_quantization_post_ema'].val_bpb:.8f}"
        assert cell("live weights at the last step, val_bpb") == f"{log.val_points[-1].val_bpb:.4f}"
        assert cell("peak memory allocated") == f"{log.peak_memory_mib[0]:,} MiB"
        assert cell("artifact bytes") == f"{log.artifact_bytes:,}"
    on, off = (logs[n].settings_without_run_specifics() for n in ("on", "off"))
    assert {k for k in on.keys() | off.keys() if on.get(k) != off.get(k)} == {"CLOCK_CHECK_EVERY", "LOSS_KERNEL"}
    gain = logs["off"].final_val_bpb - logs["on"].final_val_bpb
    assert f"{gain:.4f} bpb better" in readme


def test_the_warm_stage_compiles_a_seeds_graphs_and_leaves_no_result(tiny_data, tmp_path):
    """STAGE warm trains two steps whose untimed warm-up compiles every graph a seed's training compiles (each
    window length, looping off and on), evaluates that artifact with the preset's TTT (its graphs too), and
    deletes the artifact; a second warm call runs nothing, and a seed trained after it is untouched by it."""
    env = dict(TINY_MODEL, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(tmp_path / "h2h"), EVAL_SEQ_LEN="64", TTT_CHUNK_TOKENS="256", TTT_BATCH_SEQS="3",
               TTT_CHUNK_SIZE="16", TTT_BATCH_DOCS="4", TTT_LORA_RANK="4", TRAIN_SEQ_SCHEDULE="32@0,64@0.5",
               H2H_WARM_EVAL_SECONDS="60", H2H_COMPILED_DIR=str(tmp_path / "compiled"))

    def h2h(*args, extra=None):
        return subprocess.run(["bash", str(H2H), *args], cwd=ROOT, env=subprocess_env(dict(env, **(extra or {}))),
                              capture_output=True, text=True, timeout=900)
    warm = h2h("frontier", "3", "900", "warm")
    assert warm.returncode == 0, warm.stdout[-2000:] + warm.stderr[-2000:]
    assert "h2h: frontier's graphs compiled on this machine" in warm.stdout
    logs = tmp_path / "h2h"
    assert sorted(p.name for p in logs.iterdir()) == ["frontier_warm.txt", "frontier_warm_eval.txt"]
    trained, scored = runlog.read_log(logs / "frontier_warm.txt"), runlog.read_log(logs / "frontier_warm_eval.txt")
    assert trained.complete and trained.steps_done == 2 and trained.settings["GPTQ_CALIBRATION_BATCHES"] == "4"
    assert scored.complete and scored.ttt_protocols[0]["mode"] == "lora"
    again = h2h("frontier", "3", "900", "warm")
    assert again.returncode == 0 and "Hyperparameters" not in again.stdout
    seed = h2h("frontier", "4", "900", "train", extra=dict(ITERATIONS="3"))
    assert seed.returncode == 0, seed.stderr[-2000:]
    graphs = [[line for line in runlog.read_log(logs / name).events if line.text.startswith("warmup:graph")]
              for name in ("frontier_warm.txt", "frontier_seed4.txt")]
    assert len(graphs[0]) >= 3 and [g.text for g in graphs[0]] == [g.text for g in graphs[1]]
    assert runlog.read_log(logs / "frontier_seed4.txt").steps_done == 3


STAND_IN_TRAINER = """import os, sys, time
class Settings:  # run.sh reads the preset's n-gram tilt from the evaluating script
    ngram_tilt = True
if __name__ == "__main__":  # a training or an evaluation (EVAL_ONLY) that writes what run.sh reads of a log
    log = os.path.join(os.environ["LOG_DIR"], os.environ["RUN_ID"] + ".txt")
    evaluating = bool(os.environ.get("EVAL_ONLY"))
    if evaluating and not os.path.exists(os.environ["EVAL_ONLY"]):
        sys.exit("no artifact at " + os.environ["EVAL_ONLY"])
    with open(log, "w") as f:
        f.write("eval_budget:early pass:ttt_lora estimated_8gpu_pass_seconds:1\\n" if evaluating else "warmup:done seconds:1.0\\n")
        f.flush()
        if os.environ.get("STAND_IN_HANG"):
            time.sleep(60)
        f.write("final val_bpb:1.0\\n")
    if not evaluating:
        open(os.path.join(os.environ["LOG_DIR"], os.environ["RUN_ID"] + ".ptz"), "wb").write(b"artifact")
"""


def test_the_runner_sizes_each_step_by_what_this_machine_has_compiled(tmp_path):
    """run.sh asks a step for the time it needs on this machine: a frontier training 600 s compiled afresh and 360
    s once its graphs are (STAGE warm compiles them), an evaluation 270 s and then 100 s. What is compiled is what
    this machine's runs logged (training's `warmup:done`, the evaluation's TTT pass begun, even in a run stopped
    after it), kept in H2H_COMPILED_DIR, not what LOG_DIR holds: a carried LOG_DIR on a fresh machine (another
    H2H_COMPILED_DIR) is cold again, and the warm stage runs there again. A stand-in trainer writes the log lines
    run.sh reads; the real trainer goes through run.sh in the tests above."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN_TRAINER)
    logs = tmp_path / "h2h"

    def h2h(machine, *args, **extra):
        env = subprocess_env(dict(LOG_DIR=str(logs), H2H_SCRIPT=str(script), H2H_COMPILED_DIR=str(tmp_path / machine),
                                  **extra))
        r = subprocess.run(["bash", str(H2H), "frontier", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout
    assert "seed1 not started: a training run needs 600 s compiled afresh" in h2h("a", "1", "590", "train")
    warm = h2h("a", "1", "590", "warm")
    assert "h2h: frontier's graphs compiled on this machine" in warm
    assert sorted(p.name for p in logs.iterdir()) == ["frontier_warm.txt", "frontier_warm_eval.txt"]
    assert "h2h: training" not in h2h("a", "1", "590", "warm")  # the same machine: nothing to compile
    assert "h2h: training frontier_seed1" in h2h("a", "1", "360", "train")
    assert "h2h: evaluating frontier_seed1" in h2h("a", "1", "120", "eval")  # 100 s left, 100 needed
    assert (logs / "frontier_seed1_eval.txt").read_text().endswith("final val_bpb:1.0\n")
    assert "h2h: training frontier_seed2" in h2h("a", "2", "360", "train")
    # machine b: the same LOG_DIR carried to a fresh machine
    refused = h2h("b", "2", "289", "eval")
    assert re.search(r"seed2_eval not started: 26[89] s left of the deadline, an evaluation needs 270 s compiled "
                     r"afresh", refused), refused
    assert "h2h: training frontier_seed3" not in h2h("b", "3", "590", "train")
    stopped = h2h("b", "2", "27", "eval", H2H_EVAL_SECONDS="1", STAND_IN_HANG="1")  # stopped in its TTT pass
    assert "frontier_seed2_eval stopped at the deadline" in stopped
    refused = h2h("b", "2", "119", "eval")
    assert re.search(r"(98|99) s left of the deadline, an evaluation needs 100 s with its graphs compiled on this "
                     r"machine", refused), refused
    warm_b = h2h("b", "1", "590", "warm")  # LOG_DIR's finished warm logs do not make machine b warm
    assert "h2h: training frontier_warm" in warm_b and "graphs compiled on this machine" in warm_b
    assert (logs / "frontier_warm.txt.partial1").exists() and not (logs / "frontier_warm.ptz").exists()
    assert "h2h: training frontier_seed3" in h2h("b", "3", "360", "train")


def test_the_series_runner_gives_each_step_what_the_call_has_left_and_returns_only_text_logs(tmp_path):
    """series.sh runs its steps in order with the call's remaining time: a training that does not fit is refused
    by run.sh, the evaluation after it of a trained seed (a finished log, no artifact) is started with what is
    left and fails on the missing artifact, the series goes on to the end, and only LOG_DIR's text logs reach
    $OUT. Malformed steps stop it before anything runs."""
    series = H2H.parent / "series.sh"
    logs, out = tmp_path / "h2h", tmp_path / "out"
    logs.mkdir()
    (logs / "pr1529_seed7.txt").write_text("final val_bpb:1.0\n")
    (logs / "pr1529_seed7.ptz").write_bytes(b"not an artifact")
    env = subprocess_env({"LOG_DIR": str(logs), "OUT": str(out), "H2H_COMPILED_DIR": str(tmp_path / "compiled")})
    r = subprocess.run(["bash", str(series), "pr1529", "140", "train:8", "eval:7", "train:9"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"pr1529_seed8 not started: a training run needs 450 s compiled afresh .*, the deadline is 13[0-2] s",
                     r.stdout), r.stdout
    assert "h2h: evaluating pr1529_seed7" in r.stdout and "series: pr1529 eval:7 failed" in r.stdout
    assert "series: pr1529 train:9 at" in r.stdout and "series: done at" in r.stdout
    assert sorted(p.name for p in (out / "h2h").iterdir()) == ["pr1529_seed7.txt"]  # the artifact stays behind
    # unless asked for: a seed trained in one session, its artifact evaluated in the next
    shutil.rmtree(out)
    r = subprocess.run(["bash", str(series), "pr1529", "140", "train:8"], cwd=ROOT,
                       env=dict(env, H2H_RETURN_ARTIFACTS="1"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and sorted(p.name for p in (out / "h2h").iterdir()) == ["pr1529_seed7.ptz", "pr1529_seed7.txt"]
    bad = subprocess.run(["bash", str(series), "pr1529", "140", "train:8", "later:9"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "step later:9 is not STAGE:SEED" in bad.stderr and "series: pr1529" not in bad.stdout


def test_a_series_cut_short_still_returns_the_logs_of_its_finished_steps(tmp_path):
    """The device's call can end mid-step (its limit, or the session's device time): series.sh copies LOG_DIR's
    text logs to $OUT after each step, so a kill during the second step leaves the first one's log there. run.sh
    is replaced by a stand-in beside a copy of series.sh: the first step writes its log, the second hangs."""
    folder = tmp_path / "runner"
    folder.mkdir()
    shutil.copy(H2H.parent / "series.sh", folder / "series.sh")
    (folder / "run.sh").write_text('echo "final val_bpb:1.0" > "$LOG_DIR/$1_seed$2.txt"\n[ "$2" = 2 ] && sleep 60\n')
    logs, out = tmp_path / "h2h", tmp_path / "out"
    logs.mkdir()
    env = subprocess_env({"LOG_DIR": str(logs), "OUT": str(out)})
    series = subprocess.Popen(["bash", str(folder / "series.sh"), "frontier", "500", "train:1", "train:2"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 30
    while not (logs / "frontier_seed2.txt").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(series.pid, signal.SIGKILL)  # the whole call: series.sh, its timeout and the hanging step
    series.wait(timeout=30)
    assert (logs / "frontier_seed2.txt").exists()
    assert sorted(p.name for p in (out / "h2h").iterdir()) == ["frontier_seed1.txt"]


def test_series_3_figures_are_its_logs(capsys):
    """Series 3 of the frontier-vs-pr1529 comparison (records/proxy_1gpu_frontier_vs_pr1529/ema093_frontier3/),
    seed by seed as it comes in: each figure of its table is what the seed's committed training and evaluation
    logs say, both READMEs quote the final, and the gain over pr1529's run of the same seed (ema093/) is
    recomputed here from the two final losses and scores. With three seeds in, the means, the gain and the
    p-values both READMEs quote are tools/significance.py's on the same logs."""
    folder = H2H.parent
    readme, main_readme = (folder / "README.md").read_text(), (ROOT / "README.md").read_text()
    section = readme[readme.index("## Series 3"):readme.index("## Next")]
    rows = {line.split("|")[1].strip().replace("**", ""): [c.strip().replace("**", "") for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")}
    evals = sorted((folder / "ema093_frontier3").glob("frontier_seed*_eval.log"))
    assert evals, "series 3 has no evaluated seed"
    assert len(rows[""]) == 2 + len(evals)  # pr1529's and series 2's column at seed 1337, then series 3's seeds
    for column, path in enumerate(evals, start=2):
        seed = re.search(r"seed(\d+)_eval", path.name).group(1)
        assert rows[""][column] == f"frontier {seed}, series 3"
        scored, train = runlog.read_log(path), runlog.read_log(path.with_name(f"frontier_seed{seed}.log"))
        assert scored.complete and train.complete
        assert train.info["source_sha256"].startswith("2442a930") and scored.info["source_sha256"].startswith("2442a930")
        assert train.settings["DOC_MASK"] == "True" and train.settings["TRAIN_SEQ_SCHEDULE"] == "1024@0,2048@0.1,3072@0.7"

        def cell(label):
            return rows[label][column]
        assert cell("steps in 221-225 s (+ 12-15 s calibration)") == str(train.steps_done)
        assert cell("live weights at the last step, val_bpb") == f"{train.val_points[-1].val_bpb:.4f}"
        assert cell("post-EMA (0.93), before quantization") == \
            f"{train.metrics['pre_quantization_post_ema'].val_bpb:.5f}"
        assert cell("quantized, plain pass") == f"{scored.metrics['quantized'].val_bpb:.5f}"
        assert cell("final (the preset's evaluation)") == f"{scored.final_val_bpb:.8f}"
        assert cell("artifact bytes (code bytes)") == \
            f"{int(train.artifact['total']):,} ({int(train.artifact['code_bytes']):,})"
        assert f"{scored.final_val_bpb:.5f}" in main_readme
        baseline = runlog.read_log(folder / "ema093" / f"pr1529_seed{seed}_eval.log")
        gain_bpb = baseline.final_val_bpb - scored.final_val_bpb
        gain_nats = baseline.metrics["final_ttt"].val_loss - scored.metrics["final_ttt"].val_loss
        for text in (section, main_readme):
            assert f"{gain_bpb:.5f} bpb" in text and f"{gain_nats:.5f} nats" in text, seed
    if len(evals) < 3:
        return
    # all three seeds in: the means, the gain and the p-values both READMEs quote are tools/significance.py's on
    # the committed logs, and the bar is met
    baselines = [folder / "ema093" / re.sub(r"^frontier", "pr1529", path.name) for path in evals]
    significance.main(["--new", *map(str, evals), "--baseline", *map(str, baselines)])
    out = capsys.readouterr().out
    assert "challenge bar (gain > 0.005 nats at p < 0.01): MET" in out
    means = [float(m) for m in re.findall(r"mean [0-9.]+ nats \(([0-9.]+) bpb\)", out)]
    gain = re.search(r"observed gain \(baseline - new\): ([0-9.]+) nats \(([0-9.]+) bpb\)", out)
    p_bar = float(re.search(r"^H0 gain <= 0.005 nats: .* p=([0-9.]+)", out, re.M).group(1))
    p_paired = float(re.search(r"paired H0 gain <= 0.005 nats: .* p=([0-9.]+)", out).group(1))
    for text in (section.replace("**", ""), main_readme.replace("**", "")):
        assert f"{means[0]:.6f}" in text and f"{means[1]:.6f}" in text
        assert f"{gain.group(1)} nats ({gain.group(2)} bpb)" in text
        assert f"p = {p_bar:.4f}" in text and f"p = {p_paired:.4f}" in text
