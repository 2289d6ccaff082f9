// The adapter mode's u = scaling * g B on Hopper, with g's amax, in one pass over row blocks of g.
//
// The dgrad operand [g | u | 0] is cast at one scale, max(|g|, |u|) / fmax, so with current
// scaling the cuBLASLt u GEMM, the pass over g for its amax (with dB) and the cast read g three
// times. Here each block owns 64 rows of g and all N columns: it streams 64 x 64 boxes of g and of
// B^T through shared memory with TMA (three stages of four boxes, one producer warp), multiplies
// them on the tensor cores with wgmma (one consumer warpgroup, fp32 accumulators: the sum over N
// stays in the block), and takes g's amax from the same boxes. At the end its rows of u are
// complete, so it writes them (scaled once, as the reference: fp32 products and sums, then
// * scaling) and one partial maximum over its g and u. The fused pass then casts g and u at the
// final scale while it forms dB (grad_pass_hopper.cu, or backward.cu's cast mode): g is read
// twice.
//
// An earlier version of this pass on mma.sync (run 76-78, branch experiment/adapter-u-row-pass)
// ran at 2.0 TB/s, latency-bound on too few warps; TMA and wgmma leave a consumer warpgroup a
// handful of instructions per 8 KB box.
#include <cudaTypedefs.h>

#include <cstdlib>
#include <cstring>

#include "grad_pass.cuh"
#include "hopper.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kURows = 64;                        // rows of g per block (wgmma's M)
constexpr int kUCols = 64;                        // columns of g per box (128 bytes: the swizzle)
constexpr int kUBoxes = 4;                        // boxes per stage: 256 columns of each row
constexpr int kUStages = 3;
constexpr int kUBoxBytes = kURows * kUCols * 2;   // one 64 x 64 16-bit box
constexpr int kUStageBytes = 2 * kUBoxes * kUBoxBytes;  // g's boxes, then B^T's
constexpr int kUConsumers = 128;                  // one warpgroup
constexpr int kUThreads = kUConsumers + 32;       // and the producer warp
constexpr int kUSmemBytes = kUStages * kUStageBytes + 1024 + 2 * kUStages * 8;

#ifdef FALQON_HOPPER_DEVICE
// The consumer warpgroup of adapter_u_rows_kernel: g's amax and u = g B^T over the stages, then
// its rows of u and its partial maximum.
template <typename T>
__device__ __forceinline__ void consume_rows(unsigned char* smem, uint64_t* full, uint64_t* empty,
                                             int stages_total, int m0, int64_t M,
                                             int r, float scaling, float* __restrict__ u,
                                             uint32_t* __restrict__ partials,
                                             float* __restrict__ amax_zero) {
  using Pair = typename HalfTypes<T>::pair;
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  Pair m_pair;
  *reinterpret_cast<uint32_t*>(&m_pair) = 0u;  // +0, +0
  for (int t = 0; t < stages_total; ++t) {
    const int s = t % kUStages;
    hopper::mbarrier_wait(&full[s], (t / kUStages) & 1);
    const unsigned char* stage = smem + s * kUStageBytes;
    hopper::wgmma_fence();
#pragma unroll
    for (int b = 0; b < kUBoxes; ++b) {
      // g's amax from the box (swizzled, which a maximum does not mind; zeros outside g).
      const Pack<T, 8>* box = reinterpret_cast<const Pack<T, 8>*>(stage + b * kUBoxBytes);
#pragma unroll
      for (int i = 0; i < kUBoxBytes / 16 / kUConsumers; ++i) {
        m_pair = pack_abs_max<T>(m_pair, box[threadIdx.x + i * kUConsumers]);
      }
      const uint64_t a = hopper::sw128_descriptor(stage + b * kUBoxBytes);
      const uint64_t bt = hopper::sw128_descriptor(stage + (kUBoxes + b) * kUBoxBytes);
#pragma unroll
      for (int k = 0; k < kUCols / 16; ++k) {
        hopper::wgmma_m64n64k16<std::is_same_v<T, at::BFloat16>>(acc, a + 2 * k, bt + 2 * k);
      }
    }
    hopper::wgmma_commit();
    // One group of wgmma in flight: the previous stage's products are done, so it goes back to
    // the producer while this stage's run (the amax of the next stage overlaps them).
    hopper::wgmma_wait<1>();
    if (t > 0) hopper::mbarrier_arrive(&empty[(t - 1) % kUStages]);
  }
  hopper::wgmma_wait<0>();

  // u's rows: this thread's accumulators (wgmma's layout, hopper.cuh) scaled once.
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  uint32_t m_abs = pair_abs_bits(m_pair);
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int64_t row = m0 + 16 * warp + lane / 4 + 8 * ((i >> 1) & 1);
    const int col = 8 * (i >> 2) + 2 * (lane & 3);
    if (row < M && col < r) {  // r is a multiple of 8: columns col and col + 1 are both in
      const float v0 = __fmul_rn(acc[i], scaling), v1 = __fmul_rn(acc[i + 1], scaling);
      *reinterpret_cast<float2*>(u + row * r + col) = make_float2(v0, v1);
      m_abs = max(m_abs, max(abs_bits(v0), abs_bits(v1)));
    }
  }
  const uint32_t block_max = hopper::consumers_max<kUConsumers>(m_abs);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = block_max;
    if (blockIdx.x == 0) *amax_zero = 0.f;
  }
}

