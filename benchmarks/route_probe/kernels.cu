// Kernels of benchmarks/route_probe/probe.py (built with torch.utils.cpp_extension.load, not part
// of the extension): cuBLASLt FP8 GEMMs with per-tensor or outer-vector (row-wise) scales, a
// one-pass row-wise FP8 quantisation, and a read pass that walks a tensor forwards or backwards.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <vector>
#define CK(x)                                                                          \
  do {                                                                                 \
    const cublasStatus_t s_ = (x);                                                     \
    TORCH_CHECK(s_ == CUBLAS_STATUS_SUCCESS, #x, " -> ", cublasLtGetStatusName(s_));   \
  } while (0)

struct Plan {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t a, b, d;
  cublasLtMatmulAlgo_t algo;
  size_t ws;
};
static std::vector<Plan> plans;  // never freed: the probe's process is short

// a (m x k) fp8, b (n x k) fp8 -> out (n x m) bf16, TN as falqon's scaled_gemm_tn.
// mode: 0 scalar, 3 outer vector (A: m floats, B: n floats). Returns -1 where no algorithm.
int64_t plan(int64_t m, int64_t n, int64_t k, int64_t mode_a, int64_t mode_b, bool fast,
             torch::Tensor sa, torch::Tensor sb) {
  Plan p{};
  CK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof(nn)));
  int8_t f = fast ? 1 : 0;
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &f, sizeof(f)));
  int32_t ma = (int32_t)mode_a, mb = (int32_t)mode_b;
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof(ma)));
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof(mb)));
  const void* pa = sa.data_ptr(); const void* pb = sb.data_ptr();
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &pa, sizeof(pa)));
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &pb, sizeof(pb)));
  CK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, k, m, k));
  CK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, k, n, k));
  CK(cublasLtMatrixLayoutCreate(&p.d, CUDA_R_16BF, m, n, m));
  cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = 32ull << 20;
  CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                          sizeof(ws)));
  cublasLtMatmulHeuristicResult_t r{}; int found = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.desc,
                                                    p.a, p.b, p.d, p.d, pref, 1, &r, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || found == 0) return -1;
  p.algo = r.algo; p.ws = r.workspaceSize;
  plans.push_back(p);
  return (int64_t)plans.size() - 1;
}

void run(int64_t i, torch::Tensor a, torch::Tensor b, torch::Tensor sa, torch::Tensor sb,
         torch::Tensor out, torch::Tensor ws) {
  Plan& p = plans[i];
  const void* pa = sa.data_ptr(); const void* pb = sb.data_ptr();
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &pa, sizeof(pa)));
  CK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &pb, sizeof(pb)));
  float alpha = 1.f, beta = 0.f;
  CK(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, &alpha, a.data_ptr(), p.a,
                    b.data_ptr(), p.b, &beta, out.data_ptr(), p.d, out.data_ptr(), p.d, &p.algo,
                    p.ws ? ws.data_ptr() : nullptr, p.ws, at::cuda::getCurrentCUDAStream()));
}

// One pass: a CTA per row, the row held in registers (VEC uint4 per thread), amax over the row,
// then the cast with scale = amax / 448 (inverse applied), scale written per row.
template <int VEC>
__global__ void rowwise_quant(const __nv_bfloat16* __restrict__ x, __nv_fp8_e4m3* __restrict__ q,
                              float* __restrict__ s, int K) {
  const int row = blockIdx.x;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)row * K);
  const int n8 = K / 8;
  uint4 v[VEC];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int idx = threadIdx.x + j * blockDim.x;
    if (idx < n8) {
      v[j] = __ldg(xr + idx);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[j]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(h[e]);
        amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
      }
    }
  }
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
  __shared__ float red[32];
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float a = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
    for (int o = 16; o; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, o));
    if (threadIdx.x == 0) red[0] = a;
  }
  __syncthreads();
  const float scale = fmaxf(red[0], 1e-12f) / 448.f, inv = 1.f / scale;
  if (threadIdx.x == 0) s[row] = scale;
  uint2* qr = reinterpret_cast<uint2*>(q + (size_t)row * K);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int idx = threadIdx.x + j * blockDim.x;
    if (idx < n8) {
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[j]);
      uint2 out; __nv_fp8x4_e4m3* o4 = reinterpret_cast<__nv_fp8x4_e4m3*>(&out);
      const float2 a0 = __bfloat1622float2(h[0]), a1 = __bfloat1622float2(h[1]);
      const float2 a2 = __bfloat1622float2(h[2]), a3 = __bfloat1622float2(h[3]);
      o4[0] = __nv_fp8x4_e4m3(make_float4(a0.x * inv, a0.y * inv, a1.x * inv, a1.y * inv));
      o4[1] = __nv_fp8x4_e4m3(make_float4(a2.x * inv, a2.y * inv, a3.x * inv, a3.y * inv));
      qr[idx] = out;
    }
  }
}

std::vector<torch::Tensor> quant_rowwise(torch::Tensor x, int64_t threads) {
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kFloat8_e4m3fn));
  auto s = torch::empty({M}, x.options().dtype(torch::kFloat));
  const int vec = (int)((K / 8 + threads - 1) / threads);
  TORCH_CHECK(K % 8 == 0 && vec <= 12, "the probe takes K % 8 == 0 and K <= 12 * 8 * threads");
  auto st = at::cuda::getCurrentCUDAStream();
  auto xp = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  auto qp = reinterpret_cast<__nv_fp8_e4m3*>(q.data_ptr());
  if (vec <= 4) rowwise_quant<4><<<M, threads, 0, st>>>(xp, qp, s.data_ptr<float>(), K);
  else if (vec <= 8) rowwise_quant<8><<<M, threads, 0, st>>>(xp, qp, s.data_ptr<float>(), K);
  else rowwise_quant<12><<<M, threads, 0, st>>>(xp, qp, s.data_ptr<float>(), K);
  return {q, s};
}

// A read pass over n uint4 (a max of bits, never stored), its blocks taking contiguous shares of
// the tensor from the front (block 0 first) or from the back: after another pass, the back of the
// tensor is what L2 still holds.
__global__ void read_pass(const uint4* __restrict__ x, int64_t n, float* out, bool reverse) {
  const int64_t per_block = (n + gridDim.x - 1) / gridDim.x;
  const int64_t blk = reverse ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int64_t lo = blk * per_block, hi = min(n, lo + per_block);
  float m = 0.f;
  if (!reverse) {
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      const uint4 v = __ldg(x + i);
      m = fmaxf(m, __uint_as_float(v.x & 0x7fff7fff));
    }
  } else {
    for (int64_t i = hi - 1 - threadIdx.x; i >= lo; i -= blockDim.x) {
      const uint4 v = __ldg(x + i);
      m = fmaxf(m, __uint_as_float(v.x & 0x7fff7fff));
    }
  }
  if (m == 12345.f) out[0] = m;
}
void l2_read(torch::Tensor x, bool reverse, int64_t blocks) {
  read_pass<<<blocks, 512, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(x.data_ptr()), x.numel() * x.element_size() / 16, nullptr,
      reverse);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan", &plan);
  m.def("run", &run);
  m.def("quant_rowwise", &quant_rowwise);
  m.def("l2_read", &l2_read);
}
