// Shared pieces of the CUDA backend: the FP8-or-emulation decision, launch helpers, device-side
// conversions and reductions, and the entry points one .cu file offers the others.
//
// Numerics follow csrc/reference.cpp bit for bit where the reference is elementwise: fp32
// division (__fdiv_rn, never a reciprocal multiply), products and sums rounded separately
// (__fmul_rn / __fadd_rn, so nvcc cannot contract them into an FMA the reference does not do),
// a clamp to the format's largest finite value that keeps NaN, then a round-to-nearest-even
// saturating cast (cvt.rn.satfinite).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "falqon.h"

namespace falqon {
namespace cuda {

// ---- host side --------------------------------------------------------------------------------

// True where this device cannot run the FP8 path (compute capability < 8.9) or
// FALQON_FORCE_EMULATION=1 is set; the first true answer warns once. The CUDA entry points then
// run the reference implementation (ATen ops on the CUDA tensors).
bool use_emulation(const at::Device& device);

int sm_count(const at::Device& device);

// Largest power of two (<= 256) that divides the address: what cuBLASLt and the vector paths
// of the kernels may assume about a pointer.
inline int pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int align = 1;
  while (align < 256 && a % (2 * align) == 0) align *= 2;
  return align;
}

// The leading dimension of a 2-D row-major tensor (its row stride; its columns contiguous): a
// matrix of one row reports its width, as BLAS and TMA want it, whatever stride it carries.
inline int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0);
}

inline bool fp8_is_e4m3(at::ScalarType dtype) {
  FALQON_CHECK(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2,
              "falqon: expected torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype);
  return dtype == at::kFloat8_e4m3fn;
}

// An environment flag read once by the caller: "1"/"0", or `fallback` when unset or empty.
bool env_flag(const char* name, bool fallback);

// Programmatic dependent launch (compute capability >= 9.0; FALQON_PDL=0 turns it off): a kernel
// launched by launch_dependent may be scheduled while the kernel before it on the stream is still
// finishing, and waits for it with pdl_wait() (device side) before it reads anything that kernel
// may have written. That hides the launch latency between the small passes of a layer (~1 us
// each; run 119 had ~14 us of gaps between kernels in a 4096 -> 4096 fwd+bwd).
bool pdl_enabled(const at::Device& device);
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, const at::Device& device, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute pdl[1];
  pdl[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = pdl;
  config.numAttrs = pdl_enabled(device) ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// ---- quantize.cu ------------------------------------------------------------------------------

// Per-tensor quantisation on the FP8 path, with the implementation FALQON_QUANTIZE picks
// ("twopass", the default, or "fused"): (q, scale, amax of the input). No host synchronisation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& input,
                                                            at::ScalarType dtype);
// (q, scale) with the implementation named: "twopass" or "fused" (benchmarks, self-check).
std::tuple<at::Tensor, at::Tensor> quantize_impl(const at::Tensor& input, at::ScalarType dtype,
                                                 const std::string& impl);
// Delayed scaling (ref::quantize_delayed's numerics; arguments already checked): the scale from
// max(amax_history) where > 0, else from the input's own amax, decided on the device. One read
// and one write of the data once the history holds a value; returns (q, scale, amax of input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_delayed_fp8(const at::Tensor& input,
                                                                    at::ScalarType dtype,
                                                                    const at::Tensor& amax_history);

// ---- quantize_rows.cu -------------------------------------------------------------------------

// Row-wise quantisation on the FP8 path (ref::quantize_rows_with_amax's numerics): (q, scale, amax)
// with a scale and an amax per row of the last dimension (shaped input.shape[:-1]). One pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_fp8(const at::Tensor& input,
                                                                 at::ScalarType dtype);

// record_amax_ in one launch (arguments already checked).
void record_amax_fp8(at::Tensor& amax_history, const at::Tensor& amax);

