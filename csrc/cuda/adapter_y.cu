// The adapter mode's forward term on Hopper: y = y_base + scaling * xa B^T (ref::adapter_output's
// numerics: fp32 products and sums, then one fma with y_base and one rounding), into a new
// contiguous y, in one pass over y_base.
//
// The pass is bound by y's bytes (a read of y_base, a write of y: 128 MB at M = 8192, N = 4096);
// its products are tiny (r <= 64). cuBLASLt's bf16 GEMM with y_base as C streamed them at 3.4-3.5
// TB/s. Here a block owns a 64 x 128 tile of y: one thread loads y_base's tile, the block's 64
// rows of xa and 128 rows of B (64 x 64 boxes, 128-byte swizzle, zeros past the edges: r < 64 and
// partial tiles need no branch) with TMA onto one mbarrier; the warpgroup multiplies them with
// wgmma (fp32 accumulators), one 64-column half at a time, adds y_base from shared memory (read
// through the swizzle, so the accumulator layout's accesses are free of bank conflicts) and writes
// the rounded sum back in place; one thread stores the tile with TMA (which clips it at M and N).
// Five blocks per SM keep ~80 KB of y_base in flight while others multiply and store. Measured
// (runs 124-126, M = 8192): 98 us where cuBLASLt took 106 at N = 11,008, the same as it (43-44 us,
// L2 flushed) at N = 4096; 128-row tiles (two warpgroups, three blocks per SM) were within 1 us.
#include <cstdlib>
#include <cstring>

#include "grad_pass.cuh"
#include "hopper.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kYBox = 64;                    // a TMA box: 64 rows x 64 16-bit columns
constexpr int kYBoxBytes = kYBox * kYBox * 2;
constexpr int kYRows = kYBox;                // a tile's rows: one warpgroup's wgmma M
constexpr int kYColBoxes = 2;                // a tile's columns: 128
constexpr int kYCols = kYColBoxes * kYBox;
constexpr int kYThreads = 128;
// Boxes: y's (one per column box), xa's, B's (one per column box), then the barrier: 40 KB, five
// blocks per SM.
constexpr int kYBoxes = 2 * kYColBoxes + 1;
constexpr int kYSmemBytes = kYBoxes * kYBoxBytes + 1024 + 8;

#ifdef FALQON_HOPPER_DEVICE
// The warpgroup's accumulators (one 64-column half of the tile, wgmma's layout: hopper.cuh)
// scaled and added to y_base's box in place, rounded to T.
template <typename T>
__device__ __forceinline__ void add_to_box(unsigned char* box, const float (&acc)[32], float scaling) {
  using Pair = typename HalfTypes<T>::pair;
  const int warp = (static_cast<int>(threadIdx.x) >> 5) & 3, lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int row = 16 * warp + lane / 4 + 8 * ((i >> 1) & 1);
    // Columns 8 (i / 4) + 2 (lane % 4) + {0, 1}: 16-byte chunk i / 4 of the row, stored by the
    // swizzle at chunk (i / 4) ^ (row % 8).
    Pair* pair = reinterpret_cast<Pair*>(box + row * 128 + (((i >> 2) ^ (row & 7)) << 4) + 4 * (lane & 3));
    const float2 base = {__low2float(*pair), __high2float(*pair)};
    const float v0 = __fmaf_rn(scaling, acc[i], base.x), v1 = __fmaf_rn(scaling, acc[i + 1], base.y);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      *pair = __floats2bfloat162_rn(v0, v1);
    } else {
      *pair = __floats2half2_rn(v0, v1);
    }
  }
}
#endif

// Block (x, y): y's tile of rows [64 y, 64 y + 64) and columns [128 x, 128 x + 128).
template <typename T>
__global__ void __launch_bounds__(kYThreads, 5)
    adapter_y_kernel(const __grid_constant__ CUtensorMap base_map,
                     const __grid_constant__ CUtensorMap xa_map,
                     const __grid_constant__ CUtensorMap b_map,
                     const __grid_constant__ CUtensorMap y_map, float scaling) {
#ifdef FALQON_HOPPER_DEVICE
  extern __shared__ unsigned char y_smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes: boxes start on such a boundary.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(y_smem_raw) + 1023) & ~uintptr_t{1023});
  unsigned char* tile = smem;
  unsigned char* xa_box = smem + kYColBoxes * kYBoxBytes;
  unsigned char* b_boxes = xa_box + kYBoxBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kYBoxes * kYBoxBytes);
  const int m0 = static_cast<int>(blockIdx.y) * kYRows, n0 = static_cast<int>(blockIdx.x) * kYCols;

  if (threadIdx.x == 0) {
    hopper::mbarrier_init(full, 1);
    hopper::fence_barrier_init();
    hopper::prefetch_tensor_map(&base_map);
  }
  __syncthreads();
  pdl_wait();  // launch_dependent: xa and B are the previous kernel's outputs
  if (threadIdx.x == 0) {
    hopper::mbarrier_arrive_expect_tx(full, kYBoxes * kYBoxBytes);
#pragma unroll
    for (int c = 0; c < kYColBoxes; ++c) {
      hopper::tma_load_2d(tile + c * kYBoxBytes, &base_map, n0 + kYBox * c, m0, full);
      hopper::tma_load_2d(b_boxes + c * kYBoxBytes, &b_map, 0, n0 + kYBox * c, full);
    }
    hopper::tma_load_2d(xa_box, &xa_map, 0, m0, full);
  }
  hopper::mbarrier_wait(full, 0);

  const uint64_t a = hopper::sw128_descriptor(xa_box);
