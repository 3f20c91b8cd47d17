"""PRESET and the PR #1204 components: every preset is made of real settings, explicit variables beat it,
the log says what it changed, each preset trains, quantizes and evaluates at tiny size and has the record's
parameter count at full size; each component (BigramHash, SmearGate, value embeddings, untied loop MLPs,
attention-off layers, the step-based loop start) does what it says through the one forward path."""
import re

import pytest
import torch

from conftest import TINY_MODEL, TINY_VOCAB, tg

# model_params of each record's logs (reference-spec §12)
RECORD_PARAMS = {"pr1529": 35_944_602, "pr1477": 35_943_513, "pr1536": 35_944_537, "pr1204": 30_352_046}


def build(env: dict) -> tg.GPT:
    s = tg.Settings(environ=env)
    s.validate(1)
    torch.manual_seed(0)
    return tg.GPT(s)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the preset table -----------------------------------------------------------------------------


def test_every_preset_value_is_a_valid_value_of_a_real_setting():
    assert tg.PRESETS["pr1529"] == {}  # the project defaults are PR #1529's run values
    assert set(tg.PRESETS) == set(tg.SETTINGS_BY_NAME["PRESET"].choices)
    for name, values in tg.PRESETS.items():
        for key, value in values.items():
            setting = tg.SETTINGS_BY_NAME.get(key)
            assert setting is not None, f"{name}: {key} is not a setting"
            assert type(value) is type(setting.default), f"{name}: {key}={value!r} has the wrong type"
            raw = str(int(value)) if isinstance(value, bool) else str(value)
            assert tg._parse_setting(setting, raw) == value, f"{name}: {key}={value!r}"
        tg.Settings(environ={"PRESET": name}).validate(8)


def test_a_preset_sets_defaults_and_explicit_variables_win():
    s = tg.Settings(environ={"PRESET": "pr1477", "LOOP_START": "3", "TTT_LR": ""})  # empty = unset
    assert (s.loop_start, s.loop_end, s.enable_looping_at, s.ttt_lr) == (3, 5, 0.5, 0.005)
    assert s.parallel_residual_mode == "split" and s.hash_embed_enabled is False
    assert tg.Settings(environ={}, preset="pr1204").smear_gate is True  # keyword override picks the preset too
    plain, named = tg.Settings(environ={}), tg.Settings(environ={"PRESET": "pr1529"})
    assert [v for k, v in plain.items() if k != "RUN_ID"] == [v for k, v in named.items() if k != "RUN_ID"]
    with pytest.raises(tg.UserError, match="PRESET='pr9999' is not one of"):
        tg.Settings(environ={"PRESET": "pr9999"})


def test_preset_changes_lists_what_differs_from_the_project_default():
    s = tg.Settings(environ={"PRESET": "pr1477", "SEED": "5"})
    changed = dict(tg.preset_changes(s))
    # a preset may repeat a project default (QK_GAIN_INIT 5.0): it names the record's value either way
    differing = {k: v for k, v in tg.PRESETS["pr1477"].items() if v != tg.SETTINGS_BY_NAME[k].default}
    assert changed == dict(differing, SEED=5) and "QK_GAIN_INIT" not in changed
    assert tg.preset_changes(tg.Settings(environ={})) == []