// The two halves of the two-pass quantisation, so that several tensors can share one scale.
// amax_partials: per-block maxima of |x| (as the uint32 bits of non-negative floats, in an int32
// tensor; the bit order of non-negative floats is their numeric order and NaN sorts above Inf).
at::Tensor amax_partials(const at::Tensor& x);
// out[i] = fp8(clamp(x[i] / s)) with s = max(partials) / fmax (1 if 0); writes s to `scale`
// (and max(partials) to `amax`, a float32 scalar, where given). `x` contiguous, `out` a
// contiguous FP8 tensor (or view) of x.numel() elements.
void cast_with_partials(const at::Tensor& x, const at::Tensor& partials, const at::Tensor& out,
                        const at::Tensor& scale, const std::optional<at::Tensor>& amax = std::nullopt);
// Delayed scaling's first pass over a contiguous x: the partial maxima the cast uses (every one
// the history's amax once it holds a value, else x's own), and `amax` (float32 scalar) zeroed as
// the target of the cast's atomic max of x's own amax. `extra` more slots at the end of the
// returned partials are left for another part of the same operand (adapter_partials).
at::Tensor delayed_partials(const at::Tensor& x, const at::Tensor& amax_history,
                            const at::Tensor& amax, int64_t extra = 0);

// ---- adapter.cu: the adapter mode's dgrad operand [g | u | 0] (M x ld_q FP8, ld_q = N + r16),
// with u = scaling g B (M x r, fp32, contiguous, the scaling already applied) -------------------

// Slots of the partial maxima that adapter_partials writes.
constexpr int64_t kAdapterPartials = 32;
// Delayed scaling's partials of u: kAdapterPartials values into partials[offset, offset +
// kAdapterPartials) (int32 bits, as amax_partials), the history's amax where it holds one, else
// partial maxima of |u| (delayed_partials' rule). With current scaling the fused backward pass
// folds u's amax into its own partials instead.
void adapter_partials(const at::Tensor& u, const at::Tensor& partials, int64_t offset,
                      const at::Tensor& amax_history);
// Casts the operand at the scale of max(partials): with g (current scaling) g into columns
// [0, N) of q and u (plus zero padding) into [N, ld_q), writing scale and amax = max(partials);
// without g (delayed scaling, g already cast by the fused backward pass) u and its padding only,
// atomically maxing u's own amax into amax (as float bits; zeroed by delayed_partials).
void adapter_cast(const std::optional<at::Tensor>& g, const at::Tensor& u, int64_t N,
                  const at::Tensor& partials, const at::Tensor& q, const at::Tensor& scale,
                  const at::Tensor& amax);
// ---- adapter_u.cu: u and the operand's partial maxima in one pass over row blocks of g (Hopper)

// True where adapter_u_rows can run on g (M x N, 16-bit, contiguous) for rank r and should: an
// sm_90a build on a compute capability 9.0 GPU, r <= 64 and a multiple of 8, N a multiple of 8,
// and enough rows to fill the GPU (FALQON_ADAPTER_U=rows / gemm overrides that choice).
bool adapter_u_rows_applies(const at::Tensor& g, int64_t r);
// The partial maxima adapter_u_rows writes: one per 64 rows of g.
int64_t adapter_u_rows_blocks(int64_t M);
// u = scaling * g B (M x r, fp32, B rounded to g's dtype), partials[b] = max(|g|, |u|) over rows
// [64 b, 64 b + 64) as abs_bits (int32), amax zeroed for the casts' atomic maxima.
at::Tensor adapter_u_rows(const at::Tensor& g, const at::Tensor& lora_B, double scaling,
                          const at::Tensor& partials, const at::Tensor& amax);

// ---- adapter_y.cu: the adapter mode's forward term in one pass over y (Hopper) ---------------

// True where adapter_y can run: an sm_90a build on a compute capability 9.0 GPU, y_base (M x N,
// contiguous rows, any row stride that is a multiple of 8), xa (M x r) and b (N x r) contiguous,
// all 16-byte aligned in one 16-bit dtype, r <= 64 and a multiple of 8, N a multiple of 8
// (FALQON_ADAPTER_Y=gemm declines, for comparisons).
bool adapter_y_applies(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& b);
// y = y_base + scaling * xa b^T as a new contiguous (M, N) tensor: fp32 sums, fma(scaling, sum,
// y_base), one rounding.
at::Tensor adapter_y(const at::Tensor& y_base, const at::Tensor& xa, const at::Tensor& b,
                     double scaling);

