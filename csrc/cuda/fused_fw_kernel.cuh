// The fused forward kernel (fused_fw_params.h): one block per (b*h, 64 DHHV columns) walks the
// chunks (of 64 or 128 positions) in order. Per chunk k, with chunk k + 1's K and V in flight:
//   1. C_k (mma accumulators) goes to shared memory as bf16 hi | lo, n_k as three bf16 terms in
//      the rows' pad (n_terms: exact), so that q . n_k is one more mma per k-step. The H step's
//      gate terms that do not depend on the state come made for every chunk (fused_fw_gates.cu)
//      and load with K and V; the rows' terms with m_k were made during chunk k - 1's state
//      update (row_exponents, hintra_common.cuh): no gate scan, one barrier.
//   2. The chunk's H rows: the sm_80 H step's stages (g Q C_k + W V, q . n_k, the normaliser),
//      each warp 16 rows x 32 columns (16 at DHQK 256), S = Q K^T once per row strip (its warps
//      share W through shared memory); H, vecN, vecM written.
//   3. The state update in the accumulators, the states kernel's own steps (start_chunk,
//      state_kstep; states_kernel.cuh):
//      m_{k+1} = max(g_k + m_k, max_s a[s]), C <- e^{g_k + m_k - m_{k+1}} C + K^T diag(w) V, with
//      k w split into hi + lo halves; chunk k + 1's Q loads meanwhile.
// Every block of a (b, h) runs the same scalar recurrence for m. The products are those of the
// two kernels, except that Q C_k reads C_k split from the accumulators instead of from memory and
// q . n_k is summed by the tensor cores (exact products, float32 sums in another order).
// Tiles whose outputs come out non-finite are recomputed exactly, as in the H step.
#pragma once

#include <cuda_runtime.h>

#include "cuda/fused_fw_params.h"
#include "cuda/hintra_sm80.cuh"
#include "cuda/states_kernel.cuh"

namespace mlstm::cuda {

// The kThreads threads of H-row strip hs (warps hs, hs + kHStrips, ...) meet: named barrier 1 + hs
// (immediate ids, so that ptxas reserves only the barriers a kernel uses, not all sixteen).
template <int kThreads>
__device__ __forceinline__ void strip_sync(int hs) {
  switch (hs) {
    case 0: asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory"); break;
    case 1: asm volatile("bar.sync 2, %0;\n" ::"n"(kThreads) : "memory"); break;
    case 2: asm volatile("bar.sync 3, %0;\n" ::"n"(kThreads) : "memory"); break;
    case 3: asm volatile("bar.sync 4, %0;\n" ::"n"(kThreads) : "memory"); break;
    case 4: asm volatile("bar.sync 5, %0;\n" ::"n"(kThreads) : "memory"); break;
    case 5: asm volatile("bar.sync 6, %0;\n" ::"n"(kThreads) : "memory"); break;
    case 6: asm volatile("bar.sync 7, %0;\n" ::"n"(kThreads) : "memory"); break;
    default: asm volatile("bar.sync 8, %0;\n" ::"n"(kThreads) : "memory"); break;
  }
}

// n_k for the tensor cores: three bf16 terms, each the truncation of what the ones before left,
// so hi + mid + lo is n_k exactly (3 x 8 bits); a non-finite n_k stays in hi alone, so that its
// NaN or Inf reaches q . n_k as it would in float32. Columns 0-2 of C_k's 8-column pad.
__device__ __forceinline__ uint4 n_terms(float x) {
  const bool fin = isfinite(x);
  const __nv_bfloat16 hi = __float2bfloat16_rz(x);
  const float r1 = fin ? x - __bfloat162float(hi) : 0.f;
  const __nv_bfloat16 mid = __float2bfloat16_rz(r1);
  const __nv_bfloat16 lo = __float2bfloat16_rz(r1 - __bfloat162float(mid));
  const __nv_bfloat16 zero = __float2bfloat16(0.f);
  return make_uint4(bf16x2_bits(__halves2bfloat162(hi, mid)), bf16x2_bits(__halves2bfloat162(lo, zero)), 0u, 0u);
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) fused_fw_kernel(const FusedFwParams fp) {
  using T = typename Tr::T;
  constexpr int kL = Tr::kL;
  constexpr int kCG = Tr::kColGroups, kNTH = Tr::kHCols / 8;  // column groups, n-tiles of H per warp
  constexpr int kNTS = Tr::kSCols / 8;                        // n-tiles of C per warp
  const HintraParams& p = fp.h;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  __nv_bfloat16* sC = reinterpret_cast<__nv_bfloat16*>(smem + Tr::kCOff);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, tq = lane % 4;
  const int dvt = static_cast<int>(blockIdx.x % fp.n_dvt);
  const int64_t bh = blockIdx.x / fp.n_dvt, b = bh / p.NH, h = bh % p.NH;
  const int dv0 = dvt * Tr::kBDV;
  const int dv_valid = p.DHHV - dv0;  // > 0; may pass the tile

  // ---- The state: strip ss (rows 16 ss + g, + 8), kSCols columns from sc0 (m16n8 layout). ----
  const int ss = warp % Tr::kSStrips, sc0 = (warp / Tr::kSStrips) * Tr::kSCols;
  const int r0 = ss * 16 + g;  // this lane's rows r0, r0 + 8 of C
  float acc[kNTS][4];
#pragma unroll
  for (int nt = 0; nt < kNTS; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e < 2 ? r0 : r0 + 8, col = dv0 + sc0 + nt * 8 + 2 * tq + (e & 1);
      acc[nt][e] = (fp.C0 != nullptr && row < p.DHQK && col < p.DHHV)
                       ? fp.C0[b * fp.C0_sb + h * fp.C0_sh + row * fp.C0_sr + col * fp.C0_sc]
                       : 0.f;
    }
  }
  // n: per-lane partial sums of rows r0, r0 + 8 (the quad's sum is the state; every column group
  // of a strip computes the same, group 0's is used).
  float n_part[2] = {0.f, 0.f};
  if (fp.n0 != nullptr && tq == 0) {
    const float* n0 = fp.n0 + b * fp.n0_sb + h * fp.n0_sh;
    if (r0 < p.DHQK) n_part[0] = n0[r0 * fp.n0_sr];
    if (r0 + 8 < p.DHQK) n_part[1] = n0[(r0 + 8) * fp.n0_sr];
  }
  float m = fp.m0 != nullptr ? fp.m0[b * fp.m0_sb + h * fp.m0_sh] : 0.f;

