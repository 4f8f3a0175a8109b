// Stages shared by both H-step main loops (hintra_sm80.cuh, hintra_sm90.cuh), written once:
//   the tile index, the gate/stabiliser prologue (SPEC.md steps 1-4), the masked
//   exponentials and row sums (step 5), the quad reduction, the row normaliser (steps 6-7) and
//   the exact recomputation of tiles whose outputs came out non-finite.
//
// The stabiliser needs no running max: m_intra[t] = max(-10, bg[t] + max_{s<=t}(i[s] - bg[s])) is a
// prefix max over the gates alone, so m is known before any product and one float accumulator per
// output collects g q C + sum_s w v with no rescaling.
//
// Frame shift: every weight is computed relative to F[t] = m[t] - delta[t], delta = min(64, m - m_intra)
// (SPEC's numerator and denominator both scaled by e^delta, so H is the same function). The intra
// weights then peak near 1 even when the incoming state dominates m, so they neither underflow
// (eps = 0 with m ~ 95: e^-95 is below float32's normal range) nor lose 16-bit precision in P.
#pragma once

#include <cuda_runtime.h>

#include "cuda/hintra_params.h"
#include "cuda/hintra_tiles.h"
#include "cuda/gates.cuh"
#include "cuda/mma.cuh"
#include "cuda/tile_copy.cuh"

namespace mlstm::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLog2eD = 1.4426950408889634;
constexpr float kMinimumMaxVal = -10.0f;  // SPEC.md step 3
constexpr float kMaxShift = 64.f;         // largest frame shift delta
// Chunks whose |bg| or |i| passes this take the exact exponent: the fast one forms D - F as
// (bg[t] - F[t]) + (i[s] - bg[s]), where i is lost beside a huge bg (f = -1e30, say).
constexpr float kWideGate = 128.f;

// The tile of one block: blockIdx.x = ((bh * NC + chunk) * n_qt + qt) * n_dvt + dvt, so the
// blocks that share a chunk's Q, K and C run side by side and re-read them from L2.
struct Tile {
  int dvt, qt, chunk;
  int64_t bh, b, h;
  int row0, rows_valid, row_end;  // query rows row0..row_end-1 of the chunk; keys 0..row_end-1
  int dv0, dv_valid;              // DHHV columns dv0.. of the block (dv_valid may pass the tile)
  int64_t s0;                     // first sequence position of the chunk
};
__device__ __forceinline__ Tile tile_of_block(const HintraParams& p, int rows, int bdv) {
  Tile t;
  int64_t blk = blockIdx.x;
  t.dvt = blk % p.n_dvt;
  blk /= p.n_dvt;
  t.qt = blk % p.n_qt;
  blk /= p.n_qt;
  t.chunk = blk % p.NC;
  t.bh = blk / p.NC;
  t.b = t.bh / p.NH;
  t.h = t.bh % p.NH;
  t.row0 = t.qt * rows;
  t.rows_valid = min(rows, p.L - t.row0);
  t.row_end = t.row0 + t.rows_valid;
  t.dv0 = t.dvt * bdv;
  t.dv_valid = p.DHHV - t.dv0;
  t.s0 = (int64_t)t.chunk * p.L;
  return t;
}

// The gate scratch in shared memory (kGateArrays per key, kRowArrays per query row).
struct GateScratch {
  float* bg;       // [key] bg (cumulative log forget gate), rounded to float
  float* bg_lo;    // [key] bg - float(bg) of the float64 sum (a span keeps gates beside huge ones)
  float* col_a;    // [key] fast: log2e (i - bg), rounded to float; wide: i (in stage_gates: the prefix max)
  float* col_b;    // [key] fast: the remainder of col_a (in stage_gates: i)
  float* row_a;    // [row] fast: log2e ((bg - m) + delta); wide: log2e (delta - m)
  float* row_g;    // [row] qk_scale exp((bg + m_prev - m) + delta)
  float* row_m;    // [row] m
  float* row_d;    // [row] delta
  float* row_inv;  // [row] 1 / (den' + eps e^delta), from the epilogue (for the fix-up)
};
__device__ __forceinline__ GateScratch gate_scratch(unsigned char* smem, int gate_off, int row_off,
                                                    int gate_len, int rows) {
  GateScratch g;
  g.bg = reinterpret_cast<float*>(smem + gate_off);
  g.bg_lo = g.bg + gate_len;
  g.col_a = g.bg_lo + gate_len;
  g.col_b = g.col_a + gate_len;
  g.row_a = reinterpret_cast<float*>(smem + row_off);
  g.row_g = g.row_a + rows;
  g.row_m = g.row_g + rows;
  g.row_d = g.row_m + rows;
  g.row_inv = g.row_d + rows;
  return g;
}


