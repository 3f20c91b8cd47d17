"""QUANTIZATION options of the artifact frontier (issue 14): per-role bits and clips, GPTQ_MIXED_BITS,
AWQ-lite, LQER, ROW_ORDER, COMPRESSOR=zpaq, the measured GPTQ reserve and tools/artifact_frontier.py.

Each option must round-trip exactly through the artifact, and must change what it claims to change."""
import json
import math
import struct
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, TINY_MODEL, subprocess_env
import train_gpt as tg

sys.path.insert(0, str(ROOT / "tools"))
import artifact_frontier as frontier  # noqa: E402

try:
    import zpaq  # noqa: F401
    HAVE_ZPAQ = True
except ImportError:
    HAVE_ZPAQ = False
try:
    import constriction  # noqa: F401
    HAVE_CONSTRICTION = True
except ImportError:
    HAVE_CONSTRICTION = False


def inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs whose columns differ in scale (as activations do), so AWQ and act-order have work to do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    return (torch.randn(n, cols, generator=g) @ mix) * torch.linspace(0.2, 3.0, cols)


def small_state(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    state = {"blocks.0.attn.c_q.weight": 0.02 * torch.randn(48, 64, generator=g),
             "blocks.0.attn.proj.weight": 0.02 * torch.randn(64, 64, generator=g),
             "blocks.0.mlp.fc.weight": 0.02 * torch.randn(96, 64, generator=g),
             "blocks.0.mlp.proj.weight": 0.02 * torch.randn(64, 96, generator=g),
             "tok_emb.weight": torch.randn(100, 64, generator=g),
             "blocks.0.attn_scale": torch.ones(64)}
    hessians = {}
    for i, (name, W) in enumerate(state.items()):
        if W.dim() == 2:
            X = inputs(400, W.shape[1], seed + i) * (1 + i)  # distinct traces per matrix
            hessians[name] = X.T @ X / len(X)
    return state, hessians


def settings(**env) -> tg.Settings:
    return tg.Settings(environ=dict(PASSTHROUGH_MAX_NUMEL="100", **{k.upper(): str(v) for k, v in env.items()}))


def output_error(state, hessians, deq, name) -> float:
    """||X (W - W_hat)^T||^2 / n through the Hessian: trace(E H E^T)."""
    E = (state[name] - deq[name]).float()
    return float(torch.einsum("ij,jk,ik->", E, hessians[name], E))


def test_role_bits_and_clips_fall_back_to_the_matrix_settings():
    s = settings(attn_bits=5, mlp_clip_sigmas=11.5, embed_bits=7)
    w = torch.zeros(64, 64)
    assert tg.quantization_plan("blocks.0.attn.c_k.weight", w, s, True) == ("int", 5, s.matrix_clip_sigmas)
    assert tg.quantization_plan("blocks.3.mlp.fc.weight", w, s, True) == ("int", s.matrix_bits, 11.5)
    assert tg.quantization_plan("tok_emb.weight", w, s, True) == ("int", 7, s.embed_clip_sigmas)
    default = settings()
    assert tg.quantization_plan("blocks.0.attn.c_k.weight", w, default, True) == ("int", 6, 12.85)


def test_per_role_bits_reach_the_grid():
    state, hessians = small_state()
    q = tg.quantize_model(state, hessians, settings(attn_bits=5, mlp_bits=7, embed_bits=7))
    assert q["blocks.0.attn.c_q.weight"].bits == 5 and q["blocks.0.attn.c_q.weight"].data.abs().max() <= 15
    fc = q["blocks.0.mlp.fc.weight"]
    assert fc.bits == 7 and torch.equal(fc.scale, tg.sdclip_scales(state["blocks.0.mlp.fc.weight"], 7, 12.85))
    assert q["tok_emb.weight"].bits == 7 and q["tok_emb.weight"].data.abs().max() <= 63


def test_mixed_bits_give_the_high_bits_to_the_largest_hessian_traces():
    state, hessians = small_state()
    q = tg.quantize_model(state, hessians, settings(gptq_mixed_bits="5,6", gptq_mixed_high_frac=0.5))
    blocks = [n for n in hessians if n != "tok_emb.weight"]
    traces = sorted(blocks, key=lambda n: -float(hessians[n].trace()))
    assert [q[n].bits for n in traces] == [6, 6, 5, 5]
    assert q["tok_emb.weight"].bits == 8  # the embedding keeps EMBED_BITS


@pytest.mark.parametrize("value", ["6", "6,5", "5,6,7", "1,6", "a,b"])
def test_bad_mixed_bits_is_one_line_error(value):
    with pytest.raises(tg.UserError, match="GPTQ_MIXED_BITS"):
        settings(gptq_mixed_bits=value).validate(1)


def test_mixed_bits_and_role_bits_conflict():
    with pytest.raises(tg.UserError, match="unset ATTN_BITS"):
        settings(gptq_mixed_bits="5,6", attn_bits=5).validate(1)


def test_awq_group_rounds_finer_where_the_activations_are_largest():
    state, hessians = small_state()
    name = "blocks.0.mlp.fc.weight"
    s = settings(awq_group=16, awq_bits=8)
    q = tg.quantize_model(state, hessians, s)[name]
    first, count, bits = q.awq
    assert (count, bits) == (16, 8)
    assert first == 48  # the inputs' scale rises with the column index: the last group is the salient one
    grid = q.data[:, first:first + count]
    assert grid.abs().max() > 31 and q.data[:, :first].abs().max() <= 31
    plain = tg.quantize_model(state, hessians, settings())
    cols = slice(first, first + count)
    err_awq = (state[name] - tg.dequantize_state({name: q})[name])[:, cols].abs().mean()
    err_plain = (state[name] - tg.dequantize_state({name: plain[name]})[name])[:, cols].abs().mean()
    assert err_awq < 0.5 * err_plain


def test_lqer_lowers_the_error_of_the_top_k_tensors_only():
    state, hessians = small_state()
    plain = tg.quantize_model(state, hessians, settings(matrix_bits=4))
    corrected = tg.quantize_model(state, hessians, settings(matrix_bits=4, lqer_top_k=2, lqer_rank=4))
    with_lqer = [n for n, qt in corrected.items() if qt.lqer is not None]
    assert len(with_lqer) == 2
    norms = {n: float((state[n] - tg.dequantize_state({n: qt})[n]).norm()) for n, qt in plain.items()
             if qt.kind == "int"}
    assert set(with_lqer) == set(sorted(norms, key=lambda n: -norms[n])[:2])
    for n in with_lqer:
        qa, a_scale, qb, b_scale = corrected[n].lqer
        assert qa.min() >= -2 and qa.max() <= 1 and qb.abs().max() <= 7 and a_scale.numel() == 1
        assert b_scale.shape == (4, math.ceil(state[n].shape[1] / 64))
        after = float((state[n] - tg.dequantize_state({n: corrected[n]})[n]).norm())
        assert after < 0.97 * norms[n], n
        assert torch.equal(corrected[n].data, plain[n].data)  # the correction is added on top of the same GPTQ


OPTIONS = [dict(), dict(attn_bits=5, mlp_bits=7, embed_bits=7, attn_clip_sigmas=13, mlp_clip_sigmas=12),
           dict(gptq_mixed_bits="5,6"), dict(awq_group=16), dict(lqer_top_k=3, lqer_rank=3),
           dict(row_order="similarity"), dict(awq_group=16, lqer_top_k=5, row_order="similarity", embed_bits=7),
           dict(gptq_tcq=1), dict(gptq_tcq=1, gptq_tcq_step=0.5, lqer_top_k=3, row_order="similarity", mlp_bits=5),
           dict(gptq_tcq=1, gptq_tcq_states=64)]


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "zpaq", "ans"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_every_option_round_trips_exactly(options, compressor, monkeypatch):
    if not {"zpaq": HAVE_ZPAQ, "ans": HAVE_CONSTRICTION}.get(compressor, True):
        pytest.skip(f"COMPRESSOR={compressor} needs an optional package that is not installed")
    monkeypatch.setattr(tg, "ZPAQ_BLOCK_BYTES", 1000)  # these streams are a few KB: several zpaq blocks each
    state, hessians = small_state()
    s = settings(**options)
    qstate = tg.quantize_model(state, hessians, s)
    streams = tg.serialize_quantized(qstate, {"MODEL_DIM": 64}, s.row_order)
    blob, _ = tg.pack_artifact(streams, compressor, 2)
    back, stored = tg.unpack_artifact(blob, "test")
    assert stored == {"MODEL_DIM": 64}
    for name, qt in qstate.items():
        other = back[name]
        assert (qt.kind, qt.bits, qt.awq, qt.dtype) == (other.kind, other.bits, other.awq, other.dtype)
        assert torch.equal(qt.data, other.data)
        assert (qt.lqer is None) == (other.lqer is None) and (qt.tcq is None) == (other.tcq is None)
        if qt.tcq is not None:
            assert torch.equal(qt.tcq[0], other.tcq[0]) and qt.tcq[1:] == other.tcq[1:]
        if qt.lqer is not None:
            assert all(torch.equal(a, b) for a, b in zip(qt.lqer, other.lqer))
    ours, theirs = tg.dequantize_state(qstate), tg.dequantize_state(back)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def header_entries(streams) -> list:
    (n,) = struct.unpack_from("<I", streams[0])
    return json.loads(streams[0][4:4 + n])["tensors"]


def test_defaults_write_no_extras_and_options_do():
    state, hessians = small_state()
    plain = tg.serialize_quantized(tg.quantize_model(state, hessians, settings()), {})
    assert all(len(e) == 5 for e in header_entries(plain))
    s = settings(awq_group=16, lqer_top_k=1)
    extras = [e[5] for e in header_entries(tg.serialize_quantized(tg.quantize_model(state, hessians, s), {}))
              if len(e) == 6]
    assert any("awq" in e for e in extras) and sum("lqer" in e for e in extras) == 1


def test_similarity_order_is_a_permutation_that_brings_alike_rows_together():
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-20, 20, (4, 32), generator=g)
    rows = torch.cat([base + torch.randint(-1, 2, (4, 32), generator=g) for _ in range(8)]).to(torch.int8)
    order = tg.similarity_order(rows)
    assert sorted(order.tolist()) == list(range(32))
    chained = rows[order].float()
    assert (chained[1:] - chained[:-1]).abs().sum() < 0.5 * (rows[1:].float() - rows[:-1].float()).abs().sum()


