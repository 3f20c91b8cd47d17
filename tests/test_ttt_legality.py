"""Legality of the evaluation passes, by test. Issue #1017's conditions and the README rule: a target's
score depends only on earlier tokens (and on weights trained on earlier, already scored targets); every
target is scored exactly once; training never sees a token before it is scored; no validation token
reaches training."""
import copy
import inspect

import numpy as np
import pytest
import torch

import train_gpt as tg
from eval_helpers import losses_fn, make, random_model, tables_for, validation

torch.set_num_threads(1)

# The LoRA pass runs in four modes: plain, with two phases of SGD (ttt_lora_phased), with every LoRA option
# of the later records on (ttt_lora_options), and with both (ttt_lora_phased_options).
LORA_MODES = ("ttt_lora", "ttt_lora_phased", "ttt_lora_options", "ttt_lora_phased_options")
MODES = ("sliding", "ttt_chunk") + LORA_MODES
N = 1000  # targets: 4 TTT chunks of 256, 8 documents of which several outlive the 64-token LoRA window
# The options: two documents in flight, so adapter slots (and with b_only their A) pass from document to
# document; each document's first 100 targets in chunks of 5.
LORA_OPTIONS = dict(ttt_lora_reset="b_only", ttt_lora_alpha=12.0, ttt_lora_targets="k,o,mlp,head",
                    ttt_short_doc_tokens=100, ttt_short_doc_chunk_size=5, ttt_docs_in_flight=2, ttt_batch_docs=2)


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    # Learning rates high enough that TTT visibly changes later scores, so a leak would show.
    s, rt = make(tiny_data, tmp_path_factory.mktemp("legal"), TTT_LR=0.05, TTT_LORA_LR=0.01)
    _, tables = tables_for(s)
    return s, rt, random_model(s), validation(s, N), tables


def phased(s):
    """s with two phases of SGD after documents 3 and 6 (targets 314 and 711 of the stream), 128-target chunks."""
    s = copy.copy(s)
    s.ttt_mode, s.ttt_phases, s.ttt_phase_prefix_docs, s.ttt_phase_lr, s.ttt_chunk_tokens = "lora", 2, 6, 0.05, 128
    return s


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
    return tg.evaluate_ttt_lora(model, lora_settings(mode, s), rt, tokens, tables, 1, record=True, hints=hints)


def lora_settings(mode, s):
    """s for one of LORA_MODES: with phases (phased) and/or every LoRA option (LORA_OPTIONS) as its name says."""
    s = phased(s) if "phased" in mode else copy.copy(s)
    if "options" in mode:
        for name, value in LORA_OPTIONS.items():
            setattr(s, name, value)
    s.validate(world_size=1)
    return s


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


@pytest.mark.parametrize("mode", LORA_MODES)
def test_lora_ttt_scores_each_documents_first_chunk_with_a_fresh_adapter(mode, setup):
    """A document's first chunk is scored by the unadapted model: nothing learned elsewhere reaches it
    (with b_only its A may come from an earlier document, but B starts at zero). The phases' SGD trains
    the base model alike with or without adapter steps, so with phases the two runs share each base too."""
    s, rt, model, val, tables = setup
    adapted = run(mode, setup).scores.loss
    s.ttt_lora_lr = 0.0
    try:
        frozen = run(mode, setup).scores.loss
    finally:
        s.ttt_lora_lr = 0.01
    starts, lengths = tg.document_spans(val, 1)
    first_chunks = torch.zeros(N + 1, dtype=torch.bool)
    size = LORA_OPTIONS["ttt_short_doc_chunk_size"] if "options" in mode else s.ttt_chunk_size
    for start, length in zip(starts, lengths):
        first_chunks[start + 1:start + 1 + min(length, size)] = True
    assert torch.allclose(adapted[first_chunks], frozen[first_chunks], rtol=0, atol=1e-6)  # no document leaks into another
    assert not torch.allclose(adapted[~first_chunks][1:], frozen[~first_chunks][1:])


