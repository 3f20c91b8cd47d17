// torch op cutlass_evt_fusion::mlp_down_backward(grad_out, w_down, pre) -> dpre
//
//   grad_out [M, K] bf16, w_down [K, N] bf16 (the down projection's weight as stored), pre [M, N] bf16
//   dpre = (grad_out . w_down) * phi'(pre), phi(u) = LeakyReLU_0.5(u)^2, fp32 accumulate, bf16 out.
//
// Registered with TORCH_LIBRARY (no Python module): load the shared object with torch.ops.load_library;
// the Python package registers the fake (meta) kernel so torch.compile can trace through the op.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "mlp_down_backward.h"

// Only c10's CUDA headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and cuSPARSE): this file
// also compiles, for the compile-only test, against a CPU torch wheel and a bare nvcc toolkit.

namespace cutlass_evt_fusion {
namespace {

void check_operand(at::Tensor const& t, char const* name) {
  TORCH_CHECK(t.is_cuda(), "cutlass_evt_fusion::mlp_down_backward: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "cutlass_evt_fusion::mlp_down_backward: ", name,
              " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "cutlass_evt_fusion::mlp_down_backward: ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), "cutlass_evt_fusion::mlp_down_backward: ", name, " must be contiguous (row-major)");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, "cutlass_evt_fusion::mlp_down_backward: ",
              name, " must start on a 16-byte boundary (TMA)");
}

at::Tensor mlp_down_backward_cuda(at::Tensor const& grad_out, at::Tensor const& w_down, at::Tensor const& pre) {
  check_operand(grad_out, "grad_out");
  check_operand(w_down, "w_down");
  check_operand(pre, "pre");
  int64_t const m = grad_out.size(0), k = grad_out.size(1), n = w_down.size(1);
  TORCH_CHECK(w_down.size(0) == k, "cutlass_evt_fusion::mlp_down_backward: grad_out is [", m, ", ", k,
              "] but w_down is [", w_down.size(0), ", ", n, "]: w_down must be [K, N] with K = grad_out.size(1)");
  TORCH_CHECK(pre.size(0) == m && pre.size(1) == n, "cutlass_evt_fusion::mlp_down_backward: pre is [", pre.size(0),
              ", ", pre.size(1), "], expected [", m, ", ", n, "]");
  TORCH_CHECK(grad_out.device() == w_down.device() && grad_out.device() == pre.device(),
              "cutlass_evt_fusion::mlp_down_backward: all operands must be on one device");
  TORCH_CHECK(m % kTileM == 0 && n % kTileN == 0 && k % kTileK == 0,
              "cutlass_evt_fusion::mlp_down_backward: shape M=", m, " N=", n, " K=", k,
              " is not a multiple of the kernel tile ", kTileM, "x", kTileN, "x", kTileK,
              " (use the PyTorch path for this shape)");
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "cutlass_evt_fusion::mlp_down_backward: sizes must fit int32");

  c10::cuda::CUDAGuard guard(grad_out.device());
  int const device = static_cast<int>(grad_out.get_device());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, "cutlass_evt_fusion::mlp_down_backward: built for sm_90a (H100/H200), "
              "this GPU is sm_", major, minor);

  at::Tensor out = at::empty({m, n}, grad_out.options());
  if (m == 0 || n == 0) {
    return out;
  }
  if (k == 0) {
    return out.zero_();
  }
  MlpDownBackwardProblem problem{grad_out.data_ptr(), w_down.data_ptr(), pre.data_ptr(), out.data_ptr(),
                                 static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                                 device};
  std::size_t const workspace_bytes = mlp_down_backward_workspace_size(problem);
  at::Tensor workspace;  // the caching allocator's memory, not a cudaMalloc per call
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, grad_out.options().dtype(at::kByte));
  }
  char const* error = nullptr;
  int const code = mlp_down_backward_run(problem, workspace_bytes > 0 ? workspace.data_ptr() : nullptr,
                                         c10::cuda::getCurrentCUDAStream(device).stream(), &error);
  TORCH_CHECK(code == 0, "cutlass_evt_fusion::mlp_down_backward: CUTLASS ",
              code == 1 ? "can_implement" : code == 2 ? "initialize" : code == 3 ? "run" : "launch",
              " failed: ", error ? error : "unknown error");
  return out;
}

}  // namespace
}  // namespace cutlass_evt_fusion

TORCH_LIBRARY(cutlass_evt_fusion, m) {
  m.def("mlp_down_backward(Tensor grad_out, Tensor w_down, Tensor pre) -> Tensor");
}

TORCH_LIBRARY_IMPL(cutlass_evt_fusion, CUDA, m) {
  m.impl("mlp_down_backward", &cutlass_evt_fusion::mlp_down_backward_cuda);
}