@pytest.mark.parametrize("compressor,package", [("zpaq", "zpaq"), ("ans", "constriction")])
def test_missing_optional_compressor_is_a_one_line_error(monkeypatch, compressor, package):
    monkeypatch.setitem(sys.modules, package, None)  # importing it now raises ImportError
    with pytest.raises(tg.UserError,
                       match=f"COMPRESSOR={compressor} needs the Python package {package}: pip install '{package}>="):
        tg.compress(b"abc", compressor)


@pytest.mark.skipif(not HAVE_ZPAQ, reason="COMPRESSOR=zpaq needs the optional package zpaq")
@pytest.mark.parametrize("length", [0, 1, 4096, 4097, 10_000])
def test_zpaq_streams_are_independent_blocks_that_decode_as_one(monkeypatch, length):
    """Blocks of ZPAQ_BLOCK_BYTES, each a single-thread zpaq archive (bytes that do not depend on the machine),
    concatenated: zpaq.decompress reads the concatenation as one multi-block archive, and decodes its blocks on
    threads of their own (a single 4 MiB block was the critical path of decoding)."""
    import zpaq
    monkeypatch.setattr(tg, "ZPAQ_BLOCK_BYTES", 4096)
    g = torch.Generator().manual_seed(length)
    data = torch.clamp(torch.round(5 * torch.randn(length, generator=g)), -31, 31).to(torch.int8).numpy().tobytes()
    packed = tg.compress(data, "zpaq")
    blocks = [data[i:i + 4096] for i in range(0, length, 4096)] or [data]
    assert packed == b"".join(zpaq.compress(block, level=5, threads=1) for block in blocks)
    assert tg.decompress(packed, "zpaq") == data


