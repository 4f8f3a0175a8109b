// Parameters, tile plan and shared-memory layout of the CUDA kernels of recurrent_fw_states
// (SPEC.md, "How the states are made"). Included by the kernels (device) and the host code, so
// both agree on the layout. The tile plan is here and nowhere else.
//
// Two kernels run on the caller's stream:
// 1. states_gates_kernel (one warp per chunk): a[s] = (g_k - bg[s]) + vecI[kL+s] for every
//    position, and per chunk the pair (g_k, max_s a[s]). g_k - bg[s] is formed as the sum of
//    logsigmoid(f) after s (a reverse scan), never as a difference of two cumulative sums, so a
//    huge negative forget gate (f = -1e30) does not cancel away the other terms.
// 2. states_kernel (one block per (b*h, DHQK tile, DHHV tile)): walks the chunks in order with
//    the C tile in mma accumulators. Per chunk: m_{k+1} = max(g_k + m_k, max_s a[s]) (every block
//    of a (b, h) computes the same scalar), C <- exp(g_k + m_k - m_{k+1}) C + K^T diag(w) V with
//    w[s] = exp(a[s] - m_{k+1}), then the tile of slot k+1 is stored.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace mlstm::cuda {

// Kernel 1's inputs and outputs. Gates are float32 with the caller's strides.
struct StatesGateParams {
  const float* igate;
  int64_t i_sb, i_sh, i_ss;
  const float* fgate;
  int64_t f_sb, f_sh, f_ss;
  float* a;    // (B*NH, S) contiguous
  float2* gm;  // (B*NH, NC) contiguous: (g_k, max_s a[s])
  int64_t NH, S;
  int64_t num_chunks;  // B*NH*NC
  int L, NC;
};

// Kernel 2's inputs and outputs. K/V rows have unit column stride (the host makes it so);
// initial states may be strided or absent (nullptr: zeros).
struct StatesParams {
  const void* k;
  int64_t k_sb, k_sh, k_ss;
  const void* v;
  int64_t v_sb, v_sh, v_ss;
  const float* a;    // from kernel 1
  const float2* gm;  // from kernel 1
  const float* C0;
  int64_t C0_sb, C0_sh, C0_sr, C0_sc;
  const float* n0;
  int64_t n0_sb, n0_sh, n0_sr;
  const float* m0;
  int64_t m0_sb, m0_sh;
  void* C;   // (B, NH, (NC+1)*DHQK, DHHV) contiguous: float32, or (c16) the 16-bit input dtype
  bool c16;  // C rounded to the inputs' 16-bit dtype (the backward's recompute: its kernels
             // multiply C in that dtype); the op's outputs are float32
  float* n;  // (B, NH, (NC+1)*DHQK)
  float* m;  // (B, NH, NC+1)
  int64_t NH, S;
  int DHQK, DHHV, L, NC;
  int n_qkt, n_hvt;  // DHQK tiles, DHHV tiles (at least 1 each: the block of tile (0, 0) writes m)
  bool k_vec, v_vec; // rows 16-byte aligned: cp.async path
  bool split;        // two warps per 16-row strip (StatesTraits kSplit = 2): chosen by the plan
                     // when the grid is too small to give every SM 16 warps otherwise
};

// Build-time knobs for A/B runs (the `ab` stage of benchmarks/gpu_check.sh): ring depth and minimum resident blocks
// per SM of the register budget. Each stage is ~18.5 KB; 2 stages + staging = ~55 KB per block.
#ifndef MLSTM_EXT_STATES_STAGES
#define MLSTM_EXT_STATES_STAGES 2
#endif
#ifndef MLSTM_EXT_STATES_MINB
#define MLSTM_EXT_STATES_MINB 4
#endif

