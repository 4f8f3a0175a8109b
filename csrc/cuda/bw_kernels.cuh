// The fused per-chunk kernels of the CUDA backward (bw_params.h says what each computes), as
// templates over the 16-bit input type T and the chunk size L (64 or 128). mma.sync on tensor
// cores (sm_80 and later), float32 accumulators; the L x L matrices never leave the block.
//
// Accumulator layout (mma.cuh): element e of n-tile nt of a warp's 16 x 8NT accumulator sits at
// row 16 warp + g (+8 for e >= 2) and column 8 nt + 2 tq + (e & 1), g = lane / 4, tq = lane % 4.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "common.h"
#include "cuda/bw_params.h"
#include "cuda/gates.cuh"
#include "cuda/mma.cuh"

namespace mlstm::cuda::bw {

constexpr unsigned kFull = 0xffffffffu;

// torch.sign: NaN stays NaN, 0 gives 0.
__device__ __forceinline__ float sign_of(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : x); }

template <typename T>
__device__ __forceinline__ float2 load2(const T* p) {  // two adjacent 16-bit values as floats
  const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
  const T* h = reinterpret_cast<const T*>(&u);
  return make_float2(to_float(h[0]), to_float(h[1]));
}

// Per-chunk gate scratch in shared memory, kGateArrays arrays of L floats (SPEC.md steps 1-2 and
// the backward's row factors). bg is the float64 prefix sum of the clamped log forget gates kept
// as float + remainder, so a span bg[t] - bg[s] keeps the ordinary gates after a huge one.
struct Gates {
  float *bg, *bg_lo, *iv, *m, *r, *gq, *ga, *dns;
};
__device__ __forceinline__ Gates gates_at(float* base, int L) {
  return {base, base + L, base + 2 * L, base + 3 * L, base + 4 * L, base + 5 * L, base + 6 * L, base + 7 * L};
}

// Stages the chunk's gates: r = 1 / (den + eps), gq[t] = qk_scale exp(bg[t] + m_k - m[t]) (weight
// of the incoming state in row t), ga[s] = exp(g_k - bg[s] + i[s] - m_{k+1}) (weight of key s in
// the next state), dns = dnsum when `read_dnsum`, else 0.
template <int L>
__device__ void stage_gates(const BwParams& p, int64_t pair, int chunk, const Gates& s, bool read_dnsum) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row0 = pair * p.S + static_cast<int64_t>(chunk) * L;
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    s.bg[t] = log_forget(p.fgate[row0 + t]);  // SPEC.md step 1
    s.iv[t] = p.igate[row0 + t];
    const float m = p.m[row0 + t];
    s.m[t] = m;
    s.r[t] = 1.f / (den_of(p.den[row0 + t], m, p.n_signed) + p.eps);
    s.dns[t] = read_dnsum ? p.dnsum[row0 + t] : 0.f;
  }
  __syncthreads();
  if (warp == 0) {
    double carry = 0.0;
    for (int base = 0; base < L; base += 32) {
      const double exact = warp_inclusive_sum(static_cast<double>(s.bg[base + lane])) + carry;
      carry = __shfl_sync(kFull, exact, 31);
      const SplitSum bg = split_sum(exact);
      s.bg[base + lane] = bg.hi;
      s.bg_lo[base + lane] = bg.lo;
    }
  }
  __syncthreads();
  const float m_prev = p.m_states[pair * (p.NC + 1) + chunk];
  const float m_next = p.m_states[pair * (p.NC + 1) + chunk + 1];
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    s.gq[t] = p.qk_scale * expf((s.bg[t] + m_prev) - s.m[t]);
    s.ga[t] = expf(span(s, L - 1, t) + (s.iv[t] - m_next));
  }
  __syncthreads();
}

// kRows x kBwTile elements (L rows unless said) of a row-major global matrix (16-byte aligned
// rows) into a tile of row stride kLd, by the block's kThreads threads; the caller commits and
// waits.
// Unrolled, each thread walking down the rows with one pointer: the copies of the H step measured
// costly as a rolled loop with per-piece index arithmetic (benchmarks/NOTES.md).
template <typename T, int L, int kRows = L, int kThreads = 2 * L>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t g_stride) {
  constexpr int kE = 16 / sizeof(T);
  constexpr int kPieces = kBwTile / kE;         // 16-byte pieces per row
  constexpr int kRowStep = kThreads / kPieces;  // rows per pass of the block
  static_assert(kThreads % kPieces == 0 && kRows % kRowStep == 0, "whole passes");
  const int r = threadIdx.x / kPieces, c = (threadIdx.x % kPieces) * kE;
  T* dst = s + r * kLd + c;
  const T* src = g + r * g_stride + c;
#pragma unroll
  for (int it = 0; it < kRows / kRowStep; ++it) {
    cp_async_16(dst + it * kRowStep * kLd, src, 16);
    src += kRowStep * g_stride;
  }
}