@pytest.mark.parametrize("name", ["pr1529", "pr1477", "pr1536", "pr1204", "frontier"])
def test_full_size_parameter_count(name):
    """On the meta device: shapes only. pr1204's difference from its record is explained in README.md;
    frontier is pr1529 plus SmearGate's parameters."""
    with torch.device("meta"):
        model = tg.GPT(tg.Settings(environ={"PRESET": name}))
    if name == "frontier":
        assert count(model) == RECORD_PARAMS["pr1529"] + count(model.smear) and count(model.smear) > 0
        return
    if name != "pr1204":
        assert count(model) == RECORD_PARAMS[name]
        return
    # pr1204: the same model without its components, plus each component's own parameters
    s = tg.Settings(environ={"PRESET": "pr1204"})
    with torch.device("meta"):
        bare = tg.GPT(tg.Settings(environ={"PRESET": "pr1204"}, bigram_hash_buckets=0, smear_gate=False,
                                  value_embed_layers="", untie_loop_mlp=False, attn_off_layers=""))
    dim, kv, hidden = s.model_dim, 256, tg.mlp_hidden(s)
    bigram = 2816 * 112 + 112 * dim + 1
    value_embed = s.vocab_size * 128 + 128 * kv + 1 + 2
    untied = 2 * 2 * dim * hidden  # layers 4 and 5 repeated once, fc and proj each
    attention_0 = 2 * dim * dim + 2 * kv * dim + dim + s.num_heads  # layer 0: Q, O, K, V, attn_scale, q_gain
    assert count(model) == count(bare) + bigram + dim + value_embed + untied - attention_0
    readme = (tg.Path(tg.__file__).parent / "README.md").read_text()
    assert f"{count(model):,}" in readme, "README's pr1204 parameter count is stale"


# --- each preset end to end at tiny size ---------------------------------------------------------------

TINY_RUN = dict(TINY_MODEL, ITERATIONS="6", TRAIN_LOG_EVERY="1", EVAL_STRIDE="16", TTT_CHUNK_TOKENS="1024",
                TTT_BATCH_SEQS="3", TTT_EPOCHS="1", HASH_EMBED_SIZE="97", TTT_LORA_RANK="4", TTT_BATCH_DOCS="4",
                TTT_DOCS_IN_FLIGHT="8", TTT_CHUNK_SIZE="16")
# what a preset names that the tiny model cannot have (its layers, its vocabulary), scaled down
TINY_FIT = {"pr1204": dict(VALUE_EMBED_LAYERS="4,5", ENABLE_LOOPING_AT_STEP="3", BIGRAM_HASH_BUCKETS="97",
                           BIGRAM_HASH_DIM="16", VALUE_EMBED_DIM="16", PARALLEL_RESIDUAL_START="4"),
            # the progressive context at the tiny window: 32 tokens, then 64 from half-way
            "frontier": dict(TRAIN_SEQ_SCHEDULE="32@0,64@0.5")}


def run_preset(name: str, tiny_env: dict, **extra):
    env = {**tiny_env, **TINY_RUN, **TINY_FIT.get(name, {}), "PRESET": name, "RUN_ID": name, **extra}
    s = tg.Settings(environ=env)
    rt = tg.Runtime(s)
    results = tg.train_and_evaluate(s, rt) if not s.eval_only else tg.evaluate_artifact(s, rt)
    return results, rt.log_path.read_text().split("\nheader:end\n")[1], env


@pytest.mark.parametrize("name", ["pr1529", "pr1477", "pr1536", "pr1204", "frontier"])
def test_each_preset_trains_quantizes_and_evaluates(name, tiny_env):
    results, log, env = run_preset(name, tiny_env)
    assert results["steps"] == 6 and results["final_val_bpb"] < 8
    assert f"preset name:{name} changed:" in log
    s = tg.Settings(environ=env)
    expected = tg.preset_changes(s)
    names = re.search(r"^preset name:\S+ changed:(\d+) settings:(\S+)$", log, re.M)
    assert int(names.group(1)) == len(expected) and names.group(2).split(",") == [k for k, _ in expected]
    changed = dict(re.findall(r"^preset:changed setting:(\S+) value:(\S+) default:\S+$", log, re.M))
    assert changed == {k: tg.log_value(v) for k, v in expected}  # every value that differs, nothing else
    for key, value in tg.PRESETS[name].items():  # the preset's own values where the tiny run kept them
        if key not in env and value != tg.SETTINGS_BY_NAME[key].default:
            assert changed[key] == tg.log_value(value), key
    passes = {"pr1529": "plain,sliding,ttt_chunk", "pr1477": "plain,sliding,ttt_chunk", "pr1536": "plain,ttt_lora",
              "pr1204": "plain,sliding", "frontier": "plain,ttt_lora"}
    assert re.search(r"^eval_total_time:\S+ passes:(\S+)$", log, re.M).group(1) == passes[name]
    if name == "frontier":  # the progressive context switched to the final window length in the run
        assert re.search(r"^seq_len:switched step:\d+ frac:\S+ seq_len:64 ", log, re.M)
    if name == "pr1204":
        assert re.search(r"^layer_loop:enabled step:3 ", log, re.M)  # the step-based start, not a fraction
        assert re.search(r"^gptq:hessians .* calibration:selfgen ", log, re.M)