// ---- grad_pass_hopper.cu: the fused pass's cast mode on TMA and wgmma (Hopper) ---------------

// True where grad_cast_product_hopper can run: an sm_90a build on a compute capability 9.0 GPU,
// g (M x N) and xa (M x r) contiguous and 16-byte aligned in the same 16-bit dtype, r <= 64 and
// a multiple of 8, N a multiple of 8 (FALQON_GRAD_PASS_MMA=1 declines, for comparisons).
bool grad_cast_product_applies(const at::Tensor& g, const at::Tensor& xa);
// One pass over g: casts it into columns [0, N) of q (M x ld_q FP8) at the scale of max(partials)
// (written to scale; g's amax atomically maxed into amax, as float bits), casts u (M x r fp32)
// into columns [N, ld_q) where given (its amax joining g's), and returns the workspace (splits,
// N, 64) of dB's fp32 partial products g^T xa for grad_b_reduce_kernel.
at::Tensor grad_cast_product_hopper(const at::Tensor& g, const at::Tensor& xa,
                                    const at::Tensor& partials, const at::Tensor& q,
                                    const at::Tensor& scale, const at::Tensor& amax,
                                    const std::optional<at::Tensor>& u);

// E = x - s0 * fp8_e4m3(x / s0) in fp32, s0 from the partials of x (the FP8 quantisation error).
at::Tensor quantization_error_with_partials(const at::Tensor& x, const at::Tensor& partials);

// ---- gemm.cu ----------------------------------------------------------------------------------

// out (n x m, row-major, leading dimension ldo) = b (n x k) a (m x k)^T * a_scale * b_scale
// [+ bias over the m columns], both operands row-major FP8 with a contiguous k. This is the
// cuBLASLt "TN" FP8 GEMM: D[m x n] (column-major) = A^T B with A = a and B = b as stored.
// bias: length m, of out's dtype (bf16/fp16 output only). a_scale, b_scale: float32 device
// scalars, or contiguous vectors of m and n values (outer-vector scaling: out[j][i] takes
// a_scale[i] * b_scale[j]; where cuBLASLt has no such kernel, the scales or the bias are applied
// after the GEMM). fast_accum: CUBLASLT_MATMUL_DESC_FAST_ACCUM.
void scaled_gemm_tn(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                    const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                    const at::Tensor& out, bool fast_accum);
// The adapter mode's 16-bit GEMMs through cuBLASLt (fp32 accumulation and epilogue): row-major
// out (n x m) = alpha * b (n x k) a^T [+ c], for b and a row-major bf16/fp16 with contiguous rows
// (any row strides): a is (m x k), or with a_is_k_by_m (k x m). c (n x m, any row stride) has
// out's dtype; out is bf16, fp16 or fp32. Returns false, computing nothing, where cuBLASLt offers
// no algorithm for the layouts (the caller then takes the reference formula).
bool matmul_16bit(const at::Tensor& a, bool a_is_k_by_m, const at::Tensor& b,
                  const std::optional<at::Tensor>& c, const at::Tensor& out, float alpha);
// Fast-accumulation choices of the two GEMMs, read once from FALQON_FAST_ACCUM_FWD (default 1)
// and FALQON_FAST_ACCUM_DGRAD (default 1).
bool fast_accum_forward();
bool fast_accum_dgrad();

// ---- operands.cu ------------------------------------------------------------------------------

// A given quantisation's scales for the forward GEMM, in one launch: (W''s scale, repeated over its
// weight_rows rows where per_row (outer-vector scaling), else weight_scale itself; x's amax =
// x_scale * 448, shaped as x_scale, which is contiguous float32).
std::tuple<at::Tensor, at::Tensor> given_scales(const at::Tensor& weight_scale, int64_t weight_rows,
                                                bool per_row, const at::Tensor& x_scale);
