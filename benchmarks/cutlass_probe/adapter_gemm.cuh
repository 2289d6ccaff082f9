// The adapter mode's forward in one SM90 GEMM (issue 12's epilogue route, benchmarks/NOTES.md):
//   y = alpha[m] * (x_q W_q^T + xa' B^T),   alpha[m] = s_x[m] s_w,   xa' = scaling (x_q A_q^T)
// with x_q (M x K) and W_q (N x K) E4M3, xa' (M x r16) and B (N x r16) bf16, y bf16. CUTLASS's
// stock cooperative FP8 kernel (TMA, warp-specialised, FP8 fast accumulation) runs its K loop
// over x_q and W_q, then ceil(r16 / 64) more k-tiles of bf16 wgmma over xa' and B into the same
// fp32 accumulators, then an epilogue that scales each row by alpha[m]. xa' is in the
// accumulators' units (scaling times x_q A_q^T's raw sum), which is what makes the one row scale
// right for both parts.
//
// Why the adapter's k-tiles need no pipeline of their own: a 64-wide bf16 k-tile has 128-byte rows,
// as the 128-wide FP8 k-tile does, so both fill a pipeline stage's buffers with the same bytes
// under the same 128-byte swizzle; the producer loads the last k-tiles from xa' and B through their
// own TMA descriptors into the same stages, and the consumers read them with bf16 wgmma
// descriptors over the same shared memory. The kernel sees a problem of K_total = 128 (ceil(K /
// 128) + ceil(r16 / 64)) and keeps its pipeline bookkeeping unchanged.
//
// Measured (benchmarks/NOTES.md, H200): correct, but no faster than today's forward. Runs 98-103:
// CUTLASS's stock cooperative kernels run 2-16% behind cuBLASLt's at the LLaMA-7B shapes under
// sustained load. Runs 115-116: the stock ping-pong 128x128 kernel runs at cuBLASLt's speed; the
// adapter kernels had lost 2-40% to their stock ones because ptxas serialised their wgmma (C7519,
// the branch between the FP8 and bf16 k-tiles in one loop), and lose 1-11% with the two loops
// below. With x_q A_q^T from cuBLASLt before it (~40 us) the route still only pays at
// 4096 -> 11008 (-18 us a forward).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "launch.cuh"

using namespace cute;

namespace {

// CUTLASS's stock FP8 mainloop (Base) with the adapter's bf16 k-tiles after its K loop.
template <class Base>
struct AdapterMainloop : Base {
  using typename Base::DispatchPolicy;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::TiledMma;
  using typename Base::TileShape;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using ClusterShape = typename DispatchPolicy::ClusterShape;
  static constexpr int Stages = DispatchPolicy::Stages;
  static constexpr int kAdapterK = 64;  // bf16 elements of one k-tile (128 bytes a row)
  static_assert(size<2>(TileShape{}) == 128 && sizeof(typename Base::ElementA) == 1 &&
                    sizeof(typename Base::ElementB) == 1,
                "the adapter's k-tiles share the stages of a 128-byte FP8 k-tile");

