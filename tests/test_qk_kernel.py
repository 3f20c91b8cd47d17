"""The fused q/k RMS norm + partial RoPE (MODEL section, QK_KERNEL).

CPU, always: rms_norm's epsilon is float32's for every input dtype (the constant the kernels use), the
path choice without CUDA and its refusal of QK_KERNEL=triton, the setting's validation and its log line.

CPU with Triton importable (make setup installs it where none is): both kernels run in Triton's
interpreter on the CPU against the plain path (rms_norm, apply_partial_rope, the gain) in float64, with
autograd's gradients for the backward, on shapes with every edge: a head_dim that is not a power of two,
an odd head count, no RoPE and RoPE over the whole head, rows that do not fill a block, and gradients in
SDPA's heads-first layout. Each autotune config compiles ahead of time for sm_90 (no GPU needed).

GPU (skipped without CUDA): the custom op in bf16 against the plain path, compiled without a graph break,
and one attention layer's training step with QK_KERNEL=triton against QK_KERNEL=torch.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, hopper_ptxas, run_in_triton_interpreter, subprocess_env, tg, triton_importable

CUDA = torch.cuda.is_available()


needs_triton = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed (make setup installs it)")


def reference(x, cos, sin, gain):
    """The plain path of Attention.forward, as the model runs it."""
    out = tg.apply_partial_rope(F.rms_norm(x, (x.size(-1),), eps=tg.RMS_NORM_EPS), cos, sin)
    return out if gain is None else out * gain[:, None]


# --- CPU: the constants and the choice -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_adds_float32_epsilon_whatever_the_dtype(dtype):
    """The kernels add RMS_NORM_EPS; the model's rms_norm (eps=None) must add the same. Rows small enough
    that the epsilon moves the result by several percent tell the candidates apart."""
    x = torch.full((3, 64), 3e-4).to(dtype)
    mean_square = x.float().pow(2).mean(-1, keepdim=True)
    expected = (x.float() / torch.sqrt(mean_square + tg.RMS_NORM_EPS)).to(dtype)
    assert (expected.float() < 0.8).all()  # the epsilon matters here: 1.2e-7 against a mean square of 9e-8
    torch.testing.assert_close(tg.rms_norm(x), expected, rtol=0, atol=0)


def test_without_cuda_the_plain_path_runs_and_triton_is_refused():
    if CUDA or tg.triton_interpreting():
        pytest.skip("checks the choice on a machine without CUDA, outside Triton's interpreter")
    assert tg.pick_qk_kernel("auto") == "torch" and tg.pick_qk_kernel("torch") == "torch"
    with pytest.raises(tg.UserError, match="QK_KERNEL=triton but no CUDA device: set QK_KERNEL=auto or torch"):
        tg.pick_qk_kernel("triton")


def test_auto_picks_the_path_measured_faster_even_where_triton_runs(monkeypatch):
    # as on a CUDA machine with Triton: auto still means torch (Triton's kernels measured slower on the H100)
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tg, "triton_qk_norm_rope", lambda: object())
    assert tg.pick_qk_kernel("auto") == "torch" and tg.pick_qk_kernel("torch") == "torch"
    assert tg.pick_qk_kernel("triton") == "triton"


def test_qk_kernel_setting_is_validated():
    assert tg.Settings(environ={}).qk_kernel == "torch"
    with pytest.raises(tg.UserError, match="QK_KERNEL='cuda' is not one of auto, triton, torch"):
        tg.Settings(environ={"QK_KERNEL": "cuda"})


def test_model_records_the_path_it_resolved():
    model = tg.GPT(tg.Settings(environ={"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
                                        "VOCAB_SIZE": "64", "QK_KERNEL": "auto"}))
    expected = tg.pick_qk_kernel("auto")
    assert model.qk_kernel == expected
    assert all(block.attn.qk_kernel == expected for block in model.blocks if block.attn is not None)


# --- CPU with Triton: the kernels in the interpreter ----------------------------------------------------

INTERPRETED = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch, triton, triton.language as tl
    import torch.nn.functional as F
    import train_gpt as tg
    tg.triton, tg.tl = triton, tl
    tg.jit_qk_helpers()
    fwd_kernel, bwd_kernel = triton.jit(tg._qk_norm_rope_forward_kernel), triton.jit(tg._qk_norm_rope_backward_kernel)

    def reference(x, cos, sin, gain):
        out = tg.apply_partial_rope(F.rms_norm(x, (x.size(-1),), eps=tg.RMS_NORM_EPS), cos, sin)
        return out if gain is None else out * gain[:, None]

    torch.manual_seed(0)
    checked = 0
    # (B, T, H, D, rope dims, rows per program): a block that divides the rows and ones that do not, D off a
    # power of two, an odd H, no RoPE, RoPE over the whole head
    for B, T, H, D, rope, block in ((2, 5, 4, 64, 16, 8), (1, 7, 3, 48, 8, 16), (2, 3, 2, 32, 0, 4),
                                    (1, 4, 2, 16, 16, 32)):
        fwd, bwd = tg.qk_norm_rope_launchers(tg.FixedMeta(fwd_kernel, BLOCK_R=block), tg.FixedMeta(bwd_kernel, BLOCK_R=block))
        cos, sin = tg.rope_tables(T, rope, 10000.0, T, "cpu", torch.float32)
        for with_gain in (True, False):
            # x as c_q's output view gives it; dy in SDPA's heads-first layout, seen as [B, T, H, D]
            x = torch.randn(B, T, H, D) * torch.rand(B, T, H, 1) * 3
            x[0, 0, 0] *= 1e-4  # a row where the epsilon matters
            dy = torch.randn(B, H, T, D).transpose(1, 2)
            gain = (torch.rand(H) + 0.5) if with_gain else None
            out = fwd(x, cos, sin, gain)
            dx, dgain = bwd(dy, x, cos, sin, gain)
            x64 = x.double().requires_grad_()
            gain64 = gain.double().requires_grad_() if with_gain else None
            ref = reference(x64, cos.double(), sin.double(), gain64)
            ref.backward(dy.double())
            assert out.is_contiguous() and dx.is_contiguous()
            torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-4, atol=1e-4)
            if with_gain:
                torch.testing.assert_close(dgain.double(), gain64.grad, rtol=1e-5, atol=1e-4)
            else:
                assert dgain is None
            checked += 1
    # bf16 in and out: each output is the fp32 result rounded once
    B, T, H, D = 2, 6, 4, 64
    cos, sin = tg.rope_tables(T, 16, 10000.0, T, "cpu", torch.bfloat16)
    x, gain = torch.randn(B, T, H, D).bfloat16(), (torch.rand(H) + 0.5).bfloat16()
    fwd, bwd = tg.qk_norm_rope_launchers(tg.FixedMeta(fwd_kernel, BLOCK_R=16), tg.FixedMeta(bwd_kernel, BLOCK_R=16))
    out = fwd(x, cos, sin, gain)
    exact = reference(x.float(), cos.float(), sin.float(), gain.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exact, rtol=2 ** -7, atol=2 ** -7 * exact.pow(2).mean().sqrt().item())
    print(f"interpreted ok: {checked} fp32 cases and bf16")
""")