// From the forward's (M, N + r16) product, in one launch: (xa = columns [N, N + r), contiguous;
// lora_B in the product's dtype, contiguous, where given, else undefined).
std::tuple<at::Tensor, at::Tensor> product_operands(const at::Tensor& product, int64_t N,
                                                    int64_t r,
                                                    const std::optional<at::Tensor>& lora_B);
// t contiguous in `dtype` (an activation dtype) as Tensor.to rounds it: t itself where it is.
at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype);

// ---- transpose.cu -----------------------------------------------------------------------------

// The (cols, rows) contiguous transpose of a contiguous 2-D FP8 (1-byte) matrix whose sizes are
// multiples of 16.
at::Tensor transpose_fp8(const at::Tensor& w);

// ---- the ops on the FP8 path (arguments already checked, device guard held) ------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_fp8(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_scale,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& amax_history, bool adapter, double scaling,
    const std::optional<at::Tensor>& input_fp8, const std::optional<at::Tensor>& input_scale);
// dx = gq W'_q[:C] * sg * s (the dgrad FP8 GEMM) for a quantised 2-D operand gq (M, C) whose rows
// are those of grad_output: C = N (the proxy mode) or every row of W' (the adapter mode, whose
// weight_t holds them all); dx shaped as grad_output with K last.
at::Tensor dgrad_fp8(const at::Tensor& grad_output, const at::Tensor& gq, const at::Tensor& sg,
                     const at::Tensor& weight, const at::Tensor& weight_scale,
                     const std::optional<at::Tensor>& weight_t);
std::tuple<at::Tensor, at::Tensor, at::Tensor> melded_linear_backward_fp8(
    const at::Tensor& grad_output, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& weight_scale, const std::optional<at::Tensor>& weight_t, double scaling,
    at::ScalarType grad_dtype, const std::optional<at::Tensor>& amax_history,
    at::ScalarType grad_B_dtype, const std::optional<at::Tensor>& lora_B);
std::tuple<at::Tensor, at::Tensor> melded_linear_grad_input_fp8(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& weight_scale,
    const std::optional<at::Tensor>& weight_t, at::ScalarType grad_dtype,
    const std::optional<at::Tensor>& amax_history, const std::optional<at::Tensor>& lora_B,
    double scaling);
std::tuple<at::Tensor, at::Tensor> meld_init_fp8(const at::Tensor& weight, int64_t rank,
                                                 const std::string& svd, int64_t oversample,
                                                 int64_t power_iters, int64_t seed,
                                                 double adapter_row_norm);
void topk_update_fp8(at::Tensor& weight, at::Tensor& lora_B, const std::optional<at::Tensor>& weight_t,
                     int64_t k, double scaling, bool keep_residual);
// topk_update_many_ in four launches (topk_update.cu); weight_ts: one entry per layer.
at::Tensor topk_update_many_fp8(at::TensorList weights, at::TensorList lora_Bs,
                                const std::vector<std::optional<at::Tensor>>& weight_ts,
                                at::IntArrayRef ks, at::ArrayRef<double> scalings,
                                const c10::List<bool>& keep_residuals, bool discard_nonfinite);

}  // namespace cuda
}  // namespace falqon