#endif

// Block b: rows [64 b, 64 b + 64) of g (M x N, 16-bit), all of B^T (r x N, r <= 64); writes
// u[m][j] = scaling * sum_n g[m][n] B^T[j][n] for its rows m < M and j < r (fp32, row stride r),
// partials[b] = max(|g| over its rows, |u| over its rows) as abs_bits, and block 0 zeroes
// *amax_zero (the target of the cast passes' atomic maxima).
//
// A stage holds 256 columns of the block's 64 rows (four TMA boxes). (Tried in run 121: pairs of
// blocks in a cluster sharing B^T's boxes by TMA multicast, which halves B^T's reads from L2: the
// pass got slower, 25 -> 34 us, so B^T's reads were not its limit.)
template <typename T>
__global__ void __launch_bounds__(kUThreads, 1)
    adapter_u_rows_kernel(const __grid_constant__ CUtensorMap g_map,
                          const __grid_constant__ CUtensorMap bt_map, int64_t M, int64_t N, int r,
                          float scaling, float* __restrict__ u, uint32_t* __restrict__ partials,
                          float* __restrict__ amax_zero) {
#ifdef FALQON_HOPPER_DEVICE
  extern __shared__ unsigned char u_smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes: boxes start on such a boundary.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(u_smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kUStages * kUStageBytes);
  uint64_t* empty = full + kUStages;
  const int boxes = static_cast<int>((N + kUCols - 1) / kUCols);
  const int stages_total = (boxes + kUBoxes - 1) / kUBoxes;
  const int m0 = static_cast<int>(blockIdx.x) * kURows;

  if (threadIdx.x == 0) hopper::init_stage_barriers<kUStages, kUConsumers>(full, empty);
  __syncthreads();
  pdl_wait();  // launch_dependent: g and B^T may be the previous kernels' outputs
  pdl_launch_dependents();

  if (threadIdx.x >= kUConsumers) {  // the producer warp: one thread issues the copies
    if (threadIdx.x == kUConsumers) {
      hopper::prefetch_tensor_map(&g_map);
      hopper::prefetch_tensor_map(&bt_map);
      // Every box of the stage, also one wholly past N: the consumer's wgmma then run
      // unconditionally (a branch around them made ptxas serialise them, C7520).
      hopper::produce_stages<kUStages, kUStageBytes>(
          smem, full, empty, stages_total, [&](int t, unsigned char* stage, uint64_t* bar) {
#pragma unroll
            for (int b = 0; b < kUBoxes; ++b) {
              const int col = (t * kUBoxes + b) * kUCols;
              hopper::tma_load_2d(stage + b * kUBoxBytes, &g_map, col, m0, bar);
              hopper::tma_load_2d(stage + (kUBoxes + b) * kUBoxBytes, &bt_map, col, 0, bar);
            }
          });
    }
    return;
  }
  consume_rows<T>(smem, full, empty, stages_total, m0, M, r, scaling, u, partials, amax_zero);
#else
  __trap();  // not built for sm_90a: adapter_u_rows_applies() keeps the host from launching this
#endif
}

constexpr int kTransposeTile = 32;

// out (cols x rows, contiguous) = O(in (rows x cols, contiguous)) transposed, through a 32 x 33
// shared-memory tile (both sides coalesced, no bank conflicts).
template <typename O, typename I>
__global__ void __launch_bounds__(kTransposeTile * 8)
    adapter_b_t_kernel(const I* __restrict__ in, int64_t rows, int64_t cols,
                             O* __restrict__ out) {
  pdl_wait();  // launch_dependent (one wave: the next kernel may be scheduled now)
  pdl_launch_dependents();
  __shared__ float tile[kTransposeTile][kTransposeTile + 1];
  const int64_t r0 = int64_t{blockIdx.y} * kTransposeTile, c0 = int64_t{blockIdx.x} * kTransposeTile;
  for (int i = threadIdx.y; i < kTransposeTile; i += blockDim.y) {
    const int64_t row = r0 + i, col = c0 + threadIdx.x;
    if (row < rows && col < cols) tile[i][threadIdx.x] = static_cast<float>(in[row * cols + col]);
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTransposeTile; i += blockDim.y) {
    const int64_t col = c0 + i, row = r0 + threadIdx.x;  // out[col][row]
    if (row < rows && col < cols) out[col * rows + row] = static_cast<O>(tile[threadIdx.x][i]);
  }
}

