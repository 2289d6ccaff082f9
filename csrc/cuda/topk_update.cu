// The proxy update on the device, for one layer (topk_update_) or many at once
// (topk_update_many_), in four launches whatever the layer count and with no host
// synchronisation:
//   1. scores: every row of every B, c_t = |B_t0| + ... + |B_t,r-1| (fp32, left to right, as
//      ref::topk_row_scores), and whether the row is finite;
//   2. select: one block per layer, a radix select of the k-th largest score key and an ordered
//      pass that keeps the rows above it and the first rows equal to it (ties to the lower row
//      index, NaN first: ref::topk_rows's order); also the layer's "B is finite" flag;
//   3. update: every (layer, tile of up to 8 selected rows) x column block, the FP8 rows (and
//      weight_t's columns) rewritten;
//   4. zero: B reset per layer (all rows, or the applied ones with keep_residual; all of every B
//      where discard_nonfinite found a non-finite B).
// The layers' pointers and shapes reach the kernels through one device table, built on the first
// call with a given set of layers (an asynchronous copy from pinned memory) and reused while the
// same layers, k's and scalings come back; a single layer passes its descriptor as a kernel
// argument instead.
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.cuh"

namespace falqon {
namespace cuda {

namespace {

constexpr int kScoreThreads = 256;
constexpr int kSelectThreads = 1024;
constexpr int kUpdateThreads = 256;
constexpr int kRowsPerTile = 8;  // selected rows of one layer that share one read of A
constexpr int kZeroThreads = 256;
constexpr int kMaxGridY = 65535;

enum BType : int32_t { kBFloat = 0, kBHalf = 1, kBBf16 = 2, kBDouble = 3 };

// One layer, as the kernels see it. No implicit padding: the host compares tables bytewise.
struct LayerDesc {
  uint8_t* weight;    // (N + r16) x K, E4M3
  void* lora_B;       // N x r
  uint8_t* weight_t;  // K x N, or null
  int64_t N, K, r;
  int64_t k;           // clamped to N
  int64_t row_offset;  // first row of this layer in the scores and flags
  int64_t sel_offset;  // first entry of this layer in the selected rows
  float scaling;
  int32_t b_type;
  int32_t keep_residual;
  int32_t unused;
};
static_assert(sizeof(LayerDesc) == 88, "LayerDesc must have no padding");

struct Group {
  const LayerDesc* table;     // `layers` descriptors on the device, or null: `one` is the layer
  const int32_t* tile_layer;  // per update tile: its layer (table only)
  const int32_t* tile_first;  // per update tile: its first entry in the layer's selected rows
  LayerDesc one;
  int32_t layers;
  int32_t tiles;
  int32_t discard_nonfinite;
  int32_t unused;
  float* scores;       // per row of every layer
  uint8_t* row_ok;     // per row: all of its values finite
  int32_t* selected;   // per layer, its k selected rows (in row order)
  bool* finite;        // per layer: all of B finite
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ LayerDesc layer_desc(const Group& g, int64_t l) {
  return g.table != nullptr ? g.table[l] : g.one;
}

// Whether every layer's B is finite; every thread of the block must call it.
__device__ __forceinline__ bool all_finite(const Group& g) {
  bool ok = true;
  for (int i = threadIdx.x; i < g.layers; i += blockDim.x) ok = ok && g.finite[i];
  return __syncthreads_and(ok) != 0;
}

// The order of ref::topk_rows as unsigned keys: NaN above everything, otherwise the (non-negative)
// score's bits, -0 as +0.
__device__ __forceinline__ uint32_t score_key(float s) {
  return isnan(s) ? 0xffffffffu : (__float_as_uint(s) & 0x7fffffffu);
}

template <typename T>
__device__ __forceinline__ bool value_finite(T v) {
  return isfinite(static_cast<float>(v));
}
template <>
__device__ __forceinline__ bool value_finite<double>(double v) {
  return isfinite(v);
}

// ---- 1. scores --------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void score_row(const T* __restrict__ b, int64_t r, float& acc, bool& ok) {
  constexpr int V = 16 / sizeof(T);
  if (r % V == 0 && aligned16(b)) {
    const auto* p = reinterpret_cast<const Pack<T, V>*>(b);
    for (int64_t v = 0; v < r / V; ++v) {
      const Pack<T, V> pk = p[v];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        ok = ok && value_finite(pk.v[i]);
        acc = __fadd_rn(acc, fabsf(static_cast<float>(pk.v[i])));
      }
    }
  } else {
    for (int64_t j = 0; j < r; ++j) {
      ok = ok && value_finite(b[j]);
      acc = __fadd_rn(acc, fabsf(static_cast<float>(b[j])));
    }
  }
}

__global__ void __launch_bounds__(kScoreThreads) topk_score_kernel(Group g) {
  const LayerDesc d = layer_desc(g, blockIdx.y);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= d.N) return;
  float acc = 0.f;
  bool ok = true;
  switch (d.b_type) {
    case kBFloat: score_row(static_cast<const float*>(d.lora_B) + t * d.r, d.r, acc, ok); break;
    case kBHalf: score_row(static_cast<const at::Half*>(d.lora_B) + t * d.r, d.r, acc, ok); break;
    case kBBf16: score_row(static_cast<const at::BFloat16*>(d.lora_B) + t * d.r, d.r, acc, ok); break;
    default: score_row(static_cast<const double*>(d.lora_B) + t * d.r, d.r, acc, ok); break;
  }
  g.scores[d.row_offset + t] = acc;
  g.row_ok[d.row_offset + t] = ok ? 1 : 0;
}

// ---- 2. select --------------------------------------------------------------------------------

// Inclusive prefix sum of v over the block in thread order; `total` gets the block's sum. Every
// thread must call it; blockDim.x a multiple of 32.
__device__ __forceinline__ uint32_t block_inclusive_scan(uint32_t v, uint32_t& total) {
  __shared__ uint32_t warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();  // a previous call's readers are done with warp_sums
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  uint32_t w = lane < warps ? warp_sums[lane] : 0u;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t n = __shfl_up_sync(0xffffffffu, w, o);
    if (lane >= o) w += n;
  }
  const uint32_t before = warp > 0 ? __shfl_sync(0xffffffffu, w, warp - 1) : 0u;
  total = __shfl_sync(0xffffffffu, w, warps - 1);
  return v + before;
}

