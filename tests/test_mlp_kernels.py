"""The fused MLP (MODEL section's MLP_KERNEL paths and cutlass_evt_fusion/).

CPU, always: phi' = d/du LeakyReLU_0.5(u)^2 against autograd, the reference of the CUTLASS op against
autograd of the plain MLP, FusedMLPFunction's torch path (forward and all three gradients) against the
plain MLP, path selection and its log line. With Triton importable (not on CI's CPU machines), the
Triton forward kernel runs in Triton's interpreter on the CPU.

GPU (skipped without CUDA, and the CUTLASS ones without the built extension): the Triton forward, the
CUTLASS EVT backward and the whole fused MLP against the plain PyTorch path in bf16, and a
torch.compile'd fused MLP (fullgraph: no graph breaks). tools/gpu_mlp_check.sh builds the extension
and runs them.

Tolerances, bf16 (8 significant bits, one rounding = relative 2^-8 = 0.0039, one ulp up to 2^-7):
  * a kernel against its fp32-computed reference rounded once: the only differences are fp32
    summation order (~1e-6 relative) and the final rounding flipping at a tie, so 1 ulp:
    rtol 2^-7, plus an atol of 2^-7 times the output's RMS for values near zero;
  * the fused MLP against the plain bf16 path: both round at different places (the plain path rounds
    pre, leaky(pre), post, and each GEMM's output; the fused one skips two of those), so neither is
    the truth. Both are measured against fp32 math on the same bf16 inputs, and the fused path must
    be no less accurate than the plain one (relative error at most 1.25x the plain path's + 1e-3).
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, hopper_ptxas, run_in_triton_interpreter, subprocess_env, tg, triton_importable

import cutlass_evt_fusion as cef  # the source tree's package: the references work without the build

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs in tools/gpu_mlp_check.sh)")


def plain_mlp(x, w_up, w_down):
    return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)


def mlp_inputs(m, dim, hidden, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, dim, generator=g)
    w_up = torch.randn(hidden, dim, generator=g) / dim ** 0.5  # pre ~ N(0, 1)
    w_down = torch.randn(dim, hidden, generator=g) / hidden ** 0.5
    grad = torch.randn(m, dim, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, w_up, w_down, grad)]


# --- CPU: the math -------------------------------------------------------------------------------

def test_phi_grad_is_the_derivative_of_leaky_relu_squared():
    u = torch.cat([torch.randn(1000, dtype=torch.float64) * 3, torch.tensor([0.0, 1e-30, -1e-30, 5.0, -5.0], dtype=torch.float64)])
    u.requires_grad_(True)
    (auto,) = torch.autograd.grad(cef.leaky_relu_sq(u).sum(), u)
    u = u.detach()
    torch.testing.assert_close(cef.leaky_relu_sq_grad(u), auto, rtol=0, atol=0)
    # the closed form: 2u above zero, 2 * 0.5^2 * u = 0.5u below
    torch.testing.assert_close(cef.leaky_relu_sq_grad(u), torch.where(u > 0, 2 * u, 0.5 * u), rtol=0, atol=0)
    assert cef.leaky_relu_sq_grad(torch.tensor([5.0, -5.0])).tolist() == [10.0, -2.5]
    torch.testing.assert_close(cef.leaky_relu_sq(u), F.leaky_relu(u, 0.5) ** 2)


def test_phi_grad_of_rounded_pre_is_the_rounded_phi_grad():
    """Why the forward may keep pre instead of phi'(pre): power-of-two scalings commute with rounding."""
    u = torch.randn(100000) * 10
    assert torch.equal(cef.leaky_relu_sq_grad(u.bfloat16()), cef.leaky_relu_sq_grad(u).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_op_is_the_plain_mlp_gradient_at_pre(dtype):
    x, w_up, w_down, grad = mlp_inputs(64, 32, 128, dtype)
    pre = F.linear(x, w_up).requires_grad_(True)
    y = F.linear(cef.leaky_relu_sq(pre), w_down)
    (d_pre,) = torch.autograd.grad(y, pre, grad)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cef.mlp_down_backward_reference(grad, w_down, pre.detach()), d_pre, **tol)


