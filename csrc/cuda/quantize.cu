// Per-tensor FP8 quantisation on the device, with no host synchronisation: the amax stays in
// device memory between the kernels.
//
// twopass (default): amax_kernel reads x once and writes one partial max per block;
//   scaled_map_kernel reduces those partials (a few hundred values) in every block, computes
//   the scale and casts. The cast walks the data in the reverse order of the amax pass so that
//   its first reads hit what the amax pass left in L2 (50 MB on H100), which saves part of the
//   second read of a large activation.
// fused: one cooperative kernel. Each thread keeps its first vectors in registers and the next
//   ones in shared memory while it computes the amax, the grid synchronises once, and the cast
//   then reads back from global memory (L2 first, reverse order) only what did not fit on chip.
// delayed (quantize_delayed, the amax_history option of melded_linear): the scale comes from the
//   amaxes of previous calls (max of an amax history), so one kernel reads x once, writes q and
//   reduces this call's amax with an atomic max. Whether the history holds anything yet is
//   decided on the device: delayed_amax_kernel always launches but every block returns at once
//   when it does (the first call, with an empty history, is current scaling in two passes).
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "common.cuh"

namespace falqon {
namespace cuda {

namespace cg = cooperative_groups;

namespace {

// The fused kernel runs one block of kThreads per SM, so that each thread may hold up to 128
// registers: kRegisterVectors vectors of 16 bytes (32 registers) of its share stay in registers,
// with kUnroll loads in flight, without spilling. (Two blocks of 512 would cap it at 64.)
constexpr int kRegisterVectors = 8;
constexpr int kFusedBlocksPerSm = 1;

// Blocks of the streaming kernels: two resident blocks of kThreads per SM (each thread keeps
// kUnroll 16-byte loads in flight, 64 KB per SM, enough to cover HBM latency), fewer when the
// tensor is small. Also the number of partial maxima.
int stream_grid(int64_t vectors, const at::Device& device) {
  const int64_t needed = std::max<int64_t>(1, (vectors + kThreads - 1) / kThreads);
  return static_cast<int>(std::min<int64_t>(needed, 2LL * sm_count(device)));
}

// ---- kernels ----------------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ uint32_t tail_amax(const T* __restrict__ in, int64_t n, uint32_t m) {
  if (blockIdx.x == 0) {
    for (int64_t j = n / VEC * VEC + threadIdx.x; j < n; j += blockDim.x) m = max(m, abs_bits(to_float(in[j])));
  }
  return m;
}

// The elements after the last whole vector, converted by block 0.
template <typename T, int VEC, typename Op, typename D>
__device__ __forceinline__ void tail_map(const T* __restrict__ in, int64_t n, const D& d,
                                         typename Op::out_t* __restrict__ out) {
  if (blockIdx.x == 0) {
    for (int64_t j = n / VEC * VEC + threadIdx.x; j < n; j += blockDim.x) {
      const float x[1] = {to_float(in[j])};
      typename Op::out_t y[1];
      Op::apply(x, d, y);
      out[j] = y[0];
    }
  }
}

template <typename T, int VEC, typename Op, typename D>
__device__ __forceinline__ void map_pack(const Pack<T, VEC>& p, const D& d,
                                         typename Op::out_t* __restrict__ out, int64_t index) {
  float x[VEC];
  typename Op::out_t y[VEC];
  pack_to_floats(p, x);
  Op::apply(x, d, y);
  store_pack<typename Op::out_t, VEC>(out, index, y);
}

struct GridStride {
  int64_t nv, stride, first, rounds;
  __device__ __forceinline__ explicit GridStride(int64_t vectors)
      : nv(vectors),
        stride(static_cast<int64_t>(gridDim.x) * blockDim.x),
        first(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x),
        rounds((vectors + stride - 1) / stride) {}
};

// The block's maximum of |x| over its share of [0, n), written to partials[blockIdx.x].
template <typename T, int VEC>
__device__ __forceinline__ void write_amax_partial(const T* __restrict__ in, int64_t n,
                                                   uint32_t* __restrict__ partials) {
  using P = Pack<T, VEC>;
  const GridStride g(n / VEC);
  uint32_t m = 0;
  for_each_round<false>(reinterpret_cast<const P*>(in), g.nv, g.stride, g.first, 0, g.rounds,
                        [&](const P& p, int64_t, int64_t) { m = max_abs_bits(m, p); });
  m = block_max(tail_amax<T, VEC>(in, n, m));
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) amax_kernel(const T* __restrict__ in, int64_t n,
                                                        uint32_t* __restrict__ partials) {
  write_amax_partial<T, VEC>(in, n, partials);
}

// Converts the elements [0, n) with Op at the scale of the partial maxima, walking the rounds
// from the last to the first (the amax pass walked them forwards: its last reads are in L2).
template <typename T, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads)
    scaled_map_kernel(const T* __restrict__ in, int64_t n, const uint32_t* __restrict__ partials,
                      int num_partials, typename Op::out_t* __restrict__ out,
                      float* __restrict__ scale_out, float* __restrict__ amax_out) {
  using P = Pack<T, VEC>;
  const float amax = amax_from_partials(partials, num_partials);
  const float scale = scale_from_amax(amax, Op::kMax);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (scale_out != nullptr) *scale_out = scale;
    if (amax_out != nullptr) *amax_out = amax;
  }
  const Reciprocal d(scale);
  const GridStride g(n / VEC);
  for_each_round<true>(reinterpret_cast<const P*>(in), g.nv, g.stride, g.first, 0, g.rounds,
                       [&](const P& p, int64_t, int64_t i) { map_pack<T, VEC, Op>(p, d, out, i); });
  tail_map<T, VEC, Op>(in, n, d, out);
}