# A whole model's training forward + backward, eager and compiled (fullgraph: the op and its fake kernels
# trace without a graph break), with QK_KERNEL=triton in the interpreter against QK_KERNEL=torch.
MODEL_STEP = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    import train_gpt as tg
    env = {"NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8",
           "VOCAB_SIZE": "96", "MLP_MULT": "2", "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_RESIDUAL_START": "3",
           "XSA_LAST_N": "2", "TRAIN_SEQ_LEN": "24"}
    models = {}
    for kernel in ("triton", "torch"):
        torch.manual_seed(0)
        models[kernel] = tg.GPT(tg.Settings(environ=dict(env, QK_KERNEL=kernel))).train()
    assert models["triton"].qk_kernel == "triton" and models["torch"].qk_kernel == "torch"
    with torch.no_grad():  # away from the zero-initialised projections, so that q and k get gradients
        for p in models["triton"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    models["torch"].load_state_dict(models["triton"].state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 25), generator=g)
    ids[0, 9] = ids[2, 0] = models["torch"].bos_id
    for compile_it in (False, True):
        results = {}
        for kernel, model in models.items():
            model.zero_grad(set_to_none=True)
            run = torch.compile(model, fullgraph=True) if compile_it else model
            loss = run(ids[:, :-1], ids[:, 1:])
            loss.backward()
            results[kernel] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        (loss_t, grads_t), (loss_p, grads_p) = results["triton"], results["torch"]
        torch.testing.assert_close(loss_t, loss_p, rtol=1e-6, atol=1e-6)
        assert grads_t.keys() == grads_p.keys()
        q_gains = [n for n in grads_t if n.endswith("q_gain")]
        assert q_gains and all(grads_t[n].abs().sum() > 0 for n in q_gains)
        for name in grads_t:
            torch.testing.assert_close(grads_t[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)
        print(f"model step ok (compiled={compile_it}): loss {loss_t.item():.6f}, {len(grads_t)} gradients")
""")


@needs_triton
def test_a_model_training_step_through_the_op_matches_the_plain_path():
    run_in_triton_interpreter(MODEL_STEP, "model step ok (compiled=True)")


@needs_triton
def test_kernels_in_the_interpreter_match_the_plain_path_and_its_gradients():
    run_in_triton_interpreter(INTERPRETED, "interpreted ok: 8 fp32 cases")


@needs_triton
def test_kernels_compile_for_sm90_with_every_autotune_config():
    """Ahead of time, no GPU needed: each config and both gain variants lower to PTX whose head-vector loads
    and stores are all 16-byte vectors, and assemble for sm_90a with the ptxas Triton uses, without spilling."""
    import triton
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    proc = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME, str(ROOT), hopper_ptxas(triton)],
                          env=subprocess_env({}), capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# In a fresh process: jitting the helpers rebinds train_gpt's module names, as triton_qk_norm_rope() does.
AHEAD_OF_TIME = textwrap.dedent("""
    import os, re, subprocess, sys, tempfile
    sys.path.insert(0, sys.argv[1])
    import triton, triton.language as tl
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"this Triton has no ahead-of-time API ({e})"); sys.exit(3)
    import train_gpt as tg
    tg.triton, tg.tl = triton, tl
    tg.jit_qk_helpers()
    ptxas = sys.argv[2]
    ints = ["n_rows", "T", "H"]
    kernels = {
        "forward": (tg._qk_norm_rope_forward_kernel, ["x_ptr", "cos_ptr", "sin_ptr", "gain_ptr", "out_ptr"],
                    ints + ["stride_b", "stride_t", "stride_h"]),
        "backward": (tg._qk_norm_rope_backward_kernel,
                     ["x_ptr", "dy_ptr", "cos_ptr", "sin_ptr", "gain_ptr", "dx_ptr", "dgain_ptr"],
                     ints + ["x_stride_b", "x_stride_t", "x_stride_h", "dy_stride_b", "dy_stride_t", "dy_stride_h"]),
    }
    # the full config's head: D 64, RoPE over its first 16 dims (half 8)
    shape = {"D": 64, "HALF": 8, "BLOCK_D": 64}
    for name, (fn, pointers, scalars) in kernels.items():
        kernel = triton.jit(fn)
        signature = {p: ("*fp32" if p in ("dgain_ptr",) else "*bf16") for p in pointers}
        signature.update(dict.fromkeys(scalars, "i32"))
        signature["eps"] = "fp32"
        signature.update(dict.fromkeys(["HAS_GAIN", "BLOCK_R", *shape], "constexpr"))
        # what the launch specialises at run time on these tensors: 16-byte aligned pointers, and strides (and
        # the row count) that are multiples of 16
        aligned = pointers + [a for a in scalars if a not in ("T", "H")]
        attrs = {(fn.__code__.co_varnames.index(a),): [["tt.divisibility", 16]] for a in aligned}
        for rows, warps in tg._QK_CONFIGS:
            for has_gain in (True, False):
                try:
                    source = ASTSource(kernel, signature, {"HAS_GAIN": has_gain, "BLOCK_R": rows, **shape}, attrs)
                except TypeError as e:
                    print(f"this Triton's ASTSource differs ({e})"); sys.exit(3)
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                ptx = compiled.asm["ptx"]
                # every head-vector load and store moves 16 bytes (8 bf16): no 2-byte access but the gain's, one
                # per row a thread holds (a gather by head), so at most one per 16-byte store
                scalar_loads = len(re.findall(r"ld\\.global(?:\\.[a-z]+)*\\.b16\\s", ptx))
                scalar_stores = len(re.findall(r"st\\.global(?:\\.[a-z]+)*\\.b16\\s", ptx))
                vector_stores = len(re.findall(r"st\\.global(?:\\.[a-z]+)*\\.v4\\.b32\\s", ptx))
                allowed = vector_stores if has_gain else 0
                assert vector_stores > 0 and scalar_loads <= allowed and scalar_stores == 0, \\
                    (name, rows, warps, has_gain, scalar_loads, scalar_stores, vector_stores)
                if not os.access(ptxas, os.X_OK):
                    continue
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "k.ptx")
                    with open(path, "w") as f:
                        f.write(ptx)
                    out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                                         capture_output=True, text=True, timeout=300)
                assert out.returncode == 0, out.stderr[-2000:]
                assert "0 bytes spill stores" in out.stderr, (name, rows, warps, has_gain, out.stderr[-2000:])
    print("compiled")