  using Element16 = cutlass::bfloat16_t;
  using TileShape16 = Shape<decltype(size<0>(TileShape{})), decltype(size<1>(TileShape{})),
                            Int<kAdapterK>>;
  using SmemLayoutA16 = decltype(tile_to_shape(
      GMMA::Layout_K_SW128_Atom<Element16>{},
      make_shape(shape<0>(TileShape{}), Int<kAdapterK>{}, Int<Stages>{}), Step<_1, _2, _3>{}));
  using SmemLayoutB16 = decltype(tile_to_shape(
      GMMA::Layout_K_SW128_Atom<Element16>{},
      make_shape(shape<1>(TileShape{}), Int<kAdapterK>{}, Int<Stages>{}), Step<_1, _2, _3>{}));
  static_assert(cosize_v<SmemLayoutA16> * 2 == cosize_v<SmemLayoutA> &&
                    cosize_v<SmemLayoutB16> * 2 == cosize_v<SmemLayoutB>,
                "a bf16 k-tile must fill an FP8 stage exactly");
  static constexpr int kWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
  using TiledMma16 = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element16, Element16, float, TileShape16, GMMA::Major::K,
                           GMMA::Major::K>(),
      Layout<Shape<Int<kWarpGroups>, _1, _1>>{}));
  using StrideAdapter = cute::Stride<int64_t, cute::Int<1>, int64_t>;  // row-major (rows, r16)

  struct Arguments {
    typename Base::ElementA const* ptr_A;
    StrideA dA;
    typename Base::ElementB const* ptr_B;
    StrideB dB;
    uint32_t mma_promotion_interval = 4;
    int k_fp8 = 0;  // K of x_q and W_q (the problem's K is the padded total)
    Element16 const* ptr_xa = nullptr;  // (M, r16) row-major
    Element16 const* ptr_b16 = nullptr;  // (N, r16) row-major
    int r16 = 0;
  };

  struct Params : Base::Params {
    using TMA_A16 = decltype(make_tma_copy_A_sm90(
        GmemTiledCopyA{},
        make_tensor(static_cast<uint16_t const*>(nullptr), make_shape(1, 1, 1), StrideAdapter{}),
        SmemLayoutA16{}(_, _, cute::Int<0>{}), TileShape16{}, ClusterShape{}));
    using TMA_B16 = decltype(make_tma_copy_B_sm90(
        GmemTiledCopyB{},
        make_tensor(static_cast<uint16_t const*>(nullptr), make_shape(1, 1, 1), StrideAdapter{}),
        SmemLayoutB16{}(_, _, cute::Int<0>{}), TileShape16{}, ClusterShape{}));
    TMA_A16 tma_load_a16;
    TMA_B16 tma_load_b16;
    int fp8_k_tiles;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void* workspace) {
    auto [M, N, K_total, L] = append<4>(problem_shape, 1);
    typename Base::Arguments base_args{args.ptr_A, args.dA, args.ptr_B, args.dB,
                                       args.mma_promotion_interval};
    // The FP8 operands' descriptors over their own K (TMA fills a partial last k-tile with zeros).
    auto fp8_shape = make_shape(M, N, args.k_fp8, L);
    Params params{Base::to_underlying_arguments(fp8_shape, base_args, workspace), {}, {}, 0};
    auto xa = make_tensor(reinterpret_cast<uint16_t const*>(args.ptr_xa),
                          make_layout(make_shape(M, args.r16, 1),
                                      StrideAdapter{int64_t(args.r16), Int<1>{}, int64_t(0)}));
    auto b16 = make_tensor(reinterpret_cast<uint16_t const*>(args.ptr_b16),
                           make_layout(make_shape(N, args.r16, 1),
                                       StrideAdapter{int64_t(args.r16), Int<1>{}, int64_t(0)}));
    params.tma_load_a16 = make_tma_copy_A_sm90(GmemTiledCopyA{}, xa,
                                               SmemLayoutA16{}(_, _, cute::Int<0>{}),
                                               TileShape16{}, ClusterShape{});
    params.tma_load_b16 = make_tma_copy_B_sm90(GmemTiledCopyB{}, b16,
                                               SmemLayoutB16{}(_, _, cute::Int<0>{}),
                                               TileShape16{}, ClusterShape{});
    params.fp8_k_tiles = (args.k_fp8 + 127) / 128;
    (void)K_total;
    return params;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K_total, L] = append<4>(problem_shape, 1);
    const int fp8_tiles = (args.k_fp8 + 127) / 128, adapter_tiles = (args.r16 + 63) / 64;
    // r16 a multiple of 64: each adapter k-tile full (the caller pads xa' and B with zeros).
    return args.k_fp8 % 16 == 0 && args.r16 % 64 == 0 && args.r16 > 0 &&
           K_total == 128 * (fp8_tiles + adapter_tiles) &&
           Base::can_implement(make_shape(M, N, args.k_fp8, L),
                               typename Base::Arguments{args.ptr_A, args.dA, args.ptr_B, args.dB});
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_a16.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_b16.get_tma_descriptor());
  }

  // The pipeline's stages as FP8 k-tiles (sA, sB) and, over the same bytes, as the adapter's
  // 16-bit k-tiles (sA16, sB16) of element type E16.
  template <class E16>
  CUTLASS_DEVICE static auto stage_views(TensorStorage& shared_tensors) {
    auto* a = shared_tensors.smem_A.data();
    auto* b = shared_tensors.smem_B.data();
    return cute::make_tuple(
        make_tensor(make_smem_ptr(a), SmemLayoutA{}), make_tensor(make_smem_ptr(b), SmemLayoutB{}),
        make_tensor(make_smem_ptr(reinterpret_cast<E16*>(a)), SmemLayoutA16{}),
        make_tensor(make_smem_ptr(reinterpret_cast<E16*>(b)), SmemLayoutB16{}));
  }

  // The stock (gA_mkl, gB_nkl) over the problem's K_total (coordinates only: k-tiles past the FP8
  // ones are never loaded through them), then xa' and B tiled (BLK, 64, m or n, t, 1).
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                Params const& params) const {
    auto [M, N, K_total, L] = problem_shape_MNKL;
    auto stock = Base::load_init(problem_shape_MNKL, params);
    const int adapter_k = K_total - 128 * params.fp8_k_tiles;  // 128 per adapter k-tile...
    const int r_extent = adapter_k / 2;                        // ...of 64 bf16 columns
    Tensor mA16 = params.tma_load_a16.get_tma_tensor(make_shape(M, r_extent, 1));
    Tensor mB16 = params.tma_load_b16.get_tma_tensor(make_shape(N, r_extent, 1));
    Tensor gA16 = local_tile(mA16, TileShape16{}, make_coord(_, _, _), Step<_1, Underscore, _1>{});
    Tensor gB16 = local_tile(mB16, TileShape16{}, make_coord(_, _, _), Step<Underscore, _1, _1>{});
    return cute::make_tuple(get<0>(stock), get<1>(stock), gA16, gB16);
  }

  // Producer: the FP8 k-tiles from x_q and W_q, then the adapter's from xa' and B.
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write, LoadInputs const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    auto [sA, sB, sA16, sB16] = stage_views<uint16_t>(shared_tensors);  // TMA: bits, not values

    constexpr uint32_t cluster_shape_x = get<0>(ClusterShape{});
    uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x,
                                    block_rank_in_cluster / cluster_shape_x};
    auto block_tma_a = params.tma_load_a.get_slice(cluster_local_block_id.y);
    auto block_tma_b = params.tma_load_b.get_slice(cluster_local_block_id.x);
    auto block_tma_a16 = params.tma_load_a16.get_slice(cluster_local_block_id.y);
    auto block_tma_b16 = params.tma_load_b16.get_slice(cluster_local_block_id.x);

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor gA = get<0>(load_inputs)(_, _, m_coord, _, l_coord);    // (BLK_M, BLK_K, k)
    Tensor gB = get<1>(load_inputs)(_, _, n_coord, _, l_coord);    // (BLK_N, BLK_K, k)
    Tensor gA16 = get<2>(load_inputs)(_, _, m_coord, _, Int<0>{});  // (BLK_M, 64, t)
    Tensor gB16 = get<3>(load_inputs)(_, _, n_coord, _, Int<0>{});  // (BLK_N, 64, t)

    Tensor tAgA = block_tma_a.partition_S(gA);
    Tensor tAsA = block_tma_a.partition_D(sA);
    Tensor tBgB = block_tma_b.partition_S(gB);
    Tensor tBsB = block_tma_b.partition_D(sB);
    Tensor tAgA16 = block_tma_a16.partition_S(gA16);
    Tensor tAsA16 = block_tma_a16.partition_D(sA16);
    Tensor tBgB16 = block_tma_b16.partition_S(gB16);
    Tensor tBsB16 = block_tma_b16.partition_D(sB16);

    uint16_t mcast_mask_a = 0, mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int n = 0; n < size<1>(block_layout); ++n)
        mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x, n, Int<0>{}));
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m)
        mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int write_stage = smem_pipe_write.index();
      const int k = *k_tile_iter;
      if (k < params.fp8_k_tiles) {
        copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, k),
             tAsA(_, _, _, write_stage));
        copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, k),
             tBsB(_, _, _, write_stage));
      } else {
        const int t = k - params.fp8_k_tiles;
        copy(params.tma_load_a16.with(*tma_barrier, mcast_mask_a), tAgA16(_, _, _, t),
             tAsA16(_, _, _, write_stage));
        copy(params.tma_load_b16.with(*tma_barrier, mcast_mask_b), tBgB16(_, _, _, t),
             tBsB16(_, _, _, write_stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  // Consumers: the stock mainloop's order (one k-tile of wgmma in flight), the adapter's k-tiles
  // (the last ones) through bf16 wgmma into the same accumulators.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                          FrgTensorC& accum, int k_tile_count, int thread_idx,
                          TensorStorage& shared_tensors, Params const& params) {
    auto [sA, sB, sA16, sB16] = stage_views<Element16>(shared_tensors);

    Layout warp_group_thread_layout =
        make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int warp_group_idx =
        __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    TiledMma16 tiled_mma16;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    auto thread_mma16 = tiled_mma16.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));
    Tensor tCrA16 = thread_mma16.make_fragment_A(thread_mma16.partition_A(sA16));
    Tensor tCrB16 = thread_mma16.make_fragment_B(thread_mma16.partition_B(sB16));
    const int adapter_tiles = k_tile_count - params.fp8_k_tiles;

    PipelineState smem_pipe_release = smem_pipe_read;
    warpgroup_fence_operand(accum);
    {  // The first FP8 k-tile overwrites the accumulators.
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      const int read_stage = smem_pipe_read.index();
      warpgroup_arrive();
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, read_stage), tCrB(_, _, k_block, read_stage),
                   accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
    }
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    tiled_mma16.accumulate_ = GMMA::ScaleOut::One;
    warpgroup_fence_operand(accum);

    // Each later k-tile: wait for its stage, issue its wgmma (FP8, or the adapter's bf16), keep one
    // k-tile in flight (the stock mainloop's K_PIPE_MMAS = 1), release the stage before it. Two
    // loops rather than one with a branch on the k-tile's kind: with the branch, ptxas reported
    // warpgroup.arrive injected around the wgmma (C7519) for the ping-pong kernels (run 115).
    auto k_tile = [&](auto& mma, auto const& frag_a, auto const& frag_b) {
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      const int read_stage = smem_pipe_read.index();
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      cute::gemm(mma, frag_a(_, _, _, read_stage), frag_b(_, _, _, read_stage), accum);
      warpgroup_commit_batch();
      warpgroup_wait<1>();
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_read;
      ++smem_pipe_release;
    };
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = params.fp8_k_tiles - 1; t > 0; --t) k_tile(tiled_mma, tCrA, tCrB);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = adapter_tiles; t > 0; --t) k_tile(tiled_mma16, tCrA16, tCrB16);
    warpgroup_fence_operand(accum);
  }
};

