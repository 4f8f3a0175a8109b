// The CUDA kernel of recurrent_fw_states (SPEC.md, "How the states are made"): one block per
// (b*h, DHQK tile, DHHV tile) walks the chunks in order with its tile of C in mma accumulators.
//
// Per ring step (kBL sequence positions of one chunk; a chunk of L positions is ceil(L / kBL) steps):
//   first step of chunk k:  m_{k+1} = max(g_k + m_k, max_s a[s]),  C, n *= exp(g_k + m_k - m_{k+1})
//   every step:             C += (K^T diag(w)) V,  n += K^T w,  w[s] = exp(a[s] - m_{k+1})
//   last step of chunk k:   store slot k+1 of C (and n, m)
// with a[s] and (g_k, max_s a[s]) from states_gates_kernel (states_gates.cu). Every block of a
// (b, h) runs the same float32 scalar recurrence for m, so all agree on the stabiliser bit for bit.
//
// Products: w is folded into K in float32 (K^T is the mma A operand, ldmatrix .trans from K
// stored row-major). 16-bit inputs: k*w is split into hi + lo halves of the input dtype and both
// go through mma m16n8k16 (V is exact in its dtype), so k*w keeps ~16 (bf16) / ~22 (fp16) bits
// instead of the 8 / 11 of one rounding. float32 inputs: 3xTF32 (float32-accurate). n is summed
// from the float32 products k*w directly (per-thread partial sums, reduced over the quad on store).
#pragma once

#include <cuda_runtime.h>

#include "cuda/gates.cuh"
#include "cuda/mma.cuh"
#include "cuda/states_params.h"
#include "cuda/tile_copy.cuh"

namespace mlstm::cuda {

// (x0, x1) ~ hi + lo, both pairs in T: hi rounds x, lo rounds the exact float remainder x - hi.
template <typename T>
__device__ __forceinline__ void split2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = pack2<T>(x0, x1);
  const float2 h = unpack2<T>(hi);
  lo = pack2<T>(x0 - h.x, x1 - h.y);
}

// Chunk start: the new stabiliser m_{k+1} = max(g_k + m_k, max_s a[s]) and the decay of the
// carried C (mma accumulators) and n (per-lane partial sums). Shared with the fused forward.
template <int NT>
__device__ __forceinline__ void start_chunk(float gk, float amax, float& m, float (&acc)[NT][4], float (&n_part)[2]) {
  const float m_next = nan_max(gk + m, amax);
  const float decay = expf(gk + m - m_next);
  m = m_next;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] *= decay;
  }
  n_part[0] *= decay;
  n_part[1] *= decay;
}

