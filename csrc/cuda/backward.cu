// melded_linear_backward on the FP8 path: both gradients of a melded layer with one read of the
// gradient g for its quantisation and for dB = scaling * g^T xa.
//
// dB is small (N x r) but its GEMM reads all of g (M x N, 67-180 MB at the LLaMA-7B shapes), as
// does g's quantisation; separately they read g two (delayed scaling) or three (current scaling)
// times. grad_quantize_product_kernel reads a (64 x 128) tile of g once and
//   - reduces its amax (current scaling: one partial per block, for the cast pass that follows),
//     or casts it at the delayed scale and reduces its amax (delayed scaling, the only pass);
//   - multiplies it by the matching (64 x r) rows of xa on the tensor cores (mma.m16n8k16 fed by
//     ldmatrix, bf16/fp16 in, fp32 accumulation), each warp owning 32 of the tile's 128 outputs
//     for half of its rows (or, at rank > 64, half of the rank columns).
// Tiles stream through shared memory with cp.async, two or three buffers deep. The grid splits M
// so that ~2 blocks per SM stream g; each split writes its fp32 partial of dB
// to a workspace, and grad_b_reduce_kernel sums the splits in a fixed order (deterministic, no
// atomics), multiplies by the scaling and rounds once to dB's dtype. Ranks above 128 take
// further product-only passes over g, 128 columns of xa each.
//
// The adapter mode with current scaling on Hopper takes another route where it can
// (adapter_u_rows_applies): adapter_u.cu's row pass forms u = scaling g B and the operand's
// partial maxima, then grad_pass_hopper.cu casts g and u at the final scale while it forms dB's
// partials (this file's kernel in its cast mode does the same job where that one cannot run).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "grad_pass.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kGradThreads = 256;                       // 8 warps
constexpr int kTileN = 128;                             // outputs (columns of g) per block
constexpr int kTileM = 64;                              // rows of g per step
constexpr int kVecs = kTileM * kTileN / 8 / kGradThreads;  // 16-byte vectors per thread and step
constexpr int kMaxFragments = 8;                        // 16-column fragments of xa per pass
constexpr int kPassColumns = kMaxFragments * 16;

enum GradMode : int { kAmaxMode = 0, kCastMode = 1, kProductOnly = 2 };

// max(m, |v|) for the 8 values of an mma fragment (four registers of two 16-bit values).
template <typename T>
__device__ __forceinline__ typename HalfTypes<T>::pair fragment_abs_max(
    typename HalfTypes<T>::pair m, const uint32_t (&frag)[4]) {
  using Pair = typename HalfTypes<T>::pair;
#pragma unroll
  for (int k = 0; k < 4; ++k) m = __hmax2_nan(m, __habs2(*reinterpret_cast<const Pair*>(&frag[k])));
  return m;
}

// 16 bytes global -> shared without passing through registers (sm_80+); src_bytes = 0 fills
// zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory, each transposed on the way (ldmatrix
// .trans): lane l gives the address of row l % 8 of matrix l / 8 (16 contiguous bytes) and
// receives, in frag[i], elements (2 (l % 4) + {0, 1}, l / 4) of matrix i as stored. That is the
// layout mma.m16n8k16 wants for A from a column-major tile and for B from a row-major one.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&frag)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(addr));
}

// c += a (16 x 16, row-major) b (16 x 8, column-major), 16-bit inputs, fp32 accumulation.
template <typename W>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<W, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <int JF>
struct GradTile {
  static constexpr int kLdG = kTileN + 8;   // shared-memory row strides: multiples of 8 elements,
  static constexpr int kLdX = JF * 16 + 8;  // padded against bank conflicts of the fragment loads
  static constexpr int kGElems = kTileM * kLdG;
  static constexpr int kXElems = kTileM * kLdX;
  static constexpr int kStageBytes = (kGElems + kXElems) * 2;
};