def test_reference_op_rounds_once_from_fp32():
    x, w_up, w_down, grad = mlp_inputs(32, 64, 256, torch.bfloat16)
    pre = F.linear(x, w_up)
    expected = ((grad.float() @ w_down.float()) * cef.leaky_relu_sq_grad(pre.float())).bfloat16()
    got = cef.mlp_down_backward_reference(grad, w_down, pre)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_function_torch_path_matches_autograd_of_the_plain_mlp(dtype, tol):
    x, w_up, w_down, grad = mlp_inputs(48, 32, 128, dtype, seed=1)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    y_ref = plain_mlp(*leaves)
    ref = torch.autograd.grad(y_ref, leaves, grad)
    leaves2 = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    y = tg.FusedMLPFunction.apply(*leaves2, "torch")
    got = torch.autograd.grad(y, leaves2, grad)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name, g, r in zip(("dx", "dw_up", "dw_down"), got, ref):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_fused_function_passes_gradcheck():
    x, w_up, w_down, _ = mlp_inputs(6, 4, 8, torch.float64, seed=2)
    x = x + 0.3  # keep pre away from the kink at 0, where finite differences straddle two slopes
    args = [t.requires_grad_(True) for t in (x, w_up, w_down)]
    assert torch.autograd.gradcheck(lambda a, b, c: tg.FusedMLPFunction.apply(a, b, c, "torch"), args)


# --- CPU: the module, path selection, the log line ----------------------------------------------

def test_mlp_module_keeps_the_plain_path_off_cuda():
    torch.manual_seed(0)
    mlp = tg.MLP(32, 128, kernel="cutlass")  # as if picked on a GPU machine: a CPU input still runs plain
    torch.nn.init.normal_(mlp.proj.weight, std=0.05)
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(mlp(x), plain_mlp(x, mlp.fc.weight, mlp.proj.weight))


@pytest.mark.skipif(CUDA, reason="checks the choice on a machine without CUDA")
def test_pick_mlp_kernel_without_cuda():
    assert tg.pick_mlp_kernel("auto") == "torch"
    assert tg.pick_mlp_kernel("torch") == "torch"
    for path in ("cutlass", "triton"):
        with pytest.raises(tg.UserError, match=f"MLP_KERNEL={path} but no CUDA device"):
            tg.pick_mlp_kernel(path)
    with pytest.raises(tg.UserError, match="MLP_KERNEL=fp8 needs FP8 tensor cores .* no CUDA device"):
        tg.pick_mlp_kernel("fp8")
    model = tg.GPT(tg.Settings(environ=dict(NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
                                            ROPE_DIMS="4", XSA_LAST_N="2", NUM_LOOPS="0", VOCAB_SIZE="64")))
    assert model.mlp_kernel == "torch" and all(b.mlp.kernel == "torch" for b in model.blocks)


def test_mlp_kernel_setting_is_validated():
    assert tg.Settings(environ={}).mlp_kernel == "torch"
    with pytest.raises(tg.UserError, match="MLP_KERNEL='fast' is not one of auto, cutlass, triton, fp8, torch"):
        tg.Settings(environ={"MLP_KERNEL": "fast"})


class _StopAfterSetUp(Exception):
    pass


