"""OPTIMIZER section: Newton-Schulz, the Muon update, clipping, schedules, EMA."""
import math

import pytest
import torch

from conftest import TINY_MODEL, tg


@pytest.mark.parametrize("coeffs,low,high", [("quintic", 0.6, 1.25), ("polar_express", 0.8, 1.2)])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 48, 96)])
def test_newton_schulz_singular_values_are_near_one(coeffs, low, high, shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = tg.newton_schulz(G, 5, tg.NS_COEFFICIENTS[coeffs])
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    sv = torch.linalg.svdvals(X.float())
    assert sv.min() > low and sv.max() < high, (sv.min(), sv.max())
    # it orthogonalises G itself: close in direction to the exact polar factor U V^T
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    cos = (X.double() * (U @ Vh)).sum((-2, -1)) / (X.double().norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert (cos > 0.97).all()


def test_more_iterations_do_not_diverge():
    X = tg.newton_schulz(torch.randn(32, 64), 12, tg.NS_COEFFICIENTS["quintic"])
    assert torch.isfinite(X.float()).all() and torch.linalg.svdvals(X.float()).max() < 1.3


def test_lr_multiplier_is_flat_then_linear_to_the_floor():
    f = lambda frac, floor=0.0: tg.lr_multiplier(frac, 0.667, floor)  # noqa: E731
    assert f(0.0) == 1.0 and f(0.33) == 1.0
    assert f(1 - 0.667 / 2) == pytest.approx(0.5)
    assert f(1.0) == 0.0 and f(1.0, 0.1) == 0.1 and f(0.999, 0.1) == 0.1
    assert tg.lr_multiplier(0.9, 0.0, 0.0) == 1.0


def _tiny_optimizers(**env):
    s = tg.Settings(environ=dict(TINY_MODEL, **env))
    rt = type("RT", (), dict(rank=0, world_size=1, device=torch.device("cpu")))()
    torch.manual_seed(0)
    model = tg.GPT(s)
    return s, model, tg.Optimizers(model, s, rt)


def test_momentum_warmup():
    s, _, opt = _tiny_optimizers()
    assert opt.momentum_at(0) == pytest.approx(0.92)
    assert opt.momentum_at(750) == pytest.approx(0.945)
    assert opt.momentum_at(1500) == pytest.approx(0.97) and opt.momentum_at(10**6) == pytest.approx(0.97)


def test_parameter_groups_cover_everything_once():
    s, model, opt = _tiny_optimizers()
    matrices, embedding, scalars = tg.split_parameters(model)
    names = [n for n, _ in matrices + embedding + scalars]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n, _ in matrices)
    assert [n for n, _ in embedding] == ["tok_emb.weight"]
    assert {"skip_weights", "skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas"} <= set(names)
    groups = opt.muon.groups
    assert sum(len(g) for g in groups) == len(matrices)
    assert all(len({tuple(p.shape) for p in g}) == 1 for g in groups)


def test_muon_step_matches_a_hand_computed_update():
    s, model, opt = _tiny_optimizers(GRAD_CLIP_NORM="0")
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    group = opt.muon.groups[0]
    before = [p.detach().clone() for p in group]
    grads = [p.grad.clone() for p in group]
    opt.step(step=0, lr_mul=0.5)
    lr, mu, wd = s.matrix_lr * 0.5, 0.92, s.muon_wd
    rows, cols = group[0].shape
    # zero momentum buffer: buf = g, Nesterov u = g + mu * buf, then MuonEq-R row normalisation.
    # (Written as add(alpha=) like the optimizer: Newton-Schulz runs in bf16, so a one-ulp fp32
    # difference in its input can move the result by far more than the tolerance.)
    u = torch.stack([g.add(g, alpha=mu) for g in grads])
    u = u / u.norm(dim=-1, keepdim=True)
    ortho = tg.newton_schulz(u, 5, tg.NS_COEFFICIENTS["quintic"]).float()
    for p0, o, p1 in zip(before, ortho, group):
        want = p0 * (1 - lr * wd) - lr * max(1, rows / cols) ** 0.5 * o
        torch.testing.assert_close(p1.detach(), want, rtol=1e-6, atol=1e-7)
    assert max(1, rows / cols) > 1 or any(max(1, g[0].shape[0] / g[0].shape[1]) > 1 for g in opt.muon.groups)


def test_global_norm_clipping_scales_adam_gradients():
    s, model, opt = _tiny_optimizers(GRAD_CLIP_NORM="0.3")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    want_norm = math.sqrt(sum(p.numel() for p in model.parameters())) * 0.01
    norm = opt.step(step=0, lr_mul=1.0)
    assert norm.item() == pytest.approx(want_norm, rel=1e-4)
    emb = model.tok_emb.weight.grad  # Adam sees the clipped gradient
    assert emb.flatten()[0].item() == pytest.approx(0.01 * 0.3 / want_norm, rel=1e-4)


def test_ema_tracks_the_weights():
    model = torch.nn.Linear(3, 3)
    ema = tg.EMA(model, 0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    ema.copy_to_model()
    torch.testing.assert_close(model.weight.detach(), start + 0.1)


def test_ema_warmup_weights_each_step_as_its_decay_schedule_says():
    # the average, written out as weights: w_k enters with (1 - d_k) and then decays by every later d_j
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = tg.EMA(model, 0.99, warmup=True)
    values = [float(v) for v in torch.randn(40, generator=torch.Generator().manual_seed(0))]
    decays = [min(0.99, (1 + n) / (10 + n)) for n in range(len(values))]
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update()
    expected, initial_share = 0.0, 1.0
    for k, v in enumerate(values):
        later = 1.0
        for d in decays[k + 1:]:
            later *= d
        expected += (1 - decays[k]) * later * v
        initial_share *= decays[k]
    assert decays[0] == pytest.approx(0.1) and initial_share < 1e-9  # the initial weights (0 here) are gone
    torch.testing.assert_close(ema.shadow[0], torch.full((2, 2), expected), rtol=1e-5, atol=1e-6)
    assert ema.current_decay() == pytest.approx(41 / 50)
    # long runs: the cap takes over, as plain EMA
    ema.updates = 5000
    assert ema.current_decay() == 0.99 and tg.EMA(model, 0.99).current_decay() == 0.99


def _random_grads(model, seed, scale=1.0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale


def _old_muon_and_clip_step(opt, step, lr_mul):
    """The optimizer step as it was before the fused, overlapped one (one process): each group clipped,
    momentum, Nesterov, row-normalised and orthogonalised on its own, then per-tensor weight decay and
    update. The fused step must reproduce it bit for bit on the CPU."""
    muon, s = opt.muon, opt.settings
    shards = [torch.stack([p.grad for p in ps]) for ps in muon.groups]
    grads = [p.grad for p in opt.replicated]
    sq = torch.stack([torch.linalg.vector_norm(g.float()).square() for g in shards]).sum()
    sq = sq + torch.stack(torch._foreach_norm(grads)).square().sum()
    coef = (s.grad_clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    lr, momentum = muon.lr * lr_mul, opt.momentum_at(step)
    for params, buf, grad in zip(muon.groups, muon.momentum, shards):
        grad = grad * coef
        buf.mul_(momentum).add_(grad)
        update = grad.add(buf, alpha=momentum)
        update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        ortho = tg.newton_schulz(update, muon.steps, muon.coeffs)
        rows, cols = params[0].shape
        for p, o in zip(params, ortho):
            p.mul_(1.0 - lr * muon.wd)
            p.add_(o.float(), alpha=-lr * max(1.0, rows / cols) ** 0.5)


def test_fused_muon_step_equals_the_old_per_group_update_bit_for_bit():
    s, model, opt = _tiny_optimizers()
    _, ref_model, ref_opt = _tiny_optimizers()
    for step, lr_mul in enumerate([1.0, 0.7, 0.3]):  # momentum warms up, the LR falls, the clip engages
        _random_grads(model, step, scale=0.1)
        _random_grads(ref_model, step, scale=0.1)
        opt.step(step * 500, lr_mul)
        with torch.no_grad():
            _old_muon_and_clip_step(ref_opt, step * 500, lr_mul)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if any(p is m for m in opt.muon.params):
            assert torch.equal(p, q), name
    for a, b in zip(opt.muon.momentum, ref_opt.muon.momentum):
        assert torch.equal(a, b)


class FakeCollectives:
    """Stands in for torch.distributed on one process acting as rank 0 of `world` identical ranks, and
    records the order in which the step starts and waits on collectives and computes directions."""

    def __init__(self, monkeypatch, world):
        self.world, self.events, self.dtypes = world, [], {}
        monkeypatch.setattr(tg.dist, "reduce_scatter_tensor", self.reduce_scatter_tensor)
        monkeypatch.setattr(tg.dist, "all_gather_into_tensor", self.all_gather_into_tensor)
        monkeypatch.setattr(tg.dist, "all_reduce", self.all_reduce)

    def handle(self, name):
        self.events.append(f"start {name}")
        events = self.events
        return type("Work", (), dict(wait=lambda self: events.append(f"wait {name}")))()

    def reduce_scatter_tensor(self, out, inp, op=None, async_op=False):
        self.dtypes.setdefault("reduce_scatter", set()).add(inp.dtype)
        out.copy_(inp.chunk(self.world)[0] * self.world)
        return self.handle("reduce_scatter")

    def all_gather_into_tensor(self, out, inp, async_op=False):
        self.dtypes.setdefault("all_gather", set()).add(inp.dtype)
        out.copy_(torch.cat([inp] * self.world))
        return self.handle("gather") if async_op else None

    def all_reduce(self, tensor, op=None, async_op=False):
        tensor.mul_(self.world)
        return self.handle("all_reduce") if async_op else None


@pytest.mark.parametrize("comm,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_sharded_step_overlaps_gathers_with_the_next_groups_newton_schulz(monkeypatch, comm, dtype):
    s = tg.Settings(environ=dict(TINY_MODEL, MUON_COMM_DTYPE=comm))
    rt = type("RT", (), dict(rank=0, world_size=2, device=torch.device("cpu")))()
    model = tg.GPT(s)
    opt = tg.Optimizers(model, s, rt)
    fake = FakeCollectives(monkeypatch, 2)
    direction = opt.muon.direction

    def traced_direction(*args):
        fake.events.append("direction")
        return direction(*args)
    opt.muon.direction = traced_direction
    _random_grads(model, 0)
    opt.step(0, 1.0)
    groups = len(opt.muon.groups)
    ev = fake.events
    # every reduction starts before the first wait; then each group's gather starts right after its
    # direction, before the next group's direction, and no gather is waited on before all have started
    assert ev[:groups + 1] == ["start reduce_scatter"] * groups + ["start all_reduce"]
    first_direction = ev.index("direction")
    assert ev[first_direction:first_direction + 2 * groups] == ["direction", "start gather"] * groups
    assert ev[first_direction + 2 * groups:] == ["wait gather"] * groups
    assert fake.dtypes == {"reduce_scatter": {dtype}, "all_gather": {torch.bfloat16}}
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_the_step_never_asks_the_host_for_a_tensor_value(monkeypatch):
    """No .item(), truth value, float() or tolist() in the optimizer's own code: each would wait for the
    GPU. (torch's CPU AdamW reads its CPU step counters; the fused GPU AdamW keeps them on the device.)"""
    import sys
    s, model, opt = _tiny_optimizers()

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            assert caller.co_filename != tg.__file__, f"Tensor.{name} in {caller.co_name}: a host sync"
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        forbid(name)
    for step in range(2):
        _random_grads(model, step)
        norm = opt.step(step, 1.0)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("compile_it", [False, True])
def test_gpu_step_has_no_host_sync_and_compiled_direction_matches(compile_it):
    """On the GPU: a step after the first (which creates AdamW's state) runs with CUDA's sync debug mode
    set to error; the compiled direction matches the eager one up to bf16 rounding in Newton-Schulz."""
    s = tg.Settings(environ=dict(TINY_MODEL, COMPILE=str(int(compile_it))))
    rt = type("RT", (), dict(rank=0, world_size=1, device=torch.device("cuda")))()
    torch.manual_seed(0)
    model = tg.GPT(s).cuda()
    opt = tg.Optimizers(model, s, rt)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if step == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(step, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    g = torch.randn(4, 64, 256, device="cuda")
    coef, mu = torch.tensor(0.5, device="cuda"), torch.tensor(0.95, device="cuda")
    buf_a, buf_b = torch.ones_like(g), torch.ones_like(g)
    a = tg.muon_direction(g, buf_a, coef, mu, 5, tg.NS_COEFFICIENTS["quintic"], True).float()
    b = opt.muon.direction(g, buf_b, coef, mu, 5, tg.NS_COEFFICIENTS["quintic"], True).float()
    torch.testing.assert_close(buf_a, buf_b, rtol=1e-6, atol=1e-6)
    assert (a * b).sum() / (a.norm() * b.norm()) > 0.999 and (a - b).abs().max() < 0.02


def test_the_compiled_direction_is_one_graph_per_shape_whatever_the_momentum_and_clip():
    """The momentum warms up and the clip coefficient changes every step: as 0-d tensors they must not
    recompile the fullgraph-compiled direction (a float argument would, once per new value)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm
    direction = torch.compile(tg.muon_direction, backend=counting_backend, dynamic=False, fullgraph=True)
    coeffs = tg.NS_COEFFICIENTS["quintic"]
    for shape in [(3, 16, 32), (2, 32, 16)]:
        buf = torch.zeros(shape)
        for k, (coef, mu) in enumerate([(1.0, 0.92), (0.5, 0.93), (0.25, 0.97)]):
            coef_t, mu_t = torch.tensor(coef), torch.tensor(mu)
            grad = torch.randn(shape)
            want_buf = buf.clone()
            want = tg.muon_direction(grad, want_buf, coef_t, mu_t, 5, coeffs, True)
            got = direction(grad, buf, coef_t, mu_t, 5, coeffs, True)
            torch.testing.assert_close(buf, want_buf)
            torch.testing.assert_close(got.float(), want.float(), atol=0.02, rtol=0)
    assert len(graphs) == 2
