// The H-step kernel for 16-bit inputs on Hopper (sm_90a). Same tiles and arithmetic as
// hintra_sm80.cuh (one block per (batch*head, chunk, 64 query rows, BDV columns of DHHV), gates
// and stabiliser from stage_gates, one float accumulator), but the three products are warpgroup
// MMAs (wgmma) issued once for the whole 64-row tile instead of per warp and per 8 columns:
//
//   Q C   : C arrives as float32 and is split in shared memory into C_hi + C_lo, both bf16, so
//           Q C_hi + Q C_lo keeps 16 bits of C's mantissa (tf32 keeps 10). float16 Q is split the
//           same way (exactly: 11 bits fit in hi + lo) and Q_lo C_hi is added. q . n_k is summed
//           in float32 beside it (the normaliser may cancel, and 16 bits of n measured up to 30x
//           the sm_80 kernel's H error there: benchmarks/NOTES.md).
//   Q K^T : 16-bit operands as they come, both read from shared memory.
//   P V   : P (the weights, rounded to the input dtype as in the sm_80 kernel) from registers.
//
// Q's A fragments for Q C come from ldmatrix; every shared-memory operand (Q, K, V, C halves)
// sits in the no-swizzle core-matrix layout (wgmma.cuh).
#pragma once

#include "cuda/hintra_common.cuh"
#include "cuda/wgmma.cuh"

