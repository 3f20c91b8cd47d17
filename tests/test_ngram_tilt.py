"""The n-gram tilt (NGRAM_TILT): the tilted distribution is a normalised full-vocabulary softmax, a hint
never reads its target or anything after it, the sorted implementation matches a brute-force one, the
tilt off changes no score, and on repetitive text the tilt lowers the loss."""
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from eval_helpers import losses_fn, make, random_model, repeated_stream, tables_for, validation

torch.set_num_threads(1)


# --- references written out the slow way ------------------------------------------------------------


def brute_force_hints(tokens: list, order: int, min_count: int, threshold: float) -> list:
    """hints[t] by looking at every earlier target s < t: its context tokens[s-order:s] and continuation tokens[s]."""
    hints = [-1] * len(tokens)
    for t in range(order, len(tokens)):
        context = tokens[t - order:t]
        followers = [tokens[s] for s in range(order, t) if tokens[s - order:s] == context]
        if not followers:
            continue
        hint = followers[-1]  # what followed the most recent earlier occurrence
        follows = followers.count(hint)
        if follows >= min_count and follows >= threshold * len(followers):
            hints[t] = hint
    return hints


def brute_force_tilted_nll(z: torch.Tensor, target: int, hint: int, beta: float) -> float:
    """-log p'(target) with p'(a) = p(a) exp(beta [a = hint]) / sum_b p(b) exp(beta [b = hint]), in float64."""
    p = torch.softmax(z.double(), -1)
    weights = [math.exp(beta) if a == hint else 1.0 for a in range(len(p))]
    tilted = [float(p[a]) * w for a, w in enumerate(weights)]
    return -math.log(tilted[target] / sum(tilted))


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    s, rt = make(tiny_data, tmp_path_factory.mktemp("ngram"), NGRAM_TILT=1, NGRAM_TILT_ORDER=4)
    _, tables = tables_for(s)
    return s, rt, random_model(s), tables


def hints_of(tokens: torch.Tensor, s) -> torch.Tensor:
    return tg.ngram_hints(tokens, s.ngram_tilt_order, s.ngram_tilt_min_count, s.ngram_tilt_threshold)


# --- (1) normalisation ----------------------------------------------------------------------------------


