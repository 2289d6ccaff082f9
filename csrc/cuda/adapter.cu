// The adapter mode's dgrad operand on the FP8 path: G = [g | u | 0] (M x ld_q, ld_q = N + r16)
// with u = scaling g B, quantised as one tensor so that one FP8 GEMM over every row of
// W' = [W; A; 0] gives dx = g W + scaling (g B) A.
//
// g is the large part (M x N, 16-bit) and is read by the fused backward pass anyway; u is small
// (M x r fp32, 2 MB at M = 8192, r = 64). So u only adds its amax to g's (current scaling: the
// fused backward pass reads u's share beside its tile of g, before the cast pass, which then
// casts both at the one scale; delayed scaling: adapter_partials gives the history's amax, or
// u's own while the history is empty) and its own cast of r16 columns a row.
#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kAdapterThreads = 256;
constexpr int kRowUnroll = 4;  // rows of g in flight per thread

// partials[b] for b < gridDim.x: the history's amax where it holds one, else this block's
// maximum of |u| over its grid-stride share.
__global__ void __launch_bounds__(kAdapterThreads)
    adapter_partials_kernel(const float* __restrict__ u, int64_t count,
                            const float* __restrict__ history, int64_t history_len,
                            uint32_t* __restrict__ partials) {
  const float recorded = history_amax(history, history_len);  // the same in every thread
  if (recorded > 0.f) {
    if (threadIdx.x == 0) partials[blockIdx.x] = __float_as_uint(recorded);
    return;
  }
  uint32_t m = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    m = max(m, abs_bits(u[i]));
  }
  m = block_max(m);
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
}

// Blocks (x < g_blocks, y): g's 8-element column vectors x * blockDim.x + threadIdx.x over the
// rows y, y + gridDim.y, ...; blocks (g_blocks, y): u's M x r16 elements (zeros past r) from
// y * blockDim.x + threadIdx.x on, gridDim.y * blockDim.x apart. Every block takes the scale
// from the partials; block (0, 0) writes it and the amax (current scaling, amax_atomic null).
// With amax_atomic (delayed scaling), u's blocks max u's own amax into it.
template <typename T, bool kE4M3>
__global__ void __launch_bounds__(kAdapterThreads)
    adapter_cast_kernel(const T* __restrict__ g, int g_blocks, int64_t M, int64_t N,
                        const float* __restrict__ u, int r, int r16,
                        const uint32_t* __restrict__ partials, int num_partials,
                        uint8_t* __restrict__ q, int64_t ld_q, float* __restrict__ scale_out,
                        float* __restrict__ amax_out, uint32_t* __restrict__ amax_atomic) {
  using P = Pack<T, 8>;
  const float amax = amax_from_partials(partials, num_partials);
  const float scale = scale_from_amax(amax, Fp8Format<kE4M3>::kMax);
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    if (scale_out != nullptr) *scale_out = scale;
    if (amax_out != nullptr) *amax_out = amax;
  }
  const Reciprocal d(scale);
  if (static_cast<int>(blockIdx.x) < g_blocks) {
    const int64_t vec = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (vec * 8 >= N) return;
    const P* gv = reinterpret_cast<const P*>(g) + vec;
    const int64_t g_row = N / 8;  // vectors per row of g
    for (int64_t m0 = blockIdx.y; m0 < M; m0 += int64_t{kRowUnroll} * gridDim.y) {
      P p[kRowUnroll];
#pragma unroll
      for (int i = 0; i < kRowUnroll; ++i) {
        const int64_t m = m0 + int64_t{i} * gridDim.y;
        if (m < M) p[i] = gv[m * g_row];
      }
#pragma unroll
      for (int i = 0; i < kRowUnroll; ++i) {
        const int64_t m = m0 + int64_t{i} * gridDim.y;
        if (m < M) {
          float x[8];
          pack_to_floats(p[i], x);
          *reinterpret_cast<uint2*>(q + m * ld_q + vec * 8) = cast8_to_fp8<kE4M3>(x, d);
        }
      }
    }
    return;
  }
  // u's part: columns [N, N + r16) of q, u in [N, N + r), zeros after.
  uint32_t m_abs = 0;
  const int64_t count = M * r16;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t row = i / r16;
    const int col = static_cast<int>(i - row * r16);
    const float v = col < r ? u[row * r + col] : 0.f;
    m_abs = max(m_abs, abs_bits(v));
    q[row * ld_q + N + col] = float_to_fp8<kE4M3>(d.div(v));
  }
  if (amax_atomic != nullptr) {
    m_abs = block_max(m_abs);
    if (threadIdx.x == 0) atomicMax(amax_atomic, m_abs);
  }
}

}  // namespace

