// The fused pass over g in cast mode on Hopper: g cast into the dgrad operand at a scale already
// known (from the partial maxima of adapter_u.cu's row pass) while dB = scaling g^T xa forms, g read
// once. The same job as backward.cu's grad_quantize_product_kernel in its cast mode, which streams
// tiles with cp.async and multiplies them with mma.sync; that kernel is latency-bound (run 94:
// tensor pipe 25%, DRAM ~50%) and its cast mode ran 38 us at 4096 -> 4096 where its amax mode took
// 29 (run 118).
//
// Block (bx, by): g's columns [128 bx, 128 bx + 128) over the rows of split by. One producer warp
// streams 64-row tiles, two 64 x 64 boxes of g and the matching 64 x 64 box of xa (zeros past r),
// with TMA (128-byte swizzle, zeros past the edges) through four shared-memory stages; two consumer
// warpgroups, one per box of g, cast it (reading it back through the swizzle) and multiply it with
// wgmma: their 64 columns' partial of dB += box^T xa_box, both operands MN-major (the boxes as
// stored, rows = g's rows = the sum's index). The two share xa's box: with 64-column blocks xa's
// reads from L2 (1 MB a column tile) were as many bytes as g's from DRAM (run 119: 3.4 TB/s of g).
// The fp32 partials go to ws[by] for grad_b_reduce_kernel. Two blocks fit an SM (97 KB each).
#include <cudaTypedefs.h>

#include "grad_pass.cuh"
#include "hopper.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kFRows = 64;                        // rows of g per tile (wgmma's K steps: 4 x 16)
constexpr int kFBox = 64;                         // columns of g per box (wgmma's M)
constexpr int kFBoxes = 2;                        // boxes per block, one per consumer warpgroup
constexpr int kFCols = kFBox * kFBoxes;           // columns of g per block
constexpr int kFStages = 4;
constexpr int kFBoxBytes = kFRows * kFBox * 2;    // one 64 x 64 16-bit box
constexpr int kFStageBytes = (kFBoxes + 1) * kFBoxBytes;  // g's boxes, then xa's
constexpr int kFConsumers = 128 * kFBoxes;
constexpr int kFThreads = kFConsumers + 32;
constexpr int kFSmemBytes = kFStages * kFStageBytes + 1024 + 2 * kFStages * 8;
constexpr int kFBlocksPerSm = 2;