// One 16-key step of C += K^T diag(w) V and n += K^T w, 16-bit inputs (shared with the fused
// forward). k_lane: this lane's ldmatrix .trans row address in the row-major K tile, giving the
// K^T fragment kr[0] = rows r0 at keys s0, s0+1; kr[1] = rows r1 there; kr[2], kr[3] the same at
// s0+8, s0+9 (s0 = 16 ks + 2 tq), whose weights are w0, w1, w8, w9. v_lane: this lane's ldmatrix
// .trans row address in the V tile at the warp's first column; the n-tile pairs whose first
// column is below cols_valid are multiplied.
// kZeroPadded (the states kernel, whose V tiles are zero past cols_valid, and whose accumulators
// past it are never stored): every pair is multiplied, without a test. Then ptxas loads every V
// fragment first and puts all lo products between an accumulator's lo and hi; with the tests it
// keeps one pair's four products together, its hi products waiting on its lo ones. The products
// per accumulator and their order are the same either way. The fused forward takes this order
// where it has the registers for it (FusedFwTraits::kLoFirst) and keeps the tests elsewhere.
template <typename T, int NT, bool kZeroPadded = false>
__device__ __forceinline__ void state_kstep(float (&acc)[NT][4], float (&n_part)[2], const T* k_lane, const T* v_lane,
                                            float w0, float w1, float w8, float w9, int cols_valid) {
  uint32_t kr[4];
  ldmatrix_x4_trans(kr, k_lane);
  uint32_t bv[kZeroPadded ? NT / 2 : 1][4];  // kZeroPadded: V fragments of n-tiles 2np, 2np+1
  if constexpr (kZeroPadded) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) ldmatrix_x4_trans(bv[np], v_lane + np * 16);
  }
  const float2 k0 = unpack2<T>(kr[0]), k1 = unpack2<T>(kr[1]);
  const float2 k2 = unpack2<T>(kr[2]), k3 = unpack2<T>(kr[3]);
  const float x[8] = {k0.x * w0, k0.y * w1, k1.x * w0, k1.y * w1, k2.x * w8, k2.y * w9, k3.x * w8, k3.y * w9};
  n_part[0] += (x[0] + x[1]) + (x[4] + x[5]);
  n_part[1] += (x[2] + x[3]) + (x[6] + x[7]);
  uint32_t hi[4], lo[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) split2<T>(x[2 * q], x[2 * q + 1], hi[q], lo[q]);
  if constexpr (kZeroPadded) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      mma_16816<T>(acc[2 * np], lo, bv[np][0], bv[np][1]);  // the small half first
      mma_16816<T>(acc[2 * np + 1], lo, bv[np][2], bv[np][3]);
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      mma_16816<T>(acc[2 * np], hi, bv[np][0], bv[np][1]);
      mma_16816<T>(acc[2 * np + 1], hi, bv[np][2], bv[np][3]);
    }
  } else {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      if (np * 16 < cols_valid) {
        // V fragments (k = keys, n = columns) of n-tiles 2np, 2np+1: bv[0..1], bv[2..3].
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, v_lane + np * 16);
        mma_16816<T>(acc[2 * np], lo, bv[0], bv[1]);  // the small half first
        mma_16816<T>(acc[2 * np], hi, bv[0], bv[1]);
        mma_16816<T>(acc[2 * np + 1], lo, bv[2], bv[3]);
        mma_16816<T>(acc[2 * np + 1], hi, bv[2], bv[3]);
      }
    }
  }
}

