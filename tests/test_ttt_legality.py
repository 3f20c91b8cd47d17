"""Legality of the evaluation passes, by test. Issue #1017's conditions and the README rule: a target's
score depends only on earlier tokens (and on weights trained on earlier, already scored targets); every
target is scored exactly once; training never sees a token before it is scored; no validation token
reaches training."""
import inspect

import numpy as np
import pytest
import torch

import train_gpt as tg
from eval_helpers import losses_fn, make, random_model, tables_for, validation

torch.set_num_threads(1)

MODES = ("sliding", "ttt_chunk", "ttt_lora")
N = 1000  # targets: 4 TTT chunks of 256, ~9 documents of which several outlive the 64-token LoRA window


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    # Learning rates high enough that TTT visibly changes later scores, so a leak would show.
    s, rt = make(tiny_data, tmp_path_factory.mktemp("legal"), TTT_LR=0.05, TTT_LORA_LR=0.01)
    _, tables = tables_for(s)
    return s, rt, random_model(s), validation(s, N), tables


def run(mode, setup, tokens=None, tilt=False):
    """One pass with recorded scores; tilt: with the n-gram tilt (order 4, so that this stream has hints)."""
    s, rt, model, val, tables = setup
    tokens = val if tokens is None else tokens
    hints = tg.ngram_hints(tokens, 4, 1, 0.8) if tilt else None
    if mode == "sliding":
        def loss_fn(x, y, *h):
            return model.token_losses(x, y, hints=h[0] if h else None)
        return tg.evaluate_windows(loss_fn, tokens, tables, s.eval_seq_len, s.eval_stride, s.eval_batch_windows, rt,
                                   record=True, hints=hints)
    if mode == "ttt_chunk":
        return tg.evaluate_ttt_chunk(model, s, rt, tokens, tables, record=True, hints=hints)
    return tg.evaluate_ttt_lora(model, s, rt, tokens, tables, 1, record=True, hints=hints)


