// The interface between the CUTLASS kernel (mlp_down_backward.cu, CUDA and CUTLASS only) and the torch
// binding (binding.cpp, torch only): plain pointers, sizes and a stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace cutlass_evt_fusion {

// The kernel's tile: M, N and K must be multiples of these (the op refuses other shapes).
constexpr int kTileM = 128;
constexpr int kTileN = 256;
constexpr int kTileK = 64;

struct MlpDownBackwardProblem {
  void const* grad_out;  // [m, k] bf16, row-major
  void const* w_down;    // [k, n] bf16, row-major
  void const* pre;       // [m, n] bf16, row-major
  void* out;             // [m, n] bf16, row-major
  int m;
  int n;
  int k;
  int device;
};

std::size_t mlp_down_backward_workspace_size(MlpDownBackwardProblem const& problem);

// Launches on `stream`; returns 0, or a non-zero code with *error set to a static message.
int mlp_down_backward_run(MlpDownBackwardProblem const& problem, void* workspace, cudaStream_t stream,
                          char const** error);

}  // namespace cutlass_evt_fusion