template <typename T, bool kE4M3>
__global__ void __launch_bounds__(kFThreads, kFBlocksPerSm)
    grad_cast_product_kernel(const __grid_constant__ CUtensorMap g_map,
                             const __grid_constant__ CUtensorMap xa_map, int64_t M, int64_t N,
                             int64_t rows_per_split, const uint32_t* __restrict__ partials,
                             int num_partials, uint8_t* __restrict__ q, int64_t ld_q,
                             float* __restrict__ scale_out, uint32_t* __restrict__ amax_out,
                             float* __restrict__ ws, const float* __restrict__ u, int64_t ru) {
#ifdef FALQON_HOPPER_DEVICE
  using Pair = typename HalfTypes<T>::pair;
  using P = Pack<T, 8>;
  extern __shared__ unsigned char f_smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(f_smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kFStages * kFStageBytes);
  uint64_t* empty = full + kFStages;
  const int64_t m_begin = int64_t{blockIdx.y} * rows_per_split;
  const int64_t m_end = min(M, m_begin + rows_per_split);
  const int tiles = m_end > m_begin ? static_cast<int>((m_end - m_begin + kFRows - 1) / kFRows) : 0;

  if (threadIdx.x == 0) hopper::init_stage_barriers<kFStages, kFConsumers>(full, empty);
  pdl_wait();  // launch_dependent: the partials (and g, xa, u) come from the kernels before
  pdl_launch_dependents();
  // The scale of every partial (all threads: amax_from_partials syncs the block, which also
  // publishes the barriers' initialisation).
  const float scale =
      scale_from_amax(amax_from_partials(partials, num_partials), Fp8Format<kE4M3>::kMax);
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *scale_out = scale;
  __syncthreads();

  if (threadIdx.x >= kFConsumers) {  // the producer warp
    if (threadIdx.x == kFConsumers) {
      hopper::prefetch_tensor_map(&g_map);
      hopper::prefetch_tensor_map(&xa_map);
      hopper::produce_stages<kFStages, kFStageBytes>(
          smem, full, empty, tiles, [&](int t, unsigned char* stage, uint64_t* bar) {
            const int row = static_cast<int>(m_begin) + t * kFRows;
#pragma unroll
            for (int b = 0; b < kFBoxes; ++b) {
              hopper::tma_load_2d(stage + b * kFBoxBytes, &g_map,
                                  static_cast<int>(blockIdx.x) * kFCols + b * kFBox, row, bar);
            }
            hopper::tma_load_2d(stage + kFBoxes * kFBoxBytes, &xa_map, 0, row, bar);
          });
    }
    return;
  }

  // Consumer warpgroup wg: g's columns [n0, n0 + 64), box wg of each stage.
  const int wg = static_cast<int>(threadIdx.x) / 128, tid = static_cast<int>(threadIdx.x) % 128;
  const int64_t n0 = int64_t{blockIdx.x} * kFCols + wg * kFBox;
  const Reciprocal d(scale);
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  Pair m_pair;
  *reinterpret_cast<uint32_t*>(&m_pair) = 0u;  // +0, +0
  // This thread's 16-byte chunks of a box: chunk c (columns 8 c ... 8 c + 7) of row `row`, which
  // the 128-byte swizzle stores at chunk c ^ (row % 8) of the row.
  constexpr int kChunks = kFRows * kFBox / 8 / 128;
  for (int t = 0; t < tiles; ++t) {
    const int s = t % kFStages;
    hopper::mbarrier_wait(&full[s], (t / kFStages) & 1);
    const unsigned char* box = smem + s * kFStageBytes + wg * kFBoxBytes;
    const int64_t m0 = m_begin + int64_t{t} * kFRows;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int id = tid + i * 128;
      const int row = id >> 3, c = id & 7;
      const P v = *reinterpret_cast<const P*>(box + row * 128 + ((c ^ (row & 7)) << 4));
      m_pair = pack_abs_max<T>(m_pair, v);  // zeros outside g
      const int64_t m = m0 + row, col = n0 + 8 * c;
      if (m < m_end && col < N) {  // N is a multiple of 8: the 8 columns are all in or all out
        float x[8];
        pack_to_floats(v, x);
        *reinterpret_cast<uint2*>(q + m * ld_q + col) = cast8_to_fp8<kE4M3>(x, d);
      }
    }
    const uint64_t a = hopper::sw128_descriptor(box);
    const uint64_t b = hopper::sw128_descriptor(smem + s * kFStageBytes + kFBoxes * kFBoxBytes);
    hopper::wgmma_fence();
#pragma unroll
    for (int k = 0; k < kFRows / 16; ++k) {
      hopper::wgmma_m64n64k16<std::is_same_v<T, at::BFloat16>, true>(acc, a + 128 * k, b + 128 * k);
    }
    hopper::wgmma_commit();
    hopper::wgmma_wait<1>();
    if (t > 0) hopper::mbarrier_arrive(&empty[(t - 1) % kFStages]);
  }
  hopper::wgmma_wait<0>();

  // dB's partial: row n0 + (the accumulator's row) of ws[by], its 64 columns (zeros past r).
  const int warp = tid >> 5, lane = tid & 31;
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int64_t n = n0 + 16 * warp + lane / 4 + 8 * ((i >> 1) & 1);
    const int j = 8 * (i >> 2) + 2 * (lane & 3);
    if (n < N) {
      *reinterpret_cast<float2*>(ws + (int64_t{blockIdx.y} * N + n) * kFBox + j) =
          make_float2(acc[i], acc[i + 1]);
    }
  }
  uint32_t m_abs = pair_abs_bits(m_pair);
  if (u != nullptr) {
    const int64_t stride = int64_t{gridDim.x} * gridDim.y * kFConsumers;
    const int64_t first =
        (int64_t{blockIdx.y} * gridDim.x + blockIdx.x) * kFConsumers + threadIdx.x;
    m_abs = max(m_abs, cast_u_columns<kE4M3>(u, M, ru, N, q, ld_q, d, first, stride));
  }
  const uint32_t block_max = hopper::consumers_max<kFConsumers>(m_abs);
  if (threadIdx.x == 0) atomicMax(amax_out, block_max);
