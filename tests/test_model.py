"""MODEL section: every residual mode against a plainly written reference, the recurrence schedule,
the parameter count of the full configuration, and the pieces (RoPE, XSA)."""
import math

import pytest
import torch

from conftest import TINY_MODEL, tg

# ------------------------------------------------------------------------------------------------
# A plain float64 reference of the forward pass, written from the spec, loops and all.


def ref_rmsnorm(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)


def ref_rope(x, rope_dims, base):
    """x [T, H, D]: rotate pairs (j, j + rope_dims/2) for j < rope_dims/2 by angle t * base^(-2j/rope_dims)."""
    out = x.clone()
    half = rope_dims // 2
    for t in range(x.shape[0]):
        for j in range(half):
            angle = t * base ** (-2 * j / rope_dims)
            c, s = math.cos(angle), math.sin(angle)
            x1, x2 = x[t, :, j], x[t, :, j + half]
            out[t, :, j], out[t, :, j + half] = x1 * c + x2 * s, -x1 * s + x2 * c
    return out


def ref_attention(attn, x, s):
    T = x.shape[0]
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    w = lambda lin: lin.weight.detach().double()  # noqa: E731
    q = ref_rmsnorm((x @ w(attn.c_q).T).view(T, H, D))
    k = ref_rmsnorm((x @ w(attn.c_k).T).view(T, Hkv, D))
    v = (x @ w(attn.c_v).T).view(T, Hkv, D)
    q = ref_rope(q, s.rope_dims, s.rope_base) * attn.q_gain.detach().double()[None, :, None]
    k = ref_rope(k, s.rope_dims, s.rope_base)
    y = torch.zeros(T, H, D, dtype=torch.float64)
    for h in range(H):
        g = h // (H // Hkv)
        scores = q[:, h] @ k[:, g].T / math.sqrt(D)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y[:, h] = torch.softmax(scores, -1) @ v[:, g]
        if attn.use_xsa:
            v_hat = v[:, g] / v[:, g].norm(dim=-1, keepdim=True)
            y[:, h] -= (y[:, h] * v_hat).sum(-1, keepdim=True) * v_hat
    return y.reshape(T, H * D) @ w(attn.proj).T


def ref_mlp(mlp, x):
    h = x @ mlp.fc.weight.detach().double().T
    h = torch.where(h > 0, h, 0.5 * h) ** 2
    return h @ mlp.proj.weight.detach().double().T


def ref_parts(block, layer):
    p = lambda t: t.detach().double()  # noqa: E731
    scale = 1 / math.sqrt(layer + 1)
    mix = lambda a, x0: p(block.resid_mix)[0] * a + p(block.resid_mix)[1] * x0  # noqa: E731
    attn = lambda h, s: p(block.attn_scale) * ref_attention(block.attn, ref_rmsnorm(h) * scale, s)  # noqa: E731
    mlp = lambda h: p(block.mlp_scale) * ref_mlp(block.mlp, ref_rmsnorm(h) * scale)  # noqa: E731
    return mix, attn, mlp