// The tile plan. A block holds a kBQK x kBHV tile of C in 4 strips of 16 DHQK rows (all kBHV
// columns) and streams the sequence in steps of kBL positions (a chunk is ceil(L / kBL) steps)
// through a kStages-deep cp.async ring. kSplit warps share a strip: each takes every kSplit-th
// k-step of a step's positions into its own partial C and n, summed only when a slot is stored
// (the decay is linear, so each partial takes it alone). kSplit = 2 doubles the warps that hide
// each other's latency where the grid has few blocks: (1, 8, *, 256, 512, *) has 256 blocks,
// under 2 warps per scheduler on an H100 with one warp per strip (ncu: 5.3 cycles between a
// warp's instructions, 41% of them waiting on a fixed-latency dependency). Row strides are padded by 8
// elements: ldmatrix rows at an odd multiple of 16 bytes (16-bit) and 4-byte fragment loads on
// 32 distinct banks (float32); the C staging rows (72 floats = 8 mod 32 banks) take the
// accumulators' float2 writes without conflicts.
template <typename T_, int kSplit_ = 1>
struct StatesTraits {
  using T = T_;
  static constexpr bool kIsFloat = std::is_same_v<T, float>;
  static constexpr int kStrips = 4;
  static constexpr int kSplit = kSplit_;           // warps per strip
  static constexpr int kWarps = kStrips * kSplit;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBQK = 16 * kStrips;        // DHQK rows of C per block
  static constexpr int kBHV = 64;                  // DHHV columns of C per block
  static constexpr int kBL = kIsFloat ? 32 : 64;   // sequence positions per ring stage
  static constexpr int kStages = MLSTM_EXT_STATES_STAGES;
  static constexpr int kKStep = kIsFloat ? 8 : 16; // k of one mma
  static constexpr int kSK = kBQK + 8;             // K stage row stride (elements)
  static constexpr int kSV = kBHV + 8;             // V stage row stride (elements)
  static constexpr int kSC = kBHV + 8;             // C staging row stride (floats); column
                                                   // kBHV carries the second warp's n (kSplit 2)
  // Four blocks per SM: all 512 blocks of (8, 16, *, 128, 128, *) resident in one wave on an
  // H100 (132 SMs), which the ~55 KB of shared memory per block also allows. kSplit = 2: two
  // blocks of 8 warps, the same register budget per thread.
  static constexpr int kMinBlocks = kSplit == 1 ? MLSTM_EXT_STATES_MINB : 2;
  static_assert(kSplit == 1 || kSplit == 2, "one or two warps per strip");

  // Shared memory: kStages x {K tile, V tile, a[kBL], (g, max a)} | C staging (16 rows per strip).
  static constexpr int kKBytes = kBL * kSK * static_cast<int>(sizeof(T));
  static constexpr int kVBytes = kBL * kSV * static_cast<int>(sizeof(T));
  static constexpr int kABytes = kBL * 4;
  static constexpr int kStageBytes = kKBytes + kVBytes + kABytes + 16;
  static constexpr int kStagingOff = kStages * kStageBytes;
  static constexpr int kSmemBytes = kStagingOff + kBQK * kSC * 4;
  static_assert(kStages >= 2, "a ring of at least two stages");
  static_assert(kBL <= kThreads, "one thread per position stages a[]");
  static_assert(kKBytes % 16 == 0 && kVBytes % 16 == 0 && kABytes % 16 == 0 && kStageBytes % 16 == 0,
                "16-byte aligned regions");
};

constexpr int kGateWarps = 4;  // warps (chunks) per block of kernel 1

// Host entry points (states_gates.cu, states_{bf16,fp16,fp32}.cu). num_bh = B*NH; run on `stream`.
void launch_states_gates(const StatesGateParams& p, cudaStream_t stream);
void launch_states_bf16(const StatesParams& p, int64_t num_bh, cudaStream_t stream);
void launch_states_fp16(const StatesParams& p, int64_t num_bh, cudaStream_t stream);
void launch_states_fp32(const StatesParams& p, int64_t num_bh, cudaStream_t stream);

}  // namespace mlstm::cuda
