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

struct FusedFwParams {
  HintraParams h;     // Q, K, V, gates, H, vecN, vecM, sizes, qk_scale, eps (h.C, h.n, h.m unused)
  const float* a;     // (B*NH, S): the states' a[s] (states_gates_kernel)
  const float2* gm;   // (B*NH, NC): (g_k, max_s a[s])
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

// 16-bit inputs, chunk size 64, DHQK <= kDQK (zero-padded). 8 warps: for the H rows, warp w has
// query rows 16 (w % 4).. and DHHV columns 32 (w / 4).. of the tile; for the state, DHQK strips
// w, w + 8, ... of 16 rows (all 64 columns).
template <typename T_, int kDQK_>
struct FusedFwTraits {
  using T = T_;
  static constexpr int kDQK = kDQK_;
  static constexpr int kL = 64;
  static constexpr int kBDV = 64;
  static constexpr int kThreads = 256;
  static constexpr int kStripsPerWarp = kDQK / 16 / 8;
  // Two blocks per SM fit in shared memory at DHQK 128 (~106 KB each), one at 256 (~189 KB).
  static constexpr int kMinBlocks = kDQK <= 128 ? 2 : 1;
  // Row strides (elements): odd multiples of 16 bytes, for conflict-free ldmatrix.
  static constexpr int kSQ = kDQK + 8;      // Q and K tiles
  static constexpr int kSV = kBDV + 8;      // V tile
  static constexpr int kSC = 2 * kBDV + 8;  // C_k as bf16 hi | lo
  // Shared memory: Q (one buffer) | 2 x {K, V, a[kL], (g, max a), f[kL], i[kL]} | C_k hi | lo | n_k |
  // gate scratch.
  static constexpr int kQBytes = kL * kSQ * 2;
  static constexpr int kKBytes = kL * kSQ * 2;
  static constexpr int kVBytes = kL * kSV * 2;
  static constexpr int kABytes = (kL + 2) * 4 + 8 + 2 * kL * 4;  // a, (g, max a), pad, f and i
  static constexpr int kStageBytes = kKBytes + kVBytes + kABytes;
  static constexpr int kStageOff = kQBytes;
  static constexpr int kCOff = kStageOff + 2 * kStageBytes;
  static constexpr int kNOff = kCOff + kDQK * kSC * 2;
  static constexpr int kGateOff = kNOff + kDQK * 4;
  static constexpr int kRowOff = kGateOff + kGateArrays * kL * 4;
  static constexpr int kSmemBytes = kRowOff + kRowArrays * kL * 4;
  static_assert(kDQK % 128 == 0, "whole strips per warp");
  static_assert(kQBytes % 16 == 0 && kStageBytes % 16 == 0 && kABytes % 16 == 0, "16-byte regions");
};

// Host entry points (fused_fw_bf16.cu, fused_fw_fp16.cu): dqk_cap is 128 or 256.
void launch_fused_fw_bf16(const FusedFwParams& p, int dqk_cap, int64_t blocks, cudaStream_t stream);
void launch_fused_fw_fp16(const FusedFwParams& p, int dqk_cap, int64_t blocks, cudaStream_t stream);

}  // namespace mlstm::cuda