// kC16: C stored in the 16-bit input dtype (p.c16, the backward's recompute), a kernel of its own
// so that the forward's keeps its code: with a run-time branch in the store (and another change
// beside it) the forward measured 4-10% slower at three of four shapes.
template <class Tr, bool kC16>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) states_kernel(const StatesParams p) {
  using T = typename Tr::T;
  constexpr int NT = Tr::kBHV / 8;  // n-tiles of 8 columns per warp
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, tq = lane % 4;
  // The warp's strip of 16 rows, and its share of the strip's k-steps (part 0 of kSplit also
  // holds the initial state and stores the slots).
  const int strip = Tr::kSplit == 1 ? warp : warp % Tr::kStrips;
  const int part = Tr::kSplit == 1 ? 0 : warp / Tr::kStrips;

  // blockIdx.x = (bh * n_qkt + qkt) * n_hvt + hvt: the blocks of one (b, h) run side by side and
  // share its K and V through L2.
  int64_t blk = blockIdx.x;
  const int hvt = static_cast<int>(blk % p.n_hvt);
  blk /= p.n_hvt;
  const int qkt = static_cast<int>(blk % p.n_qkt);
  const int64_t bh = blk / p.n_qkt, b = bh / p.NH, h = bh % p.NH;
  const int dq0 = qkt * Tr::kBQK, dv0 = hvt * Tr::kBHV;
  const int dq_valid = min(Tr::kBQK, p.DHQK - dq0);  // <= 0 only when DHQK = 0
  const int dv_valid = min(Tr::kBHV, p.DHHV - dv0);  // <= 0 only when DHHV = 0
  const int wr = strip * 16;                          // the warp's first row in the tile
  const bool warp_active = wr < dq_valid;
  const int r0 = dq0 + wr + g, r1 = r0 + 8;           // this lane's two DHQK rows
  const int64_t slots = static_cast<int64_t>(p.NC) + 1;

  // ---- Slot 0: the initial state (zeros when not given). ----
  // acc[nt]: rows r0 (0, 1) and r1 (2, 3), columns dv0 + nt*8 + 2tq (+1): the m16n8 layout.
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e < 2 ? r0 : r1, col = dv0 + nt * 8 + 2 * tq + (e & 1);
      acc[nt][e] = (part == 0 && p.C0 != nullptr && row < p.DHQK && col < p.DHHV)
                       ? p.C0[b * p.C0_sb + h * p.C0_sh + row * p.C0_sr + col * p.C0_sc]
                       : 0.f;
    }
  }
  // n: per-lane partial sums of rows r0, r1; the quad's sum is the state (n_0 sits in lane tq = 0).
  float n_part[2] = {0.f, 0.f};
  if (part == 0 && p.n0 != nullptr && tq == 0) {
    const float* n0 = p.n0 + b * p.n0_sb + h * p.n0_sh;
    if (r0 < p.DHQK) n_part[0] = n0[r0 * p.n0_sr];
    if (r1 < p.DHQK) n_part[1] = n0[r1 * p.n0_sr];
  }
  float m = p.m0 != nullptr ? p.m0[b * p.m0_sb + h * p.m0_sh] : 0.f;

  // Writes this block's part of state slot `slot`: its C tile (every block), its n slice (blocks
  // of DHHV tile 0), m (the block of tile (0, 0)). C goes through the strip's 16 staging rows so
  // that the global stores are whole 16-byte pieces along rows; streaming (.cs) stores keep the
  // states, never read again here, from evicting the K and V rows that sibling blocks re-read.
  // kSplit = 2: part 1 leaves its partial C and n there first, part 0 adds its own and stores.
  // Called by every thread of the block at once (the barrier below).
  float* stage_c = reinterpret_cast<float*>(smem + Tr::kStagingOff) + wr * Tr::kSC;
  const bool out_vec = (p.DHHV % 4) == 0;
  // This warp's C accumulators into the strip's staging rows: in place of what they hold, or
  // (add: kSplit = 2, part 0) added to the other part's partial sums, in a fixed order.
  auto stage_acc = [&](bool add) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int col = nt * 8 + 2 * tq;
      float2* x0 = reinterpret_cast<float2*>(stage_c + g * Tr::kSC + col);
      float2* x1 = reinterpret_cast<float2*>(stage_c + (g + 8) * Tr::kSC + col);
      float2 a0 = make_float2(acc[nt][0], acc[nt][1]), a1 = make_float2(acc[nt][2], acc[nt][3]);
      if (add) {
        const float2 o0 = *x0, o1 = *x1;
        a0.x += o0.x, a0.y += o0.y, a1.x += o1.x, a1.y += o1.y;
      }
      *x0 = a0, *x1 = a1;
    }
  };
  auto store_slot = [&](int64_t slot) {
    if constexpr (Tr::kSplit == 2) {
      if (part == 1 && warp_active) {
        stage_acc(false);
        const float s0 = quad_sum(n_part[0]), s1 = quad_sum(n_part[1]);
        if (tq == 0) stage_c[g * Tr::kSC + Tr::kBHV] = s0, stage_c[(g + 8) * Tr::kSC + Tr::kBHV] = s1;
      }
      __syncthreads();
      if (part == 1) return;
    }
    if (warp_active && dv_valid > 0) {
      stage_acc(Tr::kSplit == 2);
      __syncwarp();
      // Lane: one 16-byte column piece c of rows r, r + kRowStep, ... of the warp's 16 rows.
      constexpr int kPieces = Tr::kBHV / 4;  // float4 pieces per row
      constexpr int kRowStep = 32 / kPieces;
      static_assert(32 % kPieces == 0, "whole rows per warp pass");
      const int c = (lane % kPieces) * 4;
      int r = lane / kPieces;
      const int64_t off = ((bh * slots + slot) * p.DHQK + dq0 + wr + r) * p.DHHV + dv0 + c;
      const float* src = stage_c + r * Tr::kSC + c;
#pragma unroll
      for (int it = 0; it < 16 / kRowStep; ++it, r += kRowStep, src += kRowStep * Tr::kSC) {
        if (wr + r < dq_valid && c < dv_valid) {
          const float4 x = *reinterpret_cast<const float4*>(src);
          const int64_t o = off + static_cast<int64_t>(it) * kRowStep * p.DHHV;
          if constexpr (kC16) {
            T* dst = static_cast<T*>(p.C) + o;
            if (out_vec && c + 4 <= dv_valid) {
              __stcs(reinterpret_cast<uint2*>(dst), make_uint2(pack2<T>(x.x, x.y), pack2<T>(x.z, x.w)));
            } else {
              const float xs[4] = {x.x, x.y, x.z, x.w};
              for (int e = 0; e < 4 && c + e < dv_valid; ++e) dst[e] = from_float<T>(xs[e]);
            }
            continue;
          }
          float* dst = static_cast<float*>(p.C) + o;
          if (out_vec && c + 4 <= dv_valid) {
            __stcs(reinterpret_cast<float4*>(dst), x);
          } else {
            const float xs[4] = {x.x, x.y, x.z, x.w};
            for (int e = 0; e < 4 && c + e < dv_valid; ++e) __stcs(dst + e, xs[e]);
          }
        }
      }
      __syncwarp();  // staging rows are rewritten by the next slot
    }
    if (hvt == 0 && warp_active) {
      float s0 = quad_sum(n_part[0]), s1 = quad_sum(n_part[1]);
      if constexpr (Tr::kSplit == 2) s0 += stage_c[g * Tr::kSC + Tr::kBHV], s1 += stage_c[(g + 8) * Tr::kSC + Tr::kBHV];
      if (tq == 0) {
        float* n_out = p.n + (bh * slots + slot) * p.DHQK;
        if (r0 < p.DHQK) n_out[r0] = s0;
        if (r1 < p.DHQK) n_out[r1] = s1;
      }
    }
    if (qkt == 0 && hvt == 0 && tid == 0) p.m[bh * slots + slot] = m;
  };
  store_slot(0);

  // ---- The chunks, through a kStages-deep cp.async ring of steps. ----
  const int n_sub = (p.L + Tr::kBL - 1) / Tr::kBL;  // steps per chunk
  const int total = p.NC * n_sub;  // < 2^31 (checked by the host)
  const T* gK = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + dq0;
  const T* gV = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + dv0;
  const float* gA = p.a + bh * p.S;
  const float2* gGM = p.gm + bh * p.NC;

  // Loads of the next step not yet issued (chunk ik, step ip) into ring slot `buf`; always
  // commits a group (empty past the end) so that the wait count below stays uniform.
  int ik = 0, ip = 0, issued = 0;
  auto issue = [&](int buf) {
    if (issued < total) {
      unsigned char* st = smem + buf * Tr::kStageBytes;
      const int off = ip * Tr::kBL;
      const int rows = min(Tr::kBL, p.L - off);
      const int64_t t0 = static_cast<int64_t>(ik) * p.L + off;
      stage_tile<T, Tr::kBL, Tr::kBQK, Tr::kThreads>(reinterpret_cast<T*>(st), Tr::kSK,
                                                     gK + t0 * p.k_ss, p.k_ss, rows, dq_valid, p.k_vec);
      stage_tile<T, Tr::kBL, Tr::kBHV, Tr::kThreads>(reinterpret_cast<T*>(st + Tr::kKBytes), Tr::kSV,
                                                     gV + t0 * p.v_ss, p.v_ss, rows, dv_valid, p.v_vec);
      float* sa = reinterpret_cast<float*>(st + Tr::kKBytes + Tr::kVBytes);
      if (tid < rows) cp_async_4(sa + tid, gA + t0 + tid, 4);  // rows <= kBL <= kThreads
      if (tid < 2) cp_async_4(sa + Tr::kBL + tid, reinterpret_cast<const float*>(gGM + ik) + tid, 4);
      ++issued;
      if (++ip == n_sub) ip = 0, ++ik;
    }
    cp_async_commit();
  };

