// Transpose of an FP8 (one byte per element) matrix through shared memory, for the dgrad GEMM
// when no persistent weight_t is kept: cuBLASLt's FP8 kernels take only the "TN" layout, so
// dx = g W needs W^T with a contiguous N.
//
// A block of 256 threads moves a 128 x 128 byte tile, so that every load and store of a warp
// covers whole 128-byte lines. Each thread loads 16 bytes of each of 4 consecutive rows (four
// 16-byte loads in flight), transposes the four 4 x 4 byte blocks in registers (byte permutes) and
// writes each column's 4 bytes as one word of the transposed tile in shared memory; then it reads
// 16 consecutive rows of a column there (four words, one 16-byte read) and stores them as 16 bytes
// of a destination row. The transposed tile is XOR-swizzled by 16-byte groups, so that both the
// word writes and the 16-byte reads of a warp are free of bank conflicts. (The first version, 64 x
// 64 tiles, one 16-byte load per thread and 16 byte-wide shared-memory reads per store, moved W'
// at 2.7-3.0 TB/s: run 119.)
#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kTile = 128;
constexpr int kTileThreads = 256;
constexpr int kChunks = kTile / 16;     // 16-byte chunks of a tile row: a thread's columns
constexpr int kRowGroups = kTile / 4;   // 4-row groups: one word per column each (a tile row
                                        // of the transposed tile: 32 words, 128 bytes)

// Word index of (column c, row group g) in the transposed tile: the 16-byte group g / 4 of column
// c's row, XOR the chunk c / 16 that the column's source bytes came from.
__device__ __forceinline__ int swizzled(int c, int g) {
  return c * kRowGroups + (g ^ ((c / 16) << 2));
}

// 16 bytes at `from`: one load where aligned, else byte by byte.
template <bool kAligned>
__device__ __forceinline__ uint4 load16(const uint8_t* from) {
  if (kAligned) return *reinterpret_cast<const uint4*>(from);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i) w[i / 4] |= static_cast<uint32_t>(from[i]) << (8 * (i % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The 4 x 4 byte block of words a, b, c, d (rows 0-3, byte k = column k) transposed: column k's
// bytes from rows 0-3 in out[k] (byte i = row i).
__device__ __forceinline__ void transpose4x4(uint32_t a, uint32_t b, uint32_t c, uint32_t d,
                                             uint32_t (&out)[4]) {
  const uint32_t ab_lo = __byte_perm(a, b, 0x5140), ab_hi = __byte_perm(a, b, 0x7362);
  const uint32_t cd_lo = __byte_perm(c, d, 0x5140), cd_hi = __byte_perm(c, d, 0x7362);
  out[0] = __byte_perm(ab_lo, cd_lo, 0x5410);
  out[1] = __byte_perm(ab_lo, cd_lo, 0x7632);
  out[2] = __byte_perm(ab_hi, cd_hi, 0x5410);
  out[3] = __byte_perm(ab_hi, cd_hi, 0x7632);
}

// rows and cols are multiples of 16, so a 16-byte chunk or a group of 4 (or 16) rows is either
// wholly inside or outside.
template <bool kAligned>
__global__ void __launch_bounds__(kTileThreads)
    transpose_fp8_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t rows,
                         int64_t cols) {
  pdl_wait();  // launch_dependent: W' may be the previous kernel's output
  __shared__ __align__(16) uint32_t tile[kTile * kRowGroups];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int group = threadIdx.x / kChunks;  // rows 4 group ... 4 group + 3 of the tile
  const int chunk = threadIdx.x % kChunks;  // bytes 16 chunk ... 16 chunk + 15 of those rows

  if (r0 + 4 * group < rows && c0 + 16 * chunk < cols) {
    uint4 v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = load16<kAligned>(src + (r0 + 4 * group + i) * cols + c0 + 16 * chunk);
    const uint32_t* w0 = &v[0].x;
    const uint32_t* w1 = &v[1].x;
    const uint32_t* w2 = &v[2].x;
    const uint32_t* w3 = &v[3].x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // columns 16 chunk + 4 j ... + 3
      uint32_t col[4];
      transpose4x4(w0[j], w1[j], w2[j], w3[j], col);
#pragma unroll
      for (int k = 0; k < 4; ++k) tile[swizzled(16 * chunk + 4 * j + k, group)] = col[k];
    }
  }
  __syncthreads();
  constexpr int kQuarters = kTile / 16;  // 16-row pieces of a destination row
#pragma unroll
  for (int pass = 0; pass < kTile * kQuarters / kTileThreads; ++pass) {
    const int line = pass * (kTileThreads / kQuarters) + threadIdx.x / kQuarters;  // dst row
    const int quarter = threadIdx.x % kQuarters;  // its source rows 16 quarter ... + 15
    if (c0 + line < cols && r0 + 16 * quarter < rows) {
      // Row groups 4 quarter ... + 3: one aligned 16-byte group after the swizzle.
      *reinterpret_cast<uint4*>(dst + (c0 + line) * rows + r0 + 16 * quarter) =
          *reinterpret_cast<const uint4*>(tile + swizzled(line, 4 * quarter));
    }
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
