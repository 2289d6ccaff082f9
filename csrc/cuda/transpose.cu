// Transpose of an FP8 (one byte per element) matrix through shared memory, for the dgrad GEMM
// when no persistent weight_t is kept: cuBLASLt's FP8 kernels take only the "TN" layout, so
// dx = g W needs W^T with a contiguous N.
//
// A block moves a 64 x 64 byte tile with 16-byte global loads and stores: 256 threads, each
// loading 16 consecutive bytes of one source row and storing 16 consecutive bytes of one
// destination row (gathered from a column of the shared tile).
#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kTile = 64;
constexpr int kTileThreads = kTile * kTile / 16;
// Row pitch of the shared tile in bytes: word-aligned rows for the 4-byte stores, and 4 bytes of
// padding so that the column gathers of one warp spread over the banks (2-way at worst).
constexpr int kPitch = kTile + 4;

// rows and cols are multiples of 16, so a 16-byte chunk is either wholly inside or outside.
template <bool kAligned>
__global__ void __launch_bounds__(kTileThreads)
    transpose_fp8_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t rows,
                         int64_t cols) {
  pdl_wait();  // launch_dependent: W' may be the previous kernel's output
  __shared__ __align__(16) uint8_t tile[kTile * kPitch];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int line = threadIdx.x / 4;   // the tile row this thread loads, the tile column it stores
  const int chunk = threadIdx.x % 4;  // which 16 bytes of that line

  if (r0 + line < rows && c0 + 16 * chunk < cols) {
    const uint8_t* from = src + (r0 + line) * cols + c0 + 16 * chunk;
    uint4 v;
    if (kAligned) {
      v = *reinterpret_cast<const uint4*>(from);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int i = 0; i < 16; ++i) w[i / 4] |= static_cast<uint32_t>(from[i]) << (8 * (i % 4));
      v = make_uint4(w[0], w[1], w[2], w[3]);
    }
    uint32_t* to = reinterpret_cast<uint32_t*>(tile + line * kPitch + 16 * chunk);
    to[0] = v.x;
    to[1] = v.y;
    to[2] = v.z;
    to[3] = v.w;
  }
  __syncthreads();
  if (c0 + line < cols && r0 + 16 * chunk < rows) {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      w[i / 4] |= static_cast<uint32_t>(tile[(16 * chunk + i) * kPitch + line]) << (8 * (i % 4));
    }
    *reinterpret_cast<uint4*>(dst + (c0 + line) * rows + r0 + 16 * chunk) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

}  // namespace

at::Tensor transpose_fp8(const at::Tensor& w) {
  FALQON_CHECK(w.dim() == 2 && w.element_size() == 1 && w.is_contiguous() && w.is_cuda(),
              "falqon: transpose_fp8 takes a contiguous 2-D one-byte CUDA matrix, got ", w.sizes(),
              " ", w.scalar_type());
  const int64_t rows = w.size(0), cols = w.size(1);
  FALQON_CHECK(rows % 16 == 0 && cols % 16 == 0,
              "falqon: transpose_fp8 needs sizes that are multiples of 16, got ", w.sizes());
  FALQON_CHECK((rows + kTile - 1) / kTile <= 65535, "falqon: transpose_fp8: too many rows (", rows, ")");
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor out = at::empty({cols, rows}, w.options());
  if (w.numel() == 0) return out;
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile),
                  static_cast<unsigned>((rows + kTile - 1) / kTile));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* src = static_cast<const uint8_t*>(w.const_data_ptr());
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  // Every row start is 16-byte aligned when the base is (cols % 16 == 0); `out` is fresh.
  if (pointer_alignment(src) >= 16) {
    launch_dependent(transpose_fp8_kernel<true>, grid, dim3(kTileThreads), 0, stream, w.device(), src,
                     dst, rows, cols);
  } else {
    launch_dependent(transpose_fp8_kernel<false>, grid, dim3(kTileThreads), 0, stream, w.device(),
                     src, dst, rows, cols);
  }
  return out;
}

}  // namespace cuda
}  // namespace falqon