#pragma unroll
  for (int s = 0; s < Tr::kStages - 1; ++s) issue(s);

  int ck = 0, cs = 0, buf = 0;  // chunk and step being computed, its ring slot
  for (int j = 0; j < total; ++j) {
    cp_async_wait<Tr::kStages - 2>();  // this thread's copies of step j have landed
    __syncthreads();                   // everyone's have; everyone is done with step j-1's slot
    issue((buf + Tr::kStages - 1) % Tr::kStages);

    const unsigned char* st = smem + buf * Tr::kStageBytes;
    const T* sK = reinterpret_cast<const T*>(st);
    const T* sV = reinterpret_cast<const T*>(st + Tr::kKBytes);
    const float* sa = reinterpret_cast<const float*>(st + Tr::kKBytes + Tr::kVBytes);
    const int rows = min(Tr::kBL, p.L - cs * Tr::kBL);

    if (cs == 0) start_chunk(sa[Tr::kBL], sa[Tr::kBL + 1], m, acc, n_part);

    if (warp_active) {
      // w[s] = exp(a[s] - m_{k+1}) for the step's valid positions, 0 on the zero-padded rows:
      // lane l computes w[l + 32q] once, fragments fetch theirs with a shuffle (a lane needs 4 of
      // them per k-step, 8 lanes the same 4).
      static_assert(Tr::kBL % 32 == 0 && Tr::kBL <= 64, "w held in one or two registers per lane");
      float wl[Tr::kBL / 32];
#pragma unroll
      for (int q = 0; q < Tr::kBL / 32; ++q) {
        const int s = q * 32 + lane;
        wl[q] = s < rows ? expf(sa[s] - m) : 0.f;
      }
      // s / 32 is the same in every lane of one call (a k-step's positions never straddle 32).
      auto weight = [&](int s) {
        return __shfl_sync(0xffffffffu, s >= 32 ? wl[Tr::kBL / 32 - 1] : wl[0], s & 31);
      };
      if constexpr (Tr::kIsFloat) {
        const int ksteps = (rows + 7) / 8;
#pragma unroll 1
        for (int ks = part; ks < ksteps; ks += Tr::kSplit) {
          // A = (K^T diag(w)) fragment: a0 (row g, k tq), a1 (g+8, tq), a2 (g, tq+4), a3 (g+8, tq+4).
          const int sA = ks * 8 + tq, sB = sA + 4;
          const float wA = weight(sA), wB = weight(sB);
          const float x0 = sK[sA * Tr::kSK + wr + g] * wA, x1 = sK[sA * Tr::kSK + wr + g + 8] * wA;
          const float x2 = sK[sB * Tr::kSK + wr + g] * wB, x3 = sK[sB * Tr::kSK + wr + g + 8] * wB;
          n_part[0] += x0 + x2;
          n_part[1] += x1 + x3;
          const Tf32Split a[4] = {split_tf32(x0), split_tf32(x1), split_tf32(x2), split_tf32(x3)};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (nt * 8 < dv_valid) {
              mma_1688_3xtf32(acc[nt], a, split_tf32(sV[sA * Tr::kSV + nt * 8 + g]),
                              split_tf32(sV[sB * Tr::kSV + nt * 8 + g]));
            }
          }
        }
      } else {
        const int ksteps = (rows + 15) / 16;
#pragma unroll 1
        for (int ks = part; ks < ksteps; ks += Tr::kSplit) {
          const int s0 = ks * 16 + 2 * tq;
          state_kstep<T, NT, true>(acc, n_part,
                             sK + (ks * 16 + (lane & 7) + ((lane >> 4) << 3)) * Tr::kSK + wr + ((lane >> 3) & 1) * 8,
                             sV + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tr::kSV + (lane >> 4) * 8,
                             weight(s0), weight(s0 + 1), weight(s0 + 8), weight(s0 + 9), dv_valid);
        }
      }
    }

    if (cs == n_sub - 1) store_slot(ck + 1);
    if (++cs == n_sub) cs = 0, ++ck;
    buf = (buf + 1) % Tr::kStages;
  }
}

}  // namespace mlstm::cuda