__global__ void __launch_bounds__(kSelectThreads) topk_select_kernel(Group g) {
  const int64_t l = blockIdx.x;
  const LayerDesc d = layer_desc(g, l);
  const float* __restrict__ s = g.scores + d.row_offset;
  const uint8_t* __restrict__ row_ok = g.row_ok + d.row_offset;
  int32_t* __restrict__ out = g.selected + d.sel_offset;
  const int64_t N = d.N, k = d.k;

  bool ok = true;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) ok = ok && row_ok[i];
  ok = __syncthreads_and(ok) != 0;
  if (threadIdx.x == 0) g.finite[l] = ok;
  if (k == 0) return;
  if (k == N) {
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) out[i] = static_cast<int32_t>(i);
    return;
  }

  // The k-th largest key T, one byte at a time from the top; `remaining` ends as the number of
  // rows equal to T that the selection takes (those above T make up the rest).
  __shared__ uint32_t hist[256];
  __shared__ uint32_t chosen_digit, chosen_remaining;
  uint32_t prefix = 0, mask = 0, remaining = static_cast<uint32_t>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const uint32_t key = score_key(s[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    // Digits from 255 down: the one where the count of keys at or above it first reaches
    // `remaining` (exactly one thread sees that).
    const uint32_t digit = 255u - threadIdx.x;
    const uint32_t count = threadIdx.x < 256 ? hist[digit] : 0u;
    uint32_t total;
    const uint32_t at_or_above = block_inclusive_scan(count, total);
    if (threadIdx.x < 256 && at_or_above >= remaining && at_or_above - count < remaining) {
      chosen_digit = digit;
      chosen_remaining = remaining - (at_or_above - count);
    }
    __syncthreads();
    prefix |= chosen_digit << shift;
    mask |= 255u << shift;
    remaining = chosen_remaining;
    __syncthreads();  // everyone has read chosen_*, and hist may be cleared
  }

  // Rows in order: every key above T, and keys equal to T while fewer than `remaining` came
  // before. Written in row order, so the selection is deterministic.
  const uint32_t T = prefix;
  uint32_t equal_before = 0, written = 0;
  for (int64_t base = 0; base < N && written < k; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const uint32_t key = i < N ? score_key(s[i]) : 0u;
    const bool above = i < N && key > T, equal = i < N && key == T;
    uint32_t equal_total, picked_total;
    const uint32_t equal_rank = equal_before + block_inclusive_scan(equal, equal_total) - equal;
    const bool picked = above || (equal && equal_rank < remaining);
    const uint32_t position = written + block_inclusive_scan(picked, picked_total) - picked;
    if (picked) out[position] = static_cast<int32_t>(i);
    equal_before += equal_total;
    written += picked_total;
  }
}