def test_the_run_logs_the_mlp_path(tiny_env, monkeypatch):
    def stop(self):
        raise _StopAfterSetUp

    monkeypatch.setattr(tg.Trainer, "train", stop)  # the set-up lines are all this test needs
    s = tg.Settings(environ=dict(tiny_env, BYTE_CHECK_DOCS="0", RUN_ID="mlp_path"))
    rt = tg.Runtime(s)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with pytest.raises(_StopAfterSetUp), contextlib.redirect_stdout(io.StringIO()):  # quiet under pytest -s
            tg.train_and_evaluate(s, rt)
    finally:  # train_and_evaluate turns TF32 on for the process (on CUDA): not for the tests after this one
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    events = rt.log_path.read_text().partition("\nheader:end\n")[2]
    lines = [line for line in events.splitlines() if line.startswith(("mlp_kernel", "qk_kernel"))]
    assert lines == ["mlp_kernel:torch", "qk_kernel:torch"]  # the defaults (on a GPU too)


STAND_INS = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch, torch.nn.functional as F
    import train_gpt as tg
    calls = {"up": 0, "down": 0}

    # CPU stand-ins under the real ops' names and schemas (the GPU kernels cannot run here)
    @torch.library.custom_op("pgolf::mlp_up_act", mutates_args=())
    def up(x: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["up"] += 1
        pre = x @ w_up.T
        return pre, F.leaky_relu(pre, 0.5).square()

    @up.register_fake
    def _(x, w_up):
        return x.new_empty(x.size(0), w_up.size(0)), x.new_empty(x.size(0), w_up.size(0))

    @torch.library.custom_op("cutlass_evt_fusion::mlp_down_backward", mutates_args=())
    def down(grad_out: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        calls["down"] += 1
        return (grad_out @ w_down) * torch.where(pre > 0, 2 * pre, 0.5 * pre)

    @down.register_fake
    def _(g, w, pre):
        return g.new_empty(g.size(0), w.size(1))

    tg._CUTLASS_TILE = (8, 16, 4)
    fn = torch.compile(lambda x, a, b: tg.FusedMLPFunction.apply(x, a, b, "cutlass"), fullgraph=True, dynamic=False)
    torch.manual_seed(0)
    leaves = [torch.randn(32, 8), torch.randn(64, 8) / 3, torch.randn(8, 64) / 8]
    grad = torch.randn(32, 8)
    fused = [t.clone().requires_grad_(True) for t in leaves]
    y = fn(*fused)
    y.backward(grad)
    plain = [t.clone().requires_grad_(True) for t in leaves]
    y_ref = F.linear(F.leaky_relu(F.linear(plain[0], plain[1]), 0.5).square(), plain[2])
    y_ref.backward(grad)
    for got, ref in zip([y] + [t.grad for t in fused], [y_ref] + [t.grad for t in plain]):
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert calls == {"up": 1, "down": 1}, calls
    print("compiled ok")
""")


def test_fused_function_compiles_to_one_graph_around_both_ops():
    """torch.compile(fullgraph=True), Inductor, forward and backward, with CPU stand-ins for the Triton
    and CUTLASS ops: the autograd function traces without a graph break, the backward calls the CUTLASS
    op, and the results are the plain MLP's. (A subprocess: the stand-ins take the real ops' names.)"""
    proc = subprocess.run([sys.executable, "-c", STAND_INS, str(ROOT)], env=subprocess_env({}), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# --- CPU: the package and the kernel's tile ------------------------------------------------------

def test_package_reports_why_it_is_unavailable():
    if cef.available():
        pytest.skip("the extension is built and this machine has an sm_90 GPU")
    assert cef.unavailable_reason()
    if cef._LIBRARY is None:  # not built here: the op says so instead of failing somewhere inside torch
        with pytest.raises(RuntimeError, match="pip install --no-build-isolation ./cutlass_evt_fusion"):
            cef.mlp_down_backward(*mlp_inputs(128, 64, 256, torch.bfloat16)[:3])


def test_tile_constants_match_the_cuda_header():
    header = (ROOT / "cutlass_evt_fusion" / "csrc" / "mlp_down_backward.h").read_text()
    tile = {name: int(v) for name, v in re.findall(r"constexpr int kTile([MNK]) = (\d+);", header)}
    assert (cef.TILE_M, cef.TILE_N, cef.TILE_K) == (tile["M"], tile["N"], tile["K"])
    assert cef.supports(98304, 2048, 512)  # the full config: 98,304 tokens, hidden 2048, dim 512
    assert not cef.supports(98304 + 64, 2048, 512) and not cef.supports(128, 2048 + 128, 512)
    assert not cef.supports(128, 256, 96) and not cef.supports(0, 256, 64)


# --- CPU with Triton: the forward kernel in Triton's interpreter ---------------------------------

@pytest.mark.parametrize("chosen, expected", [(None, "1"), ("0", "0")])
def test_tritons_fp_fusion_default_is_pinned_on_unless_the_environment_chooses(chosen, expected):
    env = {k: v for k, v in subprocess_env({}).items() if k != "TRITON_DEFAULT_FP_FUSION"}
    if chosen is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = chosen
    probe = "import os, train_gpt; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == expected, r.stderr[-2000:]


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed (CPU torch wheels do not bring it)")
def test_triton_kernel_compiles_for_sm90_with_every_autotune_config():
    """Ahead of time, no GPU needed: each config lowers to wgmma fed by cp.async, fits Hopper's shared memory
    and, with the ptxas Triton ships, spills nothing."""
    import triton
    import triton.language as tl
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time API ({e})")
    tg.triton, tg.tl = triton, tl  # what triton_mlp_up_act() binds
    kernel = triton.jit(tg._mlp_up_act_kernel)
    if not hasattr(kernel, "params"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    signature = dict.fromkeys(["x_ptr", "w_ptr", "pre_ptr", "post_ptr"], "*bf16")
    signature.update(dict.fromkeys(["M", "N", "K", "stride_xm", "stride_wn", "stride_om"], "i32"))
    signature.update(dict.fromkeys(["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"], "constexpr"))
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(10)}  # as at 98,304 x 512 -> 2048
    ptxas = hopper_ptxas(triton)
    for bm, bn, warps, stages in tg._MLP_UP_ACT_CONFIGS:
        constants = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}
        try:
            source = ASTSource(kernel, signature, constants, aligned)
        except TypeError as e:
            pytest.skip(f"this Triton's ASTSource differs ({e})")
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = compiled.asm["ptx"]
        assert "wgmma.mma_async" in ptx and "cp.async" in ptx, (bm, bn, warps, stages)
        assert compiled.metadata.shared <= 227 * 1024, (bm, bn, warps, stages, compiled.metadata.shared)
        if os.access(ptxas, os.X_OK):
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "k.ptx")
                with open(path, "w") as f:
                    f.write(ptx)
                out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                                     capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            assert "0 bytes spill stores" in out.stderr and "C7515" not in out.stderr, (bm, bn, warps, stages, out.stderr[-2000:])


INTERPRETED = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch, triton, triton.language as tl
    import train_gpt as tg
    tg.triton, tg.tl = triton, tl
    kernel = triton.jit(tg._mlp_up_act_kernel)
    torch.manual_seed(0)
    # M, N and K that the blocks divide, and ones they do not (masked edges in all three)
    for M, N, K in ((64, 96, 64), (100, 70, 48)):
        # fp16 operands: the interpreter multiplies bf16 as raw integers in tl.dot
        x = torch.randn(M, K).half()
        w = (torch.randn(N, K) / K ** 0.5).half()
        pre = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
        post = pre.clone()
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32),)
        kernel[grid](x, w, pre, post, M, N, K, x.stride(0), w.stride(0), pre.stride(0),
                     BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
        u = x.float() @ w.float().T
        torch.testing.assert_close(pre.float(), u, rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(post.float(), torch.nn.functional.leaky_relu(u, 0.5) ** 2, rtol=2 ** -6, atol=2 ** -7)
    print("interpreted ok")
""")


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed (CPU torch wheels do not bring it)")
def test_triton_kernel_reads_its_constexpr_parameters():
    """train_gpt.py has `from __future__ import annotations`: the tl.constexpr annotations are strings,
    which Triton must still read as compile-time parameters."""
    import triton
    kernel = triton.jit(tg._mlp_up_act_kernel)
    if not hasattr(kernel, "params"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    assert [p.name for p in kernel.params if p.is_constexpr] == ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed (CPU torch wheels do not bring it)")
def test_triton_forward_kernel_in_the_interpreter():
    run_in_triton_interpreter(INTERPRETED, "interpreted ok", timeout=300)


# --- GPU -----------------------------------------------------------------------------------------

def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def assert_one_rounding(got, ref):
    """got and ref both rounded once to bf16 from fp32 math that differs only in summation order."""
    atol = 2 ** -7 * ref.float().pow(2).mean().sqrt().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=atol)


