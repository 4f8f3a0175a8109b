// Parameters and tile plan of the fused forward kernel (fused_fw_kernel.cuh): the whole chunkwise
// forward in one pass, one block per (b*h, DHHV tile of 64 columns) walking the chunks in order
// with its tile of C in mma accumulators, so that no chunk's C ever goes to global memory (the
// two-kernel forward writes and re-reads every chunk's float32 C: benchmarks/NOTES.md, issue 10).
// Read by the kernel (device) and fused_fw_cuda.cpp (host).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/hintra_params.h"
#include "cuda/hintra_tiles.h"

namespace mlstm::cuda {

// The state update's k-steps as the states kernel runs them (state_kstep's kZeroPadded: the V
// tiles are zero past the head here too), every V fragment first and the lo products together:
// FusedFwTraits::kLoFirst, on at (128, 64) only. There it measured 4-6% faster (H100,
// benchmarks/NOTES.md, nineteenth session); at (256, 64) and (128, 128) the kernel sits at its
// 128-register cap and ptxas spills with it (12-24 bytes; neutral at (256, 64)). Build-time
// override for an A/B: MLSTM_EXT_FUSED_LO_FIRST=0 (off everywhere) or 1 (on everywhere).
#ifndef MLSTM_EXT_FUSED_LO_FIRST
#define MLSTM_EXT_FUSED_LO_FIRST -1
#endif

// The gate terms of one chunk's H rows that do not depend on the state, made for every chunk
// at once before the fused kernel (fused_fw_gates.cu), so that its chunk loop keeps no gate scan:
// bg, bg_lo, col_a, col_b (the column terms, as stage_gates leaves them), m_intra (L floats each),
// then the chunk's wide flag (1 or 0) and 3 floats of padding (16-byte blocks for cp.async).
constexpr int fused_gate_floats(int L) { return 5 * L + 4; }

struct FusedGateParams {
  const float* igate;
  int64_t i_sb, i_sh, i_ss;
  const float* fgate;
  int64_t f_sb, f_sh, f_ss;
  float* hg;           // (num_chunks, fused_gate_floats(L))
  int64_t NH;
  int64_t num_chunks;  // B*NH*NC
  int L, NC;
};
void launch_fused_fw_gates(const FusedGateParams& p, cudaStream_t stream);

struct FusedFwParams {
  HintraParams h;     // Q, K, V, gates, H, vecN, vecM, sizes, qk_scale, eps (h.C, h.n, h.m unused)
  const float* a;     // (B*NH, S): the states' a[s] (states_gates_kernel)
  const float2* gm;   // (B*NH, NC): (g_k, max_s a[s])
  const float* hg;    // (B*NH*NC, fused_gate_floats(L)): the H rows' gate terms (fused_fw_gates.cu)
  const float* C0;    // initial states, or nullptr (zeros)
  int64_t C0_sb, C0_sh, C0_sr, C0_sc;
  const float* n0;
  int64_t n0_sb, n0_sh, n0_sr;
  const float* m0;
  int64_t m0_sb, m0_sh;
  float* C_last;      // (B, NH, DHQK, DHHV) contiguous: the state after the last chunk
  float* n_last;      // (B, NH, DHQK)
  float* m_last;      // (B, NH)
  int n_dvt;          // DHHV tiles
};

// 16-bit inputs, chunk size kL (64 or 128), DHQK <= kDQK (zero-padded; 128 or 256, and 128 at
// kL = 128). 8 warps at (128, 64), else 16. The state's kDQK / 16 strips of 16 rows are split
// over the warps in kSGroups column groups of kSCols columns; the H rows' kL / 16 strips in
// kColGroups groups of kHCols columns (warp w: strip w % strips, group w / strips).
template <typename T_, int kDQK_, int kL_>
struct FusedFwTraits {
  using T = T_;
  static constexpr int kDQK = kDQK_;
  static constexpr int kL = kL_;
  static constexpr int kBDV = 64;
  static constexpr int kWarps = (kDQK == 128 && kL == 64) ? 8 : 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSStrips = kDQK / 16;
  static constexpr int kSCols = kBDV / (kWarps / kSStrips);
  static constexpr int kHStrips = kL / 16;
  static constexpr int kColGroups = kWarps / kHStrips;
  static constexpr int kHCols = kBDV / kColGroups;
  // Two blocks per SM fit in shared memory at (128, 64) (~108 KB each); one elsewhere (~181 KB at
  // (128, 128), ~191 KB at (256, 64)).
  static constexpr int kMinBlocks = kWarps == 8 ? 2 : 1;
  static constexpr bool kLoFirst =
      MLSTM_EXT_FUSED_LO_FIRST < 0 ? (kDQK == 128 && kL == 64) : MLSTM_EXT_FUSED_LO_FIRST != 0;
  static_assert(kWarps % kSStrips == 0 && kWarps % kHStrips == 0 && kHStrips % kColGroups == 0, "whole groups");
  static_assert(kL <= kDQK, "W fits in the Q rows");
  // Row strides (elements): odd multiples of 16 bytes, for conflict-free ldmatrix.
  static constexpr int kSQ = kDQK + 8;      // Q and K tiles
  static constexpr int kSV = kBDV + 8;      // V tile
  static constexpr int kSC = 2 * kBDV + 8;  // C_k as bf16 hi | lo | n_k's terms in the pad
  // Shared memory: Q (one buffer; W overwrites it per strip) | 2 x {K, V, a[kL], (g, max a),
  // pad, the chunk's gate terms (fused_gate_floats)} | C_k hi | lo | n_k terms (rows of kSC) |
  // 2 x the rows' gate scratch (chunk k's, and chunk k + 1's made during k's state update) |
  // row sums.
  static constexpr int kQBytes = kL * kSQ * 2;
  static constexpr int kKBytes = kL * kSQ * 2;
  static constexpr int kVBytes = kL * kSV * 2;
  static constexpr int kHGOff = (kL + 4) * 4;                     // a, (g, max a), pad, then the terms
  static constexpr int kABytes = kHGOff + fused_gate_floats(kL) * 4;
  static constexpr int kStageBytes = kKBytes + kVBytes + kABytes;
  static constexpr int kStageOff = kQBytes;
  static constexpr int kCOff = kStageOff + 2 * kStageBytes;
  static constexpr int kRowOff = kCOff + kDQK * kSC * 2;
  static constexpr int kRowBytes = kRowArrays * kL * 4;
  static constexpr int kRSOff = kRowOff + 2 * kRowBytes;  // the column groups' row sums
  static constexpr int kSmemBytes = kRSOff + kColGroups * kL * 4;
  static_assert((kDQK == 128 || kDQK == 256) && (kL == 64 || kL == 128), "the instances of the plan");
  static_assert(kQBytes % 16 == 0 && kStageBytes % 16 == 0 && kABytes % 16 == 0 && kHGOff % 16 == 0,
                "16-byte regions");
};

// Shared memory of the instance for (dqk_cap, L) (the same for both 16-bit dtypes).
inline int fused_fw_smem_bytes(int dqk_cap, int L) {
  if (L == 128) return FusedFwTraits<__nv_bfloat16, 128, 128>::kSmemBytes;
  return dqk_cap <= 128 ? FusedFwTraits<__nv_bfloat16, 128, 64>::kSmemBytes
                        : FusedFwTraits<__nv_bfloat16, 256, 64>::kSmemBytes;
}

// Blocks per SM the instance for (dqk_cap, L) is built for (its launch bounds).
inline int fused_fw_blocks_per_sm(int dqk_cap, int L) {
  if (L == 128) return FusedFwTraits<__nv_bfloat16, 128, 128>::kMinBlocks;
  return dqk_cap <= 128 ? FusedFwTraits<__nv_bfloat16, 128, 64>::kMinBlocks
                        : FusedFwTraits<__nv_bfloat16, 256, 64>::kMinBlocks;
}

// Host entry points (fused_fw_bf16.cu, fused_fw_fp16.cu): (dqk_cap, L) is (128, 64), (256, 64) or
// (128, 128).
void launch_fused_fw_bf16(const FusedFwParams& p, int dqk_cap, int L, int64_t blocks, cudaStream_t stream);
void launch_fused_fw_fp16(const FusedFwParams& p, int dqk_cap, int L, int64_t blocks, cudaStream_t stream);

}  // namespace mlstm::cuda