  // ---- Loads: Q (one buffer, refilled during the state update), K, V, a, (g, max a) (two). ----
  const T* gQ = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + dv0;
  const float* gA = fp.a + bh * p.S;
  const float2* gGM = fp.gm + bh * p.NC;
  constexpr int kHG = fused_gate_floats(kL);
  const float* gHG = fp.hg + bh * p.NC * kHG;  // the chunks' gate terms (fused_fw_gates.cu)
  auto stage = [&](int buf) { return smem + Tr::kStageOff + buf * Tr::kStageBytes; };
  auto issue_q = [&](int k) {
    stage_tile<T, kL, Tr::kDQK, Tr::kThreads>(sQ, Tr::kSQ, gQ + static_cast<int64_t>(k) * kL * p.q_ss,
                                              p.q_ss, kL, p.DHQK, p.q_vec);
  };
  auto issue_kv = [&](int k, int buf) {
    unsigned char* st = stage(buf);
    const int64_t t0 = static_cast<int64_t>(k) * kL;
    stage_tile<T, kL, Tr::kDQK, Tr::kThreads>(reinterpret_cast<T*>(st), Tr::kSQ, gK + t0 * p.k_ss, p.k_ss,
                                              kL, p.DHQK, p.k_vec);
    stage_tile<T, kL, Tr::kBDV, Tr::kThreads>(reinterpret_cast<T*>(st + Tr::kKBytes), Tr::kSV,
                                              gV + t0 * p.v_ss, p.v_ss, kL, dv_valid, p.v_vec);
    float* sa = reinterpret_cast<float*>(st + Tr::kKBytes + Tr::kVBytes);
    if (tid < kL) cp_async_4(sa + tid, gA + t0 + tid, 4);
    if (tid < 2) cp_async_4(sa + kL + tid, reinterpret_cast<const float*>(gGM + k) + tid, 4);
    // The gate terms of the H rows (16-byte blocks).
    float* shg = sa + Tr::kHGOff / 4;
    const float* ghg = gHG + static_cast<int64_t>(k) * kHG;
    for (int j = tid; j < kHG / 4; j += Tr::kThreads) cp_async_16(shg + 4 * j, ghg + 4 * j, 16);
  };
  // The gate scratch of the chunk in stage buf: its key terms in the stage, its rows in row buffer
  // buf (made by make_rows during the chunk before, or before the loop).
  auto gates_of = [&](int buf) {
    GateScratch gs;
    float* hg = reinterpret_cast<float*>(stage(buf) + Tr::kKBytes + Tr::kVBytes + Tr::kHGOff);
    gs.bg = hg, gs.bg_lo = hg + kL, gs.col_a = hg + 2 * kL, gs.col_b = hg + 3 * kL;
    float* rows = reinterpret_cast<float*>(smem + Tr::kRowOff + buf * Tr::kRowBytes);
    gs.row_a = rows, gs.row_g = rows + kL, gs.row_m = rows + 2 * kL, gs.row_d = rows + 3 * kL;
    gs.row_inv = rows + 4 * kL;
    return gs;
  };
  // Steps 3-4 of chunk k's rows with the state's m_prev (thread t: row t), from the terms
  // (bg[t], m_intra[t], wide) that the caller loaded ahead from global memory.
  auto make_rows = [&](int buf, float bg, float m_intra, float wide_flag, float m_prev) {
    if (tid < kL) {
      const RowExp e = row_exponents(bg, m_intra, m_prev, wide_flag != 0.f, p.qk_scale);
      const GateScratch gs = gates_of(buf);
      gs.row_a[tid] = e.a, gs.row_g[tid] = e.g, gs.row_m[tid] = e.m, gs.row_d[tid] = e.d;
    }
  };
  auto row_terms = [&](int k, float& bg, float& m_intra, float& wide_flag) {
    if (tid < kL) {
      const float* hg = gHG + static_cast<int64_t>(k) * kHG;
      bg = hg[tid], m_intra = hg[4 * kL + tid], wide_flag = hg[5 * kL];
    }
  };
  issue_q(0);
  issue_kv(0, 0);
  cp_async_commit();
  {
    float bg = 0.f, mi = 0.f, wf = 0.f;
    row_terms(0, bg, mi, wf);
    make_rows(0, bg, mi, wf, m);
  }