// ---- 3. update --------------------------------------------------------------------------------

// For each of the tile's rows t and column c:
//   v = float(W'[t, c]) + (sum_j B[t, j] * float(A_q[j, c])) * scaling
// in fp32: the sum as a chain of fmaf over j = 0..r-1 from 0, the product and the add rounded
// separately (the reference's rows + mm(B_rows, A_q) * scaling, up to the mm's own sum order);
// a NaN v keeps the old value; then a saturating round-to-nearest-even cast. One thread per
// column; each A_q value read once for all the tile's rows; B's values are broadcasts.
template <typename BT>
__device__ __forceinline__ void update_tile(const LayerDesc& d, const int32_t* __restrict__ sel,
                                            int rows) {
  const BT* __restrict__ B = static_cast<const BT*>(d.lora_B);
  const uint8_t* __restrict__ A = d.weight + d.N * d.K;  // the adapter's rows, never written here
  const int64_t K = d.K, N = d.N, r = d.r;
  int64_t t[kRowsPerTile];
#pragma unroll
  for (int i = 0; i < kRowsPerTile; ++i) t[i] = i < rows ? sel[i] : 0;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < K;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc[kRowsPerTile];
#pragma unroll
    for (int i = 0; i < kRowsPerTile; ++i) acc[i] = 0.f;
    for (int64_t j = 0; j < r; ++j) {
      const float a = fp8_to_float(A[j * K + c], __NV_E4M3);
#pragma unroll
      for (int i = 0; i < kRowsPerTile; ++i) {
        if (i < rows) acc[i] = fmaf(static_cast<float>(B[t[i] * r + j]), a, acc[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerTile; ++i) {
      if (i >= rows) break;
      const float old = fp8_to_float(d.weight[t[i] * K + c], __NV_E4M3);
      const float v = __fadd_rn(old, __fmul_rn(acc[i], d.scaling));
      const uint8_t q = float_to_fp8<true>(isnan(v) ? old : v);
      d.weight[t[i] * K + c] = q;
      if (d.weight_t != nullptr) d.weight_t[c * N + t[i]] = q;
    }
  }
}

__global__ void __launch_bounds__(kUpdateThreads) topk_update_kernel(Group g) {
  if (g.discard_nonfinite && !all_finite(g)) return;
  for (int64_t tile = blockIdx.y; tile < g.tiles; tile += gridDim.y) {
    const int64_t l = g.table != nullptr ? g.tile_layer[tile] : 0;
    const int64_t first = g.table != nullptr ? g.tile_first[tile] : tile * kRowsPerTile;
    const LayerDesc d = layer_desc(g, l);
    if (static_cast<int64_t>(blockIdx.x) * blockDim.x >= d.K) continue;
    const int rows = static_cast<int>(std::min<int64_t>(kRowsPerTile, d.k - first));
    const int32_t* sel = g.selected + d.sel_offset + first;
    switch (d.b_type) {
      case kBFloat: update_tile<float>(d, sel, rows); break;
      case kBHalf: update_tile<at::Half>(d, sel, rows); break;
      case kBBf16: update_tile<at::BFloat16>(d, sel, rows); break;
      default: update_tile<double>(d, sel, rows); break;
    }
  }
}

// ---- 4. zero ----------------------------------------------------------------------------------

// Zeroes bytes [0, n) of p, the work split over `workers` with this one `worker`.
__device__ __forceinline__ void zero_bytes(char* p, int64_t n, int64_t worker, int64_t workers) {
  if (aligned16(p) && n % 16 == 0) {
    auto* v = reinterpret_cast<uint4*>(p);
    for (int64_t i = worker; i < n / 16; i += workers) v[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t i = worker; i < n; i += workers) p[i] = 0;
  }
}

__global__ void __launch_bounds__(kZeroThreads) topk_zero_kernel(Group g) {
  const bool ok = !g.discard_nonfinite || all_finite(g);
  for (int64_t l = blockIdx.y; l < g.layers; l += gridDim.y) {
    const LayerDesc d = layer_desc(g, l);
    const int64_t row_bytes = d.r * (d.b_type == kBFloat ? 4 : d.b_type == kBDouble ? 8 : 2);
    char* B = static_cast<char*>(d.lora_B);
    if (!d.keep_residual || !ok) {
      zero_bytes(B, d.N * row_bytes, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                 static_cast<int64_t>(gridDim.x) * blockDim.x);
    } else {
      const int32_t* sel = g.selected + d.sel_offset;
      for (int64_t s = blockIdx.x; s < d.k; s += gridDim.x) {
        zero_bytes(B + sel[s] * row_bytes, row_bytes, threadIdx.x, blockDim.x);
      }
    }
  }
}

// ---- host side --------------------------------------------------------------------------------

int32_t b_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kBFloat;
    case at::kHalf: return kBHalf;
    case at::kBFloat16: return kBBf16;
    case at::kDouble: return kBDouble;
    default:
      FALQON_CHECK(false, "falqon.topk_update_: lora_B of dtype ", t, " is not supported on CUDA "
                  "(float32, float16, bfloat16 or float64)");
  }
}