def test_the_tilted_distribution_sums_to_one_and_is_the_closed_form_tilt():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 384, generator=g, dtype=torch.float64) * 4
    hints = torch.randint(-1, 384, (3, 5), generator=g)
    hints[0, :2] = -1
    beta = 2.0
    tilted = torch.softmax(tg.ngram_tilt(z, hints, beta), -1)
    assert torch.allclose(tilted.sum(-1), torch.ones(3, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    p = torch.softmax(z, -1)
    for b in range(3):
        for k in range(5):
            h = int(hints[b, k])
            if h < 0:
                assert torch.equal(tilted[b, k], p[b, k])  # no hint: the model's own distribution
                continue
            z_norm = 1 + float(p[b, k, h]) * (math.exp(beta) - 1)  # the records' closed-form normaliser
            expected = p[b, k] / z_norm
            expected[h] *= math.exp(beta)
            assert torch.allclose(tilted[b, k], expected, rtol=1e-12, atol=0)


def test_token_losses_with_hints_score_the_tilted_distribution(setup):
    s, rt, model, tables = setup
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 384, (2, 64), generator=g), torch.randint(0, 384, (2, 16), generator=g)
    hints = torch.randint(-1, 384, (2, 16), generator=g)
    hints[0, :4] = y[0, :4]  # right hints too
    with torch.no_grad():
        tilted = model.token_losses(x, y, hints=hints)
        z = model.logits(model.forward_hidden(x)[:, -16:])
    for b in range(2):
        for k in range(16):
            expected = brute_force_tilted_nll(z[b, k], int(y[b, k]), int(hints[b, k]), s.ngram_tilt_beta)
            assert float(tilted[b, k]) == pytest.approx(expected, abs=2e-5)


# --- (2) legality: a hint never reads its target or anything after it ---------------------------------


def test_a_hint_depends_only_on_the_tokens_before_its_target():
    """Alter tokens[t:] (the target t itself and everything after it): hints[0..t] must not change; and the
    alteration does change later hints, so the check can fail."""
    tokens = repeated_stream(37, 600, 384, seed=3)
    tokens[200:260] = torch.randint(4, 20, (60,), generator=torch.Generator().manual_seed(4))  # varied followers
    base = tg.ngram_hints(tokens, 3, 1, 0.5)
    assert (base >= 0).float().mean() > 0.5
    rng = np.random.default_rng(5)
    for t in (3, 40, 111, 222, 380, 599):
        altered = tokens.clone()
        altered[t:] = torch.from_numpy(rng.integers(4, 384, len(tokens) - t))
        hints = tg.ngram_hints(altered, 3, 1, 0.5)
        assert torch.equal(hints[:t + 1], base[:t + 1]), f"t={t}"
        if t < 500:
            assert not torch.equal(hints, base)


def test_the_tilted_distribution_at_t_is_unchanged_when_the_target_and_later_tokens_change(setup):
    """The full tilted distribution of target t (model logits from tokens[t-L:t] and hints[t]) before and
    after tokens[t:] are replaced: identical."""
    s, rt, model, tables = setup
    tokens = repeated_stream(23, 400, 384, seed=6)
    L = s.eval_seq_len

    def distribution(stream, t):
        hints = hints_of(stream, s)
        with torch.no_grad():
            z = model.logits(model.forward_hidden(stream[t - L:t][None]))[:, -1:]
            return torch.softmax(tg.ngram_tilt(z, hints[t:t + 1][None], s.ngram_tilt_beta), -1), int(hints[t])
    for t in (100, 231, 399):
        before, hint = distribution(tokens, t)
        assert hint == int(tokens[t])  # a repeated phrase: the hint is there (and right)
        altered = tokens.clone()
        altered[t:] = (altered[t:] + 1) % 384
        after, _ = distribution(altered, t)
        assert torch.equal(before, after)


def test_prepare_ngram_hints_logs_the_protocol_and_is_off_by_default(tiny_data, tmp_path):
    off, off_rt = make(tiny_data, tmp_path / "off")
    assert not off.ngram_tilt and tg.prepare_ngram_hints(off, off_rt, repeated_stream(5, 50, 384)) is None
    s, rt = make(tiny_data, tmp_path / "on", NGRAM_TILT=1, NGRAM_TILT_ORDER=4)
    hints = tg.prepare_ngram_hints(s, rt, repeated_stream(5, 50, 384))
    assert torch.equal(hints, hints_of(repeated_stream(5, 50, 384), s))
    log = (tmp_path / "on" / "logs" / "eval.txt").read_text()
    assert "ngram_tilt: prefix:stream statistics:targets_before_t context:order_4_tokens" in log
    assert "hinted:0.8200 " in log  # targets 10..50: 1..9 see their context (BOS, then a 5-token phrase) first


# --- (3) the sorted implementation against the brute-force one -----------------------------------------


@pytest.mark.parametrize("order,min_count,threshold,vocab", [(1, 1, 0.0, 3), (2, 1, 0.8, 3), (3, 2, 0.5, 4),
                                                              (5, 1, 0.0, 2), (4, 3, 0.9, 3)])
def test_ngram_hints_match_a_brute_force_reference(order, min_count, threshold, vocab):
    g = torch.Generator().manual_seed(order * 10 + min_count)
    tokens = torch.randint(0, vocab, (300,), generator=g)
    fast = tg.ngram_hints(tokens, order, min_count, threshold)
    slow = brute_force_hints(tokens.tolist(), order, min_count, threshold)
    assert fast.tolist() == slow
    assert 0 < sum(h >= 0 for h in slow) < len(slow) - order  # some hints, and some withheld by the rules


def test_ngram_hints_of_streams_too_short_for_a_context():
    assert tg.ngram_hints(torch.tensor([1, 2, 3]), 3, 1, 0.0).tolist() == [-1, -1, -1]
    assert tg.ngram_hints(torch.tensor([1, 2, 1, 2, 1]), 1, 1, 0.0).tolist() == [-1, -1, -1, 2, 1]


# --- (4) off changes nothing --------------------------------------------------------------------------


def test_no_hint_anywhere_changes_no_score_bit(setup):
    """The tilt with every hint -1 is the identity: the scores equal the untilted pass bit for bit."""
    s, rt, model, tables = setup
    val = validation(s, 500)
    plain = tg.evaluate_windows(losses_fn(model), val, tables, s.eval_seq_len, s.eval_stride, 8, rt, record=True)
    none = torch.full((501,), -1, dtype=torch.long)
    tilted = tg.evaluate_windows(lambda x, y, h: model.token_losses(x, y, hints=h), val, tables, s.eval_seq_len,
                                 s.eval_stride, 8, rt, record=True, hints=none)
    assert torch.equal(plain.scores.loss[1:], tilted.scores.loss[1:]) and plain.loss == tilted.loss


def test_with_the_tilt_off_no_pass_computes_or_passes_hints(tiny_data, tmp_path, monkeypatch):
    s, rt = make(tiny_data, tmp_path)
    sp, tables = tables_for(s)
    monkeypatch.setattr(tg, "ngram_hints", lambda *a: pytest.fail("ngram_hints called with NGRAM_TILT=0"))
    monkeypatch.setattr(tg, "ngram_tilt", lambda *a: pytest.fail("ngram_tilt called with NGRAM_TILT=0"))
    tg.run_evaluation_passes(random_model(s), s, rt, tg.EvalData(sp, tables, validation(s, 300)),
                             passes=["plain", "sliding", "ttt_chunk", "ttt_lora"])


# --- (5) the tilt helps where the text repeats ----------------------------------------------------------


@pytest.mark.parametrize("mode", ("sliding", "ttt_chunk", "ttt_lora"))
def test_on_repetitive_text_the_tilt_lowers_the_loss(mode, setup):
    s, rt, model, tables = setup
    stream = repeated_stream(50, 1000, 384, seed=7)
    hints = hints_of(stream, s)

    def run(h):
        if mode == "sliding":
            return tg.evaluate_windows(lambda x, y, *hh: model.token_losses(x, y, hints=hh[0] if hh else None), stream,
                                       tables, s.eval_seq_len, s.eval_stride, 8, rt, hints=h)
        if mode == "ttt_chunk":
            return tg.evaluate_ttt_chunk(model, s, rt, stream, tables, hints=h)
        return tg.evaluate_ttt_lora(model, s, rt, stream, tables, 1, hints=h)
    plain, tilted = run(None), run(hints)
    assert plain.targets == tilted.targets == 1000
    # ~95% of targets carry a right hint: each gains about beta nats on a model far from sure of them
    assert tilted.loss < plain.loss - 1.0, (plain.loss, tilted.loss)


# --- (6) the LoRA pass with phases and short-document chunks takes the hints everywhere ----------------

PHASED_SHORT_DOCS = dict(TTT_MODE="lora", TTT_LORA_LR=0.01, TTT_PHASES=2, TTT_PHASE_PREFIX_DOCS=6, TTT_PHASE_LR=0.05,
                         TTT_CHUNK_TOKENS=128, TTT_SHORT_DOC_TOKENS=40, TTT_SHORT_DOC_CHUNK_SIZE=8)


def test_every_loss_of_the_phased_lora_pass_with_short_document_chunks_is_tilted(tiny_data, tmp_path, monkeypatch):
    """Ten documents of one repeated phrase: every loss the pass computes (scoring and adapter steps, in small
    and full chunks, and the phases' SGD) gets hints, aligned with its targets (on this text almost every
    hint is its own target), and the tilted pass scores far better."""
    s, rt = make(tiny_data, tmp_path, NGRAM_TILT=1, NGRAM_TILT_ORDER=4, **PHASED_SHORT_DOCS)
    _, tables = tables_for(s)
    model, stream = random_model(s), repeated_stream(50, 1000, 384, seed=7)
    stream[::100] = 1  # a BOS every 100 tokens, in step with the phrase
    hints = hints_of(stream, s)
    calls, token_losses = {"lora": [], "phase": []}, tg.GPT.token_losses

    def spy(self, x, y, lora=None, extra_embedding=None, one_document_per_row=False, hints=None, rope=None):
        calls["phase" if lora is None else "lora"].append(None if hints is None else (hints == y).float().mean())
        return token_losses(self, x, y, lora, extra_embedding, one_document_per_row, hints, rope)
    monkeypatch.setattr(tg.GPT, "token_losses", spy)
    tilted = tg.evaluate_ttt_lora(model, s, rt, stream, tables, 1, hints=hints)
    assert len(calls["phase"]) > 0 and len(calls["lora"]) > 0
    for kind, shares in calls.items():
        assert None not in shares, kind
        assert float(torch.stack(shares).mean()) > 0.8, kind
    monkeypatch.setattr(tg.GPT, "token_losses", token_losses)
    plain = tg.evaluate_ttt_lora(model, s, rt, stream, tables, 1)
    assert plain.targets == tilted.targets == 1000 and tilted.loss < plain.loss - 1.0
    log = (tmp_path / "logs" / "eval.txt").read_text()
    assert "ttt:phase phase:2/2 docs_scored:6 " in log and "small_chunk:8 small_chunked_targets:40 " in log


def test_the_sgd_warm_up_compiles_with_hints_when_tilted(setup):
    """The phases' (and chunk mode's) training graph is warmed up with random int32 hints of the targets'
    shape when tilted, and without any otherwise: the graphs the real steps then call."""
    s, rt, model, tables = setup
    params, seen = list(model.parameters()), []
    for p in params:
        p.grad = torch.zeros_like(p)

    def loss_fn(x, y, *hints):
        seen.append(tuple((h.shape, h.dtype) for h in hints))
        return model.token_losses(x, y, hints=hints[0] if hints else None)
    for tilted in (True, False):
        seen.clear()
        tg.warm_up_sgd_steps(loss_fn, params, s, rt, s.vocab_size, {3, 1}, 0.0, tilted=tilted)
        assert sorted(seen) == sorted([((torch.Size([n, s.eval_seq_len]), torch.int32),) if tilted else ()
                                       for n in (3, 1)])
    assert all(bool((p.grad == 0).all()) for p in params)


def test_on_text_without_repeats_the_tilt_stays_out_of_the_way(setup):
    s, rt, model, tables = setup
    stream = torch.from_numpy(np.random.default_rng(8).permutation(384)[:300].astype(np.int64))
    assert bool((hints_of(stream, s) == -1).all())


def test_settings_refuse_a_tilt_with_nothing_to_tilt_and_out_of_range_values(tiny_data, tmp_path):
    with pytest.raises(tg.UserError, match="NGRAM_TILT=1 tilts the sliding-window and TTT passes, but both are off"):
        make(tiny_data, tmp_path, NGRAM_TILT=1, SLIDING_WINDOW_ENABLED=0, TTT_ENABLED=0)
    for name, value in (("NGRAM_TILT_THRESHOLD", 1.5), ("NGRAM_TILT_BETA", 0), ("NGRAM_TILT_ORDER", 0),
                        ("NGRAM_TILT_MIN_COUNT", 0)):
        with pytest.raises(tg.UserError, match=name):
            make(tiny_data, tmp_path, **{name: value})