  // The H rows of this warp: row strip hs, column group cg (kHCols columns from hc).
  const int hs = warp % Tr::kHStrips, cg = warp / Tr::kHStrips, hc = cg * Tr::kHCols;
  const int wr = hs * 16;
  float* sRS = reinterpret_cast<float*>(smem + Tr::kRSOff);  // [row][cg]: the groups' row sums
  Tile tile{};
  tile.dvt = dvt, tile.qt = 0, tile.bh = bh, tile.b = b, tile.h = h;
  tile.row0 = 0, tile.rows_valid = kL, tile.row_end = kL, tile.dv0 = dv0, tile.dv_valid = dv_valid;

  for (int k = 0; k < p.NC; ++k) {
    const int buf = k & 1;
    cp_async_wait<0>();  // chunk k's Q, K, V, a
    __syncthreads();     // everyone's have landed; everyone is done with chunk k - 1
    if (k + 1 < p.NC) issue_kv(k + 1, buf ^ 1);
    cp_async_commit();
    const unsigned char* st = stage(buf);
    const T* sK = reinterpret_cast<const T*>(st);
    const T* sV = reinterpret_cast<const T*>(st + Tr::kKBytes);
    const float* sa = reinterpret_cast<const float*>(st + Tr::kKBytes + Tr::kVBytes);
    const GateScratch gs = gates_of(buf);
    const bool wide = sa[Tr::kHGOff / 4 + 5 * kL] != 0.f;

    // 1. C_k and n_k for the H rows.
#pragma unroll
    for (int nt = 0; nt < kNTS; ++nt) {
      const int col = sc0 + nt * 8 + 2 * tq;
      uint32_t hi, lo;
      split_bf16(acc[nt][0], acc[nt][1], hi, lo);
      *reinterpret_cast<uint32_t*>(sC + r0 * Tr::kSC + col) = hi;
      *reinterpret_cast<uint32_t*>(sC + r0 * Tr::kSC + Tr::kBDV + col) = lo;
      split_bf16(acc[nt][2], acc[nt][3], hi, lo);
      *reinterpret_cast<uint32_t*>(sC + (r0 + 8) * Tr::kSC + col) = hi;
      *reinterpret_cast<uint32_t*>(sC + (r0 + 8) * Tr::kSC + Tr::kBDV + col) = lo;
    }
    {
      const float s0 = quad_sum(n_part[0]), s1 = quad_sum(n_part[1]);
      if (tq == 0 && sc0 == 0) {
        *reinterpret_cast<uint4*>(sC + r0 * Tr::kSC + 2 * Tr::kBDV) = n_terms(s0);
        *reinterpret_cast<uint4*>(sC + (r0 + 8) * Tr::kSC + 2 * Tr::kBDV) = n_terms(s1);
      }
    }
    tile.chunk = k;
    tile.s0 = static_cast<int64_t>(k) * kL;
    __syncthreads();  // C_k and n_k are in place

    // 2. The H rows: acc_h = g (Q C_k) + W V, 16 rows x kHCols columns per warp.
    float acc_h[kNTH][4];
#pragma unroll
    for (int i = 0; i < kNTH; ++i) acc_h[i][0] = acc_h[i][1] = acc_h[i][2] = acc_h[i][3] = 0.f;
    float acc_n[4] = {0.f, 0.f, 0.f, 0.f};  // q . (n_k's three terms), columns 0-2
    const float g0 = gs.row_g[wr + g], g1 = gs.row_g[wr + g + 8];
#pragma unroll
    for (int kk = 0; kk < Tr::kDQK; kk += 16) {
      if (kk < p.DHQK) {
        uint32_t a[4], a_lo[4];
        ldmatrix_x4(a, sQ + (wr + (lane & 15)) * Tr::kSQ + kk + (lane >> 4) * 8);
        if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = unpack2<__half>(a[i]);
            split_bf16(f.x, f.y, a[i], a_lo[i]);
          }
        }
        uint32_t bn[2];
        ldmatrix_x2_trans(bn, sC + (kk + (lane & 15)) * Tr::kSC + 2 * Tr::kBDV);
        mma_16816<__nv_bfloat16>(acc_n, a, bn[0], bn[1]);
        if constexpr (std::is_same_v<T, __half>) mma_16816<__nv_bfloat16>(acc_n, a_lo, bn[0], bn[1]);
        const __nv_bfloat16* c = sC + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * Tr::kSC + hc + (lane >> 4) * 8;
#pragma unroll
        for (int np = 0; np < kNTH / 2; ++np) {
          uint32_t bh4[4], bl4[4];
          ldmatrix_x4_trans(bh4, c + np * 16);
          ldmatrix_x4_trans(bl4, c + Tr::kBDV + np * 16);
          mma_16816<__nv_bfloat16>(acc_h[2 * np], a, bh4[0], bh4[1]);
          mma_16816<__nv_bfloat16>(acc_h[2 * np + 1], a, bh4[2], bh4[3]);
          mma_16816<__nv_bfloat16>(acc_h[2 * np], a, bl4[0], bl4[1]);
          mma_16816<__nv_bfloat16>(acc_h[2 * np + 1], a, bl4[2], bl4[3]);
          if constexpr (std::is_same_v<T, __half>) {
            mma_16816<__nv_bfloat16>(acc_h[2 * np], a_lo, bh4[0], bh4[1]);
            mma_16816<__nv_bfloat16>(acc_h[2 * np + 1], a_lo, bh4[2], bh4[3]);
          }
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNTH; ++nt) acc_h[nt][0] *= g0, acc_h[nt][1] *= g0, acc_h[nt][2] *= g1, acc_h[nt][3] *= g1;

    // S = Q K^T once per row strip: its kCG warps take the 16-key blocks cg, cg + kCG, ...
    // (causal: up to block hs), weigh them (step 5), and leave W in the strip's own Q rows (free
    // once all have read them) and their row sums in sRS; then each warp adds W V for its columns.
    float rowsum0 = 0.f, rowsum1 = 0.f;
    const RowGate rg0 = row_gate(gs, tile, wr + g), rg1 = row_gate(gs, tile, wr + g + 8);
    auto intra = [&](auto wide_tag) {
      constexpr bool kWide = decltype(wide_tag)::value;
      constexpr int kKB = Tr::kHStrips / kCG;  // key blocks per warp
      float sacc[kKB][2][4];        // key block cg + kCG j, its two n-tiles of 8 keys
#pragma unroll
      for (int j = 0; j < kKB; ++j) {
#pragma unroll
        for (int i = 0; i < 2; ++i) sacc[j][i][0] = sacc[j][i][1] = sacc[j][i][2] = sacc[j][i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < Tr::kDQK; kk += 16) {
        if (kk < p.DHQK && cg <= hs) {
          uint32_t a[4];
          ldmatrix_x4(a, sQ + (wr + (lane & 15)) * Tr::kSQ + kk + (lane >> 4) * 8);
#pragma unroll
          for (int j = 0; j < kKB; ++j) {
            const int kb = cg + kCG * j;
            if (kb <= hs) {
              uint32_t bk[4];
              ldmatrix_x4(bk, sK + (kb * 16 + (lane & 7) + ((lane >> 4) << 3)) * Tr::kSQ + kk + ((lane >> 3) & 1) * 8);
              mma_16816<T>(sacc[j][0], a, bk[0], bk[1]);
              mma_16816<T>(sacc[j][1], a, bk[2], bk[3]);
            }
          }
        }
      }
      float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
      for (int j = 0; j < kKB; ++j) {
        const int kb = cg + kCG * j;
        if (kb <= hs) weigh_scores<kWide, 2>(&sacc[j][0][0], kb * 16, kL, rg0, rg1, gs, p.qk_scale, rs0, rs1);
      }
      strip_sync<32 * kCG>(hs);  // both warps of the strip have read its Q rows
#pragma unroll
      for (int j = 0; j < kKB; ++j) {
        const int kb = cg + kCG * j;
        if (kb <= hs) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            T* w0 = sQ + (wr + g) * Tr::kSQ + kb * 16 + nt * 8 + 2 * tq;
            *reinterpret_cast<uint32_t*>(w0) = pack2<T>(sacc[j][nt][0], sacc[j][nt][1]);
            *reinterpret_cast<uint32_t*>(w0 + 8 * Tr::kSQ) = pack2<T>(sacc[j][nt][2], sacc[j][nt][3]);
          }
        }
      }
      rs0 = quad_sum(rs0), rs1 = quad_sum(rs1);
      if (tq == 0) sRS[(wr + g) * kCG + cg] = rs0, sRS[(wr + g + 8) * kCG + cg] = rs1;
      strip_sync<32 * kCG>(hs);  // W and the row sums are in place
      rowsum0 = 0.f, rowsum1 = 0.f;
#pragma unroll
      for (int c = 0; c < kCG; ++c) rowsum0 += sRS[(wr + g) * kCG + c], rowsum1 += sRS[(wr + g + 8) * kCG + c];
#pragma unroll
      for (int kt = 0; kt < Tr::kHStrips; ++kt) {
        if (kt <= hs) {
          uint32_t a[4];
          ldmatrix_x4(a, sQ + (wr + (lane & 15)) * Tr::kSQ + kt * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int np = 0; np < kNTH / 2; ++np) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, sV + (kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tr::kSV + hc + np * 16 +
                                      (lane >> 4) * 8);
            mma_16816<T>(acc_h[2 * np], a, bv[0], bv[1]);
            mma_16816<T>(acc_h[2 * np + 1], a, bv[2], bv[3]);
          }
        }
      }
    };
    if (wide) {
      intra(std::true_type{});
    } else {
      intra(std::false_type{});
    }
    bool bad = false;
    {
      const float qn0 = quad_sum(acc_n[0] + acc_n[1]), qn1 = quad_sum(acc_n[2] + acc_n[3]);
      const int ra = wr + g, rb = ra + 8;
      const RowNorm nr0 = row_normaliser(rowsum0 + g0 * qn0, gs.row_m[ra], gs.row_d[ra], p.eps, p.n_signed);
      const RowNorm nr1 = row_normaliser(rowsum1 + g1 * qn1, gs.row_m[rb], gs.row_d[rb], p.eps, p.n_signed);
      if (tq == 0) gs.row_inv[ra] = nr0.inv, gs.row_inv[rb] = nr1.inv;  // both column halves: same values
      const int64_t pos0 = bh * p.S + tile.s0 + ra;
      store_outputs<T, kNTH>(p, &acc_h[0][0], nr0, nr1, gs.row_m[ra], gs.row_m[rb], pos0, true, true, dv0 + hc,
                             dvt == 0 && cg == 0);
#pragma unroll
      for (int i = 0; i < kNTH; ++i)
        bad |= !(isfinite(acc_h[i][0]) && isfinite(acc_h[i][1]) && isfinite(acc_h[i][2]) && isfinite(acc_h[i][3]));
    }

    // 3. The state update; chunk k + 1's Q loads meanwhile (everyone is done with sQ). A tile with
    // non-finite outputs is first recomputed exactly, as the H step does, with C_k = hi + lo.
    const bool any_bad = __syncthreads_or(bad);
    if (k + 1 < p.NC) issue_q(k + 1);
    cp_async_commit();
    float next_bg = 0.f, next_mi = 0.f, next_wf = 0.f;  // in flight during the update
    if (k + 1 < p.NC) row_terms(k + 1, next_bg, next_mi, next_wf);
    if (any_bad) {
      recompute_tile_exactly<T>(p, tile, gs, wide, Tr::kBDV, [&](int d, int col) {
        const __nv_bfloat16* row = sC + d * Tr::kSC + (col - dv0);
        return __bfloat162float(row[0]) + __bfloat162float(row[Tr::kBDV]);
      });
    }
    start_chunk(sa[kL], sa[kL + 1], m, acc, n_part);
    // w[s] = exp(a[s] - m_{k+1}): lane l holds w[l + 32 q]; fragments fetch theirs by shuffle (the
    // positions of one k-step never straddle 32, so q is the same in every lane).
    float wl[kL / 32];