void adapter_partials(const at::Tensor& u, const at::Tensor& partials, int64_t offset,
                      const at::Tensor& amax_history) {
  FALQON_CHECK(u.is_contiguous() && u.scalar_type() == at::kFloat &&
                  partials.numel() >= offset + kAdapterPartials,
              "falqon: adapter_partials takes a contiguous fp32 u and room for its partials");
  const at::Tensor history = amax_history.contiguous();
  adapter_partials_kernel<<<static_cast<int>(kAdapterPartials), kAdapterThreads, 0,
                            at::cuda::getCurrentCUDAStream()>>>(
      u.const_data_ptr<float>(), u.numel(), history.const_data_ptr<float>(), history.numel(),
      reinterpret_cast<uint32_t*>(partials.data_ptr()) + offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adapter_cast(const std::optional<at::Tensor>& g, const at::Tensor& u, int64_t N,
                  const at::Tensor& partials, const at::Tensor& q, const at::Tensor& scale,
                  const at::Tensor& amax) {
  const int64_t M = u.size(0), r = u.size(1), ld_q = q.size(1);
  FALQON_CHECK(u.is_contiguous() && u.scalar_type() == at::kFloat && q.dim() == 2 &&
                  q.is_contiguous() && q.size(0) == M && ld_q > N + r - 1 && N % 8 == 0,
              "falqon: adapter_cast takes u (M, r) fp32 and q (M, N + r16)");
  if (M == 0) return;
  const bool with_g = g.has_value();
  if (with_g) {
    FALQON_CHECK(g->is_contiguous() && g->size(0) == M && g->size(1) == N &&
                    pointer_alignment(g->const_data_ptr()) >= 16,
                "falqon: adapter_cast takes a contiguous, 16-byte aligned g (M, N)");
  }
  const int g_blocks = with_g ? static_cast<int>((N / 8 + kAdapterThreads - 1) / kAdapterThreads) : 0;
  // ~8 blocks of 256 threads per SM over all column blocks, each thread with kRowUnroll rows of
  // 16 bytes in flight; no more row groups than rows.
  const int64_t row_groups =
      std::clamp<int64_t>(8 * sm_count(q.device()) / (g_blocks + 1), 1, std::min<int64_t>(M, 65535));
  const dim3 grid(g_blocks + 1, static_cast<unsigned>(row_groups));
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto* q_bytes = static_cast<uint8_t*>(q.data_ptr());
  auto launch = [&](auto type_tag, auto e4m3) {
    using T = typename decltype(type_tag)::type;
    constexpr bool kE4M3 = decltype(e4m3)::value;
    adapter_cast_kernel<T, kE4M3><<<grid, kAdapterThreads, 0, stream>>>(
        with_g ? static_cast<const T*>(g->const_data_ptr()) : nullptr, g_blocks, M, N,
        u.const_data_ptr<float>(), static_cast<int>(r), static_cast<int>(ld_q - N),
        reinterpret_cast<const uint32_t*>(partials.const_data_ptr()),
        static_cast<int>(partials.numel()), q_bytes, ld_q,
        with_g ? scale.data_ptr<float>() : nullptr, with_g ? amax.data_ptr<float>() : nullptr,
        with_g ? nullptr : reinterpret_cast<uint32_t*>(amax.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_format = [&](auto type_tag) {
    if (fp8_is_e4m3(q.scalar_type())) {
      launch(type_tag, std::true_type{});
    } else {
      launch(type_tag, std::false_type{});
    }
  };
  const at::ScalarType dtype = with_g ? g->scalar_type() : at::kBFloat16;  // u's part has no T
  if (dtype == at::kHalf) {
    with_format(TypeTag<at::Half>{});
  } else {
    FALQON_CHECK(dtype == at::kBFloat16, "falqon: adapter_cast takes a bf16 or fp16 g");
    with_format(TypeTag<at::BFloat16>{});
  }
}

}  // namespace cuda
}  // namespace falqon