@pytest.mark.skipif(not HAVE_CONSTRICTION, reason="COMPRESSOR=ans needs the optional package constriction")
@pytest.mark.parametrize("data", [b"", b"\x05", b"\x05" * 9, bytes(range(256)) * 3, bytes([255, 1]) * 5])
def test_ans_round_trips_edge_cases(data):
    assert tg.decompress(tg.compress(data, "ans"), "ans") == data


@pytest.mark.skipif(not HAVE_CONSTRICTION, reason="COMPRESSOR=ans needs the optional package constriction")
def test_ans_reaches_the_order0_entropy_of_grid_values():
    g = torch.Generator().manual_seed(0)
    grid = torch.clamp(torch.round(2.4 * torch.randn(1 << 18, generator=g)), -31, 31).to(torch.int8)
    counts = torch.bincount((grid.long() + 31)).double()
    p = counts[counts > 0] / counts.sum()
    entropy_bytes = float(-(p * p.log2()).sum()) * grid.numel() / 8
    size = len(tg.compress(grid.numpy().tobytes(), "ans"))
    assert entropy_bytes < size < 1.002 * entropy_bytes + 200


def test_measured_reserve_projects_the_calibration_batches(tiny_env):
    s = tg.Settings(environ=dict(tiny_env, MAX_WALLCLOCK_SECONDS="600", GPTQ_CALIBRATION_BATCHES="40"))
    trainer = tg.Trainer(s, tg.Runtime(s))
    reserve, how = tg.calibration_reserve(trainer)
    per_batch = float(how.split("measured_batch_seconds:")[1].split()[0])
    fixed = float(how.split("fixed_seconds:")[1].split()[0])
    assert reserve == pytest.approx(1.25 * (fixed + 40 * per_batch) + 1.0, rel=0.01, abs=0.01)
    # the projection is honest: the real calibration of 40 micro-batches takes no longer than the reserve
    t0 = tg.time.perf_counter()
    tg.collect_hessians(trainer.model, tg.calibration_batches(trainer.new_loader(), 40), trainer.rt)
    assert tg.time.perf_counter() - t0 < reserve


