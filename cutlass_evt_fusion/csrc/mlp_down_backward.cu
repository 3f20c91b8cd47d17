// The MLP's backward through the activation, as one CUTLASS 3.x SM90 GEMM with a fused epilogue:
//
//     dpre[M, N] = (grad_out[M, K] . w_down[K, N]) * phi'(pre[M, N])        (bf16 in and out)
//
// with phi(u) = LeakyReLU_0.5(u)^2, so phi'(u) = 2u for u > 0 and 0.5u otherwise. grad_out is dL/dY of
// the MLP output, w_down is the down projection as stored ([K = model dim, N = hidden], row-major, used
// as-is, no transpose copy) and pre is the pre-activation U = x . w_up^T that the Triton forward wrote.
//
// The epilogue is an epilogue visitor tree (EVT) evaluated on the fp32 accumulator tile:
//
//     multiplies( AccFetch , LeakyReluSqGrad( AuxLoad(pre) ) )   -> rounded once to bf16, stored by TMA
//
// AuxLoad brings the matching pre tile into shared memory by TMA on the epilogue's producer warp,
// LeakyReluSqGrad turns it into phi' in fp32 (exact: 2u and 0.5u are power-of-two scalings), and the
// root multiplies it into the accumulator. C is void: nothing but pre is read in the epilogue.
//
// This translation unit holds only CUDA and CUTLASS code (no torch headers), so it can be compiled
// on its own for sm_90a (tests/test_cutlass_evt_fusion.py does, without a GPU). The torch op lives in
// binding.cpp and calls the two extern "C++" functions at the bottom.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/array.h"
#include "cutlass/functional.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "mlp_down_backward.h"

// Without sm_90a's features (wgmma, setmaxnreg) CUTLASS compiles the SM90 kernel to an empty body that
// only reports an error at run time; stop the build instead.
#if !defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#error "cutlass_evt_fusion needs CUDA 12+ (CUTLASS's SM90 support)"
#endif
#if defined(__CUDA_ARCH__) && !defined(CUTLASS_ARCH_MMA_SM90A_ENABLED)
#error "cutlass_evt_fusion must be compiled for sm_90a only: -gencode arch=compute_90a,code=sm_90a"
#endif

namespace cutlass_evt_fusion {
namespace {

using namespace cute;

// --- phi' as an EVT compute functor -------------------------------------------------------------
// Sm90Compute instantiates the functor on cutlass::Array<ElementCompute, FragmentSize> (and names
// it on ElementCompute to look for an Arguments member), so there is a scalar form and an Array form.

template <class T>
struct LeakyReluSqGrad {
  CUTLASS_HOST_DEVICE T operator()(T const& u) const {
    return u > T(0) ? T(2) * u : T(0.5f) * u;
  }
};

template <int N>
struct LeakyReluSqGrad<cutlass::Array<float, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& u) const {
    LeakyReluSqGrad<float> scalar;
    cutlass::Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      out[i] = scalar(u[i]);
    }
    return out;
  }
};

// --- the GEMM -----------------------------------------------------------------------------------

using ElementIn = cutlass::bfloat16_t;   // grad_out, w_down, pre
using ElementOut = cutlass::bfloat16_t;  // dpre
using ElementAccumulator = float;
using ElementCompute = float;

using LayoutA = cutlass::layout::RowMajor;    // grad_out [M, K], K contiguous
using LayoutB = cutlass::layout::RowMajor;    // w_down [K, N], N contiguous (an N-major B operand)
using LayoutD = cutlass::layout::RowMajor;    // dpre [M, N]
using LayoutAux = cutlass::layout::RowMajor;  // pre [M, N]

constexpr int kAlignment = 128 / cutlass::sizeof_bits<ElementIn>::value;  // 8 elements: 16-byte TMA rows

// 128 x 256 output tiles, K in steps of 64 (kTileM/N/K in mlp_down_backward.h): two consumer
// warpgroups each own 64 x 256 of the tile (cooperative schedule), a producer warp feeds them by TMA.
using TileShape = Shape<Int<kTileM>, Int<kTileN>, Int<kTileK>>;
using ClusterShape = Shape<_1, _1, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
using EpilogueTileType = cutlass::epilogue::collective::EpilogueTileAuto;

// The AuxLoad node needs the epilogue tile and pipeline depth that the epilogue builder will pick;
// the descriptors compute them the same way the builder does.
using EpilogueDescriptor = cutlass::epilogue::collective::detail::EpilogueDescriptor<
    TileShape, EpilogueTileType, void, ElementOut, EpilogueSchedule>;