// One pass over g (M x N, contiguous, 16-byte aligned; N a multiple of 16) for the rank columns
// [0, r) of xa (row stride ld_xa; r <= 16 * JF). Block (bx, by) covers outputs [128 bx, +128) and
// rows [by * rows_per_split, +rows_per_split), streamed through `stages` (2 or 3) shared-memory
// buffers with cp.async, so that up to stages - 1 tiles are in flight while one is used; it
// writes its fp32 product to ws[by][n][0, 16 JF) (row stride ld_ws). mode: kAmaxMode writes
// max |g| of its tile to partials[by * gridDim.x + bx], maxed with that of its grid-stride share
// of u's u_count values where u is given (the adapter mode's u = scaling g B, which joins g's
// amax: no kernel of its own); kCastMode casts g into q at the scale of max(partials) (row
// stride ld_q) and atomically maxes g's amax into amax_out, and where u is given (a rank that is
// a multiple of 8) casts u into q's columns [N, ld_q) too, its amax joining g's; kProductOnly
// does neither.
template <typename T, int JF, bool kE4M3>
__global__ void __launch_bounds__(kGradThreads, 2)
    grad_quantize_product_kernel(const T* __restrict__ g, int64_t M, int64_t N,
                                 const T* __restrict__ xa, int64_t ld_xa, int r, bool vec_xa,
                                 int64_t rows_per_split, int mode, int stages,
                                 uint32_t* __restrict__ partials, int num_partials,
                                 uint8_t* __restrict__ q, int64_t ld_q, float* __restrict__ scale_out,
                                 uint32_t* __restrict__ amax_out, float* __restrict__ ws,
                                 int64_t ld_ws, const float* __restrict__ u, int64_t u_count) {
  using W = typename HalfTypes<T>::type;
  using P = Pack<T, 8>;
  using Tile = GradTile<JF>;
  extern __shared__ __align__(128) unsigned char grad_smem[];
  W* gs = reinterpret_cast<W*>(grad_smem);    // [stages][kTileM][kLdG]
  W* xs = gs + stages * Tile::kGElems;         // [stages][kTileM][kLdX]

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t m_end = min(M, m_begin + rows_per_split);
  const int64_t tiles = m_end > m_begin ? (m_end - m_begin + kTileM - 1) / kTileM : 0;
  const int warp = threadIdx.x >> 5;

  float scale = 1.f;
  if (mode == kCastMode) {
    scale = scale_from_amax(amax_from_partials(partials, num_partials), Fp8Format<kE4M3>::kMax);
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *scale_out = scale;
  }
  const Reciprocal d(scale);

  // Thread t's vectors of a tile of g: rows t / 16 + 16 i of the tile, columns 8 (t % 16) + [0, 8)
  // (the same column in every row and tile).
  constexpr int kRowStep = kGradThreads / (kTileN / 8);
  const int col = static_cast<int>(threadIdx.x % (kTileN / 8)) * 8;
  const int row0 = static_cast<int>(threadIdx.x / (kTileN / 8));
  const bool col_ok = n0 + col < N;
  // Offset in q (row stride ld_q: N, or N + r16 in the adapter mode's operand) of this thread's
  // first vector in the tile at row m0 = m_begin.
  const int64_t thread_offset = (m_begin + row0) * ld_q + n0 + col;
  auto vec_row = [&](int i) { return row0 + kRowStep * i; };
  auto in_range = [&](int64_t m0, int i) { return col_ok && m0 + vec_row(i) < m_end; };
  const T* g_thread = g + (m_begin + row0) * N + n0 + col;
  const int64_t row_stride = int64_t{kRowStep} * N, tile_stride = int64_t{kTileM} * N;
  // Starts the copies of tile t into buffer t % stages; zeros outside g and xa (they add nothing
  // to the product or the amax).
  auto issue = [&](int64_t t) {
    const int64_t m0 = m_begin + t * kTileM;
    W* gb = gs + (t % stages) * Tile::kGElems;
    W* xb = xs + (t % stages) * Tile::kXElems;
    // This thread's first vector of tile t; the others follow kRowStep rows apart. Every tile
    // but a split's last lies inside g (when the column does): those copies need no range test,
    // and their addresses are one base plus constants (fewer instructions per copy: run 94 found
    // the pass issue-bound).
    const T* src = g_thread + t * tile_stride;
    W* dst = gb + row0 * Tile::kLdG + col;
    if (col_ok && m0 + kTileM <= m_end) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        cp_async16(dst + i * kRowStep * Tile::kLdG, src + i * row_stride, 16);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const bool ok = in_range(m0, i);
        cp_async16(dst + i * kRowStep * Tile::kLdG, ok ? src + i * row_stride : g, ok ? 16 : 0);
      }
    }
    if (vec_xa) {
      for (int idx = threadIdx.x; idx < kTileM * JF * 2; idx += kGradThreads) {
        const int row = idx / (JF * 2), xcol = idx % (JF * 2) * 8;
        const bool ok = m0 + row < m_end && xcol < r;
        cp_async16(xb + row * Tile::kLdX + xcol, ok ? xa + (m0 + row) * ld_xa + xcol : xa,
                   ok ? 16 : 0);
      }
    } else {  // a rank that is not a multiple of 8: element by element (visible after the sync)
      for (int idx = threadIdx.x; idx < kTileM * JF * 16; idx += kGradThreads) {
        const int row = idx / (JF * 16), xcol = idx % (JF * 16);
        const T value = (m0 + row < m_end && xcol < r) ? xa[(m0 + row) * ld_xa + xcol] : T(0.f);
        *reinterpret_cast<T*>(xb + row * Tile::kLdX + xcol) = value;
      }
    }
  };

  // The warp's products: outputs n0 + 32 (warp % 4) + [0, 32) (rows of the mma, two 16-output
  // halves h) times kWarpFragments 16-column fragments of xa, in acc[h][f] (mma.m16n8k16's
  // accumulator layout). Warps 0-3 and 4-7 split the tile's rows (kSplitRows: 32 rows each, the
  // two partial products summed once at the end) or, at 8 fragments, the rank columns (the
  // accumulators would not fit in registers). Against 16 outputs and every rank column a warp,
  // a tile of xa is read from shared memory by 4 warps instead of 8 (40% less shared-memory
  // traffic). That gained only 1.4 / 5.0 us at N = 4096 / 11008 (run 94): the pass is bound by
  // the latency of its few warps, not by shared memory or g's bandwidth.
  constexpr bool kSplitRows = JF <= 4;
  constexpr int kWarpFragments = kSplitRows ? JF : JF / 2;
  constexpr int kWarpKSteps = kSplitRows ? kTileM / 32 : kTileM / 16;
  const int warp_out = warp & 3, warp_half = warp >> 2;
  const int k_first = kSplitRows ? warp_half * kWarpKSteps : 0;
  const int f_first = kSplitRows ? 0 : warp_half * kWarpFragments;
  float acc[2][2 * kWarpFragments][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int f = 0; f < 2 * kWarpFragments; ++f)
      acc[h][f][0] = acc[h][f][1] = acc[h][f][2] = acc[h][f][3] = 0.f;
  // ldmatrix row addresses (lane l: row l % 8 of matrix l / 8). A = the tile of g transposed,
  // 16 outputs x 16 rows of g: matrices (g rows 0-7 | 8-15) x (outputs 0-7 | 8-15) in the order
  // a0..a3 of the mma. B = 16 rows of xa x 16 rank columns: (rows 0-7, cols 0-7), (rows 8-15,
  // cols 0-7) for the first 8 columns, then the same for columns 8-15.
  const int lane = static_cast<int>(threadIdx.x & 31), matrix = lane >> 3, matrix_row = lane & 7;
  const int a_offset =
      ((matrix >> 1) * 8 + matrix_row) * Tile::kLdG + warp_out * 32 + (matrix & 1) * 8;
  const int b_offset =
      ((matrix & 1) * 8 + matrix_row) * Tile::kLdX + (matrix >> 1) * 8 + f_first * 16;

  using Pair = typename HalfTypes<T>::pair;
  Pair m_pair;
  *reinterpret_cast<uint32_t*>(&m_pair) = 0u;  // +0, +0
  for (int s = 0; s < stages - 1; ++s) {
    if (s < tiles) issue(s);
    cp_async_commit();  // (an empty group where there is no tile: the waits below count groups)
  }
  for (int64_t t = 0; t < tiles; ++t) {
    if (stages == 3) {
      cp_async_wait<1>();  // this thread's copies of tile t are done; tile t + 1 may still fly
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // everyone's copies of tile t are done, and everyone is done with t - 1
    if (t + stages - 1 < tiles) issue(t + stages - 1);  // into the buffer of tile t - 1
    cp_async_commit();
    const W* gb = gs + (t % stages) * Tile::kGElems;
    const W* xb = xs + (t % stages) * Tile::kXElems;
    if (mode == kCastMode) {
      const int64_t m0 = m_begin + t * kTileM;
      uint8_t* q_tile = q + thread_offset + t * kTileM * ld_q;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const P v = *reinterpret_cast<const P*>(gb + vec_row(i) * Tile::kLdG + col);
        m_pair = pack_abs_max<T>(m_pair, v);  // (zeros outside g)
        if (in_range(m0, i)) {
          float x[8];
          pack_to_floats(v, x);
          *reinterpret_cast<uint2*>(q_tile + i * kRowStep * ld_q) = cast8_to_fp8<kE4M3>(x, d);
        }
      }
    }
    // dB[n][j] += sum_m g[m][n] xa[m][j]: A = the tile of g transposed (column-major in gs).
#pragma unroll
    for (int k = k_first; k < k_first + kWarpKSteps; ++k) {
      uint32_t a[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        ldmatrix_x4_trans(a[h], gb + k * 16 * Tile::kLdG + a_offset + h * 16);
        // The amax from the fragments: every element of the tile is in exactly one warp's (or,
        // with the rank split, two warps') A fragments, zeros outside g.
        if (mode == kAmaxMode) m_pair = fragment_abs_max<T>(m_pair, a[h]);
      }
#pragma unroll
      for (int j = 0; j < kWarpFragments; ++j) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, xb + k * 16 * Tile::kLdX + j * 16 + b_offset);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mma_16816<W>(acc[h][2 * j], a[h], b[0], b[1]);
          mma_16816<W>(acc[h][2 * j + 1], a[h], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (kSplitRows) {
    // Warps 4-7 hand their partial products to warps 0-3 through the (now idle) tile buffers,
    // one float per lane and register, in a fixed order (deterministic).
    __syncthreads();
    constexpr int kAccFloats = 2 * 2 * kWarpFragments * 4;  // a thread's accumulators
    static_assert(4 * 32 * kAccFloats * 4 <= 2 * Tile::kStageBytes, "fits in two tile buffers");
    float* handoff = reinterpret_cast<float*>(grad_smem) + warp_out * 32 * kAccFloats + lane;
    float* flat = &acc[0][0][0];
    if (warp_half == 1) {
#pragma unroll
      for (int i = 0; i < kAccFloats; ++i) handoff[32 * i] = flat[i];
    }
    __syncthreads();
    if (warp_half == 0) {
#pragma unroll
      for (int i = 0; i < kAccFloats; ++i) flat[i] = __fadd_rn(flat[i], handoff[32 * i]);
    }
  }
  if (!kSplitRows || warp_half == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n_warp = n0 + warp_out * 32 + h * 16;
      if (n_warp < N) {  // N is a multiple of 16: 16 outputs are all in or all out
        // Lane l holds outputs l / 4 and l / 4 + 8, columns 8 f + 2 (l % 4) + {0, 1}.
        float* out = ws + (static_cast<int64_t>(blockIdx.y) * N + n_warp + lane / 4) * ld_ws +
                     16 * f_first + 2 * (lane % 4);
#pragma unroll
        for (int f = 0; f < 2 * kWarpFragments; ++f) {
          *reinterpret_cast<float2*>(out + 8 * f) = make_float2(acc[h][f][0], acc[h][f][1]);
          *reinterpret_cast<float2*>(out + 8 * ld_ws + 8 * f) =
              make_float2(acc[h][f][2], acc[h][f][3]);
        }
      }
    }
  }
  if (mode != kProductOnly) {
    uint32_t m_u = 0;
    const int64_t stride = int64_t{gridDim.x} * gridDim.y * blockDim.x;
    const int64_t first = (int64_t{blockIdx.y} * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
    if (mode == kAmaxMode && u != nullptr) {
      for (int64_t i = first; i < u_count; i += stride) m_u = max(m_u, abs_bits(u[i]));
    } else if (mode == kCastMode && u != nullptr) {
      // u's columns of the operand at the same scale (the host passes u only for ranks that are
      // multiples of 8).
      m_u = cast_u_columns<kE4M3>(u, M, u_count / M, N, q, ld_q, d, first, stride);
    }
    const uint32_t m_abs = block_max(max(pair_abs_bits(m_pair), m_u));
    if (threadIdx.x == 0) {
      if (mode == kAmaxMode) {
        partials[blockIdx.y * gridDim.x + blockIdx.x] = m_abs;
      } else {
        atomicMax(amax_out, m_abs);
      }
    }
  }
}

// dB[n][j] = O(scaling * sum over splits of ws[split][n][j]), the splits summed in order.
template <typename O>
__global__ void __launch_bounds__(256)
    grad_b_reduce_kernel(const float* __restrict__ ws, int splits, int64_t N, int64_t ld_ws, int r,
                         float scaling, O* __restrict__ out) {
  pdl_wait();  // launch_dependent: ws is the previous kernel's output
  pdl_launch_dependents();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * r) return;
  const int64_t n = i / r, j = i % r;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum = __fadd_rn(sum, ws[(s * N + n) * ld_ws + j]);
  out[i] = static_cast<O>(__fmul_rn(sum, scaling));
}

