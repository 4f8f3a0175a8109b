// Kernel parameters, tile shapes and shared-memory layout of the CUDA H-step kernel.
// Included by the kernel (device) and by the launch code (host), so both agree on the layout.
#pragma once

#include <cstdint>
#include <type_traits>

// Tuning knobs, fixed at build time (defaults are what the measurements in
// benchmarks/NOTES.md chose): minimum resident blocks per SM for the register budget, and the
// DHHV tile of the float32 kernel.
#ifndef MLSTM_EXT_MINB_16
#define MLSTM_EXT_MINB_16 3
#endif
#ifndef MLSTM_EXT_MINB_F32
#define MLSTM_EXT_MINB_F32 2
#endif
#ifndef MLSTM_EXT_FP32_BDV
#define MLSTM_EXT_FP32_BDV 128
#endif

namespace mlstm::cuda {

// Everything the kernel reads: pointers and element strides, taken from the tensors as they come
// (the last dim of Q/K/V/C must have stride 1; the launch code makes it so).
struct HintraParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;
  const float* igate;
  int64_t i_sb, i_sh, i_ss;
  const float* fgate;
  int64_t f_sb, f_sh, f_ss;
  const float* C;  // slot k = rows k*DHQK..(k+1)*DHQK-1
  int64_t C_sb, C_sh, C_sr;
  const float* n;
  int64_t n_sb, n_sh, n_sr;
  const float* m;
  int64_t m_sb, m_sh, m_ss;
  void* H;      // (B, NH, S, DHHV) contiguous, matQ's dtype
  float* vecN;  // (B, NH, S) contiguous
  float* vecM;
  int64_t NH, S;
  int DHQK, DHHV, L, NC;
  int rows_per_block;  // query rows of one block: 16 per warp, at most kBLQ
  int n_qt, n_dvt;     // query-row tiles per chunk, DHHV tiles
  float qk_scale, eps;
  bool q_vec, k_vec, v_vec, c_vec;  // rows 16-byte aligned: cp.async path
};

// Tile shapes for input type T and a DHHV tile of BDV columns.
template <typename T_, int BDV>
struct HintraTraits {
  using T = T_;
  static constexpr bool kIsFloat = std::is_same_v<T, float>;
  static constexpr int kMaxWarps = 4;
  static constexpr int kThreads = 32 * kMaxWarps;
  static constexpr int kBLQ = 16 * kMaxWarps;         // query rows per block (16 per warp)
  static constexpr int kBKV = 64;                     // keys per block of the causal loop
  static constexpr int kBDV = BDV;                    // DHHV columns per block
  static constexpr int kBKK = kIsFloat ? 32 : 64;     // DHQK columns per staged K chunk
  static constexpr int kBKC = 32;                     // DHQK rows per staged C chunk
  static constexpr int kKStep = kIsFloat ? 8 : 16;    // k of one mma
  static constexpr int kMinBlocks = kIsFloat ? MLSTM_EXT_MINB_F32 : MLSTM_EXT_MINB_16;
  // Row strides (elements) padded so the fragment loads below hit 32 distinct banks.
  static constexpr int kSK = kBKK + 8;                // ldmatrix rows: odd multiple of 16 bytes
  static constexpr int kSV = kIsFloat ? kBDV + 4 : kBDV + 8;
  static constexpr int kSC = kBDV + 4;                // floats; = 4 (mod 16)
};

struct SmemLayout {
  int dqk_pad;  // DHQK rounded up to the mma k
  int sq;       // Q row stride (elements)
  int q_off, k_off, v_off, c_off, n_off, gate_off, row_off;
  int bytes;
};

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Q (resident) | stream region: {K chunks x2, V block} or {C chunks x2, n chunks x2} | gates.
template <class Tr>
__host__ __device__ inline SmemLayout make_smem_layout(int DHQK, int L) {
  using T = typename Tr::T;
  SmemLayout s;
  s.dqk_pad = round_up(DHQK, Tr::kKStep);
  if (Tr::kIsFloat) {
    s.sq = s.dqk_pad + ((8 - s.dqk_pad % 32) + 32) % 32;  // float2 loads: stride = 8 (mod 32)
  } else {
    s.sq = s.dqk_pad + 8;
  }
  int off = 0;
  s.q_off = off;
  off += round_up(Tr::kBLQ * s.sq * (int)sizeof(T), 16);
  const int stream = off;
  s.k_off = stream;
  s.v_off = s.k_off + round_up(2 * Tr::kBKV * Tr::kSK * (int)sizeof(T), 16);
  const int intra_end = s.v_off + round_up(Tr::kBKV * Tr::kSV * (int)sizeof(T), 16);
  s.c_off = stream;
  s.n_off = s.c_off + 2 * Tr::kBKC * Tr::kSC * 4;
  const int inter_end = s.n_off + 2 * Tr::kBKC * 4;
  off = intra_end > inter_end ? intra_end : inter_end;
  s.gate_off = off;  // bg, log2e*(i - bg), prefix max of (i - bg): 3 x round_up(L, kBKV) floats
  off += 3 * round_up(L, Tr::kBKV) * 4;
  s.row_off = off;   // per query row: log2e*(bg - m), g, m
  off += 3 * Tr::kBLQ * 4;
  s.bytes = off;
  return s;
}

}  // namespace mlstm::cuda