def test_an_artifact_carries_its_preset_into_eval_only(tiny_env):
    """EVAL_ONLY without PRESET adopts the stored model settings (SmearGate, BigramHash, ...) and scores
    the artifact exactly as the training run did."""
    trained, _, env = run_preset("pr1204", tiny_env)
    artifact = trained["artifact_path"]
    plain = {k: v for k, v in env.items() if k in TINY_RUN or k in ("DATA_PATH", "TOKENIZER_PATH", "LOG_DIR")}
    s = tg.Settings(environ=dict(plain, EVAL_ONLY=str(artifact), RUN_ID="again"))
    rt = tg.Runtime(s)
    again = tg.evaluate_artifact(s, rt)
    log = rt.log_path.read_text()
    assert "eval_only:adopted setting:SMEAR_GATE value:True" in log
    assert again["final_val_bpb"] == trained["final_val_bpb"]


# --- the components -----------------------------------------------------------------------------------

TINY = dict(TINY_MODEL)


def test_smear_gate_never_looks_back_across_a_bos():
    torch.manual_seed(0)
    smear = tg.SmearGate(8)
    torch.nn.init.normal_(smear.gate)
    ids = torch.randint(4, 50, (2, 12))
    ids[:, 5] = 1  # the BOS
    x = torch.randn(2, 12, 8)
    out = smear(x, ids, 1)
    other_ids, other_x = ids.clone(), x.clone()
    other_ids[:, :5] = torch.randint(4, 50, (2, 5))
    other_x[:, :5] = torch.randn(2, 5, 8)
    other = smear(other_x, other_ids, 1)
    assert torch.equal(out[:, 5:], other[:, 5:])  # nothing before the BOS reaches it or anything after it
    assert torch.equal(out[:, 5], x[:, 5]) and torch.equal(out[:, 0], x[:, 0])  # no look-back at BOS or pos 0
    assert not torch.allclose(out[:, 1:5], x[:, 1:5])  # elsewhere it does mix in the previous position
    g = torch.sigmoid(smear.gate)
    assert torch.allclose(out[:, 7], (1 - g) * x[:, 7] + g * x[:, 6])


def test_smear_gate_and_bigram_hash_run_in_the_one_forward_path():
    """Changing either component's weights changes GPT.forward_hidden, which training, evaluation and TTT share."""
    model = build(dict(TINY, SMEAR_GATE="1", BIGRAM_HASH_BUCKETS="97", BIGRAM_HASH_DIM="16"))
    ids = torch.randint(4, TINY_VOCAB, (2, 16))
    base = model.forward_hidden(ids)
    with torch.no_grad():
        model.smear.gate.fill_(3.0)
    smeared = model.forward_hidden(ids)
    assert not torch.allclose(base, smeared)
    with torch.no_grad():
        model.bigram.table.weight.normal_()
    assert not torch.allclose(smeared, model.forward_hidden(ids))
    # the table starts at zero and still learns from the first step: the projection is not zero
    fresh = build(dict(TINY, BIGRAM_HASH_BUCKETS="97", BIGRAM_HASH_DIM="16"))
    fresh(ids, ids).backward()
    assert fresh.bigram.table.weight.grad.abs().sum() > 0
    buckets = (torch.nn.functional.pad(ids[:, :-1], (1, 0)) * 2039 + ids) % 97  # HashEmbedding's rule
    touched = fresh.bigram.table.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert set(touched) <= set(buckets.flatten().tolist())
    names = {n for n, _ in tg.split_parameters(fresh)[1]}
    assert names == {"tok_emb.weight", "bigram.table.weight"}  # tables train with the embedding's AdamW