// The fused quantisation (see the file comment), launched cooperatively with every block
// resident. Rounds [0, kRegisterVectors) stay in registers, the next smem_rounds in shared
// memory, the rest is read twice.
template <typename T, int VEC, bool kE4M3>
__global__ void __launch_bounds__(kThreads, kFusedBlocksPerSm)
    fused_quantize_kernel(const T* __restrict__ in, int64_t n, uint32_t* __restrict__ partials,
                          uint8_t* __restrict__ out, float* __restrict__ scale_out, int smem_rounds) {
  using P = Pack<T, VEC>;
  using Op = CastOp<kE4M3>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  P* cache = reinterpret_cast<P*>(smem_raw);  // [smem_rounds][blockDim.x]
  const P* vin = reinterpret_cast<const P*>(in);
  const GridStride g(n / VEC);
  const int64_t on_chip_end = std::min<int64_t>(g.rounds, kRegisterVectors + smem_rounds);
  auto slot = [&](int64_t t) -> P& { return cache[(t - kRegisterVectors) * blockDim.x + threadIdx.x]; };

  // Pass 1: the amax, keeping what fits on chip.
  uint32_t m = 0;
  P regs[kRegisterVectors];
#pragma unroll
  for (int t = 0; t < kRegisterVectors; ++t) {
    if (t * g.stride + g.first < g.nv) regs[t] = vin[t * g.stride + g.first];
  }
#pragma unroll
  for (int t = 0; t < kRegisterVectors; ++t) {
    if (t * g.stride + g.first < g.nv) m = max_abs_bits(m, regs[t]);
  }
  for_each_round<false>(vin, g.nv, g.stride, g.first, kRegisterVectors, on_chip_end,
                        [&](const P& p, int64_t t, int64_t) {
                          slot(t) = p;
                          m = max_abs_bits(m, p);
                        });
  for_each_round<false>(vin, g.nv, g.stride, g.first, on_chip_end, g.rounds,
                        [&](const P& p, int64_t, int64_t) { m = max_abs_bits(m, p); });
  m = block_max(tail_amax<T, VEC>(in, n, m));
  if (threadIdx.x == 0) partials[blockIdx.x] = m;

  cg::this_grid().sync();  // every partial is written and visible

  const float scale = scale_from_amax(amax_from_partials(partials, gridDim.x), Op::kMax);
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
  const Reciprocal d(scale);
  // Pass 2: the streamed rounds newest first (the most recently read are still in L2), then the
  // shared-memory and register copies.
  for_each_round<true>(vin, g.nv, g.stride, g.first, on_chip_end, g.rounds,
                       [&](const P& p, int64_t, int64_t i) { map_pack<T, VEC, Op>(p, d, out, i); });
  for (int64_t t = kRegisterVectors; t < on_chip_end; ++t) {
    if (t * g.stride + g.first < g.nv) map_pack<T, VEC, Op>(slot(t), d, out, t * g.stride + g.first);
  }
#pragma unroll
  for (int t = 0; t < kRegisterVectors; ++t) {
    if (t * g.stride + g.first < g.nv) map_pack<T, VEC, Op>(regs[t], d, out, t * g.stride + g.first);
  }
  tail_map<T, VEC, Op>(in, n, d, out);
}