// acc (this warp's 16 rows x 8 NT columns) += A (16 x 16 k-steps [k0, k1)) * B on tensor cores,
// n-tile pairs np < np_end only. A is stored [m][k] (kAT false) or [k][m] (kAT true, read
// transposed); B is stored [n][k] (kBT false) or [k][n] (kBT true). a and b point at (0, 0).
template <typename T, bool kAT, bool kBT, int NT>
__device__ __forceinline__ void warp_gemm(float (&acc)[NT][4], const T* a, int lda, const T* b,
                                          int ldb, int k0, int k1, int np_end = NT / 2) {
  const int lane = threadIdx.x % 32;
  for (int ks = k0; ks < k1; ++ks) {
    uint32_t af[4];
    if constexpr (kAT) {
      ldmatrix_x4_trans(af, a + (ks * 16 + (lane & 7) + (lane >> 4) * 8) * lda + ((lane >> 3) & 1) * 8);
    } else {
      ldmatrix_x4(af, a + (lane & 15) * lda + ks * 16 + (lane >> 4) * 8);
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      if (np < np_end) {
        uint32_t bf[4];
        if constexpr (kBT) {
          ldmatrix_x4_trans(bf, b + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + np * 16 + (lane >> 4) * 8);
        } else {
          ldmatrix_x4(bf, b + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * ldb + ks * 16 + ((lane >> 3) & 1) * 8);
        }
        mma_16816<T>(acc[2 * np], af, bf[0], bf[1]);
        mma_16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// acc = X Y^T over D / kBwTile staged tiles of the chunk's rows of X and Y (both (L, D) row-major
// from x, y): the warp's 16 rows (strip) against the kCols keys from c0, those up to its last row.
template <typename T, int L>
__device__ __forceinline__ void chunk_gram(float (&acc)[PostWarps<L>::kCols / 8][4], const T* x, const T* y,
                                           int D, T* sX, T* sY, int strip, int c0) {
  constexpr int NT = PostWarps<L>::kCols / 8;
  constexpr bool kOne = PostWarps<L>::kWC == 1;  // then c0 = 0 and every strip has keys
  const int np_end = kOne ? strip + 1 : min(NT / 2, strip + 1 - c0 / 16);  // causal: key pairs up to the strip
  zero(acc);
  for (int d0 = 0; d0 < D; d0 += kBwTile) {
    load_tile<T, L, L, PostWarps<L>::kThreads>(sX, x + d0, D);
    load_tile<T, L, L, PostWarps<L>::kThreads>(sY, y + d0, D);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (kOne || np_end > 0) {
      warp_gemm<T, false, false, NT>(acc, sX + strip * 16 * kLd, kLd, sY + c0 * kLd, kLd, 0, kBwTile / 16, np_end);
    }
    __syncthreads();
  }
}

// Where two warps span a strip (L = 128): hv = dH V^T and acc = Q K^T as chunk_gram makes them,
// as one pipeline of DV / kBwTile + DQ / kBwTile steps whose tiles alternate between two buffer
// pairs (b0 and b1, each an X and a Y tile of L rows), so that the tiles of step j + 1 are in
// flight during the products of step j (chunk_gram waits for every tile with nothing else in
// flight, and one block runs per SM at L = 128).
template <typename T, int L>
__device__ __forceinline__ void chunk_grams_pipelined(float (&hv)[PostWarps<L>::kCols / 8][4],
                                                      float (&acc)[PostWarps<L>::kCols / 8][4], const T* dH,
                                                      const T* V, const T* Q, const T* K, int DV, int DQ, T* b0,
                                                      T* b1, int strip, int c0) {
  constexpr int NT = PostWarps<L>::kCols / 8, kThr = PostWarps<L>::kThreads;
  const int np_end = min(NT / 2, strip + 1 - c0 / 16);  // causal: key pairs up to the strip
  const int n1 = DV / kBwTile, n = n1 + DQ / kBwTile;
  auto issue = [&](int j) {
    T* b = (j & 1) ? b1 : b0;
    if (j < n1) {
      load_tile<T, L, L, kThr>(b, dH + j * kBwTile, DV);
      load_tile<T, L, L, kThr>(b + L * kLd, V + j * kBwTile, DV);
    } else {
      load_tile<T, L, L, kThr>(b, Q + (j - n1) * kBwTile, DQ);
      load_tile<T, L, L, kThr>(b + L * kLd, K + (j - n1) * kBwTile, DQ);
    }
    cp_async_commit();
  };
  zero(hv);
  zero(acc);
  issue(0);
  for (int j = 0; j < n; ++j) {
    if (j + 1 < n) {
      issue(j + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* x = ((j & 1) ? b1 : b0) + strip * 16 * kLd;
    const T* y = ((j & 1) ? b1 : b0) + L * kLd + c0 * kLd;
    if (np_end > 0) {
      if (j < n1) {
        warp_gemm<T, false, false, NT>(hv, x, kLd, y, kLd, 0, kBwTile / 16, np_end);
      } else {
        warp_gemm<T, false, false, NT>(acc, x, kLd, y, kLd, 0, kBwTile / 16, np_end);
      }
    }
    __syncthreads();  // the buffers of step j are refilled at step j + 2
  }
}

// The state products of bw_post as one stream of steps through the ring of PostSmem<L>::kStages
// slots (sX, sM). Step j's tiles are an (L, 64) tile X_j of dH, V or K and a 64 x 64 block M_j of
// C_k or G_{k+1}; the products take consecutive steps in the order they run: per DQ tile d0,
// dH C_k^T and V G_{k+1}^T over the DHHV blocks (nD steps each), then per DV tile e0, K G_{k+1}
// over the DHQK blocks (nQ steps). Step j sits in slot j % kStages.
//
// `ahead` = D: step j + D is issued (one cp.async group) as step j begins, before its wait, so
// D + 1 steps are in flight while step j's tiles land, across the products' boundaries and the
// epilogues between them. Its slot last held step j + D - kStages: for D <= kStages - 2 that step
// was multiplied before the barrier of step j - 1, which every warp issuing has passed; for
// D = kStages - 1 it is step j - 1, so each step ends with a barrier. D = 0: each step's tiles are
// issued and waited for with nothing in flight.
template <typename T, int L>
struct StateStream {
  static constexpr int kStages = PostSmem<L>::kStages;
  static_assert(kStages >= 2 && kStages <= 4, "wait() counts up to three newer groups");
  const T *dH, *V, *K, *C_k, *G_k;
  int DQ, DV, nQ, nD, n_dq, n_all;  // n_dq: the steps of the DQ loop's products
  int ahead;
  T *sX, *sM;
  int next;  // the next step to multiply

  // Issues step j (an empty group past the last step, so that the waits count alike).
  __device__ __forceinline__ void issue(int j) const {
    if (j >= n_all) {
      cp_async_commit();
      return;
    }
    const T *x, *m;
    int x_ld;
    if (j < n_dq) {  // product 2 d0/64 (dH C_k^T) or 2 d0/64 + 1 (V G_{k+1}^T), DHHV block i
      const int prod = j / nD, i = j - prod * nD;
      const int64_t d0 = static_cast<int64_t>(prod >> 1) * kBwTile;
      x = ((prod & 1) ? V : dH) + i * kBwTile, x_ld = DV;
      m = ((prod & 1) ? G_k : C_k) + d0 * DV + i * kBwTile;
    } else {  // K G_{k+1} for DV tile e0 = prod * 64, DHQK block i
      const int jj = j - n_dq, prod = jj / nQ, i = jj - prod * nQ;
      x = K + i * kBwTile, x_ld = DQ;
      m = G_k + static_cast<int64_t>(i) * kBwTile * DV + prod * kBwTile;
    }
    constexpr int kThreads = PostWarps<L>::kThreads;
    const int slot = j % kStages;
    load_tile<T, L, L, kThreads>(sX + slot * L * kLd, x, x_ld);
    load_tile<T, L, kBwTile, kThreads>(sM + slot * kBwTile * kLd, m, DV);
    cp_async_commit();
  }

  // Steps 0 .. D - 1, before the first product.
  __device__ __forceinline__ void prime() const {
    for (int j = 0; j < ahead; ++j) issue(j);
  }

  // Waits for every group but the D newest: step j's, given step j + D issued last.
  __device__ __forceinline__ void wait() const { cp_async_wait_upto3(ahead); }
};

// acc = sum over the next n steps of X_i M_i^T (kBT false) or X_i M_i (kBT true): the warp's 16
// rows (strip) and kOutCols columns from c0. Tiles the caller committed before the first step
// (its own cp.async group) are complete and visible at return when n >= D; else the caller waits.
template <typename T, int L, bool kBT>
__device__ __forceinline__ void rows_by_state(float (&acc)[PostWarps<L>::kOutCols / 8][4], StateStream<T, L>& st,
                                              int n, int strip, int c0) {
  constexpr int NO = PostWarps<L>::kOutCols / 8, kStages = PostSmem<L>::kStages;
  // B is M^T ([n][k]: rows c0.. of M) or M ([k][n]: columns c0..).
  const int b_off = kBT ? c0 : c0 * kLd;
  const bool end_barrier = st.ahead >= kStages - 1;
  zero(acc);
  for (int i = 0; i < n; ++i) {
    const int j = st.next++;
    st.issue(j + st.ahead);
    st.wait();
    __syncthreads();
    const int slot = j % kStages;
    warp_gemm<T, false, kBT, NO>(acc, st.sX + slot * L * kLd + strip * 16 * kLd, kLd,
                                 st.sM + slot * kBwTile * kLd + b_off, kLd, 0, kBwTile / 16);
    if (end_barrier) __syncthreads();  // step j's slot is refilled at step j + 1
  }
}

// dH_t . H_t for the chunk's L rows into ddot: a warp per 16 rows (t = warp + NW j), a lane per
// column pair (coalesced), eight rows' loads in flight and their eight reductions interleaved (a
// row at a time left each warp waiting on one load, then on one shuffle chain).
template <typename T, int L>
__device__ __forceinline__ void dH_dot_H(const BwParams& p, int64_t row0, float* ddot) {
  constexpr int NW = L / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* dH = static_cast<const T*>(p.dh) + row0 * p.DV;
  const T* H = static_cast<const T*>(p.h) + row0 * p.DV;
#pragma unroll
  for (int j0 = 0; j0 < 16; j0 += 8) {
    float x[8] = {};
    for (int c = 2 * lane; c < p.DV; c += 64) {
      float2 a[8], b[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t off = static_cast<int64_t>(warp + NW * (j0 + j)) * p.DV + c;
        a[j] = load2(dH + off), b[j] = load2(H + off);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = fmaf(a[j].x, b[j].x, fmaf(a[j].y, b[j].y, x[j]));
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = warp_sum(x[j]);
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < 8; ++j) ddot[warp + NW * (j0 + j)] = x[j];
    }
  }
}

// dnsum of one row: den = max(|nsum|, e^-m), so the gradient follows |nsum| where it is the larger
// (ties included), -r (dH . H) sign(nsum), and is 0 where e^-m is.
__device__ __forceinline__ float nsum_gradient(float nsum, float m, float r, float ddot) {
  return fabsf(nsum) < expf(-m) ? 0.f : -r * ddot * sign_of(nsum);
}

// ------------------------------------------------------------------------------------------------
// bw_pre: dnsum (exact mode), Qs = Q gq r, Xn = sum_t gq[t] dnsum[t] q_t.
template <typename T, int L>
__global__ void __launch_bounds__(2 * L) bw_pre_kernel(const BwParams p) {
  constexpr int NT = L / 8, NW = L / 16;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + L * kLd;
  float* fl = reinterpret_cast<float*>(sK + L * kLd);
  const Gates s = gates_at(fl, L);
  float* qn = fl + kGateArrays * L;  // q_t . n_k
  float* ddot = qn + L;              // dH_t . H_t
  float* nk = ddot + L;              // a tile of n_k

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tq = lane % 4;
  const int64_t blk = blockIdx.x, pair = blk / p.NC;
  const int chunk = static_cast<int>(blk % p.NC);
  const int64_t row0 = pair * p.S + static_cast<int64_t>(chunk) * L;
  const T* Q = static_cast<const T*>(p.q) + row0 * p.DQ;
  stage_gates<L>(p, pair, chunk, s, false);

  if (p.exact && p.n_signed) {
    // The forward saved nsum itself (vecN_signed): its sign and the branch need no products.
    dH_dot_H<T, L>(p, row0, ddot);
    __syncthreads();
    for (int t = threadIdx.x; t < L; t += blockDim.x) {
      const float nsum = p.den[row0 + t];
      const float dn = nsum_gradient(nsum, s.m[t], s.r[t], ddot[t]);
      s.dns[t] = dn;
      p.dnsum[row0 + t] = dn;
    }
    __syncthreads();
  } else if (p.exact) {
    // nsum[t] = sum_s W[t, s] + gq[t] q_t . n_k: S = Q K^T with q . n alongside.
    for (int t = threadIdx.x; t < L; t += blockDim.x) qn[t] = 0.f;
    const T* K = static_cast<const T*>(p.k) + row0 * p.DQ;
    const float* n_k = p.n_states + (pair * (p.NC + 1) + chunk) * p.DQ;
    float acc[NT][4];
    zero(acc);
    for (int d0 = 0; d0 < p.DQ; d0 += kBwTile) {
      load_tile<T, L>(sQ, Q + d0, p.DQ);
      load_tile<T, L>(sK, K + d0, p.DQ);
      for (int c = threadIdx.x; c < kBwTile; c += blockDim.x) nk[c] = n_k[d0 + c];
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      warp_gemm<T, false, false, NT>(acc, sQ + warp * 16 * kLd, kLd, sK, kLd, 0, kBwTile / 16, warp + 1);
      for (int t = threadIdx.x; t < L; t += blockDim.x) {
        float x = 0.f;
        for (int c = 0; c < kBwTile; ++c) x = fmaf(to_float(sQ[t * kLd + c]), nk[c], x);
        qn[t] += x;
      }
      __syncthreads();
    }
    dH_dot_H<T, L>(p, row0, ddot);
    __syncthreads();
    const int t0 = warp * 16 + g, t1 = t0 + 8;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = e < 2 ? t0 : t1, u = nt * 8 + 2 * tq + (e & 1);
        const float w = u <= t ? p.qk_scale * acc[nt][e] * expf(span(s, t, u) + s.iv[u] - s.m[t]) : 0.f;
        (e < 2 ? rs0 : rs1) += w;
      }
    }
    rs0 = quad_sum(rs0), rs1 = quad_sum(rs1);
    if (tq == 0) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = j == 0 ? t0 : t1;
        const float nsum = (j == 0 ? rs0 : rs1) + s.gq[t] * qn[t];
        const float dn = nsum_gradient(nsum, s.m[t], s.r[t], ddot[t]);
        s.dns[t] = dn;
        p.dnsum[row0 + t] = dn;
      }
    }
    __syncthreads();
  }

  // The row factors, then Qs (where asked) and Xn by 64-column pieces: a warp per 16 rows (t =
  // warp + NW j), a lane per two columns (coalesced along them); the warps' partial sums of Xn
  // meet in shared memory (the Q tile, free now). A thread per column pair walking every row
  // left three quarters of the block idle: bw_pre took a quarter of the backward at L = 128.
  if (p.qscale != nullptr) {
    for (int t = threadIdx.x; t < L; t += blockDim.x) p.qscale[row0 + t] = s.gq[t] * s.r[t];
  }
  T* Qs = p.qs != nullptr ? static_cast<T*>(p.qs) + row0 * p.DQ : nullptr;
  float* xn = p.xn + blk * p.DQ;
  float* part = reinterpret_cast<float*>(sQ);  // [NW][kBwTile]
  static_assert(L / NW == 16 && NW * kBwTile * 4 <= L * kLd * 2, "16 rows per warp; part fits the Q tile");
  for (int d0 = 0; d0 < p.DQ; d0 += kBwTile) {
    const int d = d0 + 2 * lane;
    float x0 = 0.f, x1 = 0.f;
#pragma unroll
    for (int j0 = 0; j0 < 16; j0 += 8) {
      float2 q[8];  // eight rows' loads in flight before the first store
#pragma unroll
      for (int j = 0; j < 8; ++j) q[j] = load2(Q + (warp + NW * (j0 + j)) * p.DQ + d);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int t = warp + NW * (j0 + j);
        const float sc = s.gq[t] * s.r[t], wt = s.gq[t] * s.dns[t];
        if (Qs != nullptr) *reinterpret_cast<uint32_t*>(Qs + t * p.DQ + d) = pack2<T>(q[j].x * sc, q[j].y * sc);
        x0 = fmaf(q[j].x, wt, x0);
        x1 = fmaf(q[j].y, wt, x1);
      }
    }
    part[warp * kBwTile + 2 * lane] = x0;
    part[warp * kBwTile + 2 * lane + 1] = x1;
    __syncthreads();
    for (int c = threadIdx.x; c < kBwTile; c += blockDim.x) {
      float x = 0.f;
      for (int w = 0; w < NW; ++w) x += part[w * kBwTile + c];
      xn[d0 + c] = x;
    }
    __syncthreads();  // part is rewritten by the next piece
  }
}

// dQ's and dK's epilogue for this lane's rows t0 and t1 of the DHQK tile from column d0 (rows
// from row0 of out, row stride DQ): out = o + x, x = x_of(row, column, the inter-chunk product),
// and dot0 / dot1 += x . the row of `rows` (a shared tile of Q or K: the gate gradients'
// q . dQ_inter and k . dK_inter).
template <typename T, int NO, class XOf>
__device__ __forceinline__ void store_with_inter(const float (&o)[NO][4], const float (&inter)[NO][4],
                                                 const T* rows, T* out, int64_t row0, int DQ, int d0,
                                                 int t0, int t1, float& dot0, float& dot1, XOf x_of) {
  const int tq = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < NO; ++nt) {
    const int d = nt * 8 + 2 * tq;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int t = j == 0 ? t0 : t1;
      const float x0 = x_of(t, d, inter[nt][2 * j]);
      const float x1 = x_of(t, d + 1, inter[nt][2 * j + 1]);
      const float2 a = load2(rows + t * kLd + d);
      (j == 0 ? dot0 : dot1) += a.x * x0 + a.y * x1;
      *reinterpret_cast<uint32_t*>(out + (row0 + t) * DQ + d0 + d) = pack2<T>(o[nt][2 * j] + x0, o[nt][2 * j + 1] + x1);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// bw_post: everything else, per chunk (PostWarps: the warps' rows and columns).
// At L = 64 three blocks fit per SM (75 KB of shared memory each, 168 registers at most); at
// L = 128 one of 16 warps (128 registers at most).
template <typename T, int L>
__global__ void __launch_bounds__(PostWarps<L>::kThreads, L == 64 ? 3 : 1) bw_post_kernel(const BwParams p) {
  using Wp = PostWarps<L>;
  constexpr int NT = Wp::kCols / 8, NS = Wp::kStrips, kWC = Wp::kWC;
  using Lay = PostSmem<L>;
  constexpr int LdL = Lay::kLdL;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sA = reinterpret_cast<T*>(smem + Lay::kTiles);
  T* sB = sA + L * kLd;
  T* sDsp = reinterpret_cast<T*>(smem + Lay::kDsp);  // qk_scale dW o P, [t][s]
  T* sWr = reinterpret_cast<T*>(smem + Lay::kWr);    // W[t, s] r[t], [t][s]
  float* frag = reinterpret_cast<float*>(smem + Lay::kFrag);  // r-less dH V^T, accumulator order (kWC 1)
  T* sX = reinterpret_cast<T*>(smem + Lay::kX);  // after the elementwise step, in frag's place
  T* sM = reinterpret_cast<T*>(smem + Lay::kM);
  float* fl = reinterpret_cast<float*>(smem + Lay::kFloats);
  const Gates s = gates_at(fl, L);
  float* rows = fl + kGateArrays * L;  // row sums of dW o W
  float* cols = rows + L;              // column sums of dW o W
  float* qdot = cols + L;              // q_t . (dQ's inter-chunk term)
  float* kdot = qdot + L;              // k_s . (dK's inter-chunk term)

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tq = lane % 4;
  // The warp's 16-row strip, and its first column of the L x L matrices (cl) and of an output
  // tile (co).
  const int strip = warp / kWC, cl = (warp % kWC) * Wp::kCols, co = (warp % kWC) * Wp::kOutCols;
  const int64_t blk = blockIdx.x, pair = blk / p.NC;
  const int chunk = static_cast<int>(blk % p.NC);
  const int64_t row0 = pair * p.S + static_cast<int64_t>(chunk) * L;
  const T* Q = static_cast<const T*>(p.q) + row0 * p.DQ;
  const T* K = static_cast<const T*>(p.k) + row0 * p.DQ;
  const T* V = static_cast<const T*>(p.v) + row0 * p.DV;
  const T* dH = static_cast<const T*>(p.dh) + row0 * p.DV;
  const T* C_k = static_cast<const T*>(p.c_states) + (pair * (p.NC + 1) + chunk) * p.DQ * p.DV;
  const T* G_k = static_cast<const T*>(p.g_states) + blk * p.DQ * p.DV;  // the gradient of state k+1
  constexpr int kThr = Wp::kThreads;
  // The Q and K tiles of the DQ loop's step d0 (sA, sB), one cp.async group.
  auto load_qk = [&](int d0) {
    load_tile<T, L, L, kThr>(sA, Q + d0, p.DQ);
    load_tile<T, L, L, kThr>(sB, K + d0, p.DQ);
    cp_async_commit();
  };
  // The state products' steps (StateStream: dH C_k^T and V G_{k+1}^T per DQ tile, then K G_{k+1}
  // per DV tile) through the ring, p.ahead of them in flight; `early`: the first ones and the
  // first Q and K tiles go out before the elementwise step.
  const int nQ = p.DQ / kBwTile, nD = p.DV / kBwTile;
  StateStream<T, L> st{dH, V, K, C_k, G_k, p.DQ, p.DV, nQ, nD, 2 * nQ * nD, 3 * nQ * nD, p.ahead, sX, sM, 0};
  const bool early = kWC > 1 && p.ahead > 0;
  // Tiles committed just before a product of n steps: its steps' waits cover them when n >= ahead;
  // else n groups (its issues) came after them.
  auto own_tiles_landed = [&](int n) {
    if (n < p.ahead) {
      cp_async_wait_upto3(n);
      __syncthreads();
    }
  };
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    cols[t] = 0.f;
    if constexpr (kWC > 1) rows[t] = qdot[t] = kdot[t] = 0.f;  // summed over a strip's warps
  }
  stage_gates<L>(p, pair, chunk, s, p.exact);

  // ---- dH V^T (parked in shared memory where one warp spans a strip, else in registers), then
  // S = Q K^T in registers.
  const int t0 = strip * 16 + g, t1 = t0 + 8;
  float acc[NT][4];
  float hv[kWC > 1 ? NT : 1][4];
  if constexpr (kWC > 1) {
    // The inter-chunk region (sX) is free until the DQ loop: the second buffer pair.
    static_assert(2 * L * kLd * 2 <= PostSmem<L>::kRegion, "two tiles fit the inter-chunk region");
    if (p.grams_pipelined) {
      chunk_grams_pipelined<T, L>(hv, acc, dH, V, Q, K, p.DV, p.DQ, sA, sX, strip, cl);
    } else {
      chunk_gram<T, L>(hv, dH, V, p.DV, sA, sB, strip, cl);
      chunk_gram<T, L>(acc, Q, K, p.DQ, sA, sB, strip, cl);
    }
    // The first state product's tiles (sX holds no park here) and the DQ loop's first Q and K
    // tiles (sA, sB: the grams are done with them) land during the elementwise step.
    if (early) {
      st.prime();
      load_qk(0);
    }
  } else {
    chunk_gram<T, L>(acc, dH, V, p.DV, sA, sB, strip, cl);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      *reinterpret_cast<float4*>(frag + ((warp * NT + nt) * 32 + lane) * 4) =
          make_float4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]);
    chunk_gram<T, L>(acc, Q, K, p.DQ, sA, sB, strip, cl);
  }

  // ---- The L x L elementwise step: P, W = qk_scale S o P, dW = r dH V^T + dnsum (causal; the
  // masks select, so a later row's NaN stays out), the sums of dW o W, and the 16-bit operands.
  {
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float dwv[4];
      if constexpr (kWC > 1) {
        dwv[0] = hv[nt][0], dwv[1] = hv[nt][1], dwv[2] = hv[nt][2], dwv[3] = hv[nt][3];
      } else {
        const float4 dv = *reinterpret_cast<const float4*>(frag + ((warp * NT + nt) * 32 + lane) * 4);
        dwv[0] = dv.x, dwv[1] = dv.y, dwv[2] = dv.z, dwv[3] = dv.w;
      }
      float dsp[4], wr[4], cs[2] = {0.f, 0.f};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = e < 2 ? t0 : t1, u = cl + nt * 8 + 2 * tq + (e & 1);
        const bool ok = u <= t;
        const float pp = ok ? expf(span(s, t, u) + s.iv[u] - s.m[t]) : 0.f;
        const float w = ok ? p.qk_scale * acc[nt][e] * pp : 0.f;
        const float dw = ok ? fmaf(s.r[t], dwv[e], s.dns[t]) : 0.f;
        const float prod = dw * w;
        (e < 2 ? rs0 : rs1) += prod;
        cs[e & 1] += prod;
        dsp[e] = p.qk_scale * dw * pp;
        wr[e] = w * s.r[t];
      }
      const int u = cl + nt * 8 + 2 * tq;
      *reinterpret_cast<uint32_t*>(sDsp + t0 * LdL + u) = pack2<T>(dsp[0], dsp[1]);
      *reinterpret_cast<uint32_t*>(sDsp + t1 * LdL + u) = pack2<T>(dsp[2], dsp[3]);
      *reinterpret_cast<uint32_t*>(sWr + t0 * LdL + u) = pack2<T>(wr[0], wr[1]);
      *reinterpret_cast<uint32_t*>(sWr + t1 * LdL + u) = pack2<T>(wr[2], wr[3]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // over the 8 row pairs of the warp (lanes of equal tq)
        float c = cs[j];
        c += __shfl_xor_sync(kFull, c, 4);
        c += __shfl_xor_sync(kFull, c, 8);
        c += __shfl_xor_sync(kFull, c, 16);
        if (g == 0) atomicAdd(cols + u + j, c);
      }
    }
    rs0 = quad_sum(rs0), rs1 = quad_sum(rs1);
    if (tq == 0) {
      if constexpr (kWC > 1) {
        atomicAdd(rows + t0, rs0), atomicAdd(rows + t1, rs1);
      } else {
        rows[t0] = rs0, rows[t1] = rs1;
      }
    }
  }
  __syncthreads();

  // ---- dQ and dK, a DQ tile at a time (their Q and K tiles staged once for both):
  //   dQ[t] = sum_s dsp[t, s] k_s + gq[t] (r[t] (dH C_k^T)[t] + dnsum[t] n_k)
  //   dK[s] = sum_t dsp[t, s] q_t + ga[s] ((V G_{k+1}^T)[s] + Gn)
  // The inter-chunk products run over DHHV tiles of dH or V and of the 16-bit states C_k and
  // G_{k+1}.
  float qd0 = 0.f, qd1 = 0.f, kd0 = 0.f, kd1 = 0.f;
  const float* n_k = p.n_states + (pair * (p.NC + 1) + chunk) * p.DQ;
  const float* gn = p.gn + blk * p.DQ;
  constexpr int NO = Wp::kOutCols / 8;
  if (!early) st.prime();
  for (int d0 = 0; d0 < p.DQ; d0 += kBwTile) {
    if (!early || d0 > 0) load_qk(d0);
    float inter[NO][4], o[NO][4];
    const int dc = d0 + co;  // the warp's first output column
    // dH C_k^T and V G_{k+1}^T over the DHHV blocks (the first also waits for the Q and K tiles).
    rows_by_state<T, L, false>(inter, st, nD, strip, co);
    own_tiles_landed(nD);
    zero(o);
    warp_gemm<T, false, true, NO>(o, sDsp + strip * 16 * LdL, LdL, sB + co, kLd, 0, strip + 1);
    store_with_inter<T, NO>(o, inter, sA + co, static_cast<T*>(p.dq), row0, p.DQ, dc, t0, t1, qd0, qd1,
                            [&](int t, int d, float x) { return s.gq[t] * fmaf(s.r[t], x, s.dns[t] * __ldg(n_k + dc + d)); });
    rows_by_state<T, L, false>(inter, st, nD, strip, co);
    zero(o);
    warp_gemm<T, true, true, NO>(o, sDsp + strip * 16, LdL, sA + co, kLd, strip, NS);
    store_with_inter<T, NO>(o, inter, sB + co, static_cast<T*>(p.dk), row0, p.DQ, dc, t0, t1, kd0, kd1,
                            [&](int u, int d, float x) { return s.ga[u] * (x + __ldg(gn + dc + d)); });  // u: a key row
    __syncthreads();
  }

  // ---- dV, a DHHV tile at a time: dV[s] = sum_t W[t, s] r[t] dH_t + ga[s] (K G_{k+1})[s].
  for (int e0 = 0; e0 < p.DV; e0 += kBwTile) {
    load_tile<T, L, L, kThr>(sA, dH + e0, p.DV);
    cp_async_commit();
    float inter[NO][4], o[NO][4];
    // K G_{k+1} over the DHQK blocks (also waits for the dH tile).
    rows_by_state<T, L, true>(inter, st, nQ, strip, co);
    own_tiles_landed(nQ);
    zero(o);
    warp_gemm<T, true, true, NO>(o, sWr + strip * 16, LdL, sA + co, kLd, strip, NS);
#pragma unroll
    for (int nt = 0; nt < NO; ++nt) {
      const int d = co + nt * 8 + 2 * tq;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int u = j == 0 ? t0 : t1;
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dv) + (row0 + u) * p.DV + e0 + d) =
            pack2<T>(fmaf(s.ga[u], inter[nt][2 * j], o[nt][2 * j]),
                     fmaf(s.ga[u], inter[nt][2 * j + 1], o[nt][2 * j + 1]));
      }
    }
    __syncthreads();
  }

  // ---- Gates: d/d bg[t] = rows - cols + q.dQ_inter - k.dK_inter (+ the chunk's last row: every
  // ga and the decay hold g_k); dI = cols + k.dK_inter; dF = reverse cumsum of d/d bg times
  // sigmoid(-f) within the chunk.
  qd0 = quad_sum(qd0), qd1 = quad_sum(qd1), kd0 = quad_sum(kd0), kd1 = quad_sum(kd1);
  if (tq == 0) {
    if constexpr (kWC > 1) {  // two addends onto zero: the same sum in either order
      atomicAdd(qdot + t0, qd0), atomicAdd(qdot + t1, qd1), atomicAdd(kdot + t0, kd0), atomicAdd(kdot + t1, kd1);
    } else {
      qdot[t0] = qd0, qdot[t1] = qd1, kdot[t0] = kd0, kdot[t1] = kd1;
    }
  }
  __syncthreads();
  if (warp == 0) {
    float kd_sum = 0.f;
    for (int t = lane; t < L; t += 32) kd_sum += kdot[t];
    kd_sum = warp_sum(kd_sum) + p.last_row[blk];
    float after = 0.f;  // sum of d/d bg over the positions after the current piece
    for (int end = L; end > 0; end -= 32) {
      const int t = end - 32 + lane;
      float incl = rows[t] - cols[t] + qdot[t] - kdot[t] + (t == L - 1 ? kd_sum : 0.f);
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const float y = __shfl_down_sync(kFull, incl, off);
        if (lane + off < 32) incl += y;
      }
      const float f = p.fgate[row0 + t];
      p.df[row0 + t] = (incl + after) / (1.f + expf(f));  // times sigmoid(-f)
      p.di[row0 + t] = cols[t] + kdot[t];
      after += __shfl_sync(kFull, incl, 0);
    }
  }
}

template <typename T, int L>
void launch_bw(const BwParams& p, bool post, cudaStream_t stream) {
  if (p.num_blocks == 0) return;
  TORCH_CHECK(p.num_blocks < (int64_t(1) << 31), "chunkwise_bw: ", num(p.num_blocks),
              " chunks exceed the CUDA grid limit; split the batch");
  auto kernel = post ? bw_post_kernel<T, L> : bw_pre_kernel<T, L>;
  const int bytes = post ? PostSmem<L>::kBytes : PreSmem<L>::kBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  // bw_post at L = 64 fits three blocks per SM only with all of its shared memory configured.
  if (post) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
  }
  kernel<<<static_cast<unsigned>(p.num_blocks), post ? PostWarps<L>::kThreads : 2 * L, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bw_any(const BwParams& p, bool post, cudaStream_t stream) {
  if (p.L == 64) return launch_bw<T, 64>(p, post, stream);
  TORCH_CHECK(p.L == 128, "chunkwise_bw: internal: no fused kernel for chunk_size ", num(p.L));
  launch_bw<T, 128>(p, post, stream);
}

}  // namespace mlstm::cuda::bw