@pytest.mark.parametrize("tilt", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_every_target_is_scored_exactly_once(mode, tilt, setup):
    r = run(mode, setup, tilt=tilt)
    assert r.targets == N
    assert r.scores.hits[0] == 0 and bool((r.scores.hits[1:] == 1).all())
    assert not r.scores.loss[1:].isnan().any()


@pytest.mark.parametrize("tilt", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_a_score_never_depends_on_later_tokens(mode, tilt, setup):
    """Alter every token after position p (mid-chunk, on a chunk edge, inside a long document; BOS
    included, so document edges move too): the losses of targets 1..p must not change. With the n-gram
    tilt too: its hints (two targets in five have one here) come from earlier targets only."""
    if tilt:
        assert (tg.ngram_hints(setup[3], 4, 1, 0.8) >= 0).float().mean() > 0.2
    base = run(mode, setup, tilt=tilt).scores.loss
    rng = np.random.default_rng(1)
    for p in (300, 512, 777):
        altered = setup[3].clone()
        altered[p + 1:] = torch.from_numpy(rng.integers(0, 384, N - p))
        altered[p + 1::37] = 1
        loss = run(mode, setup, altered, tilt).scores.loss
        assert torch.allclose(loss[1:p + 1], base[1:p + 1], rtol=0, atol=1e-6), f"p={p}"
        assert not torch.allclose(loss[p + 1:], base[p + 1:])  # the alteration did reach the later scores


def test_chunk_ttt_scores_the_first_chunk_untrained_then_trains_only_on_scored_chunks(setup, monkeypatch):
    s, rt, model, val, tables = setup
    events = []
    score, train = tg.score_windows, tg.ttt_train_chunk

    def score_spy(loss_fn, tokens, segments, *args, **kwargs):
        events.append(("score", int(segments[:, 1].min()), int(segments[:, 2].max())))
        return score(loss_fn, tokens, segments, *args, **kwargs)

    def train_spy(train_fn, params, opt, tokens, first, last, *args, **kwargs):
        events.append(("train", first, last))
        return train(train_fn, params, opt, tokens, first, last, *args, **kwargs)
    monkeypatch.setattr(tg, "score_windows", score_spy)
    monkeypatch.setattr(tg, "ttt_train_chunk", train_spy)
    trained = run("ttt_chunk", setup).scores.loss
    assert events == [(kind, c * 256 + 1, min(c * 256 + 256, N)) for c in range(4) for kind in ("score", "train")][:-1]
    s.ttt_epochs = 0
    try:
        untrained = run("ttt_chunk", setup).scores.loss
    finally:
        s.ttt_epochs = 3
    assert torch.equal(trained[1:257], untrained[1:257])  # chunk 0 is scored before any training
    assert not torch.allclose(trained[257:], untrained[257:])


def test_lora_ttt_scores_each_documents_first_chunk_with_a_fresh_adapter(setup):
    s, rt, model, val, tables = setup
    adapted = run("ttt_lora", setup).scores.loss
    s.ttt_lora_lr = 0.0
    try:
        frozen = run("ttt_lora", setup).scores.loss
    finally:
        s.ttt_lora_lr = 0.01
    starts, lengths = tg.document_spans(val, 1)
    first_chunks = torch.zeros(N + 1, dtype=torch.bool)
    for start, length in zip(starts, lengths):
        first_chunks[start + 1:start + 1 + min(length, s.ttt_chunk_size)] = True
    assert torch.allclose(adapted[first_chunks], frozen[first_chunks], rtol=0, atol=1e-6)  # no document leaks into another
    assert not torch.allclose(adapted[~first_chunks][1:], frozen[~first_chunks][1:])


@pytest.mark.parametrize("mode", ("ttt_chunk", "ttt_lora"))
def test_the_guard_stops_training_on_unscored_targets(mode, setup, monkeypatch):
    """With scoring sabotaged (nothing recorded as scored), the first TTT step must refuse to run."""
    monkeypatch.setattr(tg.Scores, "add", lambda self, *args: None)
    with pytest.raises(RuntimeError, match="score-first violated"):
        run(mode, setup)


def test_lora_documents_enter_in_original_order_and_advance_chunk_by_chunk(setup, monkeypatch):
    step, calls = tg.lora_step, []

    def spy(start, length, chunk, *args):
        calls.append((start.copy(), chunk.copy()))
        return step(start, length, chunk, *args)
    monkeypatch.setattr(tg, "lora_step", spy)
    run("ttt_lora", setup)
    starts, lengths = tg.document_spans(setup[3], 1)
    first_seen, next_chunk = [], {}
    for start, chunk in calls:
        for d, j in zip(start.tolist(), chunk.tolist()):
            assert next_chunk.get(d, 0) == j  # each document's chunks in order, each once
            next_chunk[d] = j + 1
            if j == 0:
                first_seen.append(d)
    assert first_seen == starts.tolist()
    assert [next_chunk[d] for d in starts.tolist()] == (-(-lengths // setup[0].ttt_chunk_size)).tolist()


def test_lora_plan_keeps_documents_in_flight_under_the_cap():
    lengths = np.random.default_rng(0).integers(1, 400, 300)
    plan = tg.lora_plan(lengths, 16, 64, 4, 10)
    chunks, done, open_docs = -(-lengths // 16), np.zeros(300, int), set()
    for batch in plan:
        assert len(set(batch.tolist())) == len(batch) <= 4 * 64 // 16
        widths = {min(64, 16 * (done[d] + 1)) for d in batch}
        assert len(widths) == 1  # one window width per step
        open_docs |= set(batch.tolist())
        assert len(open_docs) <= 10
        done[batch] += 1
        open_docs -= {d for d in batch.tolist() if done[d] == chunks[d]}
    assert (done == chunks).all()


def test_lora_plan_batches_more_short_windows_but_at_most_four_times_the_rows():
    lengths = np.full(200, 20)  # two chunks of 16 each: windows 16 and 32 wide, L = 256 allows 16x and 8x the rows
    sizes = [len(b) for b in tg.lora_plan(lengths, 16, 256, 4, 200)]
    assert max(sizes) == 16 and sum(sizes) == 400


def test_compile_warm_ups_see_random_tokens_only_and_keep_the_weights(setup):
    s, rt, model, val, tables = setup
    for warm_up in (tg.warm_up_chunk_ttt, tg.warm_up_lora):
        assert not {"val_tokens", "tokens"} & set(inspect.signature(warm_up).parameters)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    tg.warm_up_chunk_ttt(losses_fn(model), params, s, rt, s.vocab_size, {3, 1})
    assert all(bool((p.grad == 0).all()) for p in params)
    layout = tg.LoRALayout(model, s.ttt_lora_rank)
    tg.warm_up_lora(lambda x, y, m: model.token_losses(x, y, lora=tg.DocLoRA(layout, m)), layout, layout.fresh_row(0, "cpu"),
                    s, rt, s.vocab_size)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for p in params:
        p.grad = None


def test_training_reads_only_training_shards(tiny_data, tmp_path, monkeypatch):
    s, rt = make(tiny_data, tmp_path, WARMUP_STEPS=1)
    trainer = tg.Trainer(s, rt)
    opened, read = [], tg.read_shard
    monkeypatch.setattr(tg, "read_shard", lambda path, *a, **k: opened.append(str(path)) or read(path, *a, **k))
    trainer.fetch(trainer.new_loader())
    trainer.compile_warmup()
    assert opened and all("/fineweb_train_" in p for p in opened)
    assert all("/fineweb_train_" in p for p in trainer.train_files)
