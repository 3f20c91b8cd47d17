"""The log as a complete record: the header tells what ran (settings, source and its hash, git revision,
versions), and every event line after it has the one form `name key:value ...` that tools/runlog.py reads."""
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_MODEL, subprocess_env

sys.path.insert(0, str(ROOT / "tools"))
import runlog  # noqa: E402

EVERYTHING = dict(TINY_MODEL, ITERATIONS="4", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="2", EVAL_STRIDE="16",
                  TTT_CHUNK_TOKENS="1024", TTT_BATCH_SEQS="3", TTT_EPOCHS="1", HASH_EMBED_SIZE="97",
                  SAVE_CHECKPOINT="ck.pt", MAX_WALLCLOCK_SECONDS="600", GPTQ_RESERVE_SECONDS="1")


@pytest.fixture(scope="module")
def logs(tiny_data, tmp_path_factory):
    """A training run with every pass, then a LoRA TTT run of its artifact (EVAL_ONLY)."""
    tmp = tmp_path_factory.mktemp("logs")
    env = dict(EVERYTHING, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(tmp), RUN_ID="full", SAVE_CHECKPOINT=str(tmp / "ck.pt"))
    out = {}
    for run_id, extra in (("full", {}), ("lora", dict(EVAL_ONLY=str(tmp / "full.ptz"), TTT_MODE="lora",
                                                      TTT_CHUNK_SIZE="16", TTT_BATCH_DOCS="4", TTT_LORA_RANK="4"))):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=subprocess_env(dict(env, RUN_ID=run_id, **extra)),
                              capture_output=True, text=True, timeout=600)
        out[f"{run_id}_wall_seconds"] = time.perf_counter() - started
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[run_id] = (tmp / f"{run_id}.txt").read_text()
    return out


def events(log: str) -> list:
    head, sep, body = log.partition("\nheader:end\n")
    assert sep, "no header:end line"
    return [line for line in body.splitlines() if line.strip()]


@pytest.mark.parametrize("run", ["full", "lora"])
def test_every_event_line_has_the_one_form(logs, run):
    lines = events(logs[run])
    assert len(lines) > 20
    for text in lines:
        line = runlog.split_line(text)
        if line.kind == "WARNING":
            continue
        assert line.words == [] and line.label and (line.fields or line.kind == "final"), text
        assert all(" " not in v for v in line.fields.values()), text


def test_the_header_holds_what_ran(logs):
    log = logs["full"]
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    assert f"source_sha256: {hashlib.sha256(source.encode()).hexdigest()}\n" in log
    embedded = log.split("\nsource: train_gpt.py lines:")[1].split("\nheader:end\n")[0].split("\n", 1)[1]
    assert embedded == "\n".join("  " + x for x in source.splitlines())  # the whole readable source, indented
    assert re.search(r"^git_revision: ([0-9a-f]{40}(\+dirty)?|none)$", log, re.M)
    versions = runlog.read_log.__globals__["parse_log"](log).versions
    assert {"python", "torch", "cuda", "triton", "numpy"} <= set(versions)
    assert "\n  MATRIX_BITS: 6\n" in log


def test_the_parser_reads_every_figure_of_both_runs(logs):
    full, lora = runlog.parse_log(logs["full"]), runlog.parse_log(logs["lora"])
    assert [s.step for s in full.steps] == [1, 2, 3, 4] and [v.step for v in full.val_points] == [2, 4]
    assert full.complete and full.model_bytes > 0 and full.code_bytes > 0 and full.quantization_tax is not None
    assert full.byte_check["ok"] and full.ttt_protocols[0]["score_first"] and full.ttt_protocols[0]["mode"] == "chunk"
    assert full.eval_seconds > 0 and full.val_targets > 0 and full.info["model_params"].isdigit()
    assert full.phases["wallclock:budget"]["training_cap_ms"] == "599000"
    assert {"pre_quantization_post_ema", "quantized", "quantized_sliding_window", "quantized_ttt_chunk"} <= set(full.metrics)
    for m in full.scoring_passes:
        assert m.scored_bytes > 0 and m.scored_targets == full.val_targets, m.name
    assert lora.complete and lora.ttt_protocols[0]["mode"] == "lora" and "eval_only" in "".join(lora.phases)
    assert lora.metrics["quantized"].val_bpb == full.metrics["quantized"].val_bpb  # EVAL_ONLY reproduces the round trip


def test_the_log_says_how_many_times_training_read_its_data(logs, tiny_data):
    """steps x TRAIN_BATCH_TOKENS against the training shards' token count (read here from their headers, the
    challenge format's third int32); a run that read its data more than once warns that it did."""
    held = sum(int(np.fromfile(p, dtype="<i4", count=3)[2]) for p in Path(tiny_data["DATA_PATH"]).glob("fineweb_train_*.bin"))
    info = runlog.parse_log(logs["full"]).info
    read = 4 * int(EVERYTHING["TRAIN_BATCH_TOKENS"])
    assert (int(info["tokens_read"]), int(info["train_tokens"])) == (read, held)
    assert float(info["passes"]) == pytest.approx(read / held, abs=0.005)
    warned = any(line.startswith("WARNING: training read its") for line in events(logs["full"]))
    assert warned == (read > held)


