"""TRAIN_SEQ_SCHEDULE (progressive training context, PR #2014): the loader's windows at each length and
across a switch, the step of each switch, RoPE at every length, no compile inside the timed loop, the
off path, and the schedules refused before training."""
import math
import types

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, tg
from test_train import run_script

SCHEDULE = "16@0,32@0.3,64@0.6"  # TINY_MODEL trains at TRAIN_SEQ_LEN=64 with TRAIN_BATCH_TOKENS=2048


# --- the loader -----------------------------------------------------------------------------------

@pytest.fixture
def numbered_shards(tmp_path):
    """Three shards whose tokens are their global positions (0..5999), so a window names its own place."""
    files, first = [], 0
    for i, n in enumerate((3000, 2100, 900)):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        tg.write_shard(path, np.arange(first, first + n))
        files.append(str(path))
        first += n
    return files


def rows_of(batches) -> list:
    return [row for batch in batches for row in batch.numpy()]


def test_the_loader_hands_out_windows_of_each_length_and_repeats_no_token_across_a_switch(numbered_shards):
    """5 steps at 16 tokens, a 6th fetched but never trained on (a prefetched batch), then windows of 32.
    The rest of the epoch must be exactly the unread runs of the 16-token grid cut into 32-token windows
    (each run's tail shorter than 32 waits for the next epoch): computed here from the grid and the rows
    read, independently of the loader's re-cut."""
    loader = tg.TrainLoader(numbered_shards, 16, 16, seed=3, rank=0, world_size=1, grad_accum=8)
    grid = {(int(s), int(shard)) for s, shard in zip(loader.starts, loader.shard_ids)}
    shard_first = {0: 0, 1: 3000, 2: 5100}
    trained = []
    for _ in range(5):
        batches = loader.next_step()
        assert [tuple(b.shape) for b in batches] == [(2, 17)] * 8
        trained += rows_of(batches)
    loader.next_step()  # the stale prefetch: its windows stay unread
    loader.set_seq_len(32, 8, unread_steps=1)
    # the unread 16-token windows of the grid, as runs of neighbours in one shard
    read_starts = {int(row[0]) for row in trained}
    unread = sorted((shard, shard_first[shard] + s) for s, shard in grid if shard_first[shard] + s not in read_starts)
    runs = []
    for shard, start in unread:
        if runs and runs[-1][0] == shard and runs[-1][1] + 16 * runs[-1][2] == start:
            runs[-1][2] += 1
        else:
            runs.append([shard, start, 1])
    expected = sorted(start + 32 * j for _, start, count in runs for j in range(count * 16 // 32))
    after = []
    epoch = loader.epoch
    while True:
        batches = loader.next_step()
        if loader.epoch != epoch:
            break
        assert [tuple(b.shape) for b in batches] == [(1, 33)] * 8
        after += rows_of(batches)
    for row in after:  # real consecutive tokens of one shard
        assert np.array_equal(row, np.arange(row[0], row[0] + 33))
    got = sorted(int(row[0]) for row in after)
    whole_steps = len(expected) // 8 * 8  # the epoch ends when a full step no longer fits
    assert len(got) == whole_steps and set(got) <= set(expected)
    inputs = [set(range(int(row[0]), int(row[0]) + len(row) - 1)) for row in trained + after]
    assert sum(map(len, inputs)) == len(set().union(*inputs))  # no input token read twice in the epoch


def test_the_loader_refuses_a_length_with_fewer_windows_than_one_batch(numbered_shards):
    loader = tg.TrainLoader(numbered_shards, 16, 16, seed=3, rank=0, world_size=1, grad_accum=8)
    with pytest.raises(tg.UserError, match="fewer than one batch of 8"):
        loader.set_seq_len(1024, 8)


# --- the schedule in training ---------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_only(env: dict, shapes: list | None = None):
    """The training loop alone (no evaluation passes): (trainer, results). With `shapes`, every training
    step appends the set of its micro-batch shapes."""
    s = tg.Settings(environ=env)
    s.validate(1)
    trainer = tg.Trainer(s, tg.Runtime(s))
    trainer.validate = lambda: types.SimpleNamespace(loss=0.0, bpb=0.0)
    if shapes is not None:
        forward_backward = trainer.forward_backward
        trainer.forward_backward = lambda batches: (shapes.append({tuple(b.shape) for b in batches}),
                                                    forward_backward(batches))[1]
    return trainer, trainer.train()


@pytest.mark.parametrize("iterations", [10, 7])
def test_a_step_based_run_switches_at_the_first_step_of_each_fraction(tiny_env, iterations):
    """MAX_WALLCLOCK_SECONDS=0: the fraction is step / ITERATIONS, so length n@f starts at step ceil(f * ITERATIONS)
    and the model is fed (micro_seqs, n + 1) windows from there, 2048 tokens a step throughout."""
    shapes = []
    trainer, results = train_only(dict(tiny_env, TRAIN_SEQ_SCHEDULE=SCHEDULE, ITERATIONS=str(iterations),
                                       TRAIN_LOG_EVERY="1"), shapes)
    log = trainer.rt.log_path.read_text()
    starts = {16: 0, 32: math.ceil(0.3 * iterations), 64: math.ceil(0.6 * iterations)}
    expected = [max(n for n, start in starts.items() if start <= step) for step in range(iterations)]
    assert shapes == [{(2048 // n // 8, n + 1)} for n in expected]
    assert [h["seq_len"] for h in results["history"]] == expected
    assert f"seq_len:schedule {SCHEDULE} step:0 seq_len:16 seqs_per_step:128" in log
    for n in (32, 64):
        assert f"seq_len:switched step:{starts[n]} frac:{starts[n] / iterations:.3f} seq_len:{n} " \
               f"seqs_per_step:{2048 // n}" in log


def test_off_is_todays_training_and_the_first_phase_is_todays_training_at_its_length(tiny_env):
    """Off ('' or a one-phase schedule) trains exactly as TRAIN_SEQ_LEN alone: the same weights, bit for bit.
    And until its first switch a schedule trains exactly like a plain run at its first length."""
    env = dict(tiny_env, ITERATIONS="4", TRAIN_LOG_EVERY="1")
    losses = lambda results: [h["train_loss"] for h in results["history"]]  # noqa: E731
    plain, _ = train_only(env)
    for schedule in ("", "64@0"):
        same, _ = train_only(dict(env, TRAIN_SEQ_SCHEDULE=schedule, RUN_ID=f"off{len(schedule)}"))
        for name, tensor in plain.model.state_dict().items():
            assert torch.equal(same.model.state_dict()[name], tensor), name
    _, short = train_only(dict(env, TRAIN_SEQ_LEN="32", RUN_ID="short"))
    _, scheduled = train_only(dict(env, TRAIN_SEQ_SCHEDULE="32@0,64@0.5", RUN_ID="scheduled"))
    assert losses(scheduled)[:2] == losses(short)[:2]
    assert losses(scheduled)[2:] != losses(short)[2:]


def test_rope_is_unstretched_at_every_scheduled_length():
    """The stretch references TRAIN_SEQ_LEN, the final length: every scheduled length gets the plain
    rotation angle p * base^(-2j/d), the same for a position in every phase; longer contexts stretch."""
    dims, base = 8, 10000.0
    for n in (16, 32, 64):
        cos, sin = tg.rope_tables(n, dims, base, 64, "cpu", torch.float32)
        angles = np.outer(np.arange(n), base ** (-np.arange(0, dims, 2) / dims))
        np.testing.assert_allclose(cos.numpy(), np.cos(angles), atol=1e-6)
        np.testing.assert_allclose(sin.numpy(), np.sin(angles), atol=1e-6)
    stretched, _ = tg.rope_tables(128, dims, base, 64, "cpu", torch.float32)
    assert not torch.allclose(stretched[:64], tg.rope_tables(64, dims, base, 64, "cpu", torch.float32)[0])


def test_the_warm_up_compiles_every_graph_so_the_timed_loop_compiles_none(tiny_env, monkeypatch):
    """COMPILE=1 (aot_eager, whose guards are the ones inductor gets; a 3-layer model to keep it quick):
    after the warm-up, dynamo may not compile again during training. Length 32 starts before looping
    (0.35) and ends after it, 64 runs looped: three graphs. The same run without the warm-up compiles
    those three inside the loop."""
    eager_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: eager_compile(fn, **dict(kw, backend="aot_eager")))
    stats = torch._dynamo.utils.counters["stats"]

    def train(warmup_steps):
        env = dict(tiny_env, COMPILE="1", TRAIN_SEQ_SCHEDULE="32@0,64@0.5", ITERATIONS="10", WARMUP_STEPS=warmup_steps,
                   NUM_LAYERS="3", LOOP_START="1", LOOP_END="1", PARALLEL_RESIDUAL_START="2", XSA_LAST_N="3",
                   RUN_ID=f"w{warmup_steps}")
        s = tg.Settings(environ=env)
        torch._dynamo.reset()
        trainer = tg.Trainer(s, tg.Runtime(s))
        trainer.validate = lambda: types.SimpleNamespace(loss=0.0, bpb=0.0)  # eval compiles its own graphs
        assert trainer.warmup_graphs() == [(False, 32), (True, 32), (True, 64)]
        before = stats["unique_graphs"]
        trainer.compile_warmup()
        warm = stats["unique_graphs"] - before
        trainer.compile_warmup = lambda: None
        trainer.train()
        return warm, stats["unique_graphs"] - before - warm
    assert train("1") == (3, 0)
    assert train("0") == (0, 3)


@pytest.mark.parametrize("schedule,at,expected", [
    (SCHEDULE, 0.35, [(False, 16), (False, 32), (True, 32), (True, 64)]),
    (SCHEDULE, 0.3, [(False, 16), (True, 32), (True, 64)]),  # 32 starts as looping starts
    (SCHEDULE, 0.0, [(True, 16), (True, 32), (True, 64)]),
    (SCHEDULE, 0.9, [(False, 16), (False, 32), (False, 64), (True, 64)]),
    ("", 0.35, [(False, 64), (True, 64)]),  # off: today's two graphs
])
def test_the_warm_up_graphs_are_those_the_timed_loop_can_meet(tiny_env, schedule, at, expected):
    s = tg.Settings(environ=dict(tiny_env, TRAIN_SEQ_SCHEDULE=schedule, ENABLE_LOOPING_AT=str(at)))
    assert tg.Trainer(s, tg.Runtime(s)).warmup_graphs() == expected
    s = tg.Settings(environ=dict(tiny_env, TRAIN_SEQ_SCHEDULE=schedule, ENABLE_LOOPING_AT_STEP="3"))
    lengths = [64] if not schedule else [16, 32, 64]
    assert tg.Trainer(s, tg.Runtime(s)).warmup_graphs() == [(False, n) for n in lengths] + [(True, n) for n in lengths]


# --- bad schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,message", [
    ("16,64@0.5", "TRAIN_SEQ_SCHEDULE='16,64@0.5' must be comma-separated length@fraction pairs"),
    ("16@x,64@0.5", "must be comma-separated length@fraction pairs"),
    ("16@0.1,64@0.5", "TRAIN_SEQ_SCHEDULE=16@0.1,64@0.5 must start at fraction 0"),
    ("16@0,32@0.6,64@0.5", "the fractions must increase and stay below 1"),
    ("16@0,64@1", "the fractions must increase and stay below 1"),
    ("32@0,16@0.3,64@0.6", "the lengths must be positive and increase"),
    ("0@0,64@0.5", "the lengths must be positive and increase"),
    ("16@0,32@0.5", "TRAIN_SEQ_SCHEDULE=16@0,32@0.5 ends at 32 but TRAIN_SEQ_LEN=64: set TRAIN_SEQ_LEN=32"),
    ("24@0,64@0.5", "TRAIN_SEQ_SCHEDULE length 24: TRAIN_BATCH_TOKENS=2048 must be a multiple of 8*24=192"),
])
def test_bad_schedules_are_refused_before_training(tiny_env, schedule, message):
    with pytest.raises(tg.UserError) as err:
        tg.Settings(environ=dict(tiny_env, TRAIN_SEQ_SCHEDULE=schedule)).validate(1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_schedule_is_one_line_and_a_nonzero_exit(tiny_env):
    proc = run_script(dict(tiny_env, TRAIN_SEQ_SCHEDULE="16@0,32@0.5"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: TRAIN_SEQ_SCHEDULE=16@0,32@0.5 ends at 32")
    assert "step:" not in proc.stdout  # refused before training