#pragma unroll
  for (int c = 0; c < kYColBoxes; ++c) {
    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    const uint64_t b = hopper::sw128_descriptor(b_boxes + c * kYBoxBytes);
    hopper::wgmma_fence();
#pragma unroll
    for (int k = 0; k < kYBox / 16; ++k) {
      hopper::wgmma_m64n64k16<std::is_same_v<T, at::BFloat16>>(acc, a + 2 * k, b + 2 * k);
    }
    hopper::wgmma_commit();
    hopper::wgmma_wait<0>();
    add_to_box<T>(tile + c * kYBoxBytes, acc, scaling);
  }
  hopper::fence_proxy_async_shared();  // the sums, written by this thread, for the TMA store
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int c = 0; c < kYColBoxes; ++c) {
      hopper::tma_store_2d(&y_map, n0 + kYBox * c, m0, tile + c * kYBoxBytes);
    }
    hopper::tma_store_commit_and_wait_read();
  }
#else
  __trap();  // not built for sm_90a: adapter_y_applies() keeps the host from launching this
#endif
}

}  // namespace

bool adapter_y_applies(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& b) {
  // FALQON_ADAPTER_Y=gemm: cuBLASLt's GEMM instead (comparisons). Read on every call.
  const char* choice = std::getenv("FALQON_ADAPTER_Y");
  if (choice != nullptr && std::strcmp(choice, "gemm") == 0) return false;
  const at::ScalarType dtype = y_base.scalar_type();
  if (!hopper_kernels_run_on(y_base.device()) || (dtype != at::kBFloat16 && dtype != at::kHalf) ||
      xa.scalar_type() != dtype || b.scalar_type() != dtype) {
    return false;
  }
  const int64_t M = y_base.size(0), N = y_base.size(1), r = xa.size(1);
  // TMA: 16-byte aligned bases, row strides a multiple of 16 bytes; wgmma's K (r) within one box.
  return M > 0 && N > 0 && r > 0 && r <= kYBox && r % 8 == 0 && N % 8 == 0 && xa.size(0) == M &&
         b.size(0) == N && b.size(1) == r && y_base.stride(1) == 1 &&
         row_stride(y_base) % 8 == 0 && xa.is_contiguous() && b.is_contiguous() &&
         pointer_alignment(y_base.const_data_ptr()) >= 16 &&
         pointer_alignment(xa.const_data_ptr()) >= 16 &&
         pointer_alignment(b.const_data_ptr()) >= 16 && (M + kYRows - 1) / kYRows <= 65535 &&
         M <= (int64_t{1} << 31) - kYRows && N <= (int64_t{1} << 31) - kYCols;
}

at::Tensor adapter_y(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& b,
                     double scaling) {
  FALQON_CHECK(adapter_y_applies(y_base, xa, b),
              "falqon: adapter_y cannot take these operands (see adapter_y_applies)");
  const int64_t M = y_base.size(0), N = y_base.size(1), r = xa.size(1);
  at::Tensor y = at::empty({M, N}, y_base.options().memory_format(at::MemoryFormat::Contiguous));
  const bool bf16 = y_base.scalar_type() == at::kBFloat16;
  const CUtensorMap base_map =
      tensor_map_16bit(y_base.const_data_ptr(), M, N, row_stride(y_base), kYBox, bf16);
  const CUtensorMap xa_map = tensor_map_16bit(xa.const_data_ptr(), M, r, r, kYBox, bf16);
  const CUtensorMap b_map = tensor_map_16bit(b.const_data_ptr(), N, r, r, kYBox, bf16);
  const CUtensorMap y_map = tensor_map_16bit(y.data_ptr(), M, N, N, kYBox, bf16);
  const dim3 grid(static_cast<unsigned>((N + kYCols - 1) / kYCols),
                  static_cast<unsigned>((M + kYRows - 1) / kYRows));
  with_half_type(bf16, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    launch_with_smem(adapter_y_kernel<T>, grid, dim3(kYThreads), kYSmemBytes, y.device(), base_map,
                     xa_map, b_map, y_map, static_cast<float>(scaling));
  });
  return y;
}

}  // namespace cuda
}  // namespace falqon
