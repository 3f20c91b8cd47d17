"""tools/ablate.py: real tiny train_gpt.py runs on CPU (a baseline and two features for one seed, then
the evaluation side on the baseline's artifact); every delta in its table is checked against the logs
read independently here, and the resume, the budget stop and the refusals are exercised."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_MODEL, subprocess_env

sys.path.insert(0, str(ROOT / "tools"))
import ablate  # noqa: E402
import train_gpt as tg  # noqa: E402

TINY_TRAIN = ["ITERATIONS=4", "TRAIN_BATCH_TOKENS=2048"]  # after the regime's 300 x 98,304
TINY_EVAL = ["TTT_CHUNK_TOKENS=1024", "TTT_BATCH_SEQS=3", "TTT_EPOCHS=1", "EVAL_STRIDE=16", "EVAL_BATCH_WINDOWS=8"]


def score(path: Path, pattern: str) -> float:
    return float(re.search(pattern, path.read_text().split("\nheader:end\n")[-1]).group(1))


def quantized_bpb(path: Path) -> float:
    return score(path, r"\nquantized val_loss:\S+ val_bpb:([0-9.]+)")


def final_bpb(path: Path) -> float:
    return score(path, r"\nfinal val_bpb:([0-9.]+)")


def live_bpb(path: Path) -> float:
    """The last in-training validation line's val_bpb: the live model at the last step."""
    events = path.read_text().split("\nheader:end\n")[-1]
    return float(re.findall(r"\nstep:\d+/\d+ val_loss:\S+ val_bpb:([0-9.]+)", events)[-1])


def ablate_cmd(*args) -> list:
    return [sys.executable, "tools/ablate.py", *args, "--nproc", "0", "--quiet"]