// Delayed scaling, pass 1: the amax the cast uses, as one partial per block, and this call's amax
// zeroed (the cast's atomicMax target). With a usable history every block writes the history's
// amax as its partial and returns (a launch of ~2 us, no read of x); while the history holds
// nothing usable, the blocks write the partial maxima of x as amax_kernel does.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    delayed_amax_kernel(const T* __restrict__ in, int64_t n, const float* __restrict__ history,
                        int64_t history_len, uint32_t* __restrict__ partials,
                        uint32_t* __restrict__ amax_out) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *amax_out = 0;
  const float recorded = history_amax(history, history_len);  // the same in every thread
  if (recorded > 0.f) {
    if (threadIdx.x == 0) partials[blockIdx.x] = __float_as_uint(recorded);
    return;
  }
  write_amax_partial<T, VEC>(in, n, partials);
}

// Delayed scaling, pass 2: one read of x that casts it at the scale of pass 1's partials (the
// history's amax, or x's own where the history is empty) and reduces x's own amax. Two blocks of
// kThreads per SM, as stream_grid sizes the grid: at most 64 registers (no spills, ptxas -v).
template <typename T, int VEC, bool kE4M3>
__global__ void __launch_bounds__(kThreads, 2)
    delayed_quantize_kernel(const T* __restrict__ in, int64_t n, const uint32_t* __restrict__ partials,
                            int num_partials, uint8_t* __restrict__ out,
                            float* __restrict__ scale_out, uint32_t* __restrict__ amax_out) {
  using P = Pack<T, VEC>;
  using Op = CastOp<kE4M3>;
  const float scale = scale_from_amax(amax_from_partials(partials, num_partials), Op::kMax);
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
  // |x| may exceed the recorded amax by any factor: the cast saturates.
  const Reciprocal d(scale);
  const GridStride g(n / VEC);
  uint32_t m = 0;
  for_each_round<false>(reinterpret_cast<const P*>(in), g.nv, g.stride, g.first, 0, g.rounds,
                        [&](const P& p, int64_t, int64_t i) {
                          m = max_abs_bits(m, p);
                          map_pack<T, VEC, Op>(p, d, out, i);
                        });
  tail_map<T, VEC, Op>(in, n, d, out);
  m = block_max(tail_amax<T, VEC>(in, n, m));
  if (threadIdx.x == 0) atomicMax(amax_out, m);
}

// history = [amax, history[:-1]] in place, by one block: from the end in chunks of blockDim.x,
// each chunk reading its values (one index lower) before any thread writes; a chunk writes only
// indices that it or an earlier chunk has already read. A NaN or Inf amax is not recorded (every
// thread reads the same value and returns before any barrier), as in the reference.
__global__ void __launch_bounds__(256)
    record_amax_kernel(float* __restrict__ history, int64_t count, const float* __restrict__ amax) {
  if (!isfinite(*amax)) return;
  for (int64_t end = count; end > 1; end -= blockDim.x) {
    const int64_t i = end - 1 - threadIdx.x;
    const bool active = i >= 1;
    const float v = active ? history[i - 1] : 0.f;
    __syncthreads();
    if (active) history[i] = v;
    __syncthreads();
  }
  if (threadIdx.x == 0) history[0] = *amax;
}

