"""Bad input a new user can give, found before any training time is spent: each a one-line `error:` that
names the variable or file and the fix, exit status 1, and nothing half-written. Also the guards that
must hold in every real run: the score-first check, scored bytes in the log, finite final scores."""
import math
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL, subprocess_env, tg
from eval_helpers import TINY_EVAL, make, random_model, tables_for, validation


def run_script(env: dict, *args, nproc: int = 1, timeout: int = 300):
    cmd = [sys.executable, "train_gpt.py", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)


def one_error_line(proc) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


# --- settings: ranges declared once, misspellings, run ids ------------------------------------------


@pytest.mark.parametrize("name,value,fix", [
    ("MATRIX_BITS", "12", "[2, 8]"),     # would wrap around in int8 storage
    ("MATRIX_BITS", "1", "[2, 8]"),      # q_max 0: every scale divides by zero, final val_bpb nan
    ("EMBED_BITS", "0", "[2, 8]"),
    ("MATRIX_CLIP_SIGMAS", "0", "(0, inf)"),
    ("EMBED_CLIP_SIGMAS", "-3", "(0, inf)"),
    ("GPTQ_BLOCK_SIZE", "0", "[1, inf)"),
    ("GPTQ_CALIBRATION_BATCHES", "0", "[1, inf)"),  # a KeyError after training, before
    ("EMA_DECAY", "1", "[0, 1)"),
    ("VOCAB_SIZE", "70000", "[2, 65536]"),
])
def test_out_of_range_values_name_the_setting_and_the_range(tiny_env, name, value, fix):
    with pytest.raises(tg.UserError, match=re.escape(f"{name}={value} is out of range: set it to a value in {fix}")):
        tg.Settings(environ=dict(tiny_env, **{name: value}))


def test_every_bound_parses_and_holds_its_default():
    for s in tg.SETTINGS:
        if s.bounds:
            lo, hi, _, _ = tg.parse_bounds(s.bounds)
            assert lo <= hi and tg.in_bounds(s.default, s.bounds), s.name
    assert tg.in_bounds(0.0, "[0, 1)") and not tg.in_bounds(1.0, "[0, 1)") and not tg.in_bounds(0, "(0, inf)")


def test_an_mlp_width_that_rounds_to_zero_is_refused(tiny_env):
    s = tg.Settings(environ=dict(tiny_env, MLP_MULT="0.01"))  # 0.01 x 64 = 0.64 -> 0 hidden units
    with pytest.raises(tg.UserError, match="MLP_MULT=0.01 x MODEL_DIM=64 rounds the MLP width to 0"):
        s.validate(1)


@pytest.mark.parametrize("typo,meant", [("NUM_LAYER", "NUM_LAYERS"), ("MODEL_DIMS", "MODEL_DIM"),
                                        ("MATRIX_LRR", "MATRIX_LR"), ("TTT_EPOCH", "TTT_EPOCHS")])
def test_a_misspelled_setting_stops_with_did_you_mean(tiny_env, typo, meant):
    with pytest.raises(tg.UserError, match=f"{typo} is not a setting: did you mean {meant}\\?"):
        tg.Settings(environ=dict(tiny_env, **{typo: "7"}))


def test_other_tools_variables_are_left_alone(tiny_env):
    foreign = dict(CUDA_VISIBLE_DEVICES="0", NCCL_DEBUG="INFO", LOCAL_WORLD_SIZE="1", TORCHELASTIC_RUN_ID="x",
                   OMP_NUM_THREADS="1", MASTER_PORT="29500", SEEDS="1 2 3", NPROC="8", HOME="/root", CI="true",
                   PYTHONPATH="/x", TRITON_CACHE_DIR="/tmp")
    assert tg.Settings(environ=dict(tiny_env, **foreign)).num_layers == 6


@pytest.mark.parametrize("run_id", ["exp1/seed1337", "../up", ".hidden", "a b"])
def test_a_run_id_must_be_a_plain_name(tiny_env, run_id):
    with pytest.raises(tg.UserError, match="must be a plain name .*LOG_DIR=logs/exp1 RUN_ID=seed1337"):
        tg.Settings(environ=dict(tiny_env, RUN_ID=run_id))


def test_a_reused_run_id_is_refused_unless_overwrite(tiny_env, tmp_path):
    s = tg.Settings(environ=tiny_env)
    rt = tg.Runtime(s)
    rt.log("first run")
    with pytest.raises(tg.UserError, match=r"RUN_ID=test was used before \(.*test.txt exists\): choose another RUN_ID, "
                                           r"or set OVERWRITE=1"):
        tg.Runtime(tg.Settings(environ=tiny_env))
    artifact_only = dict(tiny_env, RUN_ID="fresh")
    (Path(tiny_env["LOG_DIR"]) / "fresh.ptz").write_bytes(b"old artifact")  # the artifact alone counts too
    with pytest.raises(tg.UserError, match="RUN_ID=fresh was used before"):
        tg.Runtime(tg.Settings(environ=artifact_only))
    again = tg.Runtime(tg.Settings(environ=dict(tiny_env, OVERWRITE="1")))
    again.log("second run")
    assert again.log_path.read_text() == "second run\n"  # replaced, not appended to


