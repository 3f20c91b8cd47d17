"""TRAINING section and the command line: learning, world-size invariance, warm-up rollback,
the wallclock cap, and every bad-input error as one line with a non-zero exit."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL, subprocess_env, tg

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+)", re.M)


def run_in_process(env: dict):
    s = tg.Settings(environ=env)
    rt = tg.Runtime(s)
    return tg.train_and_evaluate(s, rt), rt


def run_script(env: dict, nproc: int = 1, timeout: int = 300):
    cmd = [sys.executable, "train_gpt.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def periodic_data(tiny_data, tmp_path):
    """Shards of a fixed random cycle of 50 tokens: the next token is a function of the current one."""
    cycle = np.random.default_rng(0).permutation(np.arange(4, 384))[:50]
    tokens = np.tile(cycle, 400)
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", tokens[:15000])
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", tokens[15000:])
    return str(tmp_path)


def test_tiny_model_learns_a_learnable_sequence(tiny_env, periodic_data):
    results, _ = run_in_process(dict(tiny_env, DATA_PATH=periodic_data, ITERATIONS="40", TRAIN_LOG_EVERY="1"))
    losses = [h["train_loss"] for h in results["history"]]
    assert losses[0] > 5.0  # ~ln(384) at the start
    assert losses[-1] < 0.5 and results["val_loss"] < 0.5
    assert any(h["looping"] for h in results["history"]) and not results["history"][0]["looping"]


def test_compile_warmup_rolls_the_state_back(tiny_env):
    """Warm-up steps train for real; afterwards weights, optimizer state and data order restart."""
    env = dict(tiny_env, ITERATIONS="6", TRAIN_LOG_EVERY="1")
    cold, _ = run_in_process(dict(env, WARMUP_STEPS="0"))
    warm, _ = run_in_process(dict(env, WARMUP_STEPS="3", RUN_ID="warm"))
    assert [h["train_loss"] for h in warm["history"]] == [h["train_loss"] for h in cold["history"]]
    assert warm["val_loss"] == cold["val_loss"]


@pytest.fixture
def one_thread():
    """One intra-op thread for a timing test: on a busy 2-core machine two threads spin against each
    other and a tiny step takes seconds instead of a fraction of one (measured 5-9 s against 0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_wallclock_cap_stops_the_loop_and_sets_the_schedule(tiny_env, one_thread):
    results, rt = run_in_process(dict(tiny_env, MAX_WALLCLOCK_SECONDS="6", GPTQ_RESERVE_SECONDS="1", ITERATIONS="100000",
                                      TRAIN_LOG_EVERY="1"))
    log = rt.log_path.read_text()
    assert "wallclock:budget seconds:6 gptq_reserve_seconds:1 training_cap_ms:5000" in log
    m = re.search(r"stopping_early:wallclock_cap train_time:(\d+)ms step:(\d+)/100000", log)
    # (no upper bound on the time: on a loaded CI machine one step can take seconds)
    assert m and int(m.group(1)) >= 5000 and int(m.group(2)) == results["steps"] < 100000
    times = {int(k): int(t) for k, t in re.findall(r"^step:(\d+)/100000 train_loss:\S+ train_time:(\d+)ms", log, re.M)}
    assert times.get(results["steps"] - 1, 0) < 5000 <= times[results["steps"]]  # stopped right after crossing the cap
    # Recurrence starts with the first step that begins at >= 35% of the cap, and it must start: a run
    # whose loop never switched on would evaluate a model unlike the one the settings describe.
    switch = re.search(r"layer_loop:enabled step:(\d+) frac:(\S+)", log)
    assert switch, f"looping never started in {results['steps']} steps: {sorted(times.items())}"
    k = int(switch.group(1))
    assert float(switch.group(2)) >= 0.35 and times[k] >= 1750 and times.get(k - 1, 0) < 1750
    assert any(h["looping"] for h in results["history"]) and not results["history"][0]["looping"]


@pytest.mark.parametrize("comm,tol", [("fp32", 2e-4), ("bf16", 1e-3)])
def test_two_gloo_processes_match_one_process(tiny_env, comm, tol):
    """Two ranks (sharded Muon, each group's all-gather started while the next group computes) train like
    one. The log prints losses to 1e-4. With fp32 gradient sums only the summation order differs. With
    bf16 sums each gradient is rounded once more (relative 2^-9) before the momentum, and Newton-Schulz
    rounds its input to bf16 anyway: measured, both differ from one process by at most one printed unit
    (1e-4) here. 1e-3 allows bf16 that much more room and still fails a real bug: all-gathered updates
    in the wrong order move the losses by 0.2. (Muon is blind to a missing 1/world_size: the row
    normalisation and Newton-Schulz undo any constant scale of the gradients.)"""
    env = dict(tiny_env, ITERATIONS="6", TRAIN_LOG_EVERY="1", WARMUP_STEPS="0", MUON_COMM_DTYPE=comm)
    one = run_script(env)
    two = run_script(dict(env, RUN_ID="two"), nproc=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "grad_accum_steps: 8" in one.stdout and "world_size: 2 grad_accum_steps: 4" in two.stdout
    losses_one = [float(v) for _, v in STEP.findall(one.stdout)]
    losses_two = [float(v) for _, v in STEP.findall(two.stdout)]
    assert len(losses_one) == 6 and losses_one == pytest.approx(losses_two, abs=tol)
    final = lambda out: float(re.search(r"post-ema val_loss:(\S+)", out).group(1))  # noqa: E731
    assert final(one.stdout) == pytest.approx(final(two.stdout), abs=tol)


def test_two_process_runs_exit_cleanly(tiny_env):
    """Every rank of a finished 2-process run exits 0. Without the barrier before the process group is torn
    down, one rank aborted at exit ("terminate called without an active exception") in 9 of 24 such runs
    (torch 2.13, CPU, 2026-12-06): 8 runs here miss that rate with probability 0.65^8 = 3%. The barrier alone
    still failed 1 run of 8 in CI (2026-12-07); the abort came in the interpreter's finalization (3 of 16
    without the barrier, none of 20 when the ranks left through os._exit after destroy_process_group), which
    finished distributed runs now skip. The evaluation passes are off to keep each run short; the abort came
    after the last log line either way."""
    env = dict(tiny_env, ITERATIONS="3", WARMUP_STEPS="0", TTT_ENABLED="0", SLIDING_WINDOW_ENABLED="0")
    for i in range(8):
        r = run_script(dict(env, RUN_ID=f"exit{i}"), nproc=2)
        assert r.returncode == 0 and "terminate called" not in r.stderr, f"run {i}: " + r.stderr[-1500:]
        assert "final val_bpb" in r.stdout


def test_one_micro_batch_trains_like_eight(tiny_env):
    """GRAD_ACCUM_STEPS=1 runs the step's 32 windows as one micro-batch instead of 8 of 4: the same windows and
    the same mean gradient, so only the fp32 summation order differs (losses are printed to 1e-4)."""
    env = dict(tiny_env, ITERATIONS="6", TRAIN_LOG_EVERY="1", WARMUP_STEPS="0", TTT_ENABLED="0",
               SLIDING_WINDOW_ENABLED="0")
    eight = run_script(env)
    one = run_script(dict(env, RUN_ID="one", GRAD_ACCUM_STEPS="1"))
    assert eight.returncode == 0 and one.returncode == 0, (eight.stderr + one.stderr)[-2000:]
    assert "world_size: 1 grad_accum_steps: 8" in eight.stdout and "world_size: 1 grad_accum_steps: 1" in one.stdout
    losses_eight = [float(v) for _, v in STEP.findall(eight.stdout)]
    losses_one = [float(v) for _, v in STEP.findall(one.stdout)]
    assert len(losses_one) == 6 and losses_one == pytest.approx(losses_eight, abs=2e-4)
    final = lambda out: float(re.search(r"post-ema val_loss:(\S+)", out).group(1))  # noqa: E731
    assert final(one.stdout) == pytest.approx(final(eight.stdout), abs=2e-4)


@pytest.mark.parametrize("overrides,message", [
    (dict(PARALLEL_RESIDUAL_MODE="diagonal"), "PARALLEL_RESIDUAL_MODE='diagonal' is not one of full, split, sequential, off"),
    (dict(MATRIX_LR="fast"), "MATRIX_LR='fast' is not valid: set MATRIX_LR to a float"),
    (dict(NUM_LAYERS="2.5"), "NUM_LAYERS='2.5' is not valid"),
    (dict(COMPILE="maybe"), "COMPILE='maybe' is not valid"),
    (dict(LOOP_END="9"), "LOOP_START=2 and LOOP_END=9 must satisfy"),
    (dict(NUM_HEADS="3"), "MODEL_DIM=64 must be divisible by NUM_HEADS=3"),
    (dict(TRAIN_BATCH_TOKENS="1000"), "TRAIN_BATCH_TOKENS=1000 must be a multiple of 8*TRAIN_SEQ_LEN=512"),
    (dict(GRAD_ACCUM_STEPS="3"), "GRAD_ACCUM_STEPS=3: a step's 32 windows of 64 tokens do not split into WORLD_SIZE=1"),
    (dict(MAX_WALLCLOCK_SECONDS="10", GPTQ_RESERVE_SECONDS="10"), "leaves no training time"),
    (dict(RANK="0", WORLD_SIZE="3"), "WORLD_SIZE=3 must divide 8"),
    (dict(VOCAB_SIZE="8192"), "has 384 pieces but VOCAB_SIZE=8192"),
    (dict(DATA_PATH="/nonexistent/shards"), "DATA_PATH=/nonexistent/shards does not exist"),
    (dict(TOKENIZER_PATH="/nonexistent/tok.model"), "TOKENIZER_PATH=/nonexistent/tok.model does not exist"),
    (dict(EVAL_SEQ_LEN="100000", TTT_CHUNK_TOKENS="100000"), "fewer than one EVAL_SEQ_LEN=100000 window"),
    (dict(SCALAR_LR="1e30", ITERATIONS="20"), "training loss became NaN or infinite between steps"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tiny_env, overrides, message):
    proc = run_script(dict(tiny_env, **overrides))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_the_step_clock_checks_every_n_steps_and_every_step_near_the_cap():
    s = tg.Settings(environ=dict(TINY_MODEL, CLOCK_CHECK_EVERY="10"))
    clock = tg.StepClock(s, tg.Runtime(s), cap_ms=1000.0)
    clock.agree(1, lambda: 10.0)  # 10 ms a step from here on
    assert [step for step in range(2, 60) if clock.due(step)] == [10, 20, 30, 40, 50]
    clock.agree(95, lambda: 950.0)
    # from step 99 the next step could reach 1000 ms (allowing 10% drift): every step is checked
    assert [step for step in range(96, 102) if clock.due(step)] == [99, 100, 101]
    assert clock.estimate_ms(97) == pytest.approx(970.0)


def test_the_step_clock_reads_the_time_after_waiting_for_the_device():
    """The time must be read once the queued steps have run: read at queue time, the wallclock stop comes a
    step or two late and the first logged steps show impossible throughput."""
    s = tg.Settings(environ=dict(TINY_MODEL))
    rt = tg.Runtime(s)
    events = []
    rt.sync = lambda: events.append("sync")
    clock = tg.StepClock(s, rt, cap_ms=float("inf"))

    def now():
        events.append("read")
        return 123.0

    assert clock.agree(5, now) == pytest.approx(123.0)
    assert events == ["sync", "read"]


def test_the_step_clock_reports_a_non_finite_loss_at_the_next_check():
    s = tg.Settings(environ=dict(TINY_MODEL))
    clock = tg.StepClock(s, tg.Runtime(s), cap_ms=float("inf"))
    clock.watch_loss(torch.tensor(2.0))
    clock.agree(10, lambda: 100.0)
    clock.watch_loss(torch.tensor(float("nan")))
    clock.watch_loss(torch.tensor(3.0))  # a later finite loss does not clear the flag
    with pytest.raises(tg.UserError, match="between steps 11 and 20"):
        clock.agree(20, lambda: 200.0)