def test_value_embeddings_reach_only_their_layers_values():
    model = build(dict(TINY, VALUE_EMBED_LAYERS="4,5", VALUE_EMBED_DIM="16"))
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
    ids = torch.randint(4, TINY_VOCAB, (2, 16))
    base = model.forward_hidden(ids)
    seen = {}

    def record(i):
        def hook(module, inputs, output):
            seen[i] = inputs[1].value  # the LayerContext's value embedding
        return hook
    hooks = [b.attn.register_forward_hook(record(i)) for i, b in enumerate(model.blocks)]
    model.forward_hidden(ids)
    for h in hooks:
        h.remove()
    assert [i for i, v in seen.items() if v is not None] == [4, 5]
    with torch.no_grad():
        model.value_embed.layer_scales[1] = 0.0  # layer 5's scale
    assert not torch.allclose(base, model.forward_hidden(ids))
    with pytest.raises(tg.UserError, match="VALUE_EMBED_LAYERS=4,9 must name distinct layers"):
        build(dict(TINY, VALUE_EMBED_LAYERS="4,9"))


def test_untied_loop_mlps_start_as_copies_and_then_train_apart():
    env = dict(TINY, NUM_LOOPS="1")
    tied, untied = build(env), build(dict(env, UNTIE_LOOP_MLP="1"))
    with torch.no_grad():
        for block in tied.blocks:
            torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
    untied.load_state_dict(tied.state_dict(), strict=False)
    assert len(untied.loop_mlps) == 2  # one extra pass over layers 2-3
    ids = torch.randint(4, TINY_VOCAB, (2, 16))
    tied.looping = True
    untied.start_looping()
    assert torch.allclose(tied.forward_hidden(ids), untied.forward_hidden(ids), atol=1e-6)
    untied(ids, ids).backward()
    assert untied.loop_mlps[0].proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        untied.loop_mlps[1].proj.weight.mul_(2)
    assert not torch.allclose(tied.forward_hidden(ids), untied.forward_hidden(ids), atol=1e-6)
    assert torch.equal(untied.blocks[3].mlp.proj.weight, tied.blocks[3].mlp.proj.weight)
    matrices = {n for n, _ in tg.split_parameters(untied)[0]}
    assert "loop_mlps.0.fc.weight" in matrices and "loop_mlps.1.proj.weight" in matrices  # Muon trains them
    with pytest.raises(tg.UserError, match="UNTIE_LOOP_MLP=1 needs depth recurrence"):
        build(dict(TINY, NUM_LOOPS="0", UNTIE_LOOP_MLP="1"))


def test_attention_off_layers_have_no_attention_and_still_run_lora():
    on, off = build(TINY), build(dict(TINY, ATTN_OFF_LAYERS="0"))
    assert off.blocks[0].attn is None and off.blocks[1].attn is not None
    assert count(on) - count(off) == sum(p.numel() for p in on.blocks[0].attn.parameters()) + 64  # + attn_scale
    ids = torch.randint(4, TINY_VOCAB, (2, 16))
    off(ids, ids).backward()
    # LoRA TTT: layer 0's attention adapters get a zero gradient, not a crash
    layout = tg.LoRALayout(off, 2)
    matrices = layout.matrices(layout.fresh_row(0, "cpu")[None], torch.float32)
    off.token_losses(ids[:1], ids[:1], lora=tg.DocLoRA(layout, matrices)).sum().backward()
    grad = tg.LoRALayout.gradient(matrices)
    assert grad.shape == (1, layout.size) and grad.abs().sum() > 0
    assert off.matmul_flops_per_token(64) < on.matmul_flops_per_token(64)
    with pytest.raises(tg.UserError, match="ATTN_OFF_LAYERS='x' must be comma-separated layer numbers"):
        build(dict(TINY, ATTN_OFF_LAYERS="x"))


