"""LOSS_KERNEL: the fused Triton softcapped cross-entropy against the plain PyTorch loss (values and
gradients, eager and under torch.compile) on the GPU; on a CPU only the choice of path is checked."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL, tg

CUDA = torch.cuda.is_available()


def reference_losses(z: torch.Tensor, target: torch.Tensor, cap: float) -> torch.Tensor:
    y = cap * torch.tanh(z.float() / cap)
    return F.cross_entropy(y, target, reduction="none")


def test_on_a_cpu_the_loss_runs_the_plain_path_and_triton_is_refused():
    if CUDA:
        pytest.skip("a CUDA machine")
    assert tg.pick_loss_kernel("auto") == "torch" and tg.pick_loss_kernel("torch") == "torch"
    with pytest.raises(tg.UserError, match="LOSS_KERNEL=triton but no CUDA device"):
        tg.pick_loss_kernel("triton")
    assert tg.GPT(tg.Settings(environ=dict(TINY_MODEL, LOSS_KERNEL="auto"))).loss_kernel == "torch"


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("compile_it", [False, True])
def test_fused_softcap_cross_entropy_matches_the_reference_on_the_gpu(compile_it):
    assert tg.triton_softcap_ce()
    g = torch.Generator(device="cuda").manual_seed(0)
    N, V, cap = 4096, 8192, 30.0
    z = (8 * torch.randn(N, V, device="cuda", generator=g)).to(torch.bfloat16)
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    target[:4] = torch.tensor([0, V - 1, 5, 5], device="cuda")  # the edges of the vocabulary

    def fused_mean(z):
        return torch.ops.pgolf.softcap_ce(z, target, cap)[0].mean()
    fn = torch.compile(fused_mean, fullgraph=True) if compile_it else fused_mean
    z1 = z.clone().requires_grad_()
    loss = fn(z1)
    loss.backward()
    z2 = z.clone().float().requires_grad_()
    ref = reference_losses(z2, target, cap).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # dz is stored in bf16: compare against the fp32 reference gradient at bf16 resolution
    err = (z1.grad.float() - z2.grad).abs().max().item()
    assert err <= 1e-2 * z2.grad.abs().max().item()
    per_row, _ = torch.ops.pgolf.softcap_ce(z, target, cap)
    assert torch.allclose(per_row, reference_losses(z, target, cap), atol=1e-4, rtol=1e-5)