// ---- launchers --------------------------------------------------------------------------------

// Calls f(std::integral_constant<bool, E4M3>).
template <typename F>
void dispatch_fp8(at::ScalarType dtype, F&& f) {
  if (fp8_is_e4m3(dtype)) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(std::integral_constant<int, VEC>) with VEC = 16 bytes of T when both pointers allow
// it, else 1 (an unaligned storage offset).
template <typename T, typename O, typename F>
void dispatch_vec(const void* in, const void* out, F&& f) {
  constexpr int vec = 16 / sizeof(T);
  if (pointer_alignment(in) >= 16 && pointer_alignment(out) >= static_cast<int>(vec * sizeof(O))) {
    f(std::integral_constant<int, vec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

uint32_t* as_bits(const at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr()); }

// For a cast of x into the FP8 tensor q: calls f(in, out, E4M3 constant, VEC constant) with
// in = x's data as its scalar type.
template <typename F>
void dispatch_cast(const at::Tensor& x, const at::Tensor& q, F&& f) {
  FALQON_DISPATCH_ACTIVATION(x.scalar_type(), "falqon_quantize", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    uint8_t* out = static_cast<uint8_t*>(q.data_ptr());
    dispatch_fp8(q.scalar_type(), [&](auto e4m3) {
      dispatch_vec<scalar_t, uint8_t>(in, out, [&](auto vec) { f(in, out, e4m3, vec); });
    });
  });
}


template <typename Op>
void launch_scaled_map(const at::Tensor& x, const at::Tensor& partials, void* out_ptr,
                       float* scale_out, float* amax_out) {
  using O = typename Op::out_t;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FALQON_DISPATCH_ACTIVATION(x.scalar_type(), "falqon_scaled_map", [&] {
    const auto* in = x.const_data_ptr<scalar_t>();
    auto* out = static_cast<O*>(out_ptr);
    dispatch_vec<scalar_t, O>(in, out, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      scaled_map_kernel<scalar_t, VEC, Op><<<stream_grid(x.numel() / VEC, x.device()), kThreads, 0, stream>>>(
          in, x.numel(), as_bits(partials), static_cast<int>(partials.numel()), out, scale_out,
          amax_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor new_scale(const at::Tensor& like) {
  return at::empty({}, like.options().dtype(at::kFloat));
}

using Quantized = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (q, scale, amax)

Quantized quantize_twopass(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(dtype));
  at::Tensor scale = new_scale(x);
  at::Tensor amax = new_scale(x);
  const at::Tensor partials = amax_partials(x);
  dispatch_fp8(dtype, [&](auto e4m3) {
    launch_scaled_map<CastOp<decltype(e4m3)::value>>(x, partials, q.data_ptr(),
                                                     scale.data_ptr<float>(),
                                                     amax.data_ptr<float>());
  });
  return {q, scale, amax};
}

// What the fused kernel may use on one device: shared-memory rounds per block and the blocks
// that are then resident at once (a cooperative launch must not exceed them).
struct FusedLimits {
  int max_smem_rounds = 0;
  int resident_blocks = 0;
};

template <typename T, int VEC, bool kE4M3>
FusedLimits fused_limits(const at::Device& device) {
  static std::mutex mutex;
  static std::unordered_map<int, FusedLimits> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device.index());
  if (it != cache.end()) return it->second;
  auto kernel = fused_quantize_kernel<T, VEC, kE4M3>;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  // Each of the kFusedBlocksPerSm blocks of an SM gets an equal share of its shared memory.
  const int64_t per_block =
      std::min<int64_t>(static_cast<int64_t>(prop->sharedMemPerMultiprocessor) / kFusedBlocksPerSm -
                            static_cast<int64_t>(prop->reservedSharedMemPerBlock),
                        static_cast<int64_t>(prop->sharedMemPerBlockOptin)) -
      static_cast<int64_t>(attr.sharedSizeBytes);
  const int64_t round_bytes = int64_t{kThreads} * sizeof(Pack<T, VEC>);
  FusedLimits limits;
  limits.max_smem_rounds = static_cast<int>(std::max<int64_t>(0, per_block / round_bytes));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
  int per_sm = 0;
  // Per device: the current device is the tensor's (the caller holds a CUDAGuard). Should the
  // estimate above leave no room for one block, give up shared-memory rounds until one fits.
  for (; limits.max_smem_rounds >= 0; --limits.max_smem_rounds) {
    const int smem = static_cast<int>(limits.max_smem_rounds * round_bytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    if (per_sm > 0) break;
  }
  FALQON_CHECK(per_sm > 0, "falqon: the fused quantize kernel cannot be resident on this GPU");
  limits.resident_blocks = std::min(per_sm, kFusedBlocksPerSm) * sm_count(device);
  cache.emplace(device.index(), limits);
  return limits;
}

Quantized quantize_fused(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(dtype));
  at::Tensor scale = new_scale(x);
  at::Tensor partials;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_cast(x, q, [&](auto in, auto out, auto e4m3, auto vec) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(in)>>;
    constexpr bool kE4M3 = decltype(e4m3)::value;
    constexpr int VEC = decltype(vec)::value;
    const FusedLimits limits = fused_limits<T, VEC, kE4M3>(x.device());
    int64_t n = x.numel();
    const int64_t vectors = n / VEC;
    const int grid = static_cast<int>(std::min<int64_t>(
        std::max<int64_t>(1, (vectors + kThreads - 1) / kThreads), limits.resident_blocks));
    const int64_t rounds = (vectors + int64_t{grid} * kThreads - 1) / (int64_t{grid} * kThreads);
    int smem_rounds =
        static_cast<int>(std::clamp<int64_t>(rounds - kRegisterVectors, 0, limits.max_smem_rounds));
    const size_t smem = static_cast<size_t>(smem_rounds) * kThreads * sizeof(Pack<T, VEC>);
    partials = at::empty({grid}, x.options().dtype(at::kInt));
    uint32_t* partial_bits = as_bits(partials);
    float* scale_ptr = scale.data_ptr<float>();
    void* args[] = {&in, &n, &partial_bits, &out, &scale_ptr, &smem_rounds};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
        reinterpret_cast<const void*>(fused_quantize_kernel<T, VEC, kE4M3>), dim3(grid),
        dim3(kThreads), args, smem, stream));
  });
  // The amax for the caller, from the partials (the bits of non-negative floats order as int32s):
  // one small reduction, kept out of the kernel, whose registers are all taken by its cache.
  return {q, scale, partials.amax().view(at::kFloat)};
}

const std::string& default_impl() {
  static const std::string impl = [] {
    const char* v = std::getenv("FALQON_QUANTIZE");
    std::string s = (v && *v) ? v : "twopass";
    FALQON_CHECK(s == "twopass" || s == "fused",
                "falqon: FALQON_QUANTIZE must be 'twopass' or 'fused', got '", s, "'");
    return s;
  }();
  return impl;
}

}  // namespace

// ---- entry points -----------------------------------------------------------------------------

at::Tensor amax_partials(const at::Tensor& x) {
  FALQON_CHECK(x.is_contiguous(), "falqon: amax_partials needs a contiguous tensor");
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  FALQON_DISPATCH_ACTIVATION(x.scalar_type(), "falqon_amax", [&] {
    const auto* in = x.const_data_ptr<scalar_t>();
    dispatch_vec<scalar_t, scalar_t>(in, in, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      // One partial per block; an empty x gives one partial of 0.
      const int grid = stream_grid(x.numel() / VEC, x.device());
      partials = at::empty({grid}, x.options().dtype(at::kInt));
      amax_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(in, x.numel(), as_bits(partials));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return partials;
}

void cast_with_partials(const at::Tensor& x, const at::Tensor& partials, const at::Tensor& out,
                        const at::Tensor& scale, const std::optional<at::Tensor>& amax) {
  FALQON_CHECK(x.is_contiguous() && out.is_contiguous() && out.numel() == x.numel(),
              "falqon: cast_with_partials needs contiguous tensors of equal sizes");
  dispatch_fp8(out.scalar_type(), [&](auto e4m3) {
    launch_scaled_map<CastOp<decltype(e4m3)::value>>(
        x, partials, out.data_ptr(), scale.data_ptr<float>(),
        amax.has_value() ? amax->data_ptr<float>() : nullptr);
  });
}

void record_amax_fp8(at::Tensor& amax_history, const at::Tensor& amax) {
  record_amax_kernel<<<1, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      amax_history.data_ptr<float>(), amax_history.numel(), amax.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor delayed_partials(const at::Tensor& x, const at::Tensor& amax_history,
                            const at::Tensor& amax, int64_t extra) {
  FALQON_CHECK(x.is_contiguous(), "falqon: delayed_partials needs a contiguous tensor");
  const at::Tensor history = amax_history.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  FALQON_DISPATCH_ACTIVATION(x.scalar_type(), "falqon_delayed_amax", [&] {
    const auto* in = x.const_data_ptr<scalar_t>();
    dispatch_vec<scalar_t, scalar_t>(in, in, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const int grid = stream_grid(x.numel() / VEC, x.device());
      partials = at::empty({grid + extra}, x.options().dtype(at::kInt));
      delayed_amax_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          in, x.numel(), history.const_data_ptr<float>(), history.numel(), as_bits(partials),
          as_bits(amax));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return partials;
}

at::Tensor quantization_error_with_partials(const at::Tensor& x, const at::Tensor& partials) {
  FALQON_CHECK(x.is_contiguous(), "falqon: quantization_error needs a contiguous tensor");
  at::Tensor error = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  launch_scaled_map<ErrorOp>(x, partials, error.data_ptr(), nullptr, nullptr);
  return error;
}

namespace {

Quantized quantize_with_impl(const at::Tensor& input, at::ScalarType dtype, const std::string& impl) {
  check_quantize_args(input, dtype);
  FALQON_CHECK(impl == "twopass" || impl == "fused", "falqon: quantize impl must be 'twopass' or "
              "'fused', got '", impl, "'");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  if (x.numel() == 0) {
    return {at::empty(input.sizes(), x.options().dtype(dtype)),
            at::ones({}, x.options().dtype(at::kFloat)), at::zeros({}, x.options().dtype(at::kFloat))};
  }
  return impl == "fused" ? quantize_fused(x, dtype) : quantize_twopass(x, dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_impl(const at::Tensor& input, at::ScalarType dtype,
                                                 const std::string& impl) {
  auto [q, scale, amax] = quantize_with_impl(input, dtype, impl);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& input,
                                                            at::ScalarType dtype) {
  return quantize_with_impl(input, dtype, default_impl());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_delayed_fp8(const at::Tensor& input,
                                                                    at::ScalarType dtype,
                                                                    const at::Tensor& amax_history) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor q = at::empty(input.sizes(), x.options().dtype(dtype));
  at::Tensor scale = new_scale(x);
  at::Tensor amax = new_scale(x);  // zeroed by delayed_amax_kernel, then the atomicMax target
  // Launched whatever the size (an empty x too): the scale depends on the history, on the device.
  const at::Tensor partials = delayed_partials(x, amax_history, amax);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_cast(x, q, [&](auto in, auto out, auto e4m3, auto vec) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(in)>>;
    constexpr int VEC = decltype(vec)::value;
    delayed_quantize_kernel<T, VEC, decltype(e4m3)::value>
        <<<stream_grid(x.numel() / VEC, x.device()), kThreads, 0, stream>>>(
            in, x.numel(), as_bits(partials), static_cast<int>(partials.numel()), out,
            scale.data_ptr<float>(), as_bits(amax));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, scale, amax};
}

}  // namespace cuda
}  // namespace falqon
