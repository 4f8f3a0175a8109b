// Pieces shared by the H-step kernels (hintra_kernel.cuh for sm_80+, hintra_sm90.cuh for sm_90a):
// tile staging, the gate/stabiliser prologue (SPEC.md steps 1-4) and the output epilogue (steps 6-7).
#pragma once

#include <cuda_runtime.h>

#include "cuda/hintra_traits.cuh"
#include "cuda/mma.cuh"

namespace mlstm::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMinimumMaxVal = -10.0f;  // SPEC.md step 3

// Stage a rows x cols tile (cols a multiple of 16 bytes) into shared memory, zero outside
// rows_valid x cols_valid. Aligned full 16-byte pieces go through cp.async; the rest element-wise.
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

// The tile of one block: blockIdx.x = ((bh * NC + chunk) * n_qt + qt) * n_dvt + dvt, so the
// blocks that share a chunk's Q, K and C run side by side and re-read them from L2.
struct TileIndex {
  int dvt, qt, chunk;
  int64_t bh, b, h;
};
__device__ __forceinline__ TileIndex tile_index(const HintraParams& p) {
  TileIndex t;
  int64_t blk = blockIdx.x;
  t.dvt = blk % p.n_dvt;
  blk /= p.n_dvt;
  t.qt = blk % p.n_qt;
  blk /= p.n_qt;
  t.chunk = blk % p.NC;
  t.bh = blk / p.NC;
  t.b = t.bh / p.NH;
  t.h = t.bh % p.NH;
  return t;
}

// Steps 1-4 for query rows row0..row0+kRows-1 of one chunk, into shared memory:
// sBG = bg (cumulative log forget gate), sColB = log2e * (i - bg), sPM = prefix max of (i - bg),
// and per query row sRowA = log2e * (bg - m), sG = qk_scale * exp(bg + m_prev - m), sM = m.
// The stabiliser needs no running max: D[t, s] - m[t] = (bg[t] - m[t]) + (i[s] - bg[s]), and
// m_intra[t] = max(-10, bg[t] + max_{s<=t}(i[s] - bg[s])) is a prefix max over the gates alone.
template <int kRows>
__device__ __forceinline__ void stage_gates(const HintraParams& p, int64_t b, int64_t h, int chunk,
                                            int row0, int row_end, float* sBG, float* sColB,
                                            float* sPM, float* sRowA, float* sG, float* sM) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t s0 = (int64_t)chunk * p.L;
  // ---- Steps 1-4: cumulative log forget gate, prefix max, combined max (float32). ----
  // All threads fetch the gates at once (one memory round trip), then warp 0 scans in shared.
  const float m_prev = p.m[b * p.m_sb + h * p.m_sh + chunk * p.m_ss];
  {
    const float* gi = p.igate + b * p.i_sb + h * p.i_sh + s0 * p.i_ss;
    const float* gf = p.fgate + b * p.f_sb + h * p.f_sh + s0 * p.f_ss;
    for (int s = threadIdx.x; s < row_end; s += blockDim.x) {
      const float f = gf[s * p.f_ss];
      sBG[s] = fminf(f, 0.f) - log1pf(expf(-fabsf(f)));  // logsigmoid, scanned below
      sColB[s] = gi[s * p.i_ss];
    }
  }
  __syncthreads();
  if (warp == 0) {
    float carry = 0.f, carry_max = -INFINITY;
    for (int base = 0; base < row_end; base += 32) {
      const int s = base + lane;
      const float lf = s < row_end ? sBG[s] : 0.f;
      const float iv = s < row_end ? sColB[s] : 0.f;
      float x = lf;  // inclusive warp scan
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const float y = __shfl_up_sync(0xffffffffu, x, off);
        if (lane >= off) x += y;
      }
      const float bg = x + carry;
      carry = __shfl_sync(0xffffffffu, bg, 31);
      const float bcol = s < row_end ? iv - bg : -INFINITY;
      float pm = bcol;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const float y = __shfl_up_sync(0xffffffffu, pm, off);
        if (lane >= off) pm = fmaxf(pm, y);
      }
      pm = fmaxf(pm, carry_max);
      carry_max = __shfl_sync(0xffffffffu, pm, 31);
      if (s < row_end) {
        sBG[s] = bg;
        sColB[s] = bcol * kLog2e;
        sPM[s] = pm;
      }
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
    const int t = row0 + r;
    float ra = 0.f, gg = 0.f, mm = 0.f;
    if (t < row_end) {
      const float bg = sBG[t];
      const float m_intra = fmaxf(kMinimumMaxVal, bg + sPM[t]);
      mm = fmaxf(bg + m_prev, m_intra);
      ra = (bg - mm) * kLog2e;
      gg = p.qk_scale * expf(bg + m_prev - mm);
    }
    sRowA[r] = ra;
    sG[r] = gg;
    sM[r] = mm;
  }
  __syncthreads();

}

// Steps 6-7 for this lane's two rows t0 = pos0 - (b*h*S offset), t0 + 8 of an m16 x (8 NT) tile:
// acc holds the numerator (mma accumulator layout), nsum the row sums (reduced over the quad).
template <typename T, int NT>
__device__ __forceinline__ void store_outputs(const HintraParams& p, const float* acc, float nsum0,
                                              float nsum1, float m0, float m1, int64_t pos0,
                                              bool ok0, bool ok1, int dv0, bool write_nm) {
  const int tq = threadIdx.x % 4;
  const float den0 = fmaxf(fabsf(nsum0), expf(-m0));
  const float den1 = fmaxf(fabsf(nsum1), expf(-m1));
  const float inv0 = 1.f / (den0 + p.eps), inv1 = 1.f / (den1 + p.eps);
  const int64_t pos1 = pos0 + 8;
  T* H = static_cast<T*>(p.H);
  const bool pairs = (p.DHHV % 2) == 0;  // a column pair is then in range as a whole, aligned
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = dv0 + nt * 8 + 2 * tq;
    const float* a = acc + 4 * nt;
    if (col >= p.DHHV) continue;
    if (pairs) {
      if constexpr (std::is_same_v<T, float>) {
        if (ok0) *reinterpret_cast<float2*>(H + pos0 * p.DHHV + col) = make_float2(a[0] * inv0, a[1] * inv0);
        if (ok1) *reinterpret_cast<float2*>(H + pos1 * p.DHHV + col) = make_float2(a[2] * inv1, a[3] * inv1);
      } else {
        if (ok0) *reinterpret_cast<uint32_t*>(H + pos0 * p.DHHV + col) = pack2<T>(a[0] * inv0, a[1] * inv0);
        if (ok1) *reinterpret_cast<uint32_t*>(H + pos1 * p.DHHV + col) = pack2<T>(a[2] * inv1, a[3] * inv1);
      }
    } else {
      const bool two = col + 1 < p.DHHV;
      if (ok0) {
        H[pos0 * p.DHHV + col] = from_float<T>(a[0] * inv0);
        if (two) H[pos0 * p.DHHV + col + 1] = from_float<T>(a[1] * inv0);
      }
      if (ok1) {
        H[pos1 * p.DHHV + col] = from_float<T>(a[2] * inv1);
        if (two) H[pos1 * p.DHHV + col + 1] = from_float<T>(a[3] * inv1);
      }
    }
  }
  if (write_nm && tq == 0) {
    if (ok0) p.vecN[pos0] = den0, p.vecM[pos0] = m0;
    if (ok1) p.vecN[pos1] = den1, p.vecM[pos1] = m1;
  }
}

}  // namespace mlstm::cuda