LayerDesc make_desc(const at::Tensor& weight, const at::Tensor& lora_B,
                    const std::optional<at::Tensor>& weight_t, int64_t k, double scaling,
                    bool keep_residual, int64_t& rows, int64_t& selected) {
  LayerDesc d;
  std::memset(&d, 0, sizeof(d));
  d.weight = static_cast<uint8_t*>(weight.data_ptr());
  d.lora_B = lora_B.data_ptr();
  d.weight_t = weight_t.has_value() ? static_cast<uint8_t*>(weight_t->data_ptr()) : nullptr;
  d.N = lora_B.size(0);
  d.r = lora_B.size(1);
  d.K = weight.size(1);
  d.k = std::min(k, d.N);
  d.row_offset = rows;
  d.sel_offset = selected;
  d.scaling = static_cast<float>(scaling);
  d.b_type = b_type_of(lora_B.scalar_type());
  d.keep_residual = keep_residual ? 1 : 0;
  rows += d.N;
  selected += d.k;
  return d;
}

// The device copy of a table (descriptors, then the tiles' layers and first entries), reused
// while the same bytes come back on the same device and stream.
struct CachedTable {
  std::vector<uint8_t> bytes;
  cudaStream_t stream = nullptr;
  at::Tensor device;
};

at::Tensor device_table(const std::vector<uint8_t>& bytes, const at::Device& device,
                        cudaStream_t stream) {
  static std::mutex mutex;
  static std::unordered_map<int, CachedTable> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  CachedTable& entry = cache[device.index()];
  if (entry.device.defined() && entry.stream == stream && entry.bytes == bytes) return entry.device;
  at::Tensor host = at::empty({static_cast<int64_t>(bytes.size())},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  at::Tensor dev = at::empty({static_cast<int64_t>(bytes.size())},
                             at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);  // the pinned block is kept until the copy is done
  entry.bytes = bytes;
  entry.stream = stream;
  entry.device = dev;
  return dev;
}

// Runs the four kernels over `descs` (offsets already set); writes the per-layer finite flags.
void run_group(const std::vector<LayerDesc>& descs, int64_t total_rows, int64_t total_selected,
               bool discard_nonfinite, const at::Tensor& finite, const at::Device& device) {
  const int64_t L = static_cast<int64_t>(descs.size());
  FALQON_CHECK(L <= kMaxGridY, "falqon.topk_update_many_: at most ", kMaxGridY,
              " layers per call, got ", L);
  const auto stream = at::cuda::getCurrentCUDAStream();
  Group g;
  std::memset(&g, 0, sizeof(g));
  g.layers = static_cast<int32_t>(L);
  g.discard_nonfinite = discard_nonfinite ? 1 : 0;
  int64_t max_N = 1, max_K = 1, max_bytes = 1;
  std::vector<int32_t> tile_layer, tile_first;
  for (int64_t l = 0; l < L; ++l) {
    const LayerDesc& d = descs[l];
    max_N = std::max(max_N, d.N);
    max_K = std::max(max_K, d.K);
    max_bytes = std::max(max_bytes, d.N * d.r * 8);
    for (int64_t f = 0; f < d.k; f += kRowsPerTile) {
      tile_layer.push_back(static_cast<int32_t>(l));
      tile_first.push_back(static_cast<int32_t>(f));
    }
  }
  const int64_t tiles = static_cast<int64_t>(tile_layer.size());
  FALQON_CHECK(tiles < (int64_t{1} << 31), "falqon.topk_update_many_: too many selected rows");
  g.tiles = static_cast<int32_t>(tiles);
  at::Tensor table;  // kept alive until the launches are queued
  if (L == 1) {
    g.one = descs[0];
  } else {
    std::vector<uint8_t> bytes(L * sizeof(LayerDesc) + 2 * tiles * sizeof(int32_t));
    std::memcpy(bytes.data(), descs.data(), L * sizeof(LayerDesc));
    std::memcpy(bytes.data() + L * sizeof(LayerDesc), tile_layer.data(), tiles * sizeof(int32_t));
    std::memcpy(bytes.data() + L * sizeof(LayerDesc) + tiles * sizeof(int32_t), tile_first.data(),
                tiles * sizeof(int32_t));
    table = device_table(bytes, device, stream);
    auto* base = table.data_ptr<uint8_t>();
    g.table = reinterpret_cast<const LayerDesc*>(base);
    g.tile_layer = reinterpret_cast<const int32_t*>(base + L * sizeof(LayerDesc));
    g.tile_first = g.tile_layer + tiles;
  }
  // Workspace: scores (fp32), selected rows (int32), row flags (bytes).
  at::Tensor work = at::empty({8 * total_rows + 4 * total_selected + 16},
                              at::TensorOptions().dtype(at::kByte).device(device));
  auto* w = work.data_ptr<uint8_t>();
  g.scores = reinterpret_cast<float*>(w);
  g.selected = reinterpret_cast<int32_t*>(w + 4 * total_rows);
  g.row_ok = w + 4 * total_rows + 4 * total_selected;
  g.finite = finite.data_ptr<bool>();

  const dim3 score_grid(static_cast<unsigned>((max_N + kScoreThreads - 1) / kScoreThreads),
                        static_cast<unsigned>(L));
  topk_score_kernel<<<score_grid, kScoreThreads, 0, stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  topk_select_kernel<<<static_cast<unsigned>(L), kSelectThreads, 0, stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (tiles > 0) {
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((max_K + kUpdateThreads - 1) / kUpdateThreads, 65535)),
                    static_cast<unsigned>(std::min<int64_t>(tiles, kMaxGridY)));
    topk_update_kernel<<<grid, kUpdateThreads, 0, stream>>>(g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Enough blocks per layer that the largest B is zeroed 4 KiB per block and round.
  const int64_t per_round = kZeroThreads * 16;
  const dim3 zero_grid(static_cast<unsigned>(std::clamp<int64_t>((max_bytes + per_round - 1) / per_round, 1, 64)),
                       static_cast<unsigned>(L));
  topk_zero_kernel<<<zero_grid, kZeroThreads, 0, stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void topk_update_fp8(at::Tensor& weight, at::Tensor& lora_B, const std::optional<at::Tensor>& weight_t,
                     int64_t k, double scaling, bool keep_residual) {
  int64_t rows = 0, selected = 0;
  const std::vector<LayerDesc> descs{
      make_desc(weight, lora_B, weight_t, k, scaling, keep_residual, rows, selected)};
  const at::Tensor finite = at::empty({1}, weight.options().dtype(at::kBool));
  run_group(descs, rows, selected, /*discard_nonfinite=*/false, finite, weight.device());
}

at::Tensor topk_update_many_fp8(at::TensorList weights, at::TensorList lora_Bs,
                                const std::vector<std::optional<at::Tensor>>& weight_ts,
                                at::IntArrayRef ks, at::ArrayRef<double> scalings,
                                const c10::List<bool>& keep_residuals, bool discard_nonfinite) {
  const int64_t L = static_cast<int64_t>(weights.size());
  int64_t rows = 0, selected = 0;
  std::vector<LayerDesc> descs;
  descs.reserve(L);
  for (int64_t i = 0; i < L; ++i) {
    descs.push_back(make_desc(weights[i], lora_Bs[i], weight_ts[i], ks[i], scalings[i],
                              keep_residuals.get(i), rows, selected));
  }
  at::Tensor finite = at::empty({L}, weights[0].options().dtype(at::kBool));
  run_group(descs, rows, selected, discard_nonfinite, finite, weights[0].device());
  return finite;
}

}  // namespace cuda
}  // namespace falqon