@pytest.mark.parametrize("at_step, fraction, expected", [(0, 0.5, 3), (2, 0.99, 2)])
def test_looping_starts_at_a_step_or_a_fraction(tiny_env, at_step, fraction, expected):
    env = dict(tiny_env, ITERATIONS="6", ENABLE_LOOPING_AT=str(fraction), ENABLE_LOOPING_AT_STEP=str(at_step),
               RUN_ID=f"loop{at_step}")
    s = tg.Settings(environ=env)
    trainer = tg.Trainer(s, tg.Runtime(s))
    assert [step for step in range(6) if trainer.loop_due(step, step / 6)][0] == expected


def test_a_loop_switch_that_never_came_still_evaluates_copied_untied_mlps(tiny_env):
    results, log, env = run_preset("pr1204", tiny_env, ENABLE_LOOPING_AT_STEP="100")
    assert "layer_loop:enabled step:" not in log
    assert re.search(r"^layer_loop:evaluation_only steps:6 untied_mlps:copied$", log, re.M)
    model = results["trainer"].model
    loop_start = int(env["LOOP_START"])
    for k, mlp in enumerate(model.loop_mlps):
        assert torch.equal(mlp.fc.weight, model.blocks[loop_start + k].mlp.fc.weight)


@pytest.mark.parametrize("name", ["pr1529", "pr1536"])  # chunk TTT and LoRA TTT
def test_the_attention_output_gate_rides_any_preset_through_every_pass(name, tiny_env):
    results, log, _ = run_preset(name, tiny_env, ATTN_GATE_DIMS="8", RUN_ID=f"gate_{name}")
    assert results["steps"] == 6 and results["final_val_bpb"] < 8
    assert "preset:changed setting:ATTN_GATE_DIMS value:8 default:0" in log


@pytest.mark.parametrize("component", [{}, {"BIGRAM_HASH_BUCKETS": "64"}, {"SMEAR_GATE": "1"},
                                       {"VALUE_EMBED_LAYERS": "9"}, {"UNTIE_LOOP_MLP": "1"},
                                       {"ATTN_OFF_LAYERS": "0"}, {"PRESET": "pr1204"}])
def test_pr1204_components_turn_off_the_inductor_fusion_that_crashed(component):
    """torch 2.11's mix-order reduction fusion crashed PRESET=pr1204's first compiled backward on the H200;
    each of its components turns the fusion off (and says so), the default model keeps it. The config's
    own patch() restores the flag afterwards (monkeypatch's restore left the config proxy broken for the
    next test)."""
    import torch._inductor.config as inductor_config
    before = inductor_config.triton.mix_order_reduction
    with inductor_config.patch({"triton.mix_order_reduction": True}):
        s = tg.Settings(environ={"COMPILE": "1", **component})
        lines = []
        rt = type("LogOnly", (), {"log": lambda self, msg="", console=True: lines.append(msg)})()
        tg.inductor_workarounds(s, rt)
        off = bool(component)
        assert inductor_config.triton.mix_order_reduction is (not off)
        assert lines == (["compile:workaround inductor.triton.mix_order_reduction:off reason:pr1204_components"]
                         if off else [])
        tg.inductor_workarounds(tg.Settings(environ={"COMPILE": "0", **component}), rt)  # nothing compiles
        assert len(lines) == int(off)
    assert inductor_config.triton.mix_order_reduction == before


@pytest.mark.parametrize("name", ["pr1529", "pr1477", "pr1536", "pr1204", "frontier"])
def test_every_preset_is_estimated_inside_the_artifact_limit(name):
    """A preset must not be refused before training, nor be expected to fail when packed: its full-size
    estimate (shapes and quantization settings; within 2% of every artifact measured) fits the limit."""
    s = tg.Settings(environ={"PRESET": name})
    with torch.device("meta"):
        model = tg.GPT(s)
    total = tg.estimate_model_bytes_of(model, s) + tg.code_bytes(s)
    assert total <= s.artifact_limit_bytes, (name, total)