def test_training_loop_stops_early_by_the_measured_reserve(tiny_env):
    s = tg.Settings(environ=dict(tiny_env, MAX_WALLCLOCK_SECONDS="600", ITERATIONS="2"))
    rt = tg.Runtime(s)
    trainer = tg.Trainer(s, rt)
    trainer.train()
    log = rt.log_path.read_text().split("\nheader:end\n")[-1]
    reserve = float(log.split("gptq:reserve seconds:")[1].split()[0])
    assert 1.0 <= reserve < 60 and trainer.reserve == pytest.approx(reserve, abs=0.05)
    assert f"gptq_reserve_seconds:{trainer.reserve:.0f} training_cap_ms:{(600 - trainer.reserve) * 1000:.0f}" in log


def test_measured_reserve_that_does_not_fit_stops_before_training(tiny_env):
    s = tg.Settings(environ=dict(tiny_env, MAX_WALLCLOCK_SECONDS="0.5", GPTQ_CALIBRATION="selfgen",
                                 GPTQ_CALIBRATION_BATCHES="64"))
    with pytest.raises(tg.UserError, match="projected to take .* GPTQ_CALIBRATION_BATCHES"):
        tg.Trainer(s, tg.Runtime(s)).train()


def run(env: dict):
    r = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=subprocess_env(env), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


EVAL_ONLY_OPTIONS = {
    "awq": (dict(ATTN_BITS="5", EMBED_BITS="7", MLP_CLIP_SIGMAS="11", AWQ_GROUP="16", LQER_TOP_K="3",
                 ROW_ORDER="similarity", COMPRESSOR="ans" if HAVE_CONSTRICTION else "lzma"), ["int5x", "int7x1"]),
    "tcq": (dict(GPTQ_TCQ="1", GPTQ_TCQ_STEP="0.5", ATTN_BITS="5", EMBED_BITS="7", LQER_TOP_K="3",
                 ROW_ORDER="similarity"), ["int5x", "int7x1", "tcq_step:0.5 tcq_states:8"]),
    "tcq32": (dict(GPTQ_TCQ="1", GPTQ_TCQ_STATES="32", GPTQ_TCQ_STEP="0.58"), ["tcq_step:0.58 tcq_states:32"]),
}