// ---- device side ------------------------------------------------------------------------------
#ifdef __CUDACC__
namespace falqon {
namespace cuda {

// A type carried as a value, for generic lambdas that dispatch on it.
template <typename T>
struct TypeTag {
  using type = T;
};

// The device side of launch_dependent: wait for the kernel before this one to finish (and its
// writes to be visible); let the kernel after this one be scheduled. Both do nothing below sm_90
// or when the launch was an ordinary one.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Threads of the elementwise kernels, and how many vectors each thread has in flight.
constexpr int kThreads = 512;
constexpr int kUnroll = 4;

// VEC consecutive elements moved with one (up to 16-byte) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// |x| as the bits of a non-negative float: unsigned comparison orders them numerically, with
// Inf above every finite value and NaN above Inf, so an integer max is a NaN-propagating max
// (fmaxf would drop NaN).
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Max over the block, returned to every thread. Safe to call repeatedly in one kernel.
__device__ __forceinline__ uint32_t block_max(uint32_t v) {
  __shared__ uint32_t warp_vals[32];
  v = warp_max(v);
  __syncthreads();  // a previous call's readers are done with warp_vals
  if ((threadIdx.x & 31) == 0) warp_vals[threadIdx.x >> 5] = v;
  __syncthreads();
  const unsigned warps = (blockDim.x + 31) >> 5;
  return warp_max((threadIdx.x & 31) < warps ? warp_vals[threadIdx.x & 31] : 0u);
}

// The reference's scale: amax / fmax in fp32, 1 where that is 0; NaN and Inf stay.
__device__ __forceinline__ float scale_from_amax(float amax, float fmax) {
  const float s = __fdiv_rn(amax, fmax);
  return s == 0.f ? 1.f : s;
}

// The max of the partial amaxes written by amax_kernel, to every thread of the block.
__device__ __forceinline__ float amax_from_partials(const uint32_t* __restrict__ partials, int count) {
  uint32_t m = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) m = max(m, partials[i]);
  return __uint_as_float(block_max(m));
}

// The amax a delayed scale uses, to every thread of the block: max(history) where it is finite and
// > 0, else 0 (nothing recorded yet; also for a history holding a NaN or +Inf, whose max is not
// finite, as in the reference). Each value maps to a key whose unsigned order is that decision's:
// NaN and +Inf above everything, a positive finite value its own bits, zero and negative values 0.
__device__ __forceinline__ float history_amax(const float* __restrict__ history, int64_t count) {
  uint32_t key = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float v = history[i];
    const bool unusable = isnan(v) || (isinf(v) && v > 0.f);
    key = max(key, unusable ? 0xffffffffu : (v > 0.f ? __float_as_uint(v) : 0u));
  }
  key = block_max(key);
  return key == 0xffffffffu ? 0.f : __uint_as_float(key);
}

template <bool kE4M3>
struct Fp8Format {
  static constexpr float kMax = kE4M3 ? 448.f : 57344.f;
  static constexpr __nv_fp8_interpretation_t kKind = kE4M3 ? __NV_E4M3 : __NV_E5M2;
};

// v cast to FP8, rounded to nearest even; __NV_SATFINITE saturates whatever lies beyond +-fmax
// (+-Inf included) to +-fmax and keeps NaN a NaN: the reference's clamp-then-cast.
template <bool kE4M3>
__device__ __forceinline__ uint8_t float_to_fp8(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, Fp8Format<kE4M3>::kKind);
}

// Two values with one cvt instruction; a in the low byte.
template <bool kE4M3>
__device__ __forceinline__ uint16_t float2_to_fp8x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, Fp8Format<kE4M3>::kKind);
}

__device__ __forceinline__ float fp8_to_float(uint8_t b, __nv_fp8_interpretation_t kind) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(b, kind);
  return __half2float(__half(h));
}

// x / s as the reference computes it: x times y = RN(1/s), the reciprocal of the tensor's one
// scale rounded once to fp32 (as torchao and Transformer Engine quantise). It can differ from the
// true quotient by an fp32 ulp, which changes an FP8 rounding only for quotients within an ulp of a
// midpoint between two FP8 values. One multiply per element instead of a correctly rounded division
// (1 mul + 4 FMA + fix-ups) keeps the cast kernels memory-bound: with the division, ncu showed them
// at 62-72% SM throughput and 50-55% of DRAM bandwidth. y is capped at FLT_MAX so that a subnormal
// scale (amax below ~1e-36) gives saturated values rather than 0 * Inf = NaN; NaN stays NaN.
struct Reciprocal {
  float s, y;  // the scale and its capped reciprocal
  __device__ __forceinline__ explicit Reciprocal(float scale) : s(scale) {
    const float r = __frcp_rn(scale);
    y = r > FLT_MAX ? FLT_MAX : r;
  }
  __device__ __forceinline__ float div(float x) const { return __fmul_rn(x, y); }
};