""")


# --- GPU -----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def qk_op():
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    op = tg.triton_qk_norm_rope()
    if not op:
        pytest.skip("Triton does not import")
    return op


def gpu_inputs(B, T, H, Hkv, D, rope, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)
    cos, sin = tg.rope_tables(T, rope, 10000.0, T, "cuda", torch.bfloat16)
    gain = torch.rand(H, generator=g) + 1.0
    return q.cuda().bfloat16(), k.cuda().bfloat16(), cos, sin, gain.cuda().bfloat16()


@pytest.mark.parametrize("shape", [(4, 256, 8, 4, 64, 16), (2, 100, 6, 2, 64, 64), (3, 33, 4, 4, 32, 0)])
def test_op_matches_the_plain_path_in_bf16(qk_op, shape):
    q, k, cos, sin, gain = gpu_inputs(*shape)
    q.requires_grad_(), k.requires_grad_(), gain.requires_grad_()
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    got_q, got_k = qk_op(q, k, cos, sin, gain)
    torch.autograd.backward((got_q, got_k), (dq_out, dk_out))
    got = [got_q, got_k, q.grad, k.grad, gain.grad]
    q32, k32, gain32 = (t.detach().float().requires_grad_() for t in (q, k, gain))
    ref_q, ref_k = reference(q32, cos.float(), sin.float(), gain32), reference(k32, cos.float(), sin.float(), None)
    torch.autograd.backward((ref_q, ref_k), (dq_out.float(), dk_out.float()))
    for a, b in zip(got, [ref_q, ref_k, q32.grad, k32.grad, gain32.grad]):
        b = b.detach()
        torch.testing.assert_close(a.float(), b, rtol=2 ** -7, atol=2 ** -7 * b.pow(2).mean().sqrt().item())


def test_compiled_attention_has_no_graph_break_and_matches_the_plain_path(qk_op):
    """One attention layer's compiled training forward + backward: QK_KERNEL=triton against torch."""
    torch.manual_seed(0)
    results = {}
    for kernel in ("triton", "torch"):
        torch.manual_seed(0)
        attn = tg.Attention(256, 4, 2, 5.0, use_xsa=True, qk_kernel=kernel).cuda()
        x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cos, sin = tg.rope_tables(128, 16, 10000.0, 128, "cuda", torch.bfloat16)
        ctx = tg.LayerContext(attend=tg.bind_causal_sdpa(None, 0), rope=(cos, sin))
        compiled = torch.compile(lambda x: attn(x, ctx), fullgraph=True)
        out = compiled(x)
        out.float().square().mean().backward()
        results[kernel] = [out.detach().float(), x.grad.float(), attn.q_gain.grad.float(), attn.c_q.weight.grad.float()]
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.pow(2).mean().sqrt().item())


def test_benchmark_says_it_needs_a_gpu():
    if CUDA:
        pytest.skip("checks the message on a machine without CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_qk.py"), "--iters", "2"], capture_output=True,
                          text=True, timeout=120, env=subprocess_env({}))
    assert proc.returncode == 1 and proc.stderr.strip() == "bench_qk: needs a CUDA GPU", proc.stderr[-2000:]