#pragma unroll
    for (int q = 0; q < kL / 32; ++q) wl[q] = expf(sa[q * 32 + lane] - m);
#pragma unroll
    for (int ks = 0; ks < kL / 16; ++ks) {
      const float wq = wl[ks / 2];
      const int s0 = (ks * 16 + 2 * tq) & 31;
      const float w0 = __shfl_sync(0xffffffffu, wq, s0), w1 = __shfl_sync(0xffffffffu, wq, s0 + 1);
      const float w8 = __shfl_sync(0xffffffffu, wq, s0 + 8), w9 = __shfl_sync(0xffffffffu, wq, s0 + 9);
      state_kstep<T, kNTS, Tr::kLoFirst>(acc, n_part,
                           sK + (ks * 16 + (lane & 7) + ((lane >> 4) << 3)) * Tr::kSQ + ss * 16 + ((lane >> 3) & 1) * 8,
                           sV + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tr::kSV + sc0 + (lane >> 4) * 8,
                           w0, w1, w8, w9, dv_valid - sc0);
    }
    // Chunk k + 1's rows, with m_{k+1}: row buffer buf ^ 1 was last read during chunk k - 1.
    if (k + 1 < p.NC) make_rows(buf ^ 1, next_bg, next_mi, next_wf, m);
  }

  // ---- The last state: C (every block its tile), n (DHHV tile 0), m (tile 0, one thread). ----
  float* Cb = fp.C_last + bh * p.DHQK * p.DHHV;
#pragma unroll
  for (int nt = 0; nt < kNTS; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e < 2 ? r0 : r0 + 8, col = dv0 + sc0 + nt * 8 + 2 * tq + (e & 1);
      if (row < p.DHQK && col < p.DHHV) Cb[static_cast<int64_t>(row) * p.DHHV + col] = acc[nt][e];
    }
  }
  const float s0 = quad_sum(n_part[0]), s1 = quad_sum(n_part[1]);
  if (dvt == 0 && sc0 == 0 && tq == 0) {
    if (r0 < p.DHQK) fp.n_last[bh * p.DHQK + r0] = s0;
    if (r0 + 8 < p.DHQK) fp.n_last[bh * p.DHQK + r0 + 8] = s1;
  }
  if (dvt == 0 && tid == 0) fp.m_last[bh] = m;
}

}  // namespace mlstm::cuda