@pytest.mark.parametrize("case", list(EVAL_ONLY_OPTIONS))
def test_eval_only_reproduces_a_run_with_every_option(case, tiny_data, tmp_path):
    options, expected = EVAL_ONLY_OPTIONS[case]
    env = dict(TINY_MODEL, **options, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(tmp_path), ITERATIONS="3", RUN_ID="opts", TTT_ENABLED="0", SLIDING_WINDOW_ENABLED="0",
               SAVE_CHECKPOINT=str(tmp_path / "ck.pt"))
    run(env)
    log = (tmp_path / "opts.txt").read_text()
    assert all(x in log for x in expected), expected
    eval_env = dict(TINY_MODEL, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
                    LOG_DIR=str(tmp_path), RUN_ID="again", EVAL_ONLY=str(tmp_path / "opts.ptz"))
    run(eval_env)
    # the decoder travels in the shipped form: the packed script (tools/pack_submission.py) scores it alike
    sys.path.insert(0, str(ROOT / "tools"))
    import pack_submission
    pack_submission.main(["--out", str(tmp_path / "packed" / "train_gpt.py")])
    r = subprocess.run([sys.executable, str(tmp_path / "packed" / "train_gpt.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=subprocess_env(dict(eval_env, RUN_ID="shipped")))
    assert r.returncode == 0, r.stderr[-3000:]

    def quantized(text):
        return [x.split(" eval_time")[0] for x in text.splitlines() if x.startswith("quantized ")][-1]
    assert quantized((tmp_path / "again.txt").read_text()) == quantized(log)
    assert quantized((tmp_path / "shipped.txt").read_text()) == quantized(log)


def test_frontier_tool_base_row_is_the_training_run_artifact(tiny_data, tmp_path):
    """tools/artifact_frontier.py on a tiny checkpoint: its base row packs byte for byte the artifact the training
    run wrote (same Hessians, same settings header), and its tax is that run's, measured on the same prefix."""
    env = dict(TINY_MODEL, DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(tmp_path), ITERATIONS="3", RUN_ID="ck", TTT_ENABLED="0", SLIDING_WINDOW_ENABLED="0",
               SAVE_CHECKPOINT=str(tmp_path / "ck.pt"))
    run(env)
    log = (tmp_path / "ck.txt").read_text().split("\nheader:end\n")[-1]  # events only, not the logged source
    model_bytes = int(log.split("artifact: model_bytes:")[1].split()[0])
    tax = float(log.split("quantization_tax bpb:")[1].split()[0])
    out = tmp_path / "frontier.md"
    tool_env = {k: v for k, v in env.items() if k not in ("SAVE_CHECKPOINT", "RUN_ID")}
    r = subprocess.run([sys.executable, "tools/artifact_frontier.py", "--checkpoint", str(tmp_path / "ck.pt"),
                        "--combo", "base=", "--combo", "e7=EMBED_BITS=7,LQER_TOP_K=2", "--combo", "z=COMPRESSOR=zpaq",
                        "--val-tokens", "100000000", "--out", str(out)],
                       cwd=ROOT, env=subprocess_env(tool_env), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| combination", "| ---"))}
    assert int(rows["base"][2].replace(",", "")) == model_bytes
    assert float(rows["base"][5]) == pytest.approx(tax, abs=2e-6)
    assert int(rows["e7"][2].replace(",", "")) != model_bytes
    for row in rows.values():  # the last column: train_gpt.py's estimate, and how far it is from the bytes
        estimate, miss = row[10].strip("| ").split()
        assert abs(int(estimate.replace(",", "")) / int(row[2].replace(",", "")) - 1) < 0.10, row
        assert miss.startswith("(") and miss.endswith("%)")
    assert ("z" in rows) == HAVE_ZPAQ and ("skipped z" in r.stderr) != HAVE_ZPAQ
    assert "partial" not in out.read_text()
    # a budget that the first row already spends: that row is measured and written, the next one never starts
    r = subprocess.run([sys.executable, "tools/artifact_frontier.py", "--checkpoint", str(tmp_path / "ck.pt"),
                        "--combo", "base=", "--combo", "e7=EMBED_BITS=7", "--budget-seconds", "0.001",
                        "--out", str(out)], cwd=ROOT, env=subprocess_env(tool_env), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "| base |" in text and "| e7 |" not in text and "budget: 0 s would be exceeded by e7" in text
    base_line = next(line for line in text.splitlines() if line.startswith("| base |"))
    # the next call resumes: base is kept as measured (not measured again), e7 is measured now
    r = subprocess.run([sys.executable, "tools/artifact_frontier.py", "--checkpoint", str(tmp_path / "ck.pt"),
                        "--combo", "base=", "--combo", "e7=EMBED_BITS=7", "--out", str(out), "--resume"],
                       cwd=ROOT, env=subprocess_env(tool_env), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "combo:base resumed" in r.stdout and "combo:e7 model_bytes:" in r.stdout
    assert base_line in text and "| e7 |" in text and "1 of these rows were measured by an earlier call" in text
    # a row whose settings changed is measured again
    r = subprocess.run([sys.executable, "tools/artifact_frontier.py", "--checkpoint", str(tmp_path / "ck.pt"),
                        "--combo", "base=", "--combo", "e7=EMBED_BITS=7,EMBED_CLIP_SIGMAS=15", "--out", str(out),
                        "--resume"], cwd=ROOT, env=subprocess_env(tool_env), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "combo:base resumed" in r.stdout and "combo:e7 model_bytes:" in r.stdout


def test_frontier_resume_keeps_rows_only_of_the_same_checkpoint_prefix_and_source(tmp_path):
    out = tmp_path / "f.md"
    measured_on = {"checkpoint_sha256": "c" * 64, "val_tokens": 1000, "source_sha256": tg.source_sha256()}
    frontier.sidecar(out).write_text(json.dumps({**measured_on, "rows": [{"name": "base", "settings": "(defaults)"}]}))
    assert list(frontier.resumable_rows(out, measured_on)) == ["base"]
    for key, other in (("checkpoint_sha256", "d" * 64), ("val_tokens", 2000), ("source_sha256", "e" * 64)):
        assert frontier.resumable_rows(out, {**measured_on, key: other}) == {}
    assert frontier.resumable_rows(tmp_path / "none.md", measured_on) == {}


def test_frontier_tool_refuses_a_non_quantization_setting():
    r = subprocess.run([sys.executable, "tools/artifact_frontier.py", "--checkpoint", __file__, "--combo",
                        "x=MODEL_DIM=128"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a quantization setting" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_incompatible_compressor_package_fails_before_training(monkeypatch, tiny_env):
    # zpaq 0.0.x installs under the same name and has compress(data, level) only: the run must stop at
    # validation with the version to install, not after training when the artifact is packed
    old_zpaq = types.ModuleType("zpaq")
    old_zpaq.compress = lambda data, level=5: bytes(data)
    old_zpaq.decompress = lambda data: bytes(data)
    monkeypatch.setitem(sys.modules, "zpaq", old_zpaq)
    tg.check_compressor.cache_clear()
    try:
        s = tg.Settings(environ=dict(tiny_env, COMPRESSOR="zpaq"))
        with pytest.raises(tg.UserError, match=r"COMPRESSOR=zpaq: the installed package failed a test round trip "
                                               r"\(TypeError: .*\); pip install -U 'zpaq>=0.3.7'"):
            s.validate(1)
    finally:
        tg.check_compressor.cache_clear()


def test_a_missing_compressor_package_fails_at_validation(monkeypatch, tiny_env):
    monkeypatch.setitem(sys.modules, "constriction", None)
    tg.check_compressor.cache_clear()
    try:
        with pytest.raises(tg.UserError, match="COMPRESSOR=ans needs the Python package constriction"):
            tg.Settings(environ=dict(tiny_env, COMPRESSOR="ans")).validate(1)
    finally:
        tg.check_compressor.cache_clear()


def test_frontier_combo_values_may_hold_commas():
    name, combo = frontier.parse_combo("m=GPTQ_MIXED_BITS=5,6,ROW_ORDER=similarity,GPTQ_MIXED_HIGH_FRAC=0.75")
    assert name == "m" and combo == {"GPTQ_MIXED_BITS": "5,6", "ROW_ORDER": "similarity",
                                     "GPTQ_MIXED_HIGH_FRAC": "0.75"}
    with pytest.raises(SystemExit, match="not a quantization setting"):
        frontier.parse_combo("m=5,6")