// Steps 1-2 by one warp for a chunk's positions 0..row_end-1: bg, the float64 prefix sum of
// log_forget(f), as float + remainder, and the prefix max of i - bg into col_a (until the rows have
// read it); lf_at(s) and i_at(s) give log_forget(f[s]) and i[s]; kStoreI also writes i into col_b
// (the H kernels staged it there already). Returns the lane's max |bg| (and |i| with kStoreI).
// The prefix sum is in float64: the fast exponents subtract it from i at |bg| ~ 100 (chunk_size
// 128, f near 0), where a float32 sum's rounding would reach 1e-5 per weight and the normaliser,
// when it cancels, passes that on to H (benchmarks/NOTES.md); a span after a -1e6 gate keeps the
// ordinary gates.
template <bool kStoreI, class LF, class IV>
__device__ __forceinline__ float scan_gates_warp(const GateScratch& gs, int row_end, LF lf_at, IV i_at) {
  const int lane = threadIdx.x % 32;
  float big = 0.f;
  double carry = 0.0;
  float carry_max = -INFINITY;
  for (int base = 0; base < row_end; base += 32) {
    const int s = base + lane;
    const float lf = s < row_end ? lf_at(s) : 0.f;
    const float iv = s < row_end ? i_at(s) : 0.f;
    const double exact = warp_inclusive_sum(static_cast<double>(lf)) + carry;
    carry = __shfl_sync(0xffffffffu, exact, 31);
    const SplitSum split = split_sum(exact);
    const float bg = split.hi;
    float pm = s < row_end ? iv - bg : -INFINITY;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const float y = __shfl_up_sync(0xffffffffu, pm, off);
      if (lane >= off) pm = nan_max(pm, y);
    }
    pm = nan_max(pm, carry_max);
    carry_max = __shfl_sync(0xffffffffu, pm, 31);
    if (s < row_end) {
      gs.bg[s] = bg;
      gs.bg_lo[s] = split.lo;
      gs.col_a[s] = pm;
      if constexpr (kStoreI) {
        gs.col_b[s] = iv;
        big = fmaxf(big, fabsf(iv));
      }
      big = fmaxf(big, fabsf(bg));
    }
  }
  return big;
}

// Step 3's intra-chunk max of row t, from the scan's arrays (col_a still the prefix max).
__device__ __forceinline__ float m_intra_of(const GateScratch& gs, int t, bool wide) {
  if (wide) {  // max_{s<=t} D[t, s], each D formed directly
    float m_intra = -INFINITY;
    for (int s = 0; s <= t; ++s) m_intra = nan_max(m_intra, span(gs, t, s) + gs.col_b[s]);
    return nan_max(kMinimumMaxVal, m_intra);
  }
  return nan_max(kMinimumMaxVal, gs.bg[t] + gs.col_a[t]);
}

// Steps 3-4 of one row from its bg, m_intra and the state's m_prev: the row's exponent base a, the
// inter-chunk weight g, its stabiliser m and frame shift delta.
struct RowExp {
  float a, g, m, d;
};
__device__ __forceinline__ RowExp row_exponents(float bg, float m_intra, float m_prev, bool wide, float qk_scale) {
  RowExp r;
  r.m = nan_max(bg + m_prev, m_intra);
  r.d = fminf(kMaxShift, r.m - m_intra);
  if (wide) {
    r.a = (r.d - r.m) * kLog2e;
    r.g = qk_scale * expf((bg + m_prev - r.m) + r.d);
  } else {
    // The intra exponents are a + log2e (i - bg), each column term as float + remainder, so a's
    // rounding scales num and nsum alike. Where the inter term can be of their size (|m_prev|
    // within a few gate bounds), its exponent a + log2e m_prev shares a too; beyond, it dominates
    // or vanishes and is formed directly (exact where it dominates).
    r.a = ((bg - r.m) + r.d) * kLog2e;
    if (fabsf(m_prev) <= 4.f * kWideGate) {
      const SplitSum mp = split_sum(static_cast<double>(m_prev) * kLog2eD);
      r.g = qk_scale * exp2f((r.a + mp.hi) + mp.lo);
    } else {
      r.g = qk_scale * expf((bg + m_prev - r.m) + r.d);
    }
  }
  return r;
}

// Step 4's column terms of key s, once the rows have read the prefix max: wide, i itself in col_a;
// fast, log2e (i - bg) as float (col_a) + remainder (col_b).
__device__ __forceinline__ void column_exponents(const GateScratch& gs, int s, bool wide) {
  const float iv = gs.col_b[s];
  if (wide) {
    gs.col_a[s] = iv;
  } else {
    const SplitSum c = split_sum((static_cast<double>(iv) - (static_cast<double>(gs.bg[s]) + gs.bg_lo[s])) * kLog2eD);
    gs.col_a[s] = c.hi;
    gs.col_b[s] = c.lo;
  }
}