// x[i] / scale, quantised: the cast of the reference's quantize.
template <bool kE4M3>
struct CastOp {
  using out_t = uint8_t;
  static constexpr float kMax = Fp8Format<kE4M3>::kMax;
  template <int V, typename D>
  __device__ __forceinline__ static void apply(const float (&x)[V], const D& d, out_t (&y)[V]) {
#pragma unroll
    for (int i = 0; i + 1 < V; i += 2) {
      const uint16_t pair = float2_to_fp8x2<kE4M3>(d.div(x[i]), d.div(x[i + 1]));
      y[i] = static_cast<uint8_t>(pair & 0xff);
      y[i + 1] = static_cast<uint8_t>(pair >> 8);
    }
    if (V & 1) y[V - 1] = float_to_fp8<kE4M3>(d.div(x[V - 1]));
  }
};

// CastOp for the 8 values of a vector, returned as two 32-bit words (x[0] in the lowest byte):
// one byte permute per word where CastOp's byte array costs a dozen moves and shifts.
template <bool kE4M3>
__device__ __forceinline__ uint2 cast8_to_fp8(const float (&x)[8], const Reciprocal& d) {
  uint32_t w[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t lo = float2_to_fp8x2<kE4M3>(d.div(x[4 * h]), d.div(x[4 * h + 1]));
    const uint32_t hi = float2_to_fp8x2<kE4M3>(d.div(x[4 * h + 2]), d.div(x[4 * h + 3]));
    w[h] = __byte_perm(lo, hi, 0x5410);
  }
  return make_uint2(w[0], w[1]);
}

// The reference's quantization_error: x - float(fp8_e4m3(x / s)) * s, product and difference
// rounded separately.
struct ErrorOp {
  using out_t = float;
  static constexpr float kMax = Fp8Format<true>::kMax;
  template <int V, typename D>
  __device__ __forceinline__ static void apply(const float (&x)[V], const D& d, out_t (&y)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float q = fp8_to_float(float_to_fp8<true>(d.div(x[i])), __NV_E4M3);
      y[i] = __fsub_rn(x[i], __fmul_rn(q, d.s));
    }
  }
};

template <typename O, int VEC>
__device__ __forceinline__ void store_pack(O* __restrict__ out, int64_t vec_index, const O (&y)[VEC]) {
  Pack<O, VEC> p;
#pragma unroll
  for (int i = 0; i < VEC; ++i) p.v[i] = y[i];
  reinterpret_cast<Pack<O, VEC>*>(out)[vec_index] = p;
}

template <typename T, int VEC>
__device__ __forceinline__ uint32_t max_abs_bits(uint32_t m, const Pack<T, VEC>& p) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) m = max(m, abs_bits(to_float(p.v[i])));
  return m;
}

template <typename T, int VEC>
__device__ __forceinline__ void pack_to_floats(const Pack<T, VEC>& p, float (&x)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) x[i] = to_float(p.v[i]);
}

// Grid-stride loops in "rounds": in round t this thread owns vector t * stride + first, where
// stride = gridDim.x * blockDim.x. Calls f(pack, t, index) for the rounds [begin, end) (last to
// first when kReverse) that hold a vector of this thread, loading kUnroll rounds before using
// any, so that kUnroll loads per thread are in flight.
template <bool kReverse, typename P, typename F>
__device__ __forceinline__ void for_each_round(const P* __restrict__ vin, int64_t nv, int64_t stride,
                                               int64_t first, int64_t begin, int64_t end, F&& f) {
  const int64_t count = end - begin;
  for (int64_t base = 0; base < count; base += kUnroll) {
    P p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = kReverse ? end - 1 - (base + u) : begin + base + u;
      if (base + u < count && t * stride + first < nv) p[u] = vin[t * stride + first];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = kReverse ? end - 1 - (base + u) : begin + base + u;
      if (base + u < count && t * stride + first < nv) f(p[u], t, t * stride + first);
    }
  }
}

// The activation dtypes (float32, float16, bfloat16); no double instantiations.
#define FALQON_DISPATCH_ACTIVATION(TYPE, NAME, ...)                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace cuda
}  // namespace falqon
#endif  // __CUDACC__
