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