// Steps 1-4 for query rows row0..row0+kRows-1 of one chunk, into the gate scratch. Returns
// whether the chunk's gates are wide (block-uniform): then the exponents are formed exactly.
// m_prev is the state's stabiliser before the chunk, gf / gi the chunk's gates with strides f_ss /
// i_ss.
template <int kRows>
__device__ __forceinline__ bool stage_gates(const HintraParams& p, const Tile& tile,
                                            const GateScratch& gs, float m_prev, const float* gf,
                                            int64_t f_ss, const float* gi, int64_t i_ss) {
  const int warp = threadIdx.x / 32;
  const int row_end = tile.row_end;
  // All threads fetch the gates at once (one memory round trip), then warp 0 scans in shared.
  float big = 0.f;  // max |i| and |bg| seen by this thread
  for (int s = threadIdx.x; s < row_end; s += blockDim.x) {
    gs.bg[s] = log_forget(gf[s * f_ss]);  // scanned below
    const float iv = gi[s * i_ss];
    gs.col_b[s] = iv;
    big = fmaxf(big, fabsf(iv));
  }
  __syncthreads();
  if (warp == 0) {
    big = fmaxf(big, scan_gates_warp<false>(gs, row_end, [&](int s) { return gs.bg[s]; },
                                            [&](int s) { return gs.col_b[s]; }));
  }
  // Wide chunks form every exponent from its span (rare, off the common path).
  const bool wide = __syncthreads_or(big > kWideGate);
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
    const int t = tile.row0 + r;
    RowExp e{0.f, 0.f, 0.f, 0.f};
    if (t < row_end) e = row_exponents(gs.bg[t], m_intra_of(gs, t, wide), m_prev, wide, p.qk_scale);
    gs.row_a[r] = e.a;
    gs.row_g[r] = e.g;
    gs.row_m[r] = e.m;
    gs.row_d[r] = e.d;
  }
  __syncthreads();  // the rows have read the prefix max
  for (int s = threadIdx.x; s < row_end; s += blockDim.x) column_exponents(gs, s, wide);
  __syncthreads();
  return wide;
}
template <int kRows>
__device__ __forceinline__ bool stage_gates(const HintraParams& p, const Tile& tile,
                                            const GateScratch& gs) {
  return stage_gates<kRows>(p, tile, gs, p.m[tile.b * p.m_sb + tile.h * p.m_sh + tile.chunk * p.m_ss],
                            p.fgate + tile.b * p.f_sb + tile.h * p.f_sh + tile.s0 * p.f_ss, p.f_ss,
                            p.igate + tile.b * p.i_sb + tile.h * p.i_sh + tile.s0 * p.i_ss, p.i_ss);
}

// One query row of a lane, as step 5 needs it.
struct RowGate {
  int t;    // row inside the chunk
  float a;  // row_a
};
__device__ __forceinline__ RowGate row_gate(const GateScratch& gs, const Tile& tile, int r) {
  return {tile.row0 + r, gs.row_a[r]};
}

// Step 5 for 64 keys kb0..kb0+63 on this lane's rows r0 (accumulator elements 0, 1) and r1
// (elements 2, 3): x holds q.k in the mma accumulator layout (8 n-tiles of 8 keys; element e of
// tile nt is key kb0 + 8 nt + 2 tq + (e & 1)) and becomes w = qk_scale (q.k) exp(D - F), zero
// where s > t (selected, never multiplied: a later row's NaN stays out). Adds w to the row sums.
// kTiles < 8: the first kTiles n-tiles only (the fused forward weighs 16 keys at a time).
template <bool kWide, int kTiles = 8>
__device__ __forceinline__ void weigh_scores(float* x, int kb0, int row_end, const RowGate& r0,
                                             const RowGate& r1, const GateScratch& gs, float qk_scale,
                                             float& rowsum0, float& rowsum1) {
  const int tq = threadIdx.x % 4;
  const bool ok0 = r0.t < row_end, ok1 = r1.t < row_end;
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int s = kb0 + nt * 8 + 2 * tq;
    float e[4];
    if constexpr (kWide) {
      // Each D formed from its span; rows past the chunk read a harmless in-bounds value.
      const float c0 = gs.col_a[s], c1 = gs.col_a[s + 1];
      e[0] = (span(gs, r0.t, s) + c0) * kLog2e + r0.a, e[1] = (span(gs, r0.t, s + 1) + c1) * kLog2e + r0.a;
      e[2] = (span(gs, r1.t, s) + c0) * kLog2e + r1.a, e[3] = (span(gs, r1.t, s + 1) + c1) * kLog2e + r1.a;
    } else {
      // (row + column) first: both large where bg is, their sum exact or small.
      const float c0 = gs.col_a[s], c1 = gs.col_a[s + 1], l0 = gs.col_b[s], l1 = gs.col_b[s + 1];
      e[0] = (r0.a + c0) + l0, e[1] = (r0.a + c1) + l1, e[2] = (r1.a + c0) + l0, e[3] = (r1.a + c1) + l1;
    }
    float* y = x + 4 * nt;
    y[0] = (s <= r0.t && ok0) ? qk_scale * y[0] * fast_exp2(e[0]) : 0.f;
    y[1] = (s + 1 <= r0.t && ok0) ? qk_scale * y[1] * fast_exp2(e[1]) : 0.f;
    y[2] = (s <= r1.t && ok1) ? qk_scale * y[2] * fast_exp2(e[2]) : 0.f;
    y[3] = (s + 1 <= r1.t && ok1) ? qk_scale * y[3] * fast_exp2(e[3]) : 0.f;
    rowsum0 += y[0] + y[1];
    rowsum1 += y[2] + y[3];
  }
}

