// The sm_80 main loop of the H step (mma.sync; runs on sm_80 and later), one block per
// (batch*head, chunk, tile of up to 64 query rows, tile of BDV columns of DHHV). With the gates
// and stabiliser staged first (hintra_common.cuh), one float accumulator per output collects
//   g[t] * (q_t C_k)          (phase 1: 16-bit inputs on bf16 tensor cores with C as C_hi + C_lo,
//                              g applied after the product; float32 inputs in 3xtf32)
// + sum_s w[t, s] v_s         (phase 2, 16-bit tensor cores or 3xtf32 for float32 inputs)
// with no rescaling. Each warp owns 16 query rows; Q stays in shared memory for both phases.
#pragma once

#include <cuda_runtime.h>

#include "cuda/hintra_common.cuh"

namespace mlstm::cuda {

// Step 7 for this lane's two rows pos0 (global row index into B*NH*S) and pos0 + 8 of an
// m16 x (8 NT) tile, straight from the mma accumulator layout (acc holds the numerator).
template <typename T, int NT>
__device__ __forceinline__ void store_outputs(const HintraParams& p, const float* acc, RowNorm n0,
                                              RowNorm n1, float m0, float m1, int64_t pos0,
                                              bool ok0, bool ok1, int dv0, bool write_nm) {
  const int tq = threadIdx.x % 4;
  const float inv0 = n0.inv, inv1 = n1.inv;
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
    if (ok0) p.vecN[pos0] = n0.den, p.vecM[pos0] = m0;
    if (ok1) p.vecN[pos1] = n1.den, p.vecM[pos1] = m1;
  }
}