namespace mlstm::cuda {

// Byte offset of element (r, c) of a tile with `chunks` 16-byte chunks per row in the core-matrix
// layout: 8 rows x 16 bytes contiguous, the chunks of one 8-row group side by side.
__device__ __forceinline__ int core_off(int r, int c_chunk, int chunks) {
  return ((r >> 3) * chunks + c_chunk) * 128 + (r & 7) * 16;
}

// 64 rows x cols (16-bit) tile from global memory into the core-matrix layout, zero outside
// rows_valid x cols_valid. Thread idx takes chunk pair bit idx & 1 and row bits (idx >> 1) & 7, so
// an 8-thread phase of 16-byte copies reads 4 rows x 32 bytes (whole sectors) and writes 4 core
// rows in two core matrices (a 2-way bank conflict at most).
template <typename T>
__device__ __forceinline__ void load_core_tile(unsigned char* s, const T* g, int64_t g_stride,
                                               int cols, int rows_valid, int cols_valid, bool vec) {
  const int chunks = cols / 8;  // a multiple of 2
  for (int idx = threadIdx.x; idx < 64 * chunks; idx += blockDim.x) {
    const int c = (idx & 1) + 2 * ((idx >> 4) % (chunks / 2));
    const int r = ((idx >> 1) & 7) + 8 * ((idx >> 4) / (chunks / 2));
    T* dst = reinterpret_cast<T*>(s + core_off(r, c, chunks));
    const T* src = g + r * g_stride + c * 8;
    if (r >= rows_valid || c * 8 >= cols_valid) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else if (vec && c * 8 + 8 <= cols_valid) {
      cp_async_16(dst, src, 16);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = (c * 8 + e < cols_valid) ? src[e] : from_float<T>(0.f);
    }
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    hintra_sm90_kernel(const HintraParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int BDV = Tr::kBDV, NT = BDV / 8;
  constexpr int kPiecesPerThread = Tr::kCPieces / Tr::kThreads;
  extern __shared__ __align__(128) unsigned char smem_sm90[];
  unsigned char* smem = smem_sm90;
  const Sm90Layout lay = make_sm90_layout<Tr>(p.DHQK, p.L);
  const GateScratch gs = gate_scratch(smem, lay.gate_off, lay.row_off, round_up(p.L, Tr::kKeys), Tr::kRows);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tq = lane % 4;

  const Tile tile = tile_of_block(p, Tr::kRows, BDV);
  const int dvt = tile.dvt, chunk = tile.chunk;
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, s0 = tile.s0;
  const int row0 = tile.row0, rows_valid = tile.rows_valid, row_end = tile.row_end;
  const int dv0 = tile.dv0, dv_valid = tile.dv_valid;
  const int DQKp = lay.dqk_pad;
  const int wr = warp * 16;
  // Q tile -> shared memory, core-matrix layout: A of Q K^T from shared memory, ldmatrix for Q C.
  const T* gQ = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + (s0 + row0) * p.q_ss;
  load_core_tile<T>(smem + lay.q_off, gQ, p.q_ss, DQKp, rows_valid, p.DHQK, p.q_vec);
  cp_async_commit();
  const int q_chunks = DQKp / 8;
  // This lane's ldmatrix row address for the A fragment of k step ks (16 rows of its warp).
  auto q_frag_addr = [&](int ks) {
    return smem + lay.q_off + core_off(wr + (lane & 15), 2 * ks + (lane >> 4), q_chunks);
  };

  unsigned char* sKt = smem + lay.kt_off;
  unsigned char* sVt = smem + lay.vt_off;
  const T* gK = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + s0 * p.k_ss;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + s0 * p.v_ss + dv0;
  // K columns part * k_cols .. of key block kb0 (one part, all of DHQK, unless Tr::kWide).
  const int k_cols = lay.k_cols, n_kparts = Tr::kWide ? (DQKp + k_cols - 1) / k_cols : 1;
  auto load_k = [&](int kb0, int part) {  // the caller commits
    const int c0 = part * k_cols;
    load_core_tile<T>(sKt, gK + kb0 * p.k_ss + c0, p.k_ss, min(k_cols, DQKp - c0),
                      min(Tr::kKeys, row_end - kb0), p.DHQK - c0, p.k_vec);
  };
  auto load_kv = [&](int kb0) {  // the caller commits
    load_k(kb0, 0);
    load_core_tile<T>(sVt, gV + kb0 * p.v_ss, p.v_ss, BDV, min(Tr::kKeys, row_end - kb0), dv_valid, p.v_vec);
  };
  // ---- Phase 1: acc = Q C_k, qn = q . n_k, 16 rows of C per stage through a ring of landing slots.
  // Copies run along rows (whole 128-byte lines per 8 threads); the split into C_hi / C_lo
  // reads the landing slot across threads, so a stage is split one barrier after it landed.
  const float* gC = p.C + b * p.C_sb + h * p.C_sh + (int64_t)chunk * p.DHQK * p.C_sr + dv0;
  const float* gN = p.n + b * p.n_sb + h * p.n_sh + (int64_t)chunk * p.DHQK * p.n_sr;
  const int n_kc = DQKp / Tr::kCRows;
  auto issue_c = [&](int kc) {
    unsigned char* land = smem + lay.land_off + (kc % Tr::kStages) * lay.land_stage;
    const int d0 = kc * Tr::kCRows;
#pragma unroll
    for (int j = 0; j < kPiecesPerThread; ++j) {
      const int pidx = threadIdx.x + j * Tr::kThreads;
      const int r = pidx / (BDV / 4), col = 4 * (pidx % (BDV / 4));
      const int d = d0 + r;
      float* dst = reinterpret_cast<float*>(land + r * lay.land_row + col * 4);
      const float* src = gC + (int64_t)d * p.C_sr + col;
      if (d >= p.DHQK || col >= dv_valid) {
        *reinterpret_cast<float4*>(dst) = make_float4(0.f, 0.f, 0.f, 0.f);
      } else if (p.c_vec && col + 4 <= dv_valid) {
        cp_async_16(dst, src, 16);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[e] = col + e < dv_valid ? src[e] : 0.f;
      }
    }
    if (threadIdx.x < Tr::kCRows) {
      const int d = d0 + threadIdx.x;
      cp_async_4(land + Tr::kCRows * lay.land_row + threadIdx.x * 4,
                 gN + (int64_t)min(d, p.DHQK - 1) * p.n_sr, d < p.DHQK ? 4 : 0);
    }
  };
  // This lane's rows of the accumulator: wr + g and wr + g + 8; their q . n_k partials (four of
  // a stage's 16 d, from d = 4 tq), in float32.
  float qn0 = 0.f, qn1 = 0.f;
  // Split stage kc into C_hi / C_lo (buffer kc & 1), MN-major core layout. Thread q takes row
  // bits q & 7 so that both the landing reads and the C_hi / C_lo writes are conflict-free.
  auto split_c = [&](int kc) {
    const unsigned char* land = smem + lay.land_off + (kc % Tr::kStages) * lay.land_stage;
    unsigned char* hi = smem + lay.hl_off + (kc & 1) * 2 * lay.hl_half;
    unsigned char* lo = hi + lay.hl_half;
#pragma unroll
    for (int j = 0; j < kPiecesPerThread; ++j) {
      const int q = threadIdx.x + j * Tr::kThreads;
      const int r = (q & 7) + 8 * (q / (8 * (BDV / 4))), c4 = (q >> 3) % (BDV / 4);
      const float4 x = *reinterpret_cast<const float4*>(land + r * lay.land_row + c4 * 16);
      uint2 vh, vl;
      split_bf16(x.x, x.y, vh.x, vl.x);
      split_bf16(x.z, x.w, vh.y, vl.y);
      const int off = core_off(r, c4 >> 1, BDV / 8) + (c4 & 1) * 8;
      *reinterpret_cast<uint2*>(hi + off) = vh;
      *reinterpret_cast<uint2*>(lo + off) = vl;
    }
    const float4 nv = *reinterpret_cast<const float4*>(land + Tr::kCRows * lay.land_row + tq * 16);
    auto q_dot_n = [&](int r, float qn) {  // 4 elements of Q's row r: 8 bytes of a core row
      const uint2 u = *reinterpret_cast<const uint2*>(smem + lay.q_off + core_off(r, 2 * kc + (tq >> 1), q_chunks) +
                                                      (tq & 1) * 8);
      const T* e = reinterpret_cast<const T*>(&u);
      qn = fmaf(to_float(e[0]), nv.x, qn);
      qn = fmaf(to_float(e[1]), nv.y, qn);
      qn = fmaf(to_float(e[2]), nv.z, qn);
      return fmaf(to_float(e[3]), nv.w, qn);
    };
    qn0 = q_dot_n(wr + g, qn0);
    qn1 = q_dot_n(wr + g + 8, qn1);
  };
#pragma unroll
  for (int s = 0; s < Tr::kStages; ++s) {
    if (s < n_kc) issue_c(s);
    cp_async_commit();
  }

  const bool wide = stage_gates<Tr::kRows>(p, tile, gs);

  float acc[BDV / 2];
#pragma unroll
  for (int i = 0; i < BDV / 2; ++i) acc[i] = 0.f;
  uint32_t qa[4], qlo[4];  // A fragments of the stage in flight (kept until its wgmma is done)
#pragma unroll
  for (int i = 0; i < 4; ++i) qa[i] = qlo[i] = 0u;
  constexpr uint32_t kHlLbo = (BDV / 8) * 128;  // next 8 rows of C (k direction)
  cp_async_wait<Tr::kStages - 1>();             // Q and stage 0
  __syncthreads();
  for (int kc = 0; kc < n_kc; ++kc) {
    split_c(kc);
    sm90::fence_proxy_async();
    sm90::wgmma_wait<0>();  // stage kc-1's products are done with buffer (kc+1) & 1 and qa
    sm90::fence_regs(acc);
    sm90::fence_regs(qa);
    sm90::fence_regs(qlo);
    cp_async_wait<Tr::kStages - 2>();  // this thread's copies of stage kc+1
    __syncthreads();  // C_hi/lo of kc complete, landing slot kc free, stage kc+1 visible
    ldmatrix_x4(qa, q_frag_addr(kc));
    if constexpr (Tr::kF16) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = unpack2<__half>(qa[i]);
        split_bf16(f.x, f.y, qa[i], qlo[i]);
      }
    }
    const unsigned char* hi = smem + lay.hl_off + (kc & 1) * 2 * lay.hl_half;
    sm90::wgmma_fence();
    sm90::Wgmma<BDV, false, 1>::run(acc, qa, sm90::make_desc(hi, kHlLbo, 128));
    sm90::Wgmma<BDV, false, 1>::run(acc, qa, sm90::make_desc(hi + lay.hl_half, kHlLbo, 128));
    if constexpr (Tr::kF16) sm90::Wgmma<BDV, false, 1>::run(acc, qlo, sm90::make_desc(hi, kHlLbo, 128));
    sm90::wgmma_commit();
    if (kc + Tr::kStages < n_kc) issue_c(kc + Tr::kStages);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // ---- Phase 2, intra-chunk term over the causal key blocks. ----
  // K and V go to the landing ring, free now (every thread split its pieces before the last
  // barrier); C_hi/lo, still read by the last products, do not overlap them, except in the wide
  // layout, where the last products must be done first.
  if constexpr (Tr::kWide) {
    sm90::wgmma_wait<0>();
    sm90::fence_regs(acc);
    sm90::fence_regs(qa);
    sm90::fence_regs(qlo);
    __syncthreads();
  }
  load_kv(0);
  cp_async_commit();

  sm90::wgmma_wait<0>();
  sm90::fence_regs(acc);
  sm90::fence_regs(qa);
  sm90::fence_regs(qlo);
  {
    const float g0 = gs.row_g[wr + g], g1 = gs.row_g[wr + g + 8];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      acc[4 * j] *= g0, acc[4 * j + 1] *= g0, acc[4 * j + 2] *= g1, acc[4 * j + 3] *= g1;
    }
    qn0 = g0 * quad_sum(qn0), qn1 = g1 * quad_sum(qn1);
  }

  float rowsum0 = 0.f, rowsum1 = 0.f;
  const RowGate r0 = row_gate(gs, tile, wr + g), r1 = row_gate(gs, tile, wr + g + 8);
  const int n_kb = (row_end + Tr::kKeys - 1) / Tr::kKeys;
  const uint32_t kQSbo = q_chunks * 128;  // next 8 rows of Q
  constexpr uint32_t kVLbo = (BDV / 8) * 128;
  // The key loop, compiled twice: the exact exponents of wide chunks stay out of the common path.
  auto key_loop = [&](auto wide_tag) {
    constexpr bool kWide = decltype(wide_tag)::value;
    for (int j = 0; j < n_kb; ++j) {
      const int kb0 = j * Tr::kKeys;
      if (j > 0) {
        __syncthreads();  // every warp's products of key block j-1 are done (waited below)
        load_kv(kb0);
        cp_async_commit();
      }
      cp_async_wait<0>();
      sm90::fence_proxy_async();
      __syncthreads();

      // S = Q K^T for 64 keys: both operands in shared memory, the k steps of a K part in one
      // group (one part unless Tr::kWide; the next part reuses the buffer once they are done).
      float sacc[32];
  #pragma unroll
      for (int i = 0; i < 32; ++i) sacc[i] = 0.f;
      for (int part = 0; part < n_kparts; ++part) {
        if (part > 0) {
          sm90::wgmma_wait<0>();
          sm90::fence_regs(sacc);
          __syncthreads();  // every warp's products of the previous part are done
          load_k(kb0, part);
          cp_async_commit();
          cp_async_wait<0>();
          sm90::fence_proxy_async();
          __syncthreads();
        }
        const int cols = Tr::kWide ? min(k_cols, DQKp - part * k_cols) : DQKp;
        const uint32_t k_sbo = (cols / 8) * 128;  // next 8 keys of this K part
        const unsigned char* q_part = smem + lay.q_off + (part * k_cols / 16) * 256;
        sm90::wgmma_fence();
  #pragma unroll 1
        for (int ks = 0; ks < cols / 16; ++ks)
          sm90::WgmmaSS<64, Tr::kF16>::run(sacc, sm90::make_desc(q_part + ks * 256, 128, kQSbo),
                                           sm90::make_desc(sKt + ks * 256, 128, k_sbo));
        sm90::wgmma_commit();
      }
      sm90::wgmma_wait<0>();
      sm90::fence_regs(sacc);

      // Step 5: w = qk_scale * (q.k) * exp(D - F), causal; row sums before any rounding.
      weigh_scores<kWide>(sacc, kb0, row_end, r0, r1, gs, p.qk_scale, rowsum0, rowsum1);
      // acc += W V: the score accumulators of keys 16kt..16kt+15 are an A fragment as they stand
      // (all four k steps, also past the diagonal, where W is zero).
      uint32_t pa[4][4];
  #pragma unroll
      for (int kt = 0; kt < 4; ++kt) {
        const float* x = sacc + 8 * kt;
        pa[kt][0] = pack2<T>(x[0], x[1]);
        pa[kt][1] = pack2<T>(x[2], x[3]);
        pa[kt][2] = pack2<T>(x[4], x[5]);
        pa[kt][3] = pack2<T>(x[6], x[7]);
      }
      sm90::wgmma_fence();
  #pragma unroll
      for (int kt = 0; kt < 4; ++kt)
        sm90::Wgmma<BDV, Tr::kF16, 1>::run(acc, pa[kt], sm90::make_desc(sVt + kt * 2 * kVLbo, kVLbo, 128));
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_regs(acc);
  #pragma unroll
      for (int kt = 0; kt < 4; ++kt) sm90::fence_regs(pa[kt]);
    }
  };
  if (wide) {
    key_loop(std::true_type{});
  } else {
    key_loop(std::false_type{});
  }

  // ---- Steps 6-7. H goes through shared memory so that global stores are whole 16-byte pieces
  // of rows; vecN / vecM too.
  rowsum0 = quad_sum(rowsum0), rowsum1 = quad_sum(rowsum1);
  const int ra = wr + g, rb = ra + 8;
  const float m0 = gs.row_m[ra], m1 = gs.row_m[rb];
  const RowNorm n0 = row_normaliser(rowsum0 + qn0, m0, gs.row_d[ra], p.eps, p.n_signed);
  const RowNorm n1 = row_normaliser(rowsum1 + qn1, m1, gs.row_d[rb], p.eps, p.n_signed);
  const float inv0 = n0.inv, inv1 = n1.inv;
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) bad |= !isfinite(acc[i]);
  if (tq == 0) gs.row_inv[ra] = inv0, gs.row_inv[rb] = inv1;
  unsigned char* sH = smem + lay.land_off;  // the landing ring / K / V region, done with
  float* sDen = reinterpret_cast<float*>(sH + Tr::kRows * lay.h_row);
  __syncthreads();  // every warp is done with K and V
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float* a = acc + 4 * nt;
    const int col = nt * 8 + 2 * tq;
    *reinterpret_cast<uint32_t*>(sH + (wr + g) * lay.h_row + col * 2) = pack2<T>(a[0] * inv0, a[1] * inv0);
    *reinterpret_cast<uint32_t*>(sH + (wr + g + 8) * lay.h_row + col * 2) = pack2<T>(a[2] * inv1, a[3] * inv1);
  }
  if (tq == 0) {
    sDen[wr + g] = n0.den, sDen[wr + g + 8] = n1.den;
    sDen[Tr::kRows + wr + g] = m0, sDen[Tr::kRows + wr + g + 8] = m1;
  }
  __syncthreads();
  T* H = static_cast<T*>(p.H) + (bh * p.S + s0 + row0) * p.DHHV + dv0;
  const bool h_vec = (p.DHHV % 8) == 0;  // rows then start on 16 bytes (H is ours, contiguous)
  for (int idx = threadIdx.x; idx < Tr::kRows * (BDV / 8); idx += Tr::kThreads) {
    const int r = idx / (BDV / 8), c = (idx % (BDV / 8)) * 8;
    if (r >= rows_valid || c >= dv_valid) continue;
    const T* src = reinterpret_cast<const T*>(sH + r * lay.h_row) + c;
    T* dst = H + (int64_t)r * p.DHHV + c;
    if (h_vec && c + 8 <= dv_valid) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && c + e < dv_valid; ++e) dst[e] = src[e];
    }
  }
  if (dvt == 0 && threadIdx.x < 2 * Tr::kRows) {
    const int r = threadIdx.x % Tr::kRows;
    if (r < rows_valid) {
      float* out = threadIdx.x < Tr::kRows ? p.vecN : p.vecM;
      out[bh * p.S + s0 + row0 + r] = sDen[threadIdx.x];
    }
  }
  if (__syncthreads_or(bad)) recompute_tile_exactly<T>(p, tile, gs, wide, BDV);
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace mlstm::cuda