// Fragments of 16 columns for a pass over `columns` columns of xa: 1, 2, 4 or 8.
int fragments_for(int64_t columns) {
  int f = 1;
  while (f * 16 < columns) f *= 2;
  return f;
}

}  // namespace

// The adapter mode's u = scaling * g B (M x r, fp32): cuBLASLt reads g once, B rounded to g's
// dtype (the reference's numerics: fp32 products and sums, scaled once).
at::Tensor adapter_u(const at::Tensor& g, const at::Tensor& lora_B, double scaling) {
  const at::Tensor b = in_dtype(lora_B, g.scalar_type());  // (N, r) = (k x m)
  at::Tensor u = at::empty({g.size(0), lora_B.size(1)}, g.options().dtype(at::kFloat));
  if (!matmul_16bit(b, /*a_is_k_by_m=*/true, g, std::nullopt, u, static_cast<float>(scaling))) {
    u = at::mm(g.to(at::kFloat), b.to(at::kFloat)).mul_(static_cast<float>(scaling));
  }
  return u;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_backward_fp8(
    const at::Tensor& grad_output, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& weight_scale, const std::optional<at::Tensor>& weight_t, double scaling,
    at::ScalarType grad_dtype, const std::optional<at::Tensor>& amax_history,
    at::ScalarType grad_B_dtype, const std::optional<at::Tensor>& lora_B) {
  const int64_t N = grad_output.size(-1), r = xa.size(-1);
  at::Tensor g = grad_output.reshape({-1, N});
  const at::Tensor x = xa.reshape({-1, r}).contiguous();
  const int64_t M = g.size(0);
  const at::ScalarType dtype = g.scalar_type();
  if (M == 0 || dtype == at::kFloat) {
    // No rows, or fp32 activations (the tensor cores would round them): the two-step path,
    // dB by an fp32 GEMM (cuBLAS, no TF32 unless the user allows it).
    auto [dx, g_amax] =
        melded_linear_grad_input_fp8(grad_output, weight, weight_scale, weight_t, grad_dtype,
                                     amax_history, lora_B, scaling);
    return {dx, ref::lora_grad_B(g, x, scaling, grad_B_dtype), g_amax};
  }
  g = g.contiguous();
  if (pointer_alignment(g.data_ptr()) < 16) g = g.clone();  // the kernel loads 16-byte vectors

  const auto opts = g.options();
  // The adapter mode quantises [g | scaling g B | 0] (every row of W') as one operand: u first,
  // so that its amax joins g's before any cast.
  const bool adapter = lora_B.has_value();
  const int64_t ld_q = adapter ? weight.size(0) : N;
  const bool delayed = amax_history.has_value();
  // Current scaling on Hopper: one pass over row blocks of g forms u and the operand's partial
  // maxima (adapter_u.cu), so the fused pass below casts g at the final scale (cast mode) and g
  // is read twice; elsewhere cuBLASLt's u GEMM, then the fused pass's amax, then the cast.
  const bool u_rows = adapter && !delayed && adapter_u_rows_applies(g, r);
  at::Tensor scale = at::empty({}, opts.dtype(at::kFloat));
  at::Tensor amax = at::empty({}, opts.dtype(at::kFloat));
  at::Tensor u_partials = u_rows ? at::empty({adapter_u_rows_blocks(M)}, opts.dtype(at::kInt))
                                 : at::Tensor();
  const at::Tensor u = !adapter ? at::Tensor()
                       : u_rows ? adapter_u_rows(g, *lora_B, scaling, u_partials, amax)
                                : adapter_u(g, *lora_B, scaling);
  // Delayed scaling: u's partials (the history's amax, or u's own) go after g's, kAdapterPartials
  // slots; current scaling: the fused pass folds u's amax into its own partials (or, with u_rows,
  // takes the row pass's as they are).
  const int64_t extra = adapter && delayed ? kAdapterPartials : 0;
  at::Tensor gq = at::empty({M, ld_q}, opts.dtype(grad_dtype));

  const int n_tiles = static_cast<int>((N + kTileN - 1) / kTileN);
  const int64_t m_tiles = (M + kTileM - 1) / kTileM;
  const int64_t want_splits = std::clamp<int64_t>(2 * sm_count(g.device()) / n_tiles, 1, m_tiles);
  const int64_t rows_per_split = (m_tiles + want_splits - 1) / want_splits * kTileM;
  const int splits = static_cast<int>((M + rows_per_split - 1) / rows_per_split);
  const int passes = static_cast<int>((r + kPassColumns - 1) / kPassColumns);
  const int64_t ld_ws =
      int64_t{kPassColumns} * (passes - 1) + 16 * fragments_for(r - int64_t{kPassColumns} * (passes - 1));
  // Then the fused pass on TMA and wgmma too (grad_pass_hopper.cu), with its own splits and
  // workspace; elsewhere grad_quantize_product_kernel below.
  const bool hopper_pass = u_rows && grad_cast_product_applies(g, x);
  at::Tensor ws = hopper_pass ? at::Tensor() : at::empty({splits, N, ld_ws}, opts.dtype(at::kFloat));

  // Current scaling: the first pass writes one amax partial per block (with u's amax in the
  // adapter mode); delayed scaling: the partials come from the history (delayed_amax_kernel,
  // which also zeroes `amax`), u's after g's (read by every cast).
  at::Tensor partials = delayed  ? delayed_partials(g, *amax_history, amax, extra)
                       : u_rows ? u_partials
                                : at::empty({int64_t{n_tiles} * splits}, opts.dtype(at::kInt));
  if (adapter && delayed) adapter_partials(u, partials, partials.numel() - extra, *amax_history);
  // u for the fused pass: its amax (current scaling without u_rows) or its cast (u_rows: the scale
  // is known when the pass starts).
  const float* u_for_pass = adapter && !delayed ? u.const_data_ptr<float>() : nullptr;
  auto* partial_bits = reinterpret_cast<uint32_t*>(partials.data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(n_tiles, splits);
  auto launch_all = [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    const T* gp = static_cast<const T*>(g.const_data_ptr());
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    for (int pass = 0; pass < passes; ++pass) {
      const int64_t col0 = int64_t{pass} * kPassColumns;
      const int cols = static_cast<int>(std::min<int64_t>(kPassColumns, r - col0));
      const int mode = pass > 0 ? kProductOnly : (delayed || u_rows ? kCastMode : kAmaxMode);
      const T* xp_pass = xp + col0;
      const bool vec_xa = r % 8 == 0 && pointer_alignment(xp_pass) >= 16;
      auto launch = [&](auto jf, auto e4m3) {
        constexpr int JF = decltype(jf)::value;
        auto kernel = grad_quantize_product_kernel<T, JF, decltype(e4m3)::value>;
        // Three buffers where they fit in a block's shared memory (H100: 80 / 104 KB for
        // r16 <= 64 / 128, two blocks per SM), else two (Ada's 99 KB).
        const int per_block = static_cast<int>(
            at::cuda::getDeviceProperties(g.device().index())->sharedMemPerBlockOptin);
        const int stages = 3 * GradTile<JF>::kStageBytes <= per_block ? 3 : 2;
        const int smem = stages * GradTile<JF>::kStageBytes;
        allow_dynamic_smem(kernel, smem, g.device().index());
        kernel<<<grid, kGradThreads, smem, stream>>>(
                gp, M, N, xp_pass, r, cols, vec_xa, rows_per_split, mode, stages, partial_bits,
                static_cast<int>(partials.numel()), static_cast<uint8_t*>(gq.data_ptr()), ld_q,
                scale.data_ptr<float>(), reinterpret_cast<uint32_t*>(amax.data_ptr()),
                ws.data_ptr<float>() + col0, ld_ws, pass == 0 ? u_for_pass : nullptr,
                pass == 0 && u_for_pass ? u.numel() : 0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      auto with_format = [&](auto jf) {
        if (fp8_is_e4m3(grad_dtype)) {
          launch(jf, std::true_type{});
        } else {
          launch(jf, std::false_type{});
        }
      };
      switch (fragments_for(cols)) {
        case 1: with_format(std::integral_constant<int, 1>{}); break;
        case 2: with_format(std::integral_constant<int, 2>{}); break;
        case 4: with_format(std::integral_constant<int, 4>{}); break;
        default: with_format(std::integral_constant<int, 8>{}); break;
      }
    }
  };
  if (hopper_pass) {
    ws = grad_cast_product_hopper(g, x, partials, gq, scale, amax, u);
  } else if (dtype == at::kHalf) {
    launch_all(TypeTag<at::Half>{});
  } else {
    launch_all(TypeTag<at::BFloat16>{});
  }

  // The split reduce before current scaling's cast pass: it reads the workspace (8 MB at
  // 4096 -> 4096) while it is still in L2, which the cast's ~100 MB of traffic would evict.
  at::Tensor dB = at::empty({N, r}, opts.dtype(grad_B_dtype));
  const int64_t outputs = N * r;
  const int reduce_grid = static_cast<int>((outputs + 255) / 256);
  FALQON_DISPATCH_ACTIVATION(grad_B_dtype, "falqon_grad_b_reduce", [&] {
    launch_dependent(grad_b_reduce_kernel<scalar_t>, dim3(reduce_grid), dim3(256), 0, stream,
                     g.device(), ws.const_data_ptr<float>(), static_cast<int>(ws.size(0)), N,
                     ws.size(2), static_cast<int>(r), static_cast<float>(scaling),
                     dB.data_ptr<scalar_t>());
  });
  if (adapter) {
    // Current scaling: g and u cast at the one scale of all partials; delayed scaling: g was cast
    // by the fused pass, u now (its amax maxed into g's). With u_rows the fused pass cast both.
    if (!u_rows) {
      adapter_cast(delayed ? std::optional<at::Tensor>() : std::optional<at::Tensor>(g), u, N,
                   partials, gq, scale, amax);
    }
  } else if (!delayed) {
    cast_with_partials(g, partials, gq, scale, amax);
  }
  return {dgrad_fp8(grad_output, gq, scale, weight, weight_scale, weight_t), dB, amax};
}

}  // namespace cuda
}  // namespace falqon
