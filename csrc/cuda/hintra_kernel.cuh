// The CUDA H-step kernel (SPEC.md steps 1-7), one block per
// (batch*head, chunk, tile of up to 64 query rows, tile of BDV columns of DHHV).
//
// The stabiliser needs no running max: D[t, s] - m[t] = (bg[t] - m[t]) + (i[s] - bg[s]), and
// m_intra[t] = max(-10, bg[t] + max_{s<=t}(i[s] - bg[s])) is a prefix max over the gates alone.
// So m is known before any product, and one float accumulator per output element collects
//   g[t] * (q_t C_k)          (phase 1, tf32 / 3xtf32 tensor cores, C read at full float32 width)
// + sum_s w[t, s] v_s         (phase 2, 16-bit tensor cores or 3xtf32 for float32 inputs)
// with no rescaling. Each warp owns 16 query rows; Q stays in shared memory for both phases.
#pragma once

#include <cuda_runtime.h>

#include "cuda/hintra_common.cuh"

namespace mlstm::cuda {

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) hintra_kernel(const HintraParams p) {
  using T = typename Tr::T;
  constexpr int NT = Tr::kBDV / 8;  // n-tiles of the output accumulator
  constexpr int KT = Tr::kBKV / 8;  // n-tiles of the score accumulator
  extern __shared__ __align__(16) unsigned char smem[];
  const SmemLayout lay = make_smem_layout<Tr>(p.DHQK, p.L);
  T* sQ = reinterpret_cast<T*>(smem + lay.q_off);
  T* sK = reinterpret_cast<T*>(smem + lay.k_off);
  T* sV = reinterpret_cast<T*>(smem + lay.v_off);
  float* sC = reinterpret_cast<float*>(smem + lay.c_off);
  float* sN = reinterpret_cast<float*>(smem + lay.n_off);
  const int gate_len = round_up(p.L, Tr::kBKV);
  float* sBG = reinterpret_cast<float*>(smem + lay.gate_off);
  float* sColB = sBG + gate_len;  // log2e * (i[s] - bg[s])
  float* sPM = sColB + gate_len;  // prefix max of (i - bg)
  float* sRowA = reinterpret_cast<float*>(smem + lay.row_off);  // log2e * (bg[t] - m[t])
  float* sG = sRowA + Tr::kBLQ;                                  // qk_scale * exp(bg + m_prev - m)
  float* sM = sG + Tr::kBLQ;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tq = lane % 4;

  const TileIndex tile = tile_index(p);
  const int dvt = tile.dvt, qt = tile.qt, chunk = tile.chunk;
  const int64_t bh = tile.bh, b = tile.b, h = tile.h;
  const int BLQ = p.rows_per_block;
  const int row0 = qt * BLQ;  // first query row of the tile, inside the chunk
  const int rows_valid = min(BLQ, p.L - row0);
  const int row_end = row0 + rows_valid;  // keys 0..row_end-1 are needed
  const int dv0 = dvt * Tr::kBDV;
  const int dv_valid = p.DHHV - dv0;
  const int64_t s0 = (int64_t)chunk * p.L;  // first sequence position of the chunk
  const int DQKp = lay.dqk_pad;

  // Q tile -> shared memory (async; overlaps the gate arithmetic).
  const T* gQ = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + (s0 + row0) * p.q_ss;
  load_tile<T>(sQ, lay.sq, gQ, p.q_ss, Tr::kBLQ, DQKp, rows_valid, p.DHQK, p.q_vec);
  cp_async_commit();

  stage_gates<Tr::kBLQ>(p, b, h, chunk, row0, row_end, sBG, sColB, sPM, sRowA, sG, sM);

  const int wr = warp * 16;  // warp's first row in the tile
  const bool warp_active = wr < rows_valid;
  const int warp_last_row = row0 + min(wr + 15, rows_valid - 1);  // in-chunk index
  const float g0 = sG[wr + g], g1 = sG[wr + g + 8];

  float acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float qn0 = 0.f, qn1 = 0.f;  // partial q . n of rows g and g+8 (this lane's columns)

  // ---- Phase 1, inter-chunk term: acc += (g * Q) C_k, q . n alongside. ----
  {
    const float* gC = p.C + b * p.C_sb + h * p.C_sh + (int64_t)chunk * p.DHQK * p.C_sr + dv0;
    const float* gN = p.n + b * p.n_sb + h * p.n_sh + (int64_t)chunk * p.DHQK * p.n_sr;
    const int n_kc = (p.DHQK + Tr::kBKC - 1) / Tr::kBKC;
    auto load_c = [&](int kc) {
      const int d0 = kc * Tr::kBKC;
      float* dst = sC + (kc & 1) * Tr::kBKC * Tr::kSC;
      load_tile<float>(dst, Tr::kSC, gC + d0 * p.C_sr, p.C_sr, Tr::kBKC, Tr::kBDV,
                       p.DHQK - d0, dv_valid, p.c_vec);
      for (int d = threadIdx.x; d < Tr::kBKC; d += blockDim.x)
        cp_async_4(sN + (kc & 1) * Tr::kBKC + d, gN + (int64_t)min(d0 + d, p.DHQK - 1) * p.n_sr,
                   d0 + d < p.DHQK ? 4 : 0);
      cp_async_commit();
    };
    if (n_kc > 0) load_c(0);
    for (int kc = 0; kc < n_kc; ++kc) {
      if (kc + 1 < n_kc) {
        load_c(kc + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      if constexpr (!Tr::kIsFloat) {
        // This thread's own copies have landed: round them to tf32 here, once, instead of in
        // every warp's fragment loads (4x fewer conversions in the largest product).
        float* cw = sC + (kc & 1) * Tr::kBKC * Tr::kSC;
        for (int idx = threadIdx.x; idx < Tr::kBKC * (Tr::kBDV / 4); idx += blockDim.x) {
          float4* pc = reinterpret_cast<float4*>(cw + (idx / (Tr::kBDV / 4)) * Tr::kSC + (idx % (Tr::kBDV / 4)) * 4);
          float4 x = *pc;
          x.x = __uint_as_float(to_tf32(x.x));
          x.y = __uint_as_float(to_tf32(x.y));
          x.z = __uint_as_float(to_tf32(x.z));
          x.w = __uint_as_float(to_tf32(x.w));
          *pc = x;
        }
      }
      __syncthreads();
      const float* cb = sC + (kc & 1) * Tr::kBKC * Tr::kSC;
      const float* nb = sN + (kc & 1) * Tr::kBKC;
      const int kvalid = min(Tr::kBKC, DQKp - kc * Tr::kBKC);
      if (warp_active) {
#pragma unroll
        for (int kk = 0; kk < Tr::kBKC; kk += 8) {
          if (kk < kvalid) {
            // k is permuted: mma k index tq <-> column 2tq, tq+4 <-> 2tq+1 (same in A and B).
            const int col = kc * Tr::kBKC + kk + 2 * tq;
            float qa0, qa1, qb0, qb1;
            if constexpr (Tr::kIsFloat) {
              const float2 x0 = *reinterpret_cast<const float2*>(sQ + (wr + g) * lay.sq + col);
              const float2 x1 = *reinterpret_cast<const float2*>(sQ + (wr + g + 8) * lay.sq + col);
              qa0 = x0.x, qa1 = x0.y, qb0 = x1.x, qb1 = x1.y;
            } else {
              const T* r0 = sQ + (wr + g) * lay.sq + col;
              const T* r1 = sQ + (wr + g + 8) * lay.sq + col;
              qa0 = to_float(r0[0]), qa1 = to_float(r0[1]), qb0 = to_float(r1[0]), qb1 = to_float(r1[1]);
            }
            const float n0 = nb[kk + 2 * tq], n1 = nb[kk + 2 * tq + 1];
            qn0 = fmaf(qa0, n0, fmaf(qa1, n1, qn0));
            qn1 = fmaf(qb0, n0, fmaf(qb1, n1, qn1));
            const float* c0 = cb + (kk + 2 * tq) * Tr::kSC + g;
            const float* c1 = c0 + Tr::kSC;
            if constexpr (Tr::kIsFloat) {
              const Tf32Split a[4] = {split_tf32(g0 * qa0), split_tf32(g1 * qb0),
                                      split_tf32(g0 * qa1), split_tf32(g1 * qb1)};
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)
                mma_1688_3xtf32(acc[nt], a, split_tf32(c0[nt * 8]), split_tf32(c1[nt * 8]));
            } else {
              const uint32_t a[4] = {to_tf32(g0 * qa0), to_tf32(g1 * qb0), to_tf32(g0 * qa1),
                                     to_tf32(g1 * qb1)};
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)  // C was rounded to tf32 when it landed
                mma_1688_tf32(acc[nt], a, __float_as_uint(c0[nt * 8]), __float_as_uint(c1[nt * 8]));
            }
          }
        }
      }
      __syncthreads();  // the buffer is refilled two iterations on
    }
  }

  // ---- Phase 2, intra-chunk term over the causal key blocks. ----
  float rowsum0 = 0.f, rowsum1 = 0.f;
  const int t0 = row0 + wr + g, t1 = t0 + 8;  // this lane's two query rows (in-chunk)
  const float ra0 = sRowA[wr + g], ra1 = sRowA[wr + g + 8];
  const int n_kb = (row_end + Tr::kBKV - 1) / Tr::kBKV;
  const int n_kk = (DQKp + Tr::kBKK - 1) / Tr::kBKK;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + s0 * p.k_ss;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + s0 * p.v_ss + dv0;
  for (int j = 0; j < n_kb; ++j) {
    const int kb0 = j * Tr::kBKV;
    const int keys_valid = min(Tr::kBKV, row_end - kb0);
    load_tile<T>(sV, Tr::kSV, gV + kb0 * p.v_ss, p.v_ss, Tr::kBKV, Tr::kBDV, keys_valid, dv_valid,
                 p.v_vec);
    cp_async_commit();
    auto load_k = [&](int c) {
      const int k0 = c * Tr::kBKK;
      load_tile<T>(sK + (c & 1) * Tr::kBKV * Tr::kSK, Tr::kSK, gK + kb0 * p.k_ss + k0, p.k_ss,
                   Tr::kBKV, Tr::kBKK, keys_valid, p.DHQK - k0, p.k_vec);
      cp_async_commit();
    };
    if (n_kk > 0) load_k(0);

    float sacc[KT][4];
#pragma unroll
    for (int i = 0; i < KT; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;

    for (int c = 0; c < n_kk; ++c) {
      if (c + 1 < n_kk) {
        load_k(c + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* kb = sK + (c & 1) * Tr::kBKV * Tr::kSK;
      const int ksteps = min(Tr::kBKK, DQKp - c * Tr::kBKK) / Tr::kKStep;
      if (warp_active) {
#pragma unroll
        for (int ks = 0; ks < Tr::kBKK / Tr::kKStep; ++ks) {
          if (ks < ksteps) {
            const int qcol = c * Tr::kBKK + ks * Tr::kKStep;
            if constexpr (Tr::kIsFloat) {
              const float2 x0 = *reinterpret_cast<const float2*>(sQ + (wr + g) * lay.sq + qcol + 2 * tq);
              const float2 x1 = *reinterpret_cast<const float2*>(sQ + (wr + g + 8) * lay.sq + qcol + 2 * tq);
              const Tf32Split a[4] = {split_tf32(x0.x), split_tf32(x1.x), split_tf32(x0.y),
                                      split_tf32(x1.y)};
#pragma unroll
              for (int nt = 0; nt < KT; ++nt) {
                if (kb0 + nt * 8 <= warp_last_row) {
                  const float2 y = *reinterpret_cast<const float2*>(
                      kb + (nt * 8 + g) * Tr::kSK + ks * 8 + 2 * tq);
                  mma_1688_3xtf32(sacc[nt], a, split_tf32(y.x), split_tf32(y.y));
                }
              }
            } else {
              uint32_t a[4];
              ldmatrix_x4(a, sQ + (wr + (lane & 15)) * lay.sq + qcol + (lane >> 4) * 8);
#pragma unroll
              for (int np = 0; np < KT / 2; ++np) {
                if (kb0 + np * 16 <= warp_last_row) {
                  uint32_t bk[4];
                  ldmatrix_x4(bk, kb + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * Tr::kSK +
                                      ks * 16 + ((lane >> 3) & 1) * 8);
                  mma_16816<T>(sacc[2 * np], a, bk[0], bk[1]);
                  mma_16816<T>(sacc[2 * np + 1], a, bk[2], bk[3]);
                }
              }
            }
          }
        }
      }
      __syncthreads();
    }
    cp_async_wait<0>();  // V (and, when DHQK = 0, nothing else) has landed
    __syncthreads();

    if (warp_active) {
      // Step 5: w = qk_scale * (q.k) * exp(D - m), causal; row sums before any rounding.
#pragma unroll
      for (int nt = 0; nt < KT; ++nt) {
        const int s = kb0 + nt * 8 + 2 * tq;
        const float cb0 = sColB[s], cb1 = sColB[s + 1];
        sacc[nt][0] = (s <= t0 && t0 < row_end) ? p.qk_scale * sacc[nt][0] * fast_exp2(ra0 + cb0) : 0.f;
        sacc[nt][1] = (s + 1 <= t0 && t0 < row_end) ? p.qk_scale * sacc[nt][1] * fast_exp2(ra0 + cb1) : 0.f;
        sacc[nt][2] = (s <= t1 && t1 < row_end) ? p.qk_scale * sacc[nt][2] * fast_exp2(ra1 + cb0) : 0.f;
        sacc[nt][3] = (s + 1 <= t1 && t1 < row_end) ? p.qk_scale * sacc[nt][3] * fast_exp2(ra1 + cb1) : 0.f;
        rowsum0 += sacc[nt][0] + sacc[nt][1];
        rowsum1 += sacc[nt][2] + sacc[nt][3];
      }
      // acc += W V.
      if constexpr (Tr::kIsFloat) {
#pragma unroll
        for (int nt = 0; nt < KT; ++nt) {
          if (kb0 + nt * 8 <= warp_last_row) {
            // k permuted as in phase 1: a0 (g, 2tq), a1 (g+8, 2tq), a2 (g, 2tq+1), a3 (g+8, 2tq+1)
            const Tf32Split a[4] = {split_tf32(sacc[nt][0]), split_tf32(sacc[nt][2]),
                                    split_tf32(sacc[nt][1]), split_tf32(sacc[nt][3])};
            const float* v0 = sV + (nt * 8 + 2 * tq) * Tr::kSV + g;
            const float* v1 = v0 + Tr::kSV;
#pragma unroll
            for (int dn = 0; dn < NT; ++dn)
              mma_1688_3xtf32(acc[dn], a, split_tf32(v0[dn * 8]), split_tf32(v1[dn * 8]));
          }
        }
      } else {
#pragma unroll
        for (int kt = 0; kt < KT / 2; ++kt) {
          if (kb0 + kt * 16 <= warp_last_row) {
            // The score accumulators of key tiles 2kt, 2kt+1 are exactly an m16k16 A fragment.
            const uint32_t a[4] = {pack2<T>(sacc[2 * kt][0], sacc[2 * kt][1]),
                                   pack2<T>(sacc[2 * kt][2], sacc[2 * kt][3]),
                                   pack2<T>(sacc[2 * kt + 1][0], sacc[2 * kt + 1][1]),
                                   pack2<T>(sacc[2 * kt + 1][2], sacc[2 * kt + 1][3])};
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
              uint32_t bv[4];
              ldmatrix_x4_trans(bv, sV + (kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tr::kSV +
                                        np * 16 + (lane >> 4) * 8);
              mma_16816<T>(acc[2 * np], a, bv[0], bv[1]);
              mma_16816<T>(acc[2 * np + 1], a, bv[2], bv[3]);
            }
          }
        }
      }
    }
    __syncthreads();  // sK / sV are refilled by the next key block
  }

  // ---- Steps 6-7: normaliser and outputs. ----
  if (!warp_active) return;
#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    rowsum0 += __shfl_xor_sync(0xffffffffu, rowsum0, off);
    rowsum1 += __shfl_xor_sync(0xffffffffu, rowsum1, off);
    qn0 += __shfl_xor_sync(0xffffffffu, qn0, off);
    qn1 += __shfl_xor_sync(0xffffffffu, qn1, off);
  }
  const int64_t pos0 = bh * p.S + s0 + t0;  // row index into (B*NH*S)
  store_outputs<T, NT>(p, &acc[0][0], rowsum0 + g0 * qn0, rowsum1 + g1 * qn1, sM[wr + g],
                       sM[wr + g + 8], pos0, t0 < row_end, t1 < row_end, dv0, dvt == 0);
}

}  // namespace mlstm::cuda