// B^T (r x N, contiguous) in `dtype`, rounded as Tensor.to rounds (an fp32 value converts to a
// 16-bit one once; a 16-bit value of the same dtype is copied).
at::Tensor transposed_in_dtype(const at::Tensor& lora_B, at::ScalarType dtype) {
  const at::Tensor src = lora_B.contiguous();
  const int64_t rows = src.size(0), cols = src.size(1);
  at::Tensor out = at::empty({cols, rows}, src.options().dtype(dtype));
  const dim3 grid(static_cast<unsigned>((cols + kTransposeTile - 1) / kTransposeTile),
                  static_cast<unsigned>((rows + kTransposeTile - 1) / kTransposeTile));
  FALQON_DISPATCH_ACTIVATION(dtype, "falqon_adapter_b_t", [&] {
    using O = scalar_t;
    FALQON_DISPATCH_ACTIVATION(src.scalar_type(), "falqon_adapter_b_t", [&] {
      launch_dependent(adapter_b_t_kernel<O, scalar_t>, grid, dim3(kTransposeTile, 8), 0,
                       at::cuda::getCurrentCUDAStream(), src.device(),
                       src.const_data_ptr<scalar_t>(), rows, cols, out.data_ptr<O>());
    });
  });
  return out;
}

}  // namespace

bool hopper_kernels_run_on(const at::Device& device) {
  if (!hopper_kernels_built()) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  return prop->major == 9 && prop->minor == 0;
}

CUtensorMap tensor_map_16bit(const void* base, int64_t rows, int64_t cols, int64_t ld, int box_rows,
                             bool bf16) {
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &found));
    FALQON_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "falqon: the CUDA driver offers no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = encode(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FALQON_CHECK(result == CUDA_SUCCESS, "falqon: cuTensorMapEncodeTiled failed (", int(result),
              ") for a ", rows, " x ", cols, " matrix");
  return map;
}

int64_t adapter_u_rows_blocks(int64_t M) { return (M + kURows - 1) / kURows; }

bool adapter_u_rows_applies(const at::Tensor& g, int64_t r) {
  // FALQON_ADAPTER_U: "rows" takes this pass wherever it can run, "gemm" never (cuBLASLt's u
  // GEMM and the three-read path); unset or "auto": where the row blocks fill at least 3/4 of the
  // GPU's SMs (one block each), below which cuBLASLt's GEMM spreads the work better. Read on
  // every call (a test switches it).
  const char* choice = std::getenv("FALQON_ADAPTER_U");
  if (choice != nullptr && std::strcmp(choice, "gemm") == 0) return false;
  const int64_t M = g.size(0), N = g.size(1);
  const bool runs = hopper_kernels_run_on(g.device()) &&
                    (g.scalar_type() == at::kBFloat16 || g.scalar_type() == at::kHalf) &&
                    g.is_contiguous() && pointer_alignment(g.const_data_ptr()) >= 16 && r <= 64 &&
                    r % 8 == 0 && N % 8 == 0 && M > 0 && M <= (int64_t{1} << 31) - kURows;
  if (!runs) return false;
  if (choice != nullptr && std::strcmp(choice, "rows") == 0) return true;
  return 4 * adapter_u_rows_blocks(M) >= 3 * int64_t{sm_count(g.device())};
}

at::Tensor adapter_u_rows(const at::Tensor& g, const at::Tensor& lora_B, double scaling,
                          const at::Tensor& partials, const at::Tensor& amax) {
  const int64_t M = g.size(0), N = g.size(1), r = lora_B.size(1);
  const int64_t blocks = adapter_u_rows_blocks(M);
  FALQON_CHECK(partials.numel() == blocks && partials.scalar_type() == at::kInt,
              "falqon: adapter_u_rows takes adapter_u_rows_blocks(M) int32 partials");
  const bool bf16 = g.scalar_type() == at::kBFloat16;
  const at::Tensor b_t = transposed_in_dtype(lora_B, g.scalar_type());  // (r, N)
  at::Tensor u = at::empty({M, r}, g.options().dtype(at::kFloat));
  const CUtensorMap g_map = tensor_map_16bit(g.const_data_ptr(), M, N, N, kURows, bf16);
  const CUtensorMap bt_map = tensor_map_16bit(b_t.const_data_ptr(), r, N, N, kURows, bf16);
  with_half_type(bf16, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    launch_with_smem(adapter_u_rows_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kUThreads),
                     kUSmemBytes, g.device(), g_map, bt_map, M, N, static_cast<int>(r),
                     static_cast<float>(scaling), u.data_ptr<float>(),
                     reinterpret_cast<uint32_t*>(partials.data_ptr()), amax.data_ptr<float>());
  });
  return u;
}

}  // namespace cuda
}  // namespace falqon
