// Copies of tiles from global to shared memory, shared by the H-step and states kernels. Both
// zero everything outside rows_valid x cols_valid (padded rows must be 0, not what an earlier
// step left there: 0 * NaN would poison a product) and send aligned 16-byte pieces through
// cp.async (the caller commits), partial ones element by element.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mma.cuh"

namespace mlstm::cuda {

// A kRows x kCols tile of a row-major global matrix (unit column stride), sizes and block size
// known at compile time, unrolled: the sm_80 H step's 16-bit C stages, the states kernel's K and V
// steps. Thread t copies column piece t % P of rows t / P, t / P + kThreads / P, ...: a row's
// pieces belong to consecutive threads of one warp (split_c_stage in hintra_sm80.cuh relies on it).
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void stage_tile(T* s, int s_stride, const T* g, int64_t g_stride,
                                           int rows_valid, int cols_valid, bool vec) {
  constexpr int E = 16 / sizeof(T);
  constexpr int P = kCols / E;              // pieces per row
  constexpr int kRowStep = kThreads / P;    // rows per pass of the block
  static_assert(kCols % E == 0 && kThreads % P == 0 && kRows % kRowStep == 0, "whole passes");
  // Each thread keeps one column piece and walks down the rows (one pointer, not one per pass).
  const int c = (threadIdx.x % P) * E;
  int r = threadIdx.x / P;
  T* dst = s + r * s_stride + c;
  const T* src = g + r * g_stride + c;
  const int64_t src_step = kRowStep * g_stride;
#pragma unroll
  for (int it = 0; it < kRows / kRowStep; ++it, r += kRowStep, dst += kRowStep * s_stride, src += src_step) {
    if (r >= rows_valid || c >= cols_valid) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else if (vec && c + E <= cols_valid) {
      cp_async_16(dst, src, 16);
    } else {  // tails and unaligned rows only: kept rolled, so no per-element state lives on
#pragma unroll 1
      for (int e = 0; e < E; ++e) dst[e] = (c + e < cols_valid) ? src[e] : from_float<T>(0.f);
    }
  }
}

// The same as a rolled loop, sizes known at run time, any block size: the sm_80 H step's Q tile
// (DHQK columns), its K and V blocks and float32 C stages (unrolled, these measured slower at some
// shapes: benchmarks/NOTES.md, fourth session).
template <typename T>
__device__ __forceinline__ void load_tile(T* s, int s_stride, const T* g, int64_t g_stride,
                                          int rows, int cols, int rows_valid, int cols_valid,
                                          bool vec) {
  constexpr int E = 16 / sizeof(T);
  const int pieces = cols / E;
  for (int idx = threadIdx.x; idx < rows * pieces; idx += blockDim.x) {
    const int r = idx / pieces, c = (idx % pieces) * E;
    T* dst = s + r * s_stride + c;
    const T* src = g + r * g_stride + c;
    if (r >= rows_valid || c >= cols_valid) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else if (vec && c + E <= cols_valid) {
      cp_async_16(dst, src, 16);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) dst[e] = (c + e < cols_valid) ? src[e] : from_float<T>(0.f);
    }
  }
}

}  // namespace mlstm::cuda