def ref_forward(model, ids, schedule, mode, start):
    s = model.settings
    x = ref_rmsnorm(model.tok_emb.weight.detach().double()[ids])
    x0 = x
    sw, sg = model.skip_weights.detach().double(), model.skip_gates.detach().double()

    def skip(a, sk, j):
        g = torch.sigmoid(sg[j])
        return g * a + (1 - g) * (sw[j] * sk)

    n_enc = len(schedule) // 2
    stack = []
    for i in schedule[:n_enc]:
        mix, attn, mlp = ref_parts(model.blocks[i], i)
        x_in = mix(x, x0)
        x_mid = x_in + attn(x_in, s)
        x = x_mid + mlp(x_mid)
        stack.append(x)
    lane0 = lane1 = None
    for j, i in enumerate(schedule[n_enc:]):
        mix, attn, mlp = ref_parts(model.blocks[i], i)
        sk = stack.pop() if (j < sw.shape[0] and stack) else None
        two_lane = mode != "off" and i >= start
        if sk is not None:
            if lane0 is None:
                x = skip(x, sk, j)
            elif mode == "sequential":
                lane0, lane1 = skip(lane0, sk, j), skip(lane1, sk, j)
            else:
                lane0 = skip(lane0, sk, j)
        if not two_lane:
            x_in = mix(x, x0)
            x_mid = x_in + attn(x_in, s)
            x = x_mid + mlp(x_mid)
            continue
        if lane0 is None:
            lane0, lane1 = x, x
        if mode == "split":
            x_in = mix(lane0, x0)
            lane0, lane1 = x_in + attn(x_in, s), lane1 + mlp(lane1)
            continue
        R = model.parallel_resid_lambdas.detach().double()[i]
        P = model.parallel_post_lambdas.detach().double()[i]
        a = attn(mix(lane0, x0), s)
        if mode == "full":
            m = mlp(lane1)
            lane0, lane1 = R[0] * lane0 + P[0, 0] * a + P[1, 0] * m, R[1] * lane1 + P[0, 1] * a + P[1, 1] * m
        else:  # sequential
            lane0, lane1 = R[0] * lane0 + P[0, 0] * a, R[0] * lane1 + P[0, 1] * a
            m = mlp(mix(lane1, x0))
            lane0, lane1 = R[1] * lane0 + P[1, 0] * m, R[1] * lane1 + P[1, 1] * m
    if lane0 is not None:
        if mode == "split":
            lam = model.lane_merge.detach().double()
            x = lam * lane0 + (1 - lam) * lane1
        else:
            x = 0.5 * (lane0 + lane1)
    return ref_rmsnorm(x)


def randomized_model(mode, seed=0):
    s = tg.Settings(environ=dict(TINY_MODEL, PARALLEL_RESIDUAL_MODE=mode))
    torch.manual_seed(seed)
    model = tg.GPT(s)
    with torch.no_grad():  # move every parameter off its initial value so no term can hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim < 2 else 0.08))
    return model


@pytest.mark.parametrize("mode", ["full", "split", "sequential", "off"])
@pytest.mark.parametrize("looping", [False, True])
def test_each_residual_mode_matches_the_reference(mode, looping):
    model = randomized_model(mode)
    model.looping = looping
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(1))
    expected_schedule = [0, 1, 2, 3, 2, 3, 2, 3, 4, 5] if looping else [0, 1, 2, 3, 4, 5]
    assert list(model.schedule()) == expected_schedule
    got = model.forward_hidden(ids)[0].double()
    want = ref_forward(model, ids[0], expected_schedule, mode, start=4)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_modes_really_differ():
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(2))
    outs = {}
    for mode in ["full", "split", "sequential", "off"]:
        model = randomized_model(mode)
        outs[mode] = model.forward_hidden(ids)
    modes = list(outs)
    for a in range(len(modes)):
        for b in range(a + 1, len(modes)):
            assert not torch.allclose(outs[modes[a]], outs[modes[b]], atol=1e-3), (modes[a], modes[b])


@pytest.mark.parametrize("args,expected", [
    ((11, 2, 3, 5, True), [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]),   # PR #1529
    ((11, 1, 4, 5, True), [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]),               # PR #1204-like
    ((11, 2, 4, 5, True), [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10]),         # PR #1394/#1477
    ((11, 2, 3, 5, False), list(range(11))),                                       # before activation
    ((11, 0, 3, 5, True), list(range(11))),                                        # NUM_LOOPS=0
    ((4, 3, 0, 0, True), [0, 0, 0, 0, 1, 2, 3]),                                   # loop the first layer
    ((4, 1, 3, 3, True), [0, 1, 2, 3, 3]),                                         # loop the last layer
])
def test_recurrence_schedule(args, expected):
    assert list(tg.virtual_layers(*args)) == expected


def test_full_config_parameter_count_and_skip_layout():
    model = tg.GPT(tg.Settings(environ={}))
    assert sum(p.numel() for p in model.parameters()) == 35_944_602  # PR #1529's logged model_params
    assert tuple(model.skip_weights.shape) == (8, 512)
    model.looping = True
    assert model.parallel_positions(model.schedule()) == [14, 15, 16]


def test_two_lane_blocks_in_the_encoder_are_rejected():
    with pytest.raises(tg.UserError, match="PARALLEL_RESIDUAL_START=3"):
        tg.GPT(tg.Settings(environ=dict(TINY_MODEL, PARALLEL_RESIDUAL_START="3")))