using AuxDescriptor = cutlass::epilogue::collective::detail::AuxLoadDescriptor<
    EpilogueDescriptor, LayoutAux, ElementIn>;

using PreLoad = cutlass::epilogue::fusion::Sm90AuxLoad<
    AuxDescriptor::Stages, typename EpilogueDescriptor::EpilogueTile, ElementIn,
    typename AuxDescriptor::Stride, typename AuxDescriptor::SmemLayoutAtom, typename AuxDescriptor::CopyOpS2R,
    kAlignment>;

constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// phi'(pre), kept in fp32
using PhiGrad = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<LeakyReluSqGrad, ElementCompute, ElementCompute, kRound>,
    PreLoad>;

// acc * phi'(pre), rounded to bf16 once
using EpilogueTree = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementOut, ElementCompute, kRound>,
    cutlass::epilogue::fusion::Sm90AccFetch,
    PhiGrad>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    TileShape, ClusterShape, EpilogueTileType,
    ElementAccumulator, ElementCompute,
    void, LayoutD, kAlignment,          // no C
    ElementOut, LayoutD, kAlignment,    // D = dpre
    EpilogueSchedule,
    EpilogueTree>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementIn, LayoutA, kAlignment,
    ElementIn, LayoutB, kAlignment,
    ElementAccumulator,
    TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<
    Shape<int, int, int, int>,  // M, N, K, L (L = 1)
    CollectiveMainloop,
    CollectiveEpilogue>;        // default tile scheduler: persistent, one CTA per SM

using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

static_assert(cute::is_same_v<typename Gemm::ElementA, ElementIn>, "A must be bf16");
static_assert(cute::is_same_v<typename Gemm::ElementD, ElementOut>, "D must be bf16");

int sm_count_of(int device) {
  // cudaDeviceGetAttribute is cheap but not free; the count never changes for a device.
  static int cached[64] = {0};
  if (device < 0 || device >= 64) {
    return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  }
  if (cached[device] == 0) {
    cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  }
  return cached[device];
}

typename Gemm::Arguments make_arguments(MlpDownBackwardProblem const& p) {
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  using StrideAux = typename AuxDescriptor::Stride;

  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(p.m, p.k, 1));
  StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(p.n, p.k, 1));
  StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(p.m, p.n, 1));
  StrideAux stride_aux = cutlass::make_cute_packed_stride(StrideAux{}, cute::make_shape(p.m, p.n, 1));

  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {p.m, p.n, p.k, 1};
  args.mainloop.ptr_A = static_cast<ElementIn const*>(p.grad_out);
  args.mainloop.dA = stride_a;
  args.mainloop.ptr_B = static_cast<ElementIn const*>(p.w_down);
  args.mainloop.dB = stride_b;

  // EVT arguments nest like the tree, children first: {AccFetch, {AuxLoad, phi'}, multiplies}.
  auto& tree = args.epilogue.thread;
  tree.op_1.op_0.ptr_aux = static_cast<ElementIn const*>(p.pre);
  tree.op_1.op_0.null_default = ElementIn(0.0f);
  tree.op_1.op_0.dAux = stride_aux;

  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = {};
  args.epilogue.ptr_D = static_cast<ElementOut*>(p.out);
  args.epilogue.dD = stride_d;

  args.hw_info.device_id = p.device;
  args.hw_info.sm_count = sm_count_of(p.device);
  return args;
}

}  // namespace

std::size_t mlp_down_backward_workspace_size(MlpDownBackwardProblem const& problem) {
  return Gemm::get_workspace_size(make_arguments(problem));
}

int mlp_down_backward_run(MlpDownBackwardProblem const& problem, void* workspace, cudaStream_t stream,
                          char const** error) {
  *error = nullptr;
  typename Gemm::Arguments args = make_arguments(problem);
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) {
    *error = cutlassGetStatusString(status);
    return 1;
  }
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) {
    *error = cutlassGetStatusString(status);
    return 2;
  }
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    *error = cutlassGetStatusString(status);
    return 3;
  }
  cudaError_t launch = cudaGetLastError();
  if (launch != cudaSuccess) {
    *error = cudaGetErrorString(launch);
    return 4;
  }
  return 0;
}

}  // namespace cutlass_evt_fusion