@pytest.fixture(scope="module")
def plan(tiny_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ablate") / "logs"
    env = subprocess_env(dict(TINY_MODEL, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"]))
    train = ablate_cmd("train", "--seeds", "3", "--only", "smear", "--feature", "lr5=MATRIX_LR=0.05",
                       "--log-dir", str(logs), *TINY_TRAIN)
    r = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    artifact = logs / "base_seed3.ptz"
    evaluate = ablate_cmd("eval", "--artifact", str(artifact), "--only", "none", "--feature", "stride32=EVAL_STRIDE=32",
                          "--log-dir", str(logs), *TINY_EVAL)
    e = subprocess.run(evaluate, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert e.returncode == 0, e.stdout[-3000:] + e.stderr[-3000:]
    return {"logs": logs, "env": env, "train": train, "train_out": r.stdout, "eval": evaluate, "eval_out": e.stdout}


def table_row(text: str, feature: str) -> list:
    line = next(x for x in text.splitlines() if x.startswith(f"| {feature} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_training_rows_are_the_paired_differences_of_the_quantized_scores(plan):
    logs = plan["logs"]
    for name in ("base", "smear", "lr5"):
        text = (logs / f"{name}_seed3.txt").read_text()
        assert "ITERATIONS: 4" in text and "TTT_ENABLED: False" in text and "EMA_DECAY: 0.955" in text
    assert "SMEAR_GATE: True" in (logs / "smear_seed3.txt").read_text()
    base = quantized_bpb(logs / "base_seed3.txt")
    for name in ("smear", "lr5"):
        row = table_row(plan["train_out"], name)
        delta = quantized_bpb(logs / f"{name}_seed3.txt") - base
        assert row[2] == "base" and row[3] == "1" and float(row[4]) == pytest.approx(delta, abs=5e-5)
        assert row[5] == f"3: {float(row[4]):+.4f}"  # each seed's delta is named by its seed
        assert row[4] != "+0.0000"  # each feature changed the model
        assert row[9] == "+0"  # equal steps: the regime's ITERATIONS, no wallclock stop
        live = live_bpb(logs / f"{name}_seed3.txt") - live_bpb(logs / "base_seed3.txt")
        assert float(row[10]) == pytest.approx(live, abs=5e-5)
        tax = [quantized_bpb(logs / f"{x}_seed3.txt") - score(logs / f"{x}_seed3.txt",
                                                                r"\npre-quantization post-ema val_loss:\S+ val_bpb:([0-9.]+)")
               for x in (name, "base")]
        assert float(row[11]) == pytest.approx(tax[0] - tax[1], abs=5e-5)
        # the evaluation estimate as the budget counts it (the records' way: compile warm-ups left out)
        counted = [score(logs / f"{x}_seed3.txt", r"\neval_budget: passes:.* counts:records counted_seconds:(\d+)")
                   for x in (name, "base")]
        assert row[8] == format(counted[0] - counted[1], "+.0f")
    assert "Δ val_bpb (mean)" in plan["train_out"] and "stopped" not in plan["train_out"]
    assert f"; base 3: {base:.4f}\n" in plan["train_out"]


def test_seeds_are_named_and_in_one_order_in_the_base_scores_and_the_rows():
    # glob order puts base_seed1337 before base_seed42; the table must not pair one order with the other
    from types import SimpleNamespace

    def run(bpb):
        return SimpleNamespace(metrics={"quantized": SimpleNamespace(val_bpb=bpb)}, step_avg_ms=None,
                               artifact_bytes=None, estimated_8gpu_counted_eval_seconds=None, steps_done=None, val_points=[])
    runs = {("train", "base", 1337): run(1.40), ("train", "base", 42): run(1.50),
            ("train", "f", 1337): run(1.39), ("train", "f", 42): run(1.52)}
    text = ablate.markdown("train", ablate.rows_of("train", [ablate.Feature("f", {"MATRIX_LR": "0.03"})], runs), runs)
    assert "; base 42: 1.5000, 1337: 1.4000\n" in text
    assert table_row(text, "f")[5] == "42: +0.0200, 1337: -0.0100 (spread 0.0300)" and table_row(text, "f")[4] == "+0.0050"


def test_evaluation_rows_score_one_artifact_with_the_environments_evaluation(plan):
    logs = plan["logs"]
    base_log = (logs / "eval_base.txt").read_text()
    # the artifact stores the training regime's evaluation (no sliding window, no TTT); the baseline pins the default's
    assert "SLIDING_WINDOW_ENABLED: True" in base_log and "TTT_ENABLED: True" in base_log
    assert "final_ttt" in base_log and "eval_only:overridden setting:TTT_ENABLED" in base_log
    row = table_row(plan["eval_out"], "stride32")
    delta = final_bpb(logs / "eval_stride32.txt") - final_bpb(logs / "eval_base.txt")
    assert float(row[4]) == pytest.approx(delta, abs=5e-5) and row[6] == "-" and row[7] == "-"


def test_a_rerun_resumes_and_the_table_comes_from_the_logs_alone(plan, tmp_path):
    r = subprocess.run(plan["train"], cwd=ROOT, env=plan["env"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count(": done earlier") == 3 and "\n--- " not in r.stdout
    out = tmp_path / "table.md"
    t = subprocess.run([sys.executable, "tools/ablate.py", "table", "--log-dir", str(plan["logs"]), "--out", str(out)],
                       cwd=ROOT, env=plan["env"], capture_output=True, text=True)
    assert t.returncode == 0, t.stderr
    for mode, feature, out_of_run in (("train", "lr5", plan["train_out"]), ("eval", "stride32", plan["eval_out"])):
        assert table_row(t.stdout, feature) == table_row(out_of_run, feature)
    # a row's settings are what its log differs in from its reference's
    assert table_row(t.stdout, "lr5")[1] == "`MATRIX_LR=0.05`" and table_row(t.stdout, "smear")[1] == "`SMEAR_GATE=True`"
    assert table_row(t.stdout, "stride32")[1] == "`EVAL_STRIDE=32`"
    assert out.read_text().strip() == t.stdout.strip()


def test_the_budget_stops_before_a_run_that_would_not_fit(plan):
    cmd = plan["train"] + ["--feature", "lr3=MATRIX_LR=0.03", "--budget-seconds", "0"]
    r = subprocess.run(cmd, cwd=ROOT, env=plan["env"], capture_output=True, text=True)
    # the finished runs are reused whatever the budget; the new one would end past it, so it does not start
    assert r.returncode == 0 and r.stdout.count(": done earlier") == 3 and "budget: 0 s would be exceeded by lr3_seed3" in r.stdout
    assert "(partial" in r.stdout and not (plan["logs"] / "lr3_seed3.txt").exists()
    # a later call starts with the longest run its log directory holds (a feature that compiles afresh may take
    # that long again), read here independently from the logs' run_phases lines
    totals = [float(re.search(r"\nrun_phases .*\btotal_s:([0-9.]+)", p.read_text()).group(1))
              for p in plan["logs"].glob("*_seed3.txt")]
    assert len(totals) == 3 and ablate.longest_logged_run(plan["logs"], "train") == max(totals) > 0
    evals = [float(re.search(r"\neval_total_time:([0-9.]+)ms", p.read_text()).group(1)) / 1000
             for p in plan["logs"].glob("eval_*.txt")]
    assert len(evals) == 2 and max(evals) > 0 and ablate.longest_logged_run(plan["logs"], "eval") == pytest.approx(max(evals))
    assert ablate.longest_logged_run(plan["logs"] / "missing", "train") == 0.0
    seeded = subprocess.run(plan["train"] + ["--feature", "lr3=MATRIX_LR=0.03", "--budget-seconds", f"{max(totals) / 2:.3f}"],
                            cwd=ROOT, env=plan["env"], capture_output=True, text=True)
    assert seeded.returncode == 0 and f"the longest run logged in {plan['logs']} took" in seeded.stdout
    assert "would be exceeded by lr3_seed3" in seeded.stdout and not (plan["logs"] / "lr3_seed3.txt").exists()
    budget = ablate.Budget(100.0)
    assert budget.allows_another()  # nothing measured yet: the first run starts
    budget.record(150.0)
    assert not budget.allows_another()  # the longest run so far would end past the budget
    assert ablate.Budget(None).allows_another()


def test_parallel_runs_reproduce_the_sequential_scores(plan, tmp_path):
    # base and lr5 at once in a fresh directory: the same scores as the sequential plan's, bit for bit
    logs = tmp_path / "parallel"
    cmd = ablate_cmd("train", "--seeds", "3", "--only", "none", "--feature", "lr5=MATRIX_LR=0.05", "--parallel", "2",
                     "--log-dir", str(logs), *TINY_TRAIN)
    r = subprocess.run(cmd, cwd=ROOT, env=plan["env"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 runs at once share no GPU(s)" in r.stdout and r.stdout.count(": ran") == 2
    for name in ("base", "lr5"):
        assert quantized_bpb(logs / f"{name}_seed3.txt") == quantized_bpb(plan["logs"] / f"{name}_seed3.txt")


def test_parallel_runs_get_disjoint_gpus_when_there_are_enough(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert ablate.gpu_slots(8, 1) == [str(i) for i in range(8)]
    assert ablate.gpu_slots(4, 2) == ["0,1", "2,3", "4,5", "6,7"]
    assert ablate.gpu_slots(1, 8) == [None]  # one run at a time: torchrun sees every visible GPU
    assert capsys.readouterr().out == ""
    assert ablate.gpu_slots(3, 4) == [None, None, None]  # 12 GPUs needed: they share, and say so
    assert "3 runs at once share 8 GPU(s)" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["train", "--feature", "x=NOT_A_SETTING=1", "--only", "none"], "NOT_A_SETTING is not a train_gpt.py setting"),
    (["train", "--only", "nonsense"], "no built-in feature nonsense"),
    (["train", "--only", "none", "--feature", "x=MATRIX_LR=0.03@missing"], "compared with 'missing'"),
    (["train", "--only", "none", "--feature", "base=MATRIX_LR=0.03"], "'base' names the baseline"),
    (["train", "--only", "none", "--feature", "x=MATRIX_LR"], "is not KEY=VALUE"),
    (["eval", "--artifact", "/nonexistent.ptz"], "eval needs --artifact"),
    (["train", "--only", "none", "--parallel", "0"], "--parallel 0 must be at least 1"),
    (["train", "--only", "none", "--feature", "x=MATRIX_LR=-1"], "MATRIX_LR"),
    (["train", "--only", "none", "--script", "/nonexistent.py"], "--script /nonexistent.py: no such file"),
    (["train", "--only", "none", "--seeds", "7", "--no-base"], "--no-base: the baseline's log"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        ablate.main([*args, "--log-dir", str(tmp_path / "logs"), "--nproc", "0"])
    assert message in str(e.value) and str(e.value).startswith("error: "), str(e.value)
    assert not (tmp_path / "logs").exists()


def test_no_base_runs_the_features_against_carried_baseline_logs_and_refuses_other_ones(plan, tmp_path):
    """--no-base: with the baseline's log carried into a fresh directory (no artifact), the features run or
    are reused and the table compares them with it; the baseline is not touched. A baseline of other settings
    is refused before anything runs."""
    import shutil
    logs = tmp_path / "carried"
    logs.mkdir()
    for name in ("base", "smear"):
        shutil.copy(plan["logs"] / f"{name}_seed3.txt", logs)
    args = ["train", "--seeds", "3", "--only", "smear", "--no-base", "--log-dir", str(logs), *TINY_TRAIN]
    r = subprocess.run(ablate_cmd(*args), cwd=ROOT, env=plan["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "smear_seed3: done earlier" in r.stdout and "base_seed3:" not in r.stdout
    assert table_row(r.stdout, "smear") == table_row(plan["train_out"], "smear")
    assert sorted(p.name for p in logs.iterdir()) == ["base_seed3.txt", "smear_seed3.txt"]
    other = subprocess.run(ablate_cmd(*args, "MATRIX_LR=0.05"), cwd=ROOT, env=plan["env"], capture_output=True,
                           text=True, timeout=300)
    assert other.returncode != 0 and "error: --no-base: the baseline's log" in other.stderr
    assert "is a finished run but" in other.stderr and "--- " not in other.stdout


def test_builtin_features_name_real_settings_and_references():
    for builtin in (ablate.TRAIN_FEATURES, ablate.EVAL_FEATURES):
        ablate.check_features(builtin, {"base"} | {f.name for f in builtin})
    with_refs = ablate.plan_features(ablate.EVAL_FEATURES, "lora_b_only", [])
    assert [f.name for f in with_refs] == ["base", "lora", "lora_b_only"]


def test_a_features_seeds_run_back_to_back(monkeypatch, tmp_path):
    # the order is what lets the second seed reuse the first's compiled graphs; the runs themselves are
    # exercised by the tests above, here only the order in which run_plan starts them is recorded
    started = []
    monkeypatch.setattr(ablate.seeds_tool, "run_or_resume",
                        lambda label, rid, *args: started.append(rid) or (None, "ran"))
    features = [ablate.Feature("base", {}), ablate.Feature("smear", {"SMEAR_GATE": "1"})]
    assert ablate.run_plan("train", features, [1337, 42], {}, [], tmp_path, ablate.Budget(None), quiet=True)
    assert started == ["base_seed1337", "base_seed42", "smear_seed1337", "smear_seed42"]


def test_a_failed_run_counts_against_the_budget(monkeypatch, tmp_path):
    # a run refused late (over the artifact limit after training) spent its minutes: the budget must not start
    # the next run as if nothing had been measured
    def fails(label, rid, *args):
        time.sleep(0.3)
        sys.exit(f"error: {label} failed")
    monkeypatch.setattr(ablate.seeds_tool, "run_or_resume", fails)
    budget = ablate.Budget(0.5)
    with pytest.raises(SystemExit, match="failed"):
        ablate.run_plan("train", [ablate.Feature("base", {})], [1, 2], {}, [], tmp_path, budget, quiet=True)
    assert budget.longest >= 0.3 and not budget.allows_another()


def test_a_row_over_the_challenges_artifact_limit_is_marked():
    from types import SimpleNamespace

    def run(bpb, total):
        return SimpleNamespace(metrics={"quantized": SimpleNamespace(val_bpb=bpb)}, step_avg_ms=100.0,
                               artifact_bytes=total, estimated_8gpu_counted_eval_seconds=None, steps_done=300, val_points=[])
    runs = {("train", "base", 1): run(1.50, 15_925_900), ("train", "clips", 1): run(1.49, 16_599_457),
            ("train", "lr", 1): run(1.51, 15_999_999)}
    features = [ablate.Feature("clips", {"EMBED_CLIP_SIGMAS": "14"}), ablate.Feature("lr", {"MATRIX_LR": "0.03"})]
    text = ablate.markdown("train", ablate.rows_of("train", features, runs), runs)
    assert table_row(text, "clips")[7] == "+673,557 (over 16,000,000 B)"
    assert table_row(text, "lr")[7] == "+74,099"


def test_feature_values_may_hold_commas_and_at_signs():
    f = ablate.parse_feature("seq=TRAIN_SEQ_SCHEDULE=1024@0,2048@0.5,TRAIN_SEQ_LEN=2048@lora")
    assert f.settings == {"TRAIN_SEQ_SCHEDULE": "1024@0,2048@0.5", "TRAIN_SEQ_LEN": "2048"} and f.reference == "lora"
    f = ablate.parse_feature("m=GPTQ_MIXED_BITS=5,6")
    assert f.settings == {"GPTQ_MIXED_BITS": "5,6"} and f.reference == "base"
    with pytest.raises(SystemExit, match="is not KEY=VALUE"):
        ablate.parse_feature("m=5,6")


def test_a_pinned_script_runs_and_keeps_its_logs_apart_from_the_checkouts(plan, tmp_path):
    # a study spread over sessions pins its source with --script while train_gpt.py moves on: the pinned
    # copy is what runs (its hash is in the log), and the checkout's train_gpt.py cannot reuse that log
    import hashlib
    pinned = tmp_path / "pinned.py"
    pinned.write_bytes((ROOT / "train_gpt.py").read_bytes() + b"\n# pinned for a study\n")
    logs = tmp_path / "logs"
    cmd = ablate_cmd("train", "--seeds", "3", "--only", "none", "--log-dir", str(logs), *TINY_TRAIN)
    r = subprocess.run(cmd + ["--script", str(pinned)], cwd=ROOT, env=plan["env"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"python3 {pinned}" in r.stdout
    logged = re.search(r"\nsource_sha256: (\w+)", (logs / "base_seed3.txt").read_text()).group(1)
    assert logged == hashlib.sha256(pinned.read_bytes()).hexdigest()
    again = subprocess.run(cmd + ["--script", str(pinned)], cwd=ROOT, env=plan["env"], capture_output=True, text=True)
    assert again.returncode == 0 and "base_seed3: done earlier" in again.stdout
    checkout = subprocess.run(cmd, cwd=ROOT, env=plan["env"], capture_output=True, text=True)
    assert checkout.returncode != 0 and "it ran another train_gpt.py" in checkout.stderr, checkout.stderr[-2000:]


def test_the_frontier_preset_is_the_ablation_features_it_names():
    """PRESET=frontier repeats, as typed values in train_gpt.py, the settings of tools/ablate.py's features: a
    feature changed in one place and not the other would make the ablation table describe another preset.
    The preset is every training and evaluation feature except those its comment leaves out (RUN_ID is a fresh
    random id in each Settings)."""
    left_out = {"attn_gate", "greedy_1855", "greedy_clips", "ctx2560", "lora_no_qv"}
    union = {}
    for feature in ablate.TRAIN_FEATURES + ablate.EVAL_FEATURES:
        if feature.name not in left_out:
            union.update(feature.settings)
    from_features = tg.Settings(environ=union)
    from_preset = tg.Settings(environ={"PRESET": "frontier"})
    differ = [s.name for s in tg.SETTINGS if s.name not in ("PRESET", "RUN_ID")
              and getattr(from_features, s.name.lower()) != getattr(from_preset, s.name.lower())]
    assert differ == []


def table_of_committed_logs(folder: Path, tmp_path: Path) -> tuple:
    """(the tool's table output, its feature rows) for a records folder's ablate_<run>.log files, copied into a
    log directory under the names the tool wrote them (<run>.txt)."""
    for log in folder.glob("ablate_*.log"):
        (tmp_path / (log.stem[len("ablate_"):] + ".txt")).write_text(log.read_text())
    r = subprocess.run([sys.executable, "tools/ablate.py", "table", "--log-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout, [x for x in r.stdout.splitlines() if x.startswith("| ") and not x.startswith(("| feature", "| ---"))]


def test_the_committed_ablation_logs_reproduce_their_readmes_table(tmp_path):
    """records/proxy_1gpu_h100_2026-12-06_ema0955/: the table its README (and the main README's current
    ablation table) quotes is what the tool computes from the committed logs."""
    folder = ROOT / "records" / "proxy_1gpu_h100_2026-12-06_ema0955"
    table, rows = table_of_committed_logs(folder, tmp_path)
    assert len(rows) == 8
    readme = (folder / "README.md").read_text()
    for row in rows:
        assert row in readme
    main_readme = (ROOT / "README.md").read_text()
    for name in ("smear", "polar_express", "min_lr", "greedy_1855", "seq_schedule", "attn_gate", "greedy_clips", "doc_mask"):
        cells = table_row(table, name)
        mean_delta, per_seed, live, tax = cells[4], cells[5].split(" (spread")[0], cells[10], cells[11]
        spread = cells[5].split(" (spread ")[1].rstrip(")")
        step_ms, artifact, eval_s = cells[6], cells[7], cells[8]
        line = next(x for x in main_readme.splitlines() if x.startswith(f"| {name} |") and per_seed in x)
        assert mean_delta in line
        assert line.rstrip(" |").endswith(f"{per_seed} | {spread} | {step_ms} | {artifact} | {eval_s} | {live} | {tax}")


def test_the_frontier_eval_row_is_the_presets_evaluation_side():
    """frontier_eval runs, on the baseline's artifact, every evaluation setting of PRESET=frontier and nothing
    else: the same scoring settings as the preset, and the base's model and training settings."""
    row = next(f for f in ablate.EVAL_FEATURES if f.name == "frontier_eval")
    assert row.reference == "base" and "TTT_MODE" in row.settings
    from_row = tg.Settings(environ=row.settings)
    from_preset = tg.Settings(environ={"PRESET": "frontier"})
    plain = tg.Settings(environ={})
    for x in tg.SETTINGS:
        if x.name in ("PRESET", "RUN_ID"):
            continue
        expected = from_preset if x.role == "score" else plain
        assert getattr(from_row, x.name.lower()) == getattr(expected, x.name.lower()), x.name


def test_the_committed_evaluation_ablation_reproduces_its_readmes_table(tmp_path):
    """records/proxy_1gpu_h200_2026-12-06_eval/: the table its README and the main README quote is what the tool
    computes from the committed logs, and each Δ is the difference of the two runs' final val_bpb read here
    independently (a LoRA refinement against plain LoRA, the rest against the base)."""
    folder = ROOT / "records" / "proxy_1gpu_h200_2026-12-06_eval"
    finals = {log.stem[len("ablate_eval_"):]: float(re.search(r"\nfinal val_bpb:([0-9.]+)", log.read_text()).group(1))
              for log in folder.glob("ablate_eval_*.log")}
    _, rows = table_of_committed_logs(folder, tmp_path)
    assert len(rows) == 8
    readme = (folder / "README.md").read_text()
    main_readme = (ROOT / "README.md").read_text()
    for row in rows:
        assert row in readme
        cells = [c.strip() for c in row.strip("|").split("|")]
        name, reference, mean_delta = cells[0], cells[2], cells[4]
        assert f"{finals[name] - finals[reference]:+.4f}".replace("-0.0000", "+0.0000") == \
            mean_delta.replace("-0.0000", "+0.0000")
        line = next(x for x in main_readme.splitlines() if x.startswith(f"| {name} |"))
        assert mean_delta in line and cells[8] in line
