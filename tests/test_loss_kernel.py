"""LOSS_KERNEL: the fused Triton softcapped cross-entropy against the plain PyTorch loss (values and
gradients, eager and under torch.compile) on the GPU. On a CPU: the choice of path, and, with Triton
importable (make test installs it), both kernels in Triton's interpreter against float64 autograd."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL, run_in_triton_interpreter, tg, triton_importable

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


INTERPRETED = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch, triton, triton.language as tl
    import train_gpt as tg
    tg.triton, tg.tl = triton, tl
    tg._softcap = triton.jit(tg._softcap)
    forward, backward = triton.jit(tg._softcap_ce_forward_kernel), triton.jit(tg._softcap_ce_backward_kernel)
    torch.manual_seed(0)
    cap = 30.0
    # a vocabulary the block divides and one it does not (a masked tail), fp32 and bf16 logits
    for N, V, block, dtype in ((6, 512, 128, torch.float32), (5, 300, 128, torch.float32), (4, 1000, 256, torch.bfloat16)):
        z = (8 * torch.randn(N, V)).to(dtype)
        target = torch.randint(0, V, (N,))
        target[:2] = torch.tensor([0, V - 1])  # the edges of the vocabulary
        loss, lse = torch.empty(N), torch.empty(N)
        forward[(N,)](z, target, loss, lse, V, z.stride(0), cap, BLOCK_V=block)
        z64 = z.double().requires_grad_()
        y = cap * torch.tanh(z64 / cap)
        ref_lse = torch.logsumexp(y, dim=-1)
        ref_loss = ref_lse - y.gather(1, target[:, None])[:, 0]
        torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
        dloss = torch.randn(N)
        dz = torch.empty_like(z)
        backward[(N,)](z, target, lse, dloss, dz, V, z.stride(0), cap, BLOCK_V=block)
        (ref_dz,) = torch.autograd.grad((ref_loss * dloss.double()).sum(), z64)
        # bf16 dz: one unit in the last place (the interpreter truncates where the GPU rounds to nearest)
        rtol = 2 ** -7 if dtype == torch.bfloat16 else 0
        torch.testing.assert_close(dz.double(), ref_dz, rtol=rtol, atol=1e-6 * ref_dz.abs().max().item())
    print("interpreted ok")
""")


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed (make test installs it)")
def test_both_kernels_in_the_interpreter_match_float64_autograd():
    run_in_triton_interpreter(INTERPRETED, "interpreted ok")


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
