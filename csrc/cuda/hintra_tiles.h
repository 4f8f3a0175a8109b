// Tile shapes and shared-memory layouts of the H-step kernels, in one place: read by the kernels
// (device) and by plan_hintra (host), so both agree on every size.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// Depth of the float32 C landing ring (16 rows of C per stage) and blocks per SM for the
// register budget; see benchmarks/NOTES.md.
#ifndef MLSTM_EXT_SM90_STAGES
#define MLSTM_EXT_SM90_STAGES 4
#endif
#ifndef MLSTM_EXT_SM90_MINB
#define MLSTM_EXT_SM90_MINB 3
#endif

namespace mlstm::cuda {

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Gate scratch of both kernels (stage_gates, hintra_common.cuh): per key, bg (float and remainder)
// and two column terms; per query row, the exponent offset, inter factor, m, the frame shift and
// 1/(den + eps).
constexpr int kGateArrays = 4;
constexpr int kRowArrays = 5;

// ---- sm_80 kernel (hintra_sm80.cuh): mma.sync, one warp per 16 query rows. ----
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
  s.gate_off = off;  // kGateArrays per-key arrays of round_up(L, kBKV) floats (hintra_common.cuh)
  off += kGateArrays * round_up(L, Tr::kBKV) * 4;
  s.row_off = off;   // kRowArrays per-query-row arrays
  off += kRowArrays * Tr::kBLQ * 4;
  s.bytes = off;
  return s;
}

// ---- sm_90a kernel (hintra_sm90.cuh): wgmma, one warpgroup per 64 query rows. ----
// kWide: the layout for wide heads (DHQK above kKPart, e.g. xLSTM-7B's 256), which keeps three
// blocks per SM: K comes in parts of kKPart columns, and phase 1 (C landing ring + C_hi/C_lo)
// shares one region with phase 2 (K part + V) and the epilogue, with a 2-deep landing ring.
template <typename T_, int BDV, bool kWide_ = false>
struct Sm90Traits {
  using T = T_;
  static constexpr bool kF16 = std::is_same_v<T, __half>;
  static constexpr bool kWide = kWide_;
  static constexpr int kThreads = 128;  // one warpgroup
  static constexpr int kRows = 64;      // query rows per block = wgmma M
  static constexpr int kKeys = 64;      // keys per causal block = N of Q K^T
  static constexpr int kBDV = BDV;      // DHHV columns per block
  static constexpr int kCRows = 16;     // C rows per stage = one wgmma k step
  static constexpr int kKPart = 128;    // K columns per part (kWide)
  static constexpr int kStages = kWide ? 2 : MLSTM_EXT_SM90_STAGES;
  static constexpr int kMinBlocks = MLSTM_EXT_SM90_MINB;
  static constexpr int kCPieces = kCRows * BDV / 4;  // float4 pieces of one C stage
  static_assert(kCPieces % kThreads == 0, "C stage must split evenly over the threads");
};

struct Sm90Layout {
  int dqk_pad;     // DHQK rounded up to two wgmma k steps (32)
  int k_cols;      // K columns held at once: dqk_pad, or kKPart (kWide)
  int q_off;       // Q tile, core-matrix layout (K-major)
  int land_off;    // C landing ring (phase 1) ...
  int kt_off;      // ... shared with the K and V tiles (phase 2) and the H tile (epilogue)
  int vt_off;
  int hl_off;      // C_hi / C_lo of two stages
  int gate_off, row_off, bytes;
  int land_row;    // bytes of one landing row: BDV floats + 16 (keeps row-wise reads conflict-free)
  int land_stage;  // bytes of one landing stage: kCRows rows, then kCRows floats of n
  int hl_half;     // bytes of one of C_hi / C_lo of one stage
  int h_row;       // bytes of one row of the staged H tile
};

// K and V reuse the landing ring once phase 1 is done with it (giving them their own region, to
// copy them early, costs a resident block per SM and measured slower: benchmarks/NOTES.md).
template <class Tr>
__host__ __device__ inline Sm90Layout make_sm90_layout(int DHQK, int L) {
  Sm90Layout s;
  s.dqk_pad = round_up(DHQK, 32);  // even number of 16-wide k steps and 16-byte chunks
  s.k_cols = Tr::kWide && s.dqk_pad > Tr::kKPart ? Tr::kKPart : s.dqk_pad;
  int off = 0;
  s.q_off = off;
  off += round_up(Tr::kRows * s.dqk_pad * 2, 128);
  s.land_off = off;
  s.land_row = Tr::kBDV * 4 + 16;
  s.land_stage = Tr::kCRows * s.land_row + Tr::kCRows * 4;
  const int land = Tr::kStages * s.land_stage;
  const int kv = Tr::kKeys * s.k_cols * 2 + Tr::kKeys * Tr::kBDV * 2;
  s.h_row = (Tr::kBDV + 8) * 2;
  const int ht = Tr::kRows * s.h_row + 2 * Tr::kRows * 4;  // H tile + vecN, vecM (epilogue)
  s.hl_half = Tr::kCRows * Tr::kBDV * 2;
  s.kt_off = off;
  s.vt_off = s.kt_off + Tr::kKeys * s.k_cols * 2;
  if constexpr (Tr::kWide) {  // one region: {landing ring, C_hi/C_lo} | {K part, V} | H tile
    s.hl_off = off + round_up(land, 128);
    int region = s.hl_off + 4 * s.hl_half - off;
    region = region > kv ? region : kv;
    region = region > ht ? region : ht;
    off += round_up(region, 128);
  } else {
    int stream = land > ht ? land : ht;
    stream = stream > kv ? stream : kv;
    s.hl_off = off + round_up(stream, 128);
    off = s.hl_off + 4 * s.hl_half;
  }
  s.gate_off = off;
  off += kGateArrays * round_up(L, Tr::kKeys) * 4;
  s.row_off = off;
  off += kRowArrays * Tr::kRows * 4;
  s.bytes = off;
  return s;
}

}  // namespace mlstm::cuda