@pytest.fixture
def triton_op():
    if not CUDA:
        pytest.skip("needs a CUDA GPU (runs in tools/gpu_mlp_check.sh)")
    if not tg.triton_mlp_up_act():
        pytest.skip("Triton does not import")
    return torch.ops.pgolf.mlp_up_act


@pytest.fixture
def cutlass_op():
    if not cef.available():
        pytest.skip(f"cutlass_evt_fusion unavailable: {cef.unavailable_reason()}")
    try:
        tg.pick_mlp_kernel("cutlass")  # also records the kernel's tile for FusedMLPFunction
    except tg.UserError as e:
        pytest.skip(str(e))
    assert tg._CUTLASS_TILE == (cef.TILE_M, cef.TILE_N, cef.TILE_K)
    return cef.mlp_down_backward


@pytest.mark.parametrize("m,dim,hidden", [(4096, 512, 2048), (1000, 200, 320)])
def test_triton_forward_matches_fp32_reference(triton_op, m, dim, hidden):
    x, w_up, _, _ = mlp_inputs(m, dim, hidden, torch.bfloat16, "cuda")
    pre, post = triton_op(x, w_up)
    u = x.float() @ w_up.float().T
    assert pre.dtype == post.dtype == torch.bfloat16 and pre.shape == (m, hidden)
    assert_one_rounding(pre, u.bfloat16())
    assert_one_rounding(post, cef.leaky_relu_sq(u).bfloat16())