def test_partial_rope_rotates_only_its_dims_and_keeps_norms():
    x = torch.randn(1, 10, 2, 16)
    cos, sin = tg.rope_tables(10, 8, 10000.0, 2048, x.device, x.dtype)
    y = tg.apply_partial_rope(x, cos, sin)
    torch.testing.assert_close(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated


def test_xsa_output_is_orthogonal_to_the_own_value_vector():
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = tg.exclusive_self_attention(y, v)
    v_hat = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5


def test_zero_initialised_projections_make_blocks_start_as_identity():
    model = tg.GPT(tg.Settings(environ=dict(TINY_MODEL, PARALLEL_RESIDUAL_MODE="off")))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    x = torch.randn(1, 6, 64)
    assert torch.equal(model.blocks[0](x, torch.zeros_like(x), tg.LayerContext((torch.ones(6, 4), torch.zeros(6, 4)), model.bind_attention(None, 1))), x)


# ------------------------------------------------------------------------------------------------
# ATTN_GATE_DIMS: the sparse attention output gate


def gated_pair(dims: int = 8):
    """Two tiny models with the same weights, one with the output gate: (plain, gated, settings)."""
    env = dict(TINY_MODEL, PARALLEL_RESIDUAL_MODE="off")
    torch.manual_seed(0)
    plain = tg.GPT(tg.Settings(environ=env))
    gated_settings = tg.Settings(environ=dict(env, ATTN_GATE_DIMS=str(dims)))
    gated = tg.GPT(gated_settings)
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith("attn.out_gate") for k in missing)
    with torch.no_grad():  # a non-zero output projection, so the attention output shows
        for a, b in zip(plain.blocks, gated.blocks):
            a.attn.proj.weight.normal_(0, 0.02)
            b.attn.proj.weight.copy_(a.attn.proj.weight)
    return plain, gated, gated_settings


def test_the_output_gate_starts_at_one_half_of_each_heads_output():
    plain, gated, _ = gated_pair()
    x = torch.randn(2, 16, 64)
    ctx = tg.LayerContext((torch.ones(16, 4), torch.zeros(16, 4)), plain.bind_attention(None, 1))
    with torch.no_grad():
        assert torch.allclose(gated.blocks[0].attn(x, ctx), 0.5 * plain.blocks[0].attn(x, ctx), atol=1e-6)


def test_the_output_gate_weights_each_head_by_the_first_dims_of_its_input():
    plain, gated, _ = gated_pair(dims=8)
    attn_p, attn_g = plain.blocks[0].attn, gated.blocks[0].attn
    with torch.no_grad():
        attn_g.out_gate.normal_()
    x = torch.randn(1, 16, 64)
    ctx = tg.LayerContext((torch.ones(16, 4), torch.zeros(16, 4)), plain.bind_attention(None, 1))
    # the ungated head outputs, by running the plain module with its projection replaced by the identity
    captured = {}
    attn_p.proj.register_forward_hook(lambda m, inp, out: captured.setdefault("y", inp[0]))
    with torch.no_grad():
        attn_p(x, ctx)
        y = captured["y"].view(1, 16, 4, 16)
        gate = torch.sigmoid(torch.einsum("btd,hd->bth", x[..., :8], attn_g.out_gate))
        expected = (y * gate[..., None]).reshape(1, 16, 64) @ attn_g.proj.weight.T
        assert torch.allclose(attn_g(x, ctx), expected, atol=1e-5)


def test_the_output_gate_trains_with_adamw_and_counts_its_parameters():
    plain, gated, s = gated_pair(dims=8)
    extra = sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == s.num_layers * s.num_heads * 8
    matrices, _, scalars = tg.split_parameters(gated)
    assert all(not n.endswith("out_gate") for n, _ in matrices)
    assert sum(n.endswith("out_gate") for n, _ in scalars) == s.num_layers
    with pytest.raises(tg.UserError, match="ATTN_GATE_DIMS=65 must be at most MODEL_DIM=64"):
        tg.Settings(environ=dict(TINY_MODEL, ATTN_GATE_DIMS="65")).validate(world_size=1)
