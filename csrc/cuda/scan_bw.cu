// The reverse state scan of the backward (scan_params.h). One thread per vec state entries of one
// pair g walks the chunks from last to first: memory-bound, per chunk one read of X and of the
// state and one write of X, coalesced along e. Each warp writes its own partial of
// <state k, G_{k+1}>, so the loop needs no block-wide synchronisation.
#include <c10/cuda/CUDAException.h>

#include "cuda/mma.cuh"
#include "cuda/scan_params.h"

namespace mlstm::cuda {
namespace {

// Loads for kAhead chunks are issued before the dependent updates: the chain through `prev` would
// otherwise leave one global load in flight per thread.
constexpr int kAhead = 8;

// VEC consecutive entries per thread (4: 16-byte loads and stores, a quarter of the memory
// instructions of one entry per thread; 1 where E or an address is not a multiple of 4 floats).
template <int VEC>
struct Vec {
  float v[VEC];
};
template <int VEC>
__device__ __forceinline__ Vec<VEC> load_vec(const float* p) {
  Vec<VEC> x;
  if constexpr (VEC == 4) {
    const float4 y = *reinterpret_cast<const float4*>(p);
    x.v[0] = y.x, x.v[1] = y.y, x.v[2] = y.z, x.v[3] = y.w;
  } else {
    x.v[0] = *p;
  }
  return x;
}
template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const Vec<VEC>& x) {
  if constexpr (VEC == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
  } else {
    *p = x.v[0];
  }
}

template <int VEC>
__global__ void __launch_bounds__(kScanThreads) reverse_state_scan_kernel(const ScanParams p) {
  const int64_t g = blockIdx.x / p.blocks_per_pair, block = blockIdx.x % p.blocks_per_pair;
  const int64_t e = (block * kScanThreads + threadIdx.x) * VEC;
  const bool live = e < p.E;  // E is a multiple of VEC
  const int64_t warp = block * kScanWarps + threadIdx.x / 32;
  float* X = p.X + g * p.NC * p.E + e;
  const float* st = p.states + g * p.states_stride_g + e;
  const float* decay = p.decay + g * p.NC;
  Vec<VEC> prev = {};
  if (live && p.last != nullptr) prev = load_vec<VEC>(p.last + g * p.E + e);
  for (int64_t k0 = p.NC - 1; k0 >= 0; k0 -= kAhead) {
    Vec<VEC> xs[kAhead] = {}, ss[kAhead] = {};
    float ds[kAhead];
#pragma unroll
    for (int j = 0; j < kAhead; ++j) {
      const int64_t k = k0 - j;
      if (live && k >= 0) xs[j] = load_vec<VEC>(X + k * p.E), ss[j] = load_vec<VEC>(st + k * p.E);
      ds[j] = k >= 0 ? decay[k] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kAhead; ++j) {
      const int64_t k = k0 - j;
      if (k < 0) break;  // the same k for every thread: no divergence
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot = fmaf(ss[j].v[i], prev.v[i], dot);
      if (live) store_vec<VEC>(X + k * p.E, prev);
#pragma unroll
      for (int i = 0; i < VEC; ++i) prev.v[i] = fmaf(ds[j], prev.v[i], xs[j].v[i]);
      dot = warp_sum(dot);
      if ((threadIdx.x & 31) == 0) p.dots[(g * p.NC + k) * p.warps_per_pair + warp] = dot;
    }
  }
  if (live) store_vec<VEC>(p.first + g * p.E + e, prev);
}

}  // namespace

void launch_reverse_state_scan(const ScanParams& p, cudaStream_t stream) {
  const int64_t blocks = p.G * p.blocks_per_pair;
  if (blocks == 0) return;
  if (p.vec == 4) {
    reverse_state_scan_kernel<4><<<static_cast<unsigned>(blocks), kScanThreads, 0, stream>>>(p);
  } else {
    reverse_state_scan_kernel<1><<<static_cast<unsigned>(blocks), kScanThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mlstm::cuda