@pytest.mark.parametrize("m,dim,hidden", [(4096, 512, 2048), (256, 64, 256)])
def test_cutlass_backward_matches_reference(cutlass_op, m, dim, hidden):
    x, w_up, w_down, grad = mlp_inputs(m, dim, hidden, torch.bfloat16, "cuda")
    pre = F.linear(x, w_up)
    got = cutlass_op(grad, w_down, pre)
    assert got.dtype == torch.bfloat16 and got.shape == (m, hidden)
    assert_one_rounding(got, cef.mlp_down_backward_reference(grad, w_down, pre))


def test_cutlass_epilogue_is_exact_where_the_gemm_is(cutlass_op):
    """grad_out one-hot rows make each accumulator one exact product, so the epilogue's result is bitwise
    the reference's: any mix-up of pre's rows or columns (the AuxLoad's indexing) or of phi' shows."""
    m, k, n = 512, 128, 512
    grad = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
    grad[torch.arange(m), torch.arange(m) % k] = 1.0
    w_down = torch.randn(k, n, device="cuda").bfloat16()
    pre = torch.randn(m, n, device="cuda").bfloat16()
    got = cutlass_op(grad, w_down, pre)
    assert torch.equal(got, cef.mlp_down_backward_reference(grad, w_down, pre))


def test_cutlass_refuses_shapes_off_its_tile(cutlass_op):
    x, w_up, w_down, grad = mlp_inputs(192, 64, 256, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="multiple of the kernel tile"):
        cutlass_op(grad, w_down, F.linear(x, w_up))


