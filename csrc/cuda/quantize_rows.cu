// Row-wise FP8 quantisation on the device (quantize_rows, and x's quantisation in the adapter
// mode): a scale per row of the last dimension, scale[i] = amax(row i) / fmax (1 where that is 0).
//
// One pass: a block owns a row and keeps its 8-element vectors in registers (up to kRowPacks a
// thread, kHeld the least of 1, 2, 4 that holds the row at the block's size) while it reduces the
// row's amax, then casts them from registers. x is read once and q written once (per-tensor
// current scaling reads x twice: its amax needs the whole tensor first). Blocks grow with the row
// (128 threads for LLaMA-7B's 4096 bf16 features, 512 for 11,008) so that a thread holds at most
// kRowPacks vectors: at 64 registers, 1024 threads an SM keep 64 KB of loads in flight. Run 84
// held 12 vectors a thread at 128 threads whatever the row, 127 registers and four blocks an SM,
// and took 59.9 us at 8192 x 4096 (run 83's probe with 4 vectors: 30.9). Rows longer than
// 4 * 8 * 1024 elements read their remainder again for the cast, from L1/L2; rows whose vectors
// would be misaligned take a scalar loop.
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kMinRowThreads = 128;
constexpr int kMaxRowThreads = 1024;
constexpr int kRowPacks = 4;  // vectors a thread holds at most (64 registers at 1024 threads)

// An 8-element vector held as raw 16-byte words: c10::BFloat16 elements held as themselves take a
// 32-bit register each (127 registers at 12 vectors, against 64 for fp16), the words take 4 per
// 16 bytes; the elements are unpacked where they are used.
template <typename T>
struct RawPack {
  uint4 w[sizeof(Pack<T, 8>) / 16];
};

template <typename T>
__device__ __forceinline__ Pack<T, 8> unpack(const RawPack<T>& raw) {
  Pack<T, 8> p;
  memcpy(&p, &raw, sizeof(p));
  return p;
}

template <typename T, int kHeld, bool kE4M3>
__global__ void __launch_bounds__(kMaxRowThreads)
    quantize_rows_kernel(const T* __restrict__ in, int64_t K, uint8_t* __restrict__ q,
                         float* __restrict__ scale_out, float* __restrict__ amax_out) {
  pdl_wait();  // launch_dependent: x may be the previous kernel's output
  using P = Pack<T, 8>;
  using R = RawPack<T>;
  const int64_t row = blockIdx.x;
  const int64_t threads = blockDim.x;
  const T* x = in + row * K;
  uint8_t* qr = q + row * K;
  // Whole vectors where the row's start allows 16/32-byte loads and 8-byte stores.
  const bool vectors_ok = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % sizeof(P) == 0 &&
                          reinterpret_cast<uintptr_t>(qr) % 8 == 0;
  const int64_t packs = vectors_ok ? K / 8 : 0;
  const R* xv = reinterpret_cast<const R*>(x);

  R held[kHeld];
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {  // every load issued before any is used
    const int64_t v = threadIdx.x + int64_t{i} * threads;
    if (v < packs) held[i] = xv[v];
  }
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    if (threadIdx.x + int64_t{i} * threads < packs) m = max_abs_bits(m, unpack(held[i]));
  }
  for (int64_t v = threadIdx.x + int64_t{kHeld} * threads; v < packs; v += threads) {
    m = max_abs_bits(m, unpack(xv[v]));
  }
  for (int64_t j = packs * 8 + threadIdx.x; j < K; j += threads) {
    m = max(m, abs_bits(to_float(x[j])));
  }

  const float amax = __uint_as_float(block_max(m));
  const float scale = scale_from_amax(amax, Fp8Format<kE4M3>::kMax);
  if (threadIdx.x == 0) {
    scale_out[row] = scale;
    amax_out[row] = amax;
  }
  const Reciprocal d(scale);
  auto cast = [&](const R& raw, int64_t v) {
    float f[8];
    pack_to_floats(unpack(raw), f);
    reinterpret_cast<uint2*>(qr)[v] = cast8_to_fp8<kE4M3>(f, d);
  };
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int64_t v = threadIdx.x + int64_t{i} * threads;
    if (v < packs) cast(held[i], v);
  }
  for (int64_t v = threadIdx.x + int64_t{kHeld} * threads; v < packs; v += threads) {
    cast(xv[v], v);
  }
  for (int64_t j = packs * 8 + threadIdx.x; j < K; j += threads) {
    qr[j] = float_to_fp8<kE4M3>(d.div(to_float(x[j])));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_fp8(const at::Tensor& input,
                                                                 at::ScalarType dtype) {
  check_quantize_args(input, dtype);
  FALQON_CHECK(input.dim() >= 1, "falqon.quantize_rows: the input needs a last dimension");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t K = x.size(-1), rows = K == 0 ? 0 : x.numel() / K;
  const std::vector<int64_t> lead(input.sizes().begin(), input.sizes().end() - 1);
  at::Tensor q = at::empty(input.sizes(), x.options().dtype(dtype));
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kFloat));
  at::Tensor amax = at::empty(lead, x.options().dtype(at::kFloat));
  if (K == 0) {  // empty rows: amax 0, scale 1, as the reference
    scale.fill_(1.f);
    amax.zero_();
    return {q, scale, amax};
  }
  if (rows == 0) return {q, scale, amax};
  FALQON_CHECK(rows <= std::numeric_limits<int32_t>::max(),
              "falqon.quantize_rows: at most 2^31 - 1 rows, got ", rows);
  const auto stream = at::cuda::getCurrentCUDAStream();
  // The fewest threads (a multiple of 128) for which kRowPacks vectors a thread hold the row.
  const int64_t vectors = K / 8;
  const int threads = static_cast<int>(std::clamp<int64_t>(
      (vectors + kRowPacks * kMinRowThreads - 1) / (kRowPacks * kMinRowThreads) * kMinRowThreads,
      kMinRowThreads, kMaxRowThreads));
  const int64_t packs_per_thread = (vectors + threads - 1) / threads;
  FALQON_DISPATCH_ACTIVATION(x.scalar_type(), "falqon_quantize_rows", [&] {
    auto launch = [&](auto packs, auto e4m3) {
      launch_dependent(quantize_rows_kernel<scalar_t, decltype(packs)::value, decltype(e4m3)::value>,
                       dim3(static_cast<unsigned>(rows)), dim3(threads), 0, stream, x.device(),
                       x.const_data_ptr<scalar_t>(), K, static_cast<uint8_t*>(q.data_ptr()),
                       scale.data_ptr<float>(), amax.data_ptr<float>());
    };
    auto with_packs = [&](auto e4m3) {
      if (packs_per_thread <= 1) {
        launch(std::integral_constant<int, 1>{}, e4m3);
      } else if (packs_per_thread <= 2) {
        launch(std::integral_constant<int, 2>{}, e4m3);
      } else {  // (more than 4 only past 32,768 elements: the rest is read again)
        launch(std::integral_constant<int, kRowPacks>{}, e4m3);
      }
    };
    if (fp8_is_e4m3(dtype)) {
      with_packs(std::true_type{});
    } else {
      with_packs(std::false_type{});
    }
  });
  return {q, scale, amax};
}

}  // namespace cuda
}  // namespace falqon