def test_default_run_ids_are_unique(tiny_env):
    env = {k: v for k, v in tiny_env.items() if k != "RUN_ID"}
    assert tg.Settings(environ=env).run_id != tg.Settings(environ=env).run_id


# --- output paths, checked at start-up -----------------------------------------------------------------


def test_output_paths_are_checked_before_any_work(tiny_env, tmp_path):
    a_file = tmp_path / "plain_file"
    a_file.write_text("x")
    cases = [
        (dict(LOG_DIR=str(a_file)), f"LOG_DIR={a_file}: {a_file} is a file, not a folder"),
        (dict(ARTIFACT_PATH=str(tmp_path)), f"ARTIFACT_PATH={tmp_path} is a folder: give a file path"),
        (dict(SAVE_CHECKPOINT=str(tmp_path)), f"SAVE_CHECKPOINT={tmp_path} is a folder"),
        (dict(ARTIFACT_PATH=str(a_file / "model.ptz")), f"ARTIFACT_PATH: {a_file} is a file, not a folder"),
        (dict(LOG_DIR="/proc/pg_logs"), "LOG_DIR=/proc/pg_logs: cannot write to /proc/pg_logs"),  # read-only to root too
    ]
    for overrides, message in cases:
        with pytest.raises(tg.UserError, match=re.escape(message)):
            tg.Runtime(tg.Settings(environ=dict(tiny_env, **overrides)))