def test_a_run_that_read_its_data_more_than_once_warns():
    import types
    import train_gpt as tg
    lines = []
    tg.log_data_passes(types.SimpleNamespace(log=lines.append), 173_015_040, 32_800_000)
    assert lines[0] == "training_data tokens_read:173015040 train_tokens:32800000 passes:5.27"
    assert lines[1].startswith("WARNING: training read its 32,800,000 tokens 5.3 times over;") and len(lines) == 2


def test_run_phases_account_for_the_whole_run(logs):
    """The last line splits the run's wall time into phases that add up to its total, which the process's own
    wall time (measured here, from outside) bounds; warm-up and loop are parts of the train phase."""
    phases = runlog.parse_log(logs["full"]).phases["run_phases"]
    seconds = {k[:-2]: float(v) for k, v in phases.items() if k.endswith("_s")}
    named = ("setup", "train", "validate", "calibrate", "pack", "score")
    assert set(named) | {"total", "warmup", "loop"} == set(seconds)
    assert sum(seconds[k] for k in named) == pytest.approx(seconds["total"], abs=0.35)  # 6 phases rounded to 0.1
    assert 0 < seconds["total"] < logs["full_wall_seconds"]
    assert seconds["warmup"] + seconds["loop"] <= seconds["train"] + 0.1 and seconds["loop"] > 0
    assert events(logs["full"])[-1].startswith("run_phases ")


def main_crashing_in_startup(tiny_env, monkeypatch, run_id: str, crash):
    """Run main() as RUN_ID with `crash` in place of the start-up size check; it must raise its RuntimeError."""
    import train_gpt as tg
    for key, value in dict(tiny_env, RUN_ID=run_id).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tg, "check_artifact_estimate", crash)
    monkeypatch.setattr(sys, "argv", ["train_gpt.py"])
    with pytest.raises(RuntimeError, match="compile failed"):
        tg.main()


def test_a_log_that_cannot_be_written_does_not_hide_the_failure(tiny_env, monkeypatch, capsys):
    """When the crash comes with a log that can no longer be written (here: its path becomes a folder, as a
    full disk refuses an append), the original exception still reaches the caller, not the log's error,
    and stderr says why the traceback is missing from the log."""
    log_path = Path(tiny_env["LOG_DIR"]) / "crash2.txt"

    def crash(*args, **kwargs):
        log_path.unlink()
        log_path.mkdir()
        raise RuntimeError("compile failed")
    main_crashing_in_startup(tiny_env, monkeypatch, "crash2", crash)
    assert "the traceback below is not in the log: cannot append to the log" in capsys.readouterr().err


def test_an_unexpected_failure_leaves_its_traceback_in_the_log(tiny_env, monkeypatch):
    """A crash (here: a RuntimeError raised where the start-up size check runs) still raises, and the log keeps
    its traceback, indented under `failure:traceback`: a log copied off the GPU machine says why the run
    stopped. The parser keeps the traceback out of the events, so a source line it quotes that looks like
    an event (`final val_bpb:...`) does not make the crashed run look finished."""
    def crash(*args, **kwargs):
        raise RuntimeError("compile failed\nfinal val_bpb:1.00000000")
    main_crashing_in_startup(tiny_env, monkeypatch, "crash", crash)
    text = (Path(tiny_env["LOG_DIR"]) / "crash.txt").read_text()
    body = text.partition("\nheader:end\n")[2]
    assert "\nfailure:traceback\n  Traceback (most recent call last):\n" in body
    assert "\n  RuntimeError: compile failed\n  final val_bpb:1.00000000" in body
    log = runlog.parse_log(text)
    assert log.final_val_bpb is None and not log.complete
    assert log.incomplete_reason == "it failed: final val_bpb:1.00000000"
    assert log.failure[0] == "Traceback (most recent call last):" and "RuntimeError: compile failed" in log.failure


def test_phase_rates_time_each_phase_from_the_step_clocks_and_never_across_the_switch():
    """RunLog.phase_rates: before looping from the first logged step >= 10 to the last one without looping, looping
    from its first logged step on; tokens per step are TRAIN_BATCH_TOKENS. A step's own tok/s field is ignored
    (here deliberately wrong), and a log whose steps do not say whether they loop gives no rates."""
    committed = ROOT / "records" / "proxy_1gpu_h100_2026-12-07_speed_wallclock" / "speed_on_seed1337.log"
    header = committed.read_text().partition("\nheader:end\n")[0] + "\nheader:end\n"
    assert "\n  TRAIN_BATCH_TOKENS: 786432\n" in header
    clock = {1: 900, 5: 3500, 10: 7000, 20: 14500, 30: 22000, 40: 40000, 50: 52000, 60: 64000}
    steps = "".join(f"step:{n}/100 train_loss:3.0 train_time:{ms}ms step_avg:1.0ms tok/s:1 looping:{int(n >= 35)}\n"
                    for n, ms in clock.items())
    rates = runlog.parse_log(header + steps).phase_rates()
    before, looping = rates["before_looping"], rates["looping"]
    assert before["steps"] == 20 and before["ms_per_step"] == pytest.approx((22000 - 7000) / 20)
    assert before["tokens_per_s"] == pytest.approx(786432 / 0.75)
    assert looping["steps"] == 20 and looping["ms_per_step"] == pytest.approx((64000 - 40000) / 20)
    old = steps.replace(" looping:0", "").replace(" looping:1", "")
    assert runlog.parse_log(header + old).phase_rates() == {}