def fused_vs_plain(kernel, m=2048, dim=512, hidden=2048, compile_it=False):
    """Relative errors (fused, plain bf16) of y, dx, dw_up, dw_down against fp32 math on the same inputs."""
    assert not torch.backends.cuda.matmul.allow_tf32  # the fp32 truth must not round its operands to TF32
    x, w_up, w_down, grad = mlp_inputs(m, dim, hidden, torch.bfloat16, "cuda", seed=3)
    mlp = tg.MLP(dim, hidden, kernel=kernel).cuda()
    with torch.no_grad():
        mlp.fc.weight.copy_(w_up.float())
        mlp.proj.weight.copy_(w_down.float())
    x = x.view(4, m // 4, dim)
    grad = grad.view(4, m // 4, dim)

    def run(module, inp, g):
        inp = inp.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        y = module(inp)
        y.backward(g)
        return [y.detach(), inp.grad, module.fc.weight.grad, module.proj.weight.grad]

    fused_fn = torch.compile(mlp, fullgraph=True, dynamic=False) if compile_it else mlp
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused = run(fused_fn, x, grad)
    ops = {e.name for e in prof.events()}
    expected = {"pgolf::mlp_up_act"} | ({"cutlass_evt_fusion::mlp_down_backward"} if kernel == "cutlass" else set())
    if kernel == "fp8":  # compiled, inductor calls the cuBLASLt kernel itself
        expected = set() if compile_it else {"aten::_scaled_mm"}
    assert expected <= ops, f"{kernel}: {sorted(expected - ops)} never ran"
    plain_module = tg.MLP(dim, hidden, kernel="torch").cuda()
    plain_module.load_state_dict(mlp.state_dict())
    plain = run(plain_module, x, grad)
    exact_module = tg.MLP(dim, hidden, kernel="torch").cuda()
    exact_module.load_state_dict(mlp.state_dict())
    exact = run(exact_module, x.float(), grad.float())
    return [(name, rel_err(f, e), rel_err(p, e)) for name, f, p, e in zip(("y", "dx", "dw_up", "dw_down"), fused, plain, exact)]


@pytest.mark.parametrize("kernel", ["triton", "cutlass"])
def test_fused_mlp_is_as_accurate_as_the_plain_bf16_path(kernel, triton_op, request):
    if kernel == "cutlass":
        request.getfixturevalue("cutlass_op")
    for name, fused, plain in fused_vs_plain(kernel):
        print(f"{kernel} {name}: fused rel err {fused:.2e}, plain bf16 rel err {plain:.2e}")
        assert fused <= 1.25 * plain + 1e-3, (kernel, name, fused, plain)


def test_compiled_fused_mlp_has_no_graph_breaks(triton_op):
    kernel = "cutlass" if cef.available() else "triton"
    if kernel == "cutlass":
        tg.pick_mlp_kernel("auto")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    errors = fused_vs_plain(kernel, compile_it=True)  # fullgraph=True raises on a graph break
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for name, fused, plain in errors:
        print(f"compiled {kernel} {name}: fused rel err {fused:.2e}, plain bf16 rel err {plain:.2e}")
        assert fused <= 1.25 * plain + 1e-3, (kernel, name, fused, plain)


@needs_cuda
def test_auto_picks_the_fastest_path_that_loads():
    expected = "cutlass" if cef.available() and tg.triton_mlp_up_act() else "triton" if tg.triton_mlp_up_act() else "torch"
    assert tg.pick_mlp_kernel("auto") == expected


# --- FP8 (MLP_KERNEL=fp8): torch._scaled_mm runs on CPU too, so its wiring is checked here ------------

def fp8_case(seed=0, m=64, dim=32, hidden=128):
    torch.manual_seed(seed)
    x = torch.randn(m, dim, dtype=torch.bfloat16)
    w_up = (torch.randn(hidden, dim) * dim ** -0.5).to(torch.bfloat16)
    w_down = (torch.randn(dim, hidden) * hidden ** -0.5).to(torch.bfloat16)
    grad = torch.randn(m, dim, dtype=torch.bfloat16)
    return x, w_up, w_down, grad


def fp8_run(x, w_up, w_down, grad):
    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
    out = tg.FP8MLPFunction.apply(*leaves)
    out.backward(grad)
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def test_fp8_mlp_computes_with_its_rounded_operands():
    # the same dataflow in fp32 on the operands as rounded to fp8 and scaled back: a wrong scale, transpose
    # or format would miss this by far more than the bf16 outputs' rounding
    x, w_up, w_down, grad = fp8_case()
    out, d_x, d_w_up, d_w_down = fp8_run(x, w_up, w_down, grad)

    def rounded(t, fmt, top):
        t8, scale = tg.to_fp8(t, fmt, top)
        return t8.float() * scale
    values = lambda t: rounded(t, tg.FP8_VALUES, tg.FP8_VALUES_MAX)  # noqa: E731
    grads = lambda t: rounded(t, tg.FP8_GRADS, tg.FP8_GRADS_MAX)  # noqa: E731
    pre = (values(x) @ values(w_up).T).to(torch.bfloat16).float()
    post = values(torch.nn.functional.leaky_relu(pre, 0.5).square().to(torch.bfloat16))
    d_pre = ((grads(grad) @ values(w_down)).to(torch.bfloat16).float()
             * torch.where(pre > 0, 2.0 * pre, 0.5 * pre)).to(torch.bfloat16)
    expected = [post @ values(w_down).T, grads(d_pre) @ values(w_up), grads(d_pre).T @ values(x),
                grads(grad).T @ post]
    for name, got, want in zip(("out", "d_x", "d_w_up", "d_w_down"), (out, d_x, d_w_up, d_w_down), expected):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3 * float(want.abs().max()), msg=name)


def test_fp8_mlp_is_within_fp8_error_of_the_plain_mlp():
    x, w_up, w_down, grad = fp8_case(seed=1)
    fp8 = fp8_run(x, w_up, w_down, grad)
    leaves = [t.float().requires_grad_() for t in (x, w_up, w_down)]
    out = plain_mlp(*leaves)
    out.backward(grad.float())
    plain = [out.detach()] + [t.grad for t in leaves]
    # Rounding to e4m3 (3 mantissa bits) errs by 3.6% rms, to e5m2 (2 bits) by 7.2%. Each output goes through
    # four rounded operands (the square doubles x's and W_up's share in the forward): by the root sum of
    # squares, 11-13% at most. A wrong scale, transpose or derivative errs by 100% or more.
    for name, got, want in zip(("out", "d_x", "d_w_up", "d_w_down"), fp8, plain):
        error = float((got - want.detach()).norm() / want.detach().norm())
        assert error < 0.15, (name, error)


def test_fp8_mlp_of_zero_weights_is_finite():
    x, w_up, w_down, grad = fp8_case(seed=2)
    out, d_x, d_w_up, d_w_down = fp8_run(x, w_up, torch.zeros_like(w_down), grad)  # proj starts at zero
    assert float(out.abs().max()) == 0.0 and float(d_x.abs().max()) == 0.0
    assert torch.isfinite(d_w_down).all() and float(d_w_down.abs().max()) > 0


@needs_cuda
@pytest.mark.parametrize("compile_it", [False, True])
def test_fp8_mlp_on_the_gpu_is_within_fp8_error(compile_it):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need SM 8.9+")
    torch._dynamo.reset()
    for name, fp8, plain in fused_vs_plain("fp8", compile_it=compile_it):
        print(f"fp8 {'compiled' if compile_it else 'eager'} {name}: rel err {fp8:.2e} (plain bf16 {plain:.2e})")
        assert fp8 < 0.15, (name, fp8)  # the CPU test's bound, from the formats' rounding