// 16-bit inputs: stage of C (kBKC rows of float32, row stride kSC) rewritten in place as bf16
// C_hi | C_lo in each row (hi in its first BDV * 2 bytes, lo in the next; both 16-byte aligned, rows
// an odd number of 16-byte units apart for conflict-free ldmatrix), so that Q C_hi + Q C_lo keeps
// 16 bits of C (tf32 would keep 10: benchmarks/NOTES.md, issue 12's float16 case). stage_tile
// (tile_copy.cuh) gave each row's pieces to lanes of one warp, in the order walked here: each lane
// reads its own pieces (landed, cp_async_wait) and the warp's lanes have all read before any writes.
template <class Tr>
__device__ __forceinline__ void split_c_stage(float* stage) {
  constexpr int kPieces = Tr::kBDV / 4;  // float4 pieces per row
  constexpr int kRowStep = Tr::kThreads / kPieces;
  static_assert(32 % kPieces == 0 && Tr::kBKC % kRowStep == 0, "a row within one warp");
  static_assert((Tr::kSC * 4) % 32 == 16, "odd multiple of 16 bytes between rows");
  const int c = (threadIdx.x % kPieces) * 4;
  float* row = stage + (threadIdx.x / kPieces) * Tr::kSC;
#pragma unroll
  for (int it = 0; it < Tr::kBKC / kRowStep; ++it, row += kRowStep * Tr::kSC) {
    const float4 x = *reinterpret_cast<const float4*>(row + c);
    uint2 hi, lo;
    split_bf16(x.x, x.y, hi.x, lo.x);
    split_bf16(x.z, x.w, hi.y, lo.y);
    __syncwarp();
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(row);
    *reinterpret_cast<uint2*>(out + c) = hi;
    *reinterpret_cast<uint2*>(out + Tr::kBDV + c) = lo;
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) hintra_sm80_kernel(const HintraParams p) {
  using T = typename Tr::T;
  constexpr int NT = Tr::kBDV / 8;  // n-tiles of the output accumulator
  constexpr int KT = Tr::kBKV / 8;  // n-tiles of the score accumulator
  static_assert(KT == 8, "weigh_scores takes 64 keys at a time");
  extern __shared__ __align__(16) unsigned char smem[];
  const SmemLayout lay = make_smem_layout<Tr>(p.DHQK, p.L);
  T* sQ = reinterpret_cast<T*>(smem + lay.q_off);
  T* sK = reinterpret_cast<T*>(smem + lay.k_off);
  T* sV = reinterpret_cast<T*>(smem + lay.v_off);
  float* sC = reinterpret_cast<float*>(smem + lay.c_off);
  float* sN = reinterpret_cast<float*>(smem + lay.n_off);
  const GateScratch gs = gate_scratch(smem, lay.gate_off, lay.row_off, round_up(p.L, Tr::kBKV), Tr::kBLQ);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tq = lane % 4;

  const Tile tile = tile_of_block(p, p.rows_per_block, Tr::kBDV);
  const int dvt = tile.dvt, row0 = tile.row0, rows_valid = tile.rows_valid, row_end = tile.row_end;
  const int dv0 = tile.dv0, dv_valid = tile.dv_valid;
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, s0 = tile.s0;
  const int chunk = tile.chunk;
  const int DQKp = lay.dqk_pad;

  // Q tile -> shared memory (async; overlaps the gate arithmetic).
  const T* gQ = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + (s0 + row0) * p.q_ss;
  load_tile<T>(sQ, lay.sq, gQ, p.q_ss, Tr::kBLQ, DQKp, rows_valid, p.DHQK, p.q_vec);
  cp_async_commit();

  const bool wide = stage_gates<Tr::kBLQ>(p, tile, gs);

  const int wr = warp * 16;  // warp's first row in the tile
  const bool warp_active = wr < rows_valid;
  const int warp_last_row = row0 + min(wr + 15, rows_valid - 1);  // in-chunk index
  const float g0 = gs.row_g[wr + g], g1 = gs.row_g[wr + g + 8];

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
      // 16-bit inputs: unrolled for the block, in the order split_c_stage walks (rolled, this copy
      // and the split took about a third of the kernel's instructions at DHQK = 256: ncu, NOTES).
      // float32 keeps the rolled loop: with its copies unrolled its kernel measured 1.4x slower.
      if constexpr (Tr::kIsFloat) {
        load_tile<float>(dst, Tr::kSC, gC + d0 * p.C_sr, p.C_sr, Tr::kBKC, Tr::kBDV, p.DHQK - d0,
                         dv_valid, p.c_vec);
      } else {
        stage_tile<float, Tr::kBKC, Tr::kBDV, Tr::kThreads>(dst, Tr::kSC, gC + d0 * p.C_sr, p.C_sr,
                                                           p.DHQK - d0, dv_valid, p.c_vec);
      }
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
      if constexpr (!Tr::kIsFloat) split_c_stage<Tr>(sC + (kc & 1) * Tr::kBKC * Tr::kSC);
      __syncthreads();
      const float* cb = sC + (kc & 1) * Tr::kBKC * Tr::kSC;
      const float* nb = sN + (kc & 1) * Tr::kBKC;
      const int kvalid = min(Tr::kBKC, DQKp - kc * Tr::kBKC);
      if (warp_active) {
        if constexpr (Tr::kIsFloat) {
#pragma unroll
          for (int kk = 0; kk < Tr::kBKC; kk += 8) {
            if (kk < kvalid) {
              // k is permuted: mma k index tq <-> column 2tq, tq+4 <-> 2tq+1 (same in A and B).
              const int col = kc * Tr::kBKC + kk + 2 * tq;
              const float2 x0 = *reinterpret_cast<const float2*>(sQ + (wr + g) * lay.sq + col);
              const float2 x1 = *reinterpret_cast<const float2*>(sQ + (wr + g + 8) * lay.sq + col);
              const float n0 = nb[kk + 2 * tq], n1 = nb[kk + 2 * tq + 1];
              qn0 = fmaf(x0.x, n0, fmaf(x0.y, n1, qn0));
              qn1 = fmaf(x1.x, n0, fmaf(x1.y, n1, qn1));
              const float* c0 = cb + (kk + 2 * tq) * Tr::kSC + g;
              const float* c1 = c0 + Tr::kSC;
              const Tf32Split a[4] = {split_tf32(g0 * x0.x), split_tf32(g1 * x1.x),
                                      split_tf32(g0 * x0.y), split_tf32(g1 * x1.y)};
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)
                mma_1688_3xtf32(acc[nt], a, split_tf32(c0[nt * 8]), split_tf32(c1[nt * 8]));
            }
          }
        } else {
#pragma unroll
          for (int kk = 0; kk < Tr::kBKC; kk += 16) {
            if (kk < kvalid) {
              const int col = kc * Tr::kBKC + kk;
#pragma unroll
              for (int half = 0; half < 16; half += 8) {  // q . n in float, 2 columns per lane
                const T* r0 = sQ + (wr + g) * lay.sq + col + half + 2 * tq;
                const T* r1 = r0 + 8 * lay.sq;
                const float n0 = nb[kk + half + 2 * tq], n1 = nb[kk + half + 2 * tq + 1];
                qn0 = fmaf(to_float(r0[0]), n0, fmaf(to_float(r0[1]), n1, qn0));
                qn1 = fmaf(to_float(r1[0]), n0, fmaf(to_float(r1[1]), n1, qn1));
              }
              // A = Q, exactly in bf16: bfloat16 Q as it is, float16 Q as hi + lo (11 bits fit).
              uint32_t a[4], a_lo[4];
              ldmatrix_x4(a, sQ + (wr + (lane & 15)) * lay.sq + col + (lane >> 4) * 8);
              if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                  const float2 f = unpack2<__half>(a[i]);
                  split_bf16(f.x, f.y, a[i], a_lo[i]);
                }
              }
              const __nv_bfloat16* hi = reinterpret_cast<const __nv_bfloat16*>(cb) +
                                        (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * (2 * Tr::kSC) +
                                        (lane >> 4) * 8;
#pragma unroll
              for (int np = 0; np < NT / 2; ++np) {
                uint32_t bh[4], bl[4];
                ldmatrix_x4_trans(bh, hi + np * 16);
                ldmatrix_x4_trans(bl, hi + Tr::kBDV + np * 16);
                mma_16816<__nv_bfloat16>(acc[2 * np], a, bh[0], bh[1]);
                mma_16816<__nv_bfloat16>(acc[2 * np + 1], a, bh[2], bh[3]);
                mma_16816<__nv_bfloat16>(acc[2 * np], a, bl[0], bl[1]);
                mma_16816<__nv_bfloat16>(acc[2 * np + 1], a, bl[2], bl[3]);
                if constexpr (std::is_same_v<T, __half>) {
                  mma_16816<__nv_bfloat16>(acc[2 * np], a_lo, bh[0], bh[1]);
                  mma_16816<__nv_bfloat16>(acc[2 * np + 1], a_lo, bh[2], bh[3]);
                }
              }
            }
          }
        }
      }
      __syncthreads();  // the buffer is refilled two iterations on
    }
    if constexpr (!Tr::kIsFloat) {
      // 16-bit inputs: the inter factor g of each row after the product (not rounded into Q).
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) acc[nt][0] *= g0, acc[nt][1] *= g0, acc[nt][2] *= g1, acc[nt][3] *= g1;
    }
  }

  // ---- Phase 2, intra-chunk term over the causal key blocks. ----
  float rowsum0 = 0.f, rowsum1 = 0.f;
  const RowGate r0 = row_gate(gs, tile, wr + g), r1 = row_gate(gs, tile, wr + g + 8);
  const int n_kb = (row_end + Tr::kBKV - 1) / Tr::kBKV;
  const int n_kk = (DQKp + Tr::kBKK - 1) / Tr::kBKK;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + s0 * p.k_ss;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + s0 * p.v_ss + dv0;
  // The key loop, compiled twice: the exact exponents of wide chunks stay out of the common path.
  auto key_loop = [&](auto wide_tag) {
    constexpr bool kWide = decltype(wide_tag)::value;
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
        // Step 5: w = qk_scale * (q.k) * exp(D - F), causal; row sums before any rounding.
        weigh_scores<kWide>(&sacc[0][0], kb0, row_end, r0, r1, gs, p.qk_scale, rowsum0, rowsum1);
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
  };
  if (wide) {
    key_loop(std::true_type{});
  } else {
    key_loop(std::false_type{});
  }

  // ---- Steps 6-7: normaliser and outputs; a non-finite tile is recomputed exactly. ----
  bool bad = false;
  if (warp_active) {
    rowsum0 = quad_sum(rowsum0), rowsum1 = quad_sum(rowsum1);
    qn0 = quad_sum(qn0), qn1 = quad_sum(qn1);
    const int ra = wr + g, rb = ra + 8;
    const RowNorm n0 = row_normaliser(rowsum0 + g0 * qn0, gs.row_m[ra], gs.row_d[ra], p.eps, p.n_signed);
    const RowNorm n1 = row_normaliser(rowsum1 + g1 * qn1, gs.row_m[rb], gs.row_d[rb], p.eps, p.n_signed);
    if (tq == 0) gs.row_inv[ra] = n0.inv, gs.row_inv[rb] = n1.inv;
    const int64_t pos0 = bh * p.S + s0 + r0.t;  // row index into (B*NH*S)
    store_outputs<T, NT>(p, &acc[0][0], n0, n1, gs.row_m[ra], gs.row_m[rb], pos0, r0.t < row_end, r1.t < row_end,
                         dv0, dvt == 0);
#pragma unroll
    for (int i = 0; i < NT; ++i)
      bad |= !(isfinite(acc[i][0]) && isfinite(acc[i][1]) && isfinite(acc[i][2]) && isfinite(acc[i][3]));
  }
  if (__syncthreads_or(bad)) recompute_tile_exactly<T>(p, tile, gs, wide, Tr::kBDV);
}

}  // namespace mlstm::cuda