@pytest.mark.parametrize("mode", ("ttt_chunk",) + LORA_MODES)
def test_the_guard_stops_training_on_unscored_targets(mode, setup, monkeypatch):
    """With scoring sabotaged (nothing recorded as scored), the first TTT step must refuse to run."""
    monkeypatch.setattr(tg.Scores, "add", lambda self, *args: None)
    with pytest.raises(RuntimeError, match="score-first violated"):
        run(mode, setup)


@pytest.mark.parametrize("mode", ("ttt_lora_phased", "ttt_lora_phased_options"))
def test_phased_ttt_scores_the_whole_prefix_before_training_on_it_and_nothing_after_it(mode, setup, monkeypatch):
    """Every target scored and every target trained on, in order: a phase trains only once every document of
    its prefix is scored, on exactly that prefix's whole chunks, and no later document is scored before it;
    with the LoRA options too (small first chunks, warm-start A across the phases)."""
    s = lora_settings(mode, setup[0])
    C, L, chunks = s.ttt_chunk_tokens, s.eval_seq_len, tg.LoRAChunks.of(s)
    events, step, train, phase = [], tg.lora_step, tg.ttt_train_chunk, tg.PhasedSGD.train

    def step_spy(start, length, chunk, *args):
        for a, n, j in zip(start.tolist(), length.tolist(), chunk.tolist()):
            end = int(chunks.end(j))
            events.append(("score", a + end - int(chunks.size(j)) + 1, a + min(end, n)))
        return step(start, length, chunk, *args)

    def train_spy(train_fn, params, opt, tokens, first, last, *args):
        events.append(("train", first, first + (last - first + 1) // L * L - 1))
        return train(train_fn, params, opt, tokens, first, last, *args)

    def phase_spy(self, k, *args):
        events.append(("phase", k, self.ends[k]))
        return phase(self, k, *args)
    monkeypatch.setattr(tg, "lora_step", step_spy)
    monkeypatch.setattr(tg, "ttt_train_chunk", train_spy)
    monkeypatch.setattr(tg.PhasedSGD, "train", phase_spy)
    run(mode, setup)
    starts, _ = tg.document_spans(setup[3], 1)
    assert [e[1:] for e in events if e[0] == "phase"] == [(0, starts[3]), (1, starts[6])] == [(0, 314), (1, 711)]
    scored, trained = np.zeros(N + 1, bool), {}
    for kind, a, b in events:
        if kind == "score":
            assert not scored[a:b + 1].any()
            scored[a:b + 1] = True
        elif kind == "phase":
            assert scored.nonzero()[0].tolist() == list(range(1, b + 1))  # the prefix, all of it, nothing more
            trained[a] = np.zeros(N + 1, bool)
            current = trained[a]
        else:
            assert scored[a:b + 1].all()
            current[a:b + 1] = True
    assert scored[1:].all()
    for k, end in enumerate((314, 711)):  # every chunk of the prefix but the last, whose learning rate is 0
        assert trained[k].nonzero()[0].tolist() == list(range(1, (-(-end // C) - 1) * C + 1))


def test_a_phase_refuses_to_train_on_an_unscored_target(setup):
    s, rt, model, val, tables = setup
    sgd = tg.PhasedSGD(copy.deepcopy(model).requires_grad_(False), phased(s), rt, tg.document_spans(val, 1)[0], N)
    scores = tg.Scores("cpu", n_targets=N)
    scores.mark(2, sgd.ends[0])
    with pytest.raises(RuntimeError, match="score-first violated"):
        sgd.train(0, val.to(torch.int32), scores)
    scores.mark(1, 1)
    sgd.train(0, val.to(torch.int32), scores)


@pytest.mark.parametrize("mode", LORA_MODES)
def test_lora_documents_enter_in_original_order_and_advance_chunk_by_chunk(mode, setup, monkeypatch):
    step, calls = tg.lora_step, []

    def spy(start, length, chunk, *args):
        calls.append((start.copy(), chunk.copy()))
        return step(start, length, chunk, *args)
    monkeypatch.setattr(tg, "lora_step", spy)
    run(mode, setup)
    starts, lengths = tg.document_spans(setup[3], 1)
    first_seen, next_chunk = [], {}
    for start, chunk in calls:
        for d, j in zip(start.tolist(), chunk.tolist()):
            assert next_chunk.get(d, 0) == j  # each document's chunks in order, each once
            next_chunk[d] = j + 1
            if j == 0:
                first_seen.append(d)
    assert first_seen == starts.tolist()
    C = setup[0].ttt_chunk_size
    if "options" in mode:  # 20 chunks of 5, then of 16
        counts = [-(-n // 5) if n <= 100 else 20 + -(-(n - 100) // C) for n in lengths.tolist()]
    else:
        counts = (-(-lengths // C)).tolist()
    assert [next_chunk[d] for d in starts.tolist()] == counts


@pytest.mark.parametrize("mode", ("ttt_lora_options", "ttt_lora_phased_options"))
def test_warm_start_a_comes_only_from_finished_earlier_documents(mode, setup, monkeypatch):
    """TTT_LORA_RESET=b_only: a document opens in a slot (keeping that slot's A) whose previous document
    came earlier in the stream and had every chunk scored, and no row is updated after its last chunk,
    so an A handed on has learned only from targets scored before the document that inherits it; with
    phases too, where an A also passes from one part of the documents to the next."""
    events = []
    step, adamw = tg.lora_step, tg.AdapterSlots.adamw_

    def step_spy(start, length, chunk, slot, *args):
        events.append(("step", start.copy(), length.copy(), chunk.copy(), slot.copy()))
        return step(start, length, chunk, slot, *args)

    def adamw_spy(self, idx, grad, s):
        events.append(("update", sorted(idx.tolist())))
        return adamw(self, idx, grad, s)
    monkeypatch.setattr(tg, "lora_step", step_spy)
    monkeypatch.setattr(tg.AdapterSlots, "adamw_", adamw_spy)
    run(mode, setup)
    owner, finished, handed_on, expected_updates = {}, set(), 0, []
    for event in events:
        if event[0] == "update":
            assert event[1] == expected_updates.pop(0)
            continue
        assert not expected_updates  # the previous step's update came before this step
        _, start, length, chunk, slot = event
        for doc, j, s in zip(start.tolist(), chunk.tolist(), slot.tolist()):
            if j == 0:
                previous = owner.get(s)
                if previous is not None:
                    assert previous in finished and previous < doc
                    handed_on += 1
                owner[s] = doc
        chunk_end = np.where(chunk < 20, 5 * (chunk + 1), 100 + 16 * (chunk - 19))  # 20 chunks of 5, then 16
        if (chunk_end < length).any():
            expected_updates.append(sorted(slot[chunk_end < length].tolist()))
        finished |= set(start[chunk_end >= length].tolist())
    assert not expected_updates and len(finished) == 8 and handed_on == 6  # all but the first two documents


def test_lora_plan_keeps_documents_in_flight_under_the_cap():
    lengths = np.random.default_rng(0).integers(1, 400, 300)
    plan = tg.lora_plan(lengths, tg.LoRAChunks(16, 64), 4, 10)
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
    sizes = [len(b) for b in tg.lora_plan(lengths, tg.LoRAChunks(16, 256), 4, 200)]
    assert max(sizes) == 16 and sum(sizes) == 400


def test_compile_warm_ups_see_random_tokens_only_and_keep_the_weights(setup):
    s, rt, model, val, tables = setup
    for warm_up in (tg.warm_up_chunk_ttt, tg.warm_up_sgd_steps, tg.warm_up_lora):
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