def test_a_failed_write_leaves_no_temporary_file_and_says_what_to_free(tmp_path):
    """A real write failure: the child process may not write files over 64 KiB (RLIMIT_FSIZE), as on a full disk."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train_gpt as tg\n"
            f"try:\n    tg.write_atomic(tg.Path({str(tmp_path / 'model.ptz')!r}), b'x' * 1_000_000)\n"
            f"except tg.UserError as e:\n    print(e)\n")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"could not write {tmp_path / 'model.ptz'} (File too large): it needs 1.0 MB" in out.stdout
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .tmp


# --- data: paths that are not files, token ids outside the vocabulary --------------------------------------


def test_paths_that_are_not_files_say_what_they_are(tiny_env, tmp_path):
    fifo = tmp_path / "fifo.model"
    os.mkfifo(fifo)
    broken = tmp_path / "broken.model"
    broken.symlink_to(tmp_path / "gone")
    for path, what in ((tmp_path, "is a folder, not a file"), (fifo, "is not a regular file"),
                       (broken, "is a broken symbolic link"), (tmp_path / "absent", "does not exist")):
        with pytest.raises(tg.UserError, match=f"TOKENIZER_PATH={re.escape(str(path))} {what}"):
            tg.load_tokenizer(str(path), 384)
        with pytest.raises(tg.UserError, match=f"shard {re.escape(str(path))} {what}"):
            tg.read_shard(path)


def shards_with_a_bad_id(tiny_data, tmp_path, split: str) -> str:
    """A copy of the tiny shards where one token of `split` is 400 >= VOCAB_SIZE=384."""
    folder = tmp_path / f"bad_{split}"
    folder.mkdir()
    for f in sorted(Path(tiny_data["DATA_PATH"]).glob("fineweb_*.bin")):
        tokens = tg.read_shard(f, mmap=False).copy()
        if f.name.startswith(f"fineweb_{split}_000000"):
            tokens[len(tokens) // 2] = 400
        tg.write_shard(folder / f.name, tokens)
    return str(folder)


def test_a_validation_id_outside_the_vocabulary_stops_at_start_up(tiny_env, tiny_data, tmp_path):
    data = shards_with_a_bad_id(tiny_data, tmp_path, "val")
    line = one_error_line(run_script(dict(tiny_env, DATA_PATH=data)))
    assert f"validation shard {data}/fineweb_val_000000.bin holds token id 400 >= VOCAB_SIZE=384" in line
    assert not (Path(tiny_env["LOG_DIR"]) / "test.ptz").exists()


def test_a_training_id_outside_the_vocabulary_names_its_shard(tiny_env, tiny_data, tmp_path):
    data = shards_with_a_bad_id(tiny_data, tmp_path, "train")
    loader = tg.TrainLoader(tg.shard_files(data, "train"), 64, 32, 0, 0, 1, 8, vocab_size=384)
    with pytest.raises(tg.UserError, match=f"training shard {data}/fineweb_train_000000.bin \\(window at token \\d+\\) "
                                           f"holds token id 400 >= VOCAB_SIZE=384"):
        for _ in range(200):  # an epoch or two: the bad window comes up
            loader.next_step()


# --- one error line, once, and the --check dry run -------------------------------------------------------------


def test_check_runs_every_start_up_check_and_writes_nothing(tiny_env):
    proc = run_script(tiny_env, "--check")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "check:ok run_id:test" in proc.stdout and "byte_check: docs:" in proc.stdout
    assert not Path(tiny_env["LOG_DIR"]).joinpath("test.txt").exists()
    line = one_error_line(run_script(dict(tiny_env, TOKENIZER_PATH=tiny_env["DATA_PATH"]), "--check"))
    assert "is a folder, not a file" in line
    assert "only flag is --check" in one_error_line(run_script(tiny_env, "--chek"))


def test_two_processes_print_a_start_up_error_once(tiny_env):
    proc = run_script(dict(tiny_env, DATA_PATH="/nonexistent/shards"), nproc=2)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert errors == ["error: DATA_PATH=/nonexistent/shards does not exist: download the shards with `python3 "
                      "data/cached_challenge_fineweb.py --variant sp8192` or point DATA_PATH at the folder that holds them"]


# --- evaluation: EVAL_ONLY reproduces the run, bytes in the log, the guard, finite scores ---------------


def test_eval_only_reproduces_the_run_from_the_artifact_alone(tiny_env):
    """The run uses non-default evaluation settings; EVAL_ONLY without them gets the same final score."""
    eval_settings = dict(TINY_EVAL, VAL_BATCH_TOKENS="2048", TTT_EPOCHS="2", TTT_LR="0.02")
    run = run_script(dict(tiny_env, ITERATIONS="3", RUN_ID="source", **eval_settings))
    assert run.returncode == 0, run.stderr[-2000:]
    final = re.search(r"final val_bpb:(\S+)", run.stdout).group(1)
    artifact = str(Path(tiny_env["LOG_DIR"]) / "source.ptz")
    again = run_script(dict(tiny_env, RUN_ID="again", EVAL_ONLY=artifact))
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(r"final val_bpb:(\S+)", again.stdout).group(1) == final
    assert "eval_only:adopted setting:EVAL_STRIDE value:16 default:64" in again.stdout
    override = run_script(dict(tiny_env, RUN_ID="override", EVAL_ONLY=artifact, TTT_ENABLED="0"))
    assert override.returncode == 0, override.stderr[-2000:]
    assert "eval_only:overridden setting:TTT_ENABLED value:False artifact:True" in override.stdout
    assert "final_ttt" not in override.stdout


def test_every_pass_logs_the_bytes_its_bpb_divides_by(tiny_data, tmp_path):
    s, rt = make(tiny_data, tmp_path)
    _, tables = tables_for(s)
    val = validation(s, 2000)
    model = random_model(s)
    result = tg.evaluate_windows(model.token_losses, val, tables, s.eval_seq_len, 16, 8, rt)
    independent = int(tables.count(val[:-1], val[1:]).sum())
    assert result.scored_bytes == independent
    fields = dict(p.split(":", 1) for p in result.log_line("sliding").split()[1:])
    assert int(fields["scored_bytes"]) == independent and int(fields["scored_targets"]) == len(val) - 1
    bpb = float(fields["val_loss"]) * int(fields["scored_targets"]) / (math.log(2) * int(fields["scored_bytes"]))
    assert bpb == pytest.approx(float(fields["val_bpb"]), rel=1e-7)


@pytest.mark.parametrize("mode", ("ttt_chunk", "ttt_lora"))
def test_the_score_first_guard_is_on_without_recording(mode, tiny_data, tmp_path, monkeypatch):
    """Not a test-only check: with nothing recorded, a pass whose scoring is never marked must refuse to train."""
    s, rt = make(tiny_data, tmp_path)
    _, tables = tables_for(s)
    val = validation(s, 1200)
    model = random_model(s)
    run = tg.evaluate_ttt_chunk if mode == "ttt_chunk" else \
        (lambda *a, **k: tg.evaluate_ttt_lora(*a[:5], 1, **k))
    result = run(model, s, rt, val, tables)  # the real pass: guard active, no recording
    assert result.scores is None and result.targets == len(val) - 1
    assert re.search(r"ttt:score_first_guard status:active checks:[1-9]\d* targets_scored:\d+", rt.log_path.read_text())
    monkeypatch.setattr(tg.Scores, "mark", lambda self, first, last: None)
    with pytest.raises(RuntimeError, match="score-first violated"):
        run(model, s, rt, val, tables)


def test_a_non_finite_score_is_an_error(tiny_env):
    s = tg.Settings(environ=tiny_env)
    tg.require_finite(1.5, "final val_bpb", s)
    for bad in (math.nan, math.inf):
        with pytest.raises(tg.UserError, match=f"final val_bpb is {bad}"):
            tg.require_finite(bad, "final val_bpb", s)


def test_a_checkpoint_of_another_train_seq_len_is_refused(tiny_data, tmp_path):
    """RoPE is stretched by TRAIN_SEQ_LEN, so it shapes the evaluation forward: a mismatch must not load."""
    s, rt = make(tiny_data, tmp_path)
    tg.save_checkpoint(random_model(s), s, rt, str(tmp_path / "ck.pt"))
    s2, rt2 = make(tiny_data, tmp_path, TRAIN_SEQ_LEN=32)
    with pytest.raises(tg.UserError, match="TRAIN_SEQ_LEN=64 \\(run: 32\\)"):
        tg.load_checkpoint(tg.GPT(s2), s2, rt2, str(tmp_path / "ck.pt"))
    assert "TRAIN_SEQ_LEN" in tg.artifact_setting_names() and "EVAL_STRIDE" in tg.artifact_setting_names()