// Steps 6-7 for one row, in the shifted frame: nsum is sum w + g q.n (times e^delta), so
// den' = max(|nsum|, e^(delta - m)), H = num / (den' + eps e^delta) and SPEC's den = den' e^-delta
// (vecN; SPEC's nsum = nsum e^-delta where `signed_n`).
struct RowNorm {
  float inv;  // 1 / (den' + eps e^delta)
  float den;  // vecN
};
__device__ __forceinline__ RowNorm row_normaliser(float nsum, float m, float delta, float eps, bool signed_n) {
  const float den_f = nan_max(fabsf(nsum), expf(delta - m));
  return {1.f / (den_f + eps * expf(delta)), (signed_n ? nsum : den_f) * expf(-delta)};
}

// A tile whose outputs came out non-finite is recomputed element by element, summing keys s <= t
// only: the tensor-core products multiply masked weights (zeros) by later rows of V too, and
// 0 * NaN would leak a later row's NaN or Inf into earlier rows. Rare (non-finite inputs or
// overflow), so plain float32 arithmetic from global memory, in the same frame as the main path.
// c_at(d, col) is C_k[d, col] (the fused forward reads it from its shared-memory split).
template <typename T, class CAt>
__device__ __forceinline__ void recompute_tile_exactly(const HintraParams& p, const Tile& tile,
                                                    const GateScratch& gs, bool wide, int bdv, CAt c_at) {
  const T* q = static_cast<const T*>(p.q) + tile.b * p.q_sb + tile.h * p.q_sh + tile.s0 * p.q_ss;
  const T* k = static_cast<const T*>(p.k) + tile.b * p.k_sb + tile.h * p.k_sh + tile.s0 * p.k_ss;
  const T* v = static_cast<const T*>(p.v) + tile.b * p.v_sb + tile.h * p.v_sh + tile.s0 * p.v_ss;
  T* H = static_cast<T*>(p.H) + (tile.bh * p.S + tile.s0) * p.DHHV;
  const int cols = min(bdv, tile.dv_valid);
  for (int idx = threadIdx.x; idx < tile.rows_valid * cols; idx += blockDim.x) {
    const int r = idx / cols, col = tile.dv0 + idx % cols, t = tile.row0 + r;
    const T* qt = q + t * p.q_ss;
    float qc = 0.f;
    for (int d = 0; d < p.DHQK; ++d) qc = fmaf(to_float(qt[d]), c_at(d, col), qc);
    float num = gs.row_g[r] * qc;
    const float ra = gs.row_a[r];
    for (int s = 0; s <= t; ++s) {
      float qk = 0.f;
      for (int d = 0; d < p.DHQK; ++d) qk = fmaf(to_float(qt[d]), to_float(k[s * p.k_ss + d]), qk);
      const float e = wide ? (span(gs, t, s) + gs.col_a[s]) * kLog2e + ra : (ra + gs.col_a[s]) + gs.col_b[s];
      num = fmaf(p.qk_scale * qk * exp2f(e), to_float(v[s * p.v_ss + col]), num);
    }
    H[t * p.DHHV + col] = from_float<T>(num * gs.row_inv[r]);
  }
}

// The H kernels: C_k from the states in global memory.
template <typename T>
__device__ __forceinline__ void recompute_tile_exactly(const HintraParams& p, const Tile& tile,
                                                    const GateScratch& gs, bool wide, int bdv) {
  const float* C = p.C + tile.b * p.C_sb + tile.h * p.C_sh + (int64_t)tile.chunk * p.DHQK * p.C_sr;
  recompute_tile_exactly<T>(p, tile, gs, wide, bdv, [&](int d, int col) { return C[d * p.C_sr + col]; });
}

}  // namespace mlstm::cuda
