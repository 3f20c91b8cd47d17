"""Fused MLP backward through LeakyReLU(0.5)^2 as one CUTLASS 3.x SM90 GEMM with an epilogue visitor tree.

For the MLP  Y = phi(X W_up^T) W_down^T  with  phi(u) = LeakyReLU_0.5(u)^2  and G = dL/dY,

    dpre = (G . W_down) * phi'(pre),   phi'(u) = 2u (u > 0), 0.5u (u <= 0),   pre = X W_up^T

computed by `torch.ops.cutlass_evt_fusion.mlp_down_backward(grad_out, w_down, pre)`: grad_out [M, K],
w_down [K, N] (the down projection's weight as stored), pre [M, N], all bf16 and contiguous; fp32
accumulation; the product with phi' happens on the fp32 accumulator in the GEMM's epilogue and is
rounded to bf16 once. M, N, K must be multiples of TILE_M, TILE_N, TILE_K (`supports`); the op refuses
other shapes with an error naming the tile, and callers fall back to `mlp_down_backward_reference`.

    available()            True when the compiled op is loaded and this machine has an sm_90 GPU
    unavailable_reason()   why not, in one line
    mlp_down_backward      the op (a torch.library op with a fake kernel: torch.compile traces through it)
    mlp_down_backward_reference, leaky_relu_sq, leaky_relu_sq_grad   plain PyTorch, any device and dtype

Build: pip install --no-build-isolation ./cutlass_evt_fusion (see setup.py and README.md).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

TILE_M, TILE_N, TILE_K = 128, 256, 64  # csrc/mlp_down_backward.h: kTileM, kTileN, kTileK

_OP_NAME = "cutlass_evt_fusion::mlp_down_backward"


# --- the reference -------------------------------------------------------------------------------

def leaky_relu_sq(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = LeakyReLU(u, 0.5)^2."""
    return torch.nn.functional.leaky_relu(u, 0.5).square()


def leaky_relu_sq_grad(u: torch.Tensor) -> torch.Tensor:
    """phi'(u): d/du u^2 = 2u for u > 0; d/du (0.5u)^2 = 0.5u for u < 0 (and 0 at u = 0)."""
    return torch.where(u > 0, 2.0 * u, 0.5 * u)


def mlp_down_backward_reference(grad_out: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """(grad_out . w_down) * phi'(pre) computed in fp32 (fp64 for fp64 inputs) and rounded once to grad_out's
    dtype: the op's math."""
    compute = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    acc = grad_out.to(compute) @ w_down.to(compute)
    return (acc * leaky_relu_sq_grad(pre.to(compute))).to(grad_out.dtype)


def supports(m: int, n: int, k: int) -> bool:
    """Whether the kernel's tile divides the problem (grad_out [m, k], w_down [k, n])."""
    return m > 0 and n > 0 and k > 0 and m % TILE_M == 0 and n % TILE_N == 0 and k % TILE_K == 0


# --- loading the compiled op ---------------------------------------------------------------------

def _library_path():
    """The built shared object: next to this file (installed package), else the installed distribution's
    copy (when this file is the source tree's, e.g. running from the repository root)."""
    here = sorted(Path(__file__).resolve().parent.glob("_C*.so"))
    if here:
        return here[0]
    try:
        files = importlib.metadata.files("cutlass_evt_fusion") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("_C") and f.suffix == ".so":
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def _load():
    path = _library_path()
    if path is None:
        return None, "the extension is not built: pip install --no-build-isolation ./cutlass_evt_fusion"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return None, f"{path.name} does not load ({' '.join(str(e).split())[:200]})"
    return path, ""


_LIBRARY, _LOAD_ERROR = _load()

if _LIBRARY is not None:
    @torch.library.register_fake(_OP_NAME)
    def _mlp_down_backward_fake(grad_out, w_down, pre):
        torch._check(grad_out.dim() == 2 and w_down.dim() == 2 and pre.dim() == 2)
        return grad_out.new_empty((grad_out.size(0), w_down.size(1)))


def unavailable_reason() -> str:
    """Empty when available(); otherwise why the op cannot run here."""
    if _LIBRARY is None:
        return _LOAD_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"the kernel is built for sm_90a (H100/H200); this GPU is sm_{major}{minor}"
    return ""


def available() -> bool:
    return unavailable_reason() == ""


def mlp_down_backward(grad_out: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The CUTLASS op (raises RuntimeError when it is not built, or for shapes `supports` refuses)."""
    if _LIBRARY is None:
        raise RuntimeError(f"cutlass_evt_fusion unavailable: {_LOAD_ERROR}")
    # Refused here rather than by the C++ checks: on the H200 (torch 2.11) an exception thrown from
    # inside the op crashed the process instead of reaching Python (2026-12-02, under investigation).
    (m, k), n = grad_out.shape, w_down.shape[-1]
    if not supports(m, n, k):
        raise RuntimeError(f"cutlass_evt_fusion::mlp_down_backward: [{m}, {k}] x [{k}, {n}] is not a multiple of the "
                           f"kernel tile {TILE_M}x{TILE_N}x{TILE_K}: use the plain matmuls for this shape")
    return torch.ops.cutlass_evt_fusion.mlp_down_backward(grad_out, w_down, pre)


__all__ = ["TILE_M", "TILE_N", "TILE_K", "available", "unavailable_reason", "supports", "mlp_down_backward",
           "mlp_down_backward_reference", "leaky_relu_sq", "leaky_relu_sq_grad"]