// KernelSchedule / EpilogueSchedule: CUTLASS's cooperative pair (two consumer warp groups share a
// tile), or the ping-pong pair (KernelTmaWarpSpecializedPingpongFP8FastAccum with
// TmaWarpSpecialized: each consumer warp group owns a tile, the two alternate their mainloop and
// epilogue), the schedule of cuBLASLt's 128x128 kernel with row scales (run 113's profile).
// kAdapterTiles = false: CUTLASS's stock mainloop under the same row-scale epilogue (xa' and B
// unread, y = alpha[m] x_q W_q^T), which separates what the adapter's k-tiles cost from what the
// epilogue costs.
template <class TileShape, class ClusterShape,
          class KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
          class EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative,
          bool kAdapterTiles = true>
struct AdapterGemm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;     // x_q: M x K
  using LayoutB = cutlass::layout::ColumnMajor;  // W_q^T: K x N column-major = W_q: N x K
  using LayoutD = cutlass::layout::RowMajor;

  // D = alpha[m] * acc: a per-row alpha (a vector over M), no bias, no C.
  using Fusion = cutlass::epilogue::fusion::PerRowLinCombPerRowBiasEltAct<
      cutlass::epilogue::thread::Identity, ElementD, float, ElementD, ElementD, float>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, 8, ElementD,
      LayoutD, 8, EpilogueSchedule, Fusion>::CollectiveOp;
  using StockMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, 16, ElementB,
      LayoutB, 16, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Mainloop =
      std::conditional_t<kAdapterTiles, AdapterMainloop<StockMainloop>, StockMainloop>;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static torch::Tensor run(const torch::Tensor& xq, const torch::Tensor& wq,
                           const torch::Tensor& xa, const torch::Tensor& b16,
                           const torch::Tensor& alpha, int64_t swizzle, int64_t raster) {
    TORCH_CHECK(xq.scalar_type() == at::kFloat8_e4m3fn && wq.scalar_type() == at::kFloat8_e4m3fn,
                "adapter gemm: E4M3 x_q and W_q");
    TORCH_CHECK(xa.scalar_type() == at::kBFloat16 && b16.scalar_type() == at::kBFloat16 &&
                    alpha.scalar_type() == at::kFloat,
                "adapter gemm: bf16 xa' and B, fp32 alpha");
    TORCH_CHECK(xq.is_contiguous() && wq.is_contiguous() && xa.is_contiguous() &&
                    b16.is_contiguous() && alpha.is_contiguous(),
                "adapter gemm: contiguous operands");
    const int M = static_cast<int>(xq.size(0)), K = static_cast<int>(xq.size(1)),
              N = static_cast<int>(wq.size(0)), r16 = static_cast<int>(xa.size(1));
    TORCH_CHECK(wq.size(1) == K && xa.size(0) == M && b16.size(0) == N && b16.size(1) == r16 &&
                    alpha.numel() == M,
                "adapter gemm: shapes x_q (M, K), W_q (N, K), xa' (M, r16), B (N, r16), alpha (M)");
    const int k_total = kAdapterTiles ? 128 * ((K + 127) / 128 + (r16 + 63) / 64) : K;
    torch::Tensor y = torch::empty({M, N}, xq.options().dtype(torch::kBFloat16));
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    typename Mainloop::Arguments mainloop{
        reinterpret_cast<const ElementA*>(xq.data_ptr()),
        cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1)),
        reinterpret_cast<const ElementB*>(wq.data_ptr()),
        cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1)),
        4};
    if constexpr (kAdapterTiles) {
      mainloop.k_fp8 = K;
      mainloop.ptr_xa = reinterpret_cast<const cutlass::bfloat16_t*>(xa.data_ptr());
      mainloop.ptr_b16 = reinterpret_cast<const cutlass::bfloat16_t*>(b16.data_ptr());
      mainloop.r16 = r16;
    }
    auto* d = reinterpret_cast<ElementD*>(y.data_ptr());
    const auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, k_total, 1},
                                  mainloop,
                                  {{}, nullptr, stride_d, d, stride_d}};
    args.epilogue.thread.alpha_ptr = alpha.data_ptr<float>();
    args.epilogue.thread.dAlpha = {bool(1), cute::_0{}, int64_t(M)};
    args.epilogue.thread.beta = 0.f;
    // The persistent scheduler's tile order: raster 0 lets CUTLASS choose, 1 along M, 2 along N;
    // swizzle groups that many tiles for L2 reuse.
    using Raster = typename Kernel::TileScheduler::RasterOrderOptions;
    args.scheduler.max_swizzle_size = static_cast<int>(swizzle);
    args.scheduler.raster_order = raster == 1   ? Raster::AlongM
                                  : raster == 2 ? Raster::AlongN
                                                : Raster::Heuristic;
    launch<Gemm>(args, xq.options(), "adapter gemm");
    return y;
  }
};

}  // namespace