#else
  __trap();  // not built for sm_90a: grad_cast_product_applies() keeps the host from launching this
#endif
}

}  // namespace

bool grad_cast_product_applies(const at::Tensor& g, const at::Tensor& xa) {
  const int64_t r = xa.size(1);
  return hopper_kernels_run_on(g.device()) && std::getenv("FALQON_GRAD_PASS_MMA") == nullptr &&
         (g.scalar_type() == at::kBFloat16 || g.scalar_type() == at::kHalf) &&
         xa.scalar_type() == g.scalar_type() && g.is_contiguous() && xa.is_contiguous() &&
         pointer_alignment(g.const_data_ptr()) >= 16 &&
         pointer_alignment(xa.const_data_ptr()) >= 16 && r <= kFBox && r % 8 == 0 &&
         g.size(1) % 8 == 0 && g.size(0) <= (int64_t{1} << 31) - kFRows;
}

at::Tensor grad_cast_product_hopper(const at::Tensor& g, const at::Tensor& xa,
                                    const at::Tensor& partials, const at::Tensor& q,
                                    const at::Tensor& scale, const at::Tensor& amax,
                                    const std::optional<at::Tensor>& u) {
  const int64_t M = g.size(0), N = g.size(1), r = xa.size(1);
  const int64_t n_tiles = (N + kFCols - 1) / kFCols, m_tiles = (M + kFRows - 1) / kFRows;
  // About kFBlocksPerSm blocks per SM in one wave; each split a whole number of 64-row tiles.
  const int64_t want_splits =
      std::clamp<int64_t>(kFBlocksPerSm * sm_count(g.device()) / n_tiles, 1, m_tiles);
  const int64_t rows_per_split = (m_tiles + want_splits - 1) / want_splits * kFRows;
  const int64_t splits = (M + rows_per_split - 1) / rows_per_split;
  at::Tensor ws = at::empty({splits, N, kFBox}, g.options().dtype(at::kFloat));
  const bool bf16 = g.scalar_type() == at::kBFloat16;
  const CUtensorMap g_map = tensor_map_16bit(g.const_data_ptr(), M, N, N, kFRows, bf16);
  const CUtensorMap xa_map = tensor_map_16bit(xa.const_data_ptr(), M, r, r, kFRows, bf16);
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(splits));
  auto launch = [&](auto type_tag, auto e4m3) {
    using T = typename decltype(type_tag)::type;
    launch_with_smem(grad_cast_product_kernel<T, decltype(e4m3)::value>, grid, dim3(kFThreads),
                     kFSmemBytes, g.device(), g_map, xa_map, M, N, rows_per_split,
                     reinterpret_cast<const uint32_t*>(partials.const_data_ptr()),
                     static_cast<int>(partials.numel()), static_cast<uint8_t*>(q.data_ptr()),
                     q.size(1), scale.data_ptr<float>(),
                     reinterpret_cast<uint32_t*>(amax.data_ptr()), ws.data_ptr<float>(),
                     u.has_value() ? u->const_data_ptr<float>() : nullptr,
                     u.has_value() ? u->size(1) : int64_t{0});
  };
  auto with_format = [&](auto type_tag) {
    if (fp8_is_e4m3(q.scalar_type())) {
      launch(type_tag, std::true_type{});
    } else {
      launch(type_tag, std::false_type{});
    }
  };
  with_half_type(bf16, with_format);
  return ws;
}

}  // namespace cuda
}  // namespace falqon
