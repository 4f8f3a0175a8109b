// The fused per-chunk kernels of the CUDA backward (backward.cpp's fast path; SPEC.md "The
// backward"). One thread block per (pair, chunk), L / 16 warps, each warp 16 rows of the chunk:
//
//   bw_pre   (before the reverse state scan): nsum's sign and dnsum (exact mode), the row
//            factors qscale = gq * r and (where asked) the 16-bit Qs = Q diag(qscale) whose
//            product with dH is the gradient reaching state k, and
//            Xn = sum_t gq[t] dnsum[t] q_t (the same for the n state).
//   bw_post  (after the scan): the L x L work in registers and shared memory (S = Q K^T, P, W,
//            dW = r dH V^T + dnsum, their products), the products with the states C_k and
//            G_{k+1} (both 16-bit), then dQ, dK, dV, dI and dF.
//
// Every tensor is contiguous over the group's g pairs: rows are (pair * S + position).
// Plain header (no ATen).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mlstm::cuda {

constexpr int kBwTile = 64;  // DHQK / DHHV columns per staged tile; both must be multiples of it

struct BwParams {
  const void *q, *k, *v, *dh, *h;  // (g, S, D) in the inputs' 16-bit dtype
  const float *igate, *fgate;      // (g, S)
  const float *den, *m;            // (g, S): the forward's vecN (den, or nsum) and vecM
  const float* m_states;           // (g, NC + 1): the recomputed m state at each chunk border
  const float* n_states;           // (g, NC + 1, DQ)
  float* dnsum;                    // (g, S): written by bw_pre, read by bw_post (exact mode)
  void* qs;                        // (g, S, DQ) 16-bit or nullptr: bw_pre's Qs
  float* qscale;                   // (g, S) or nullptr: bw_pre's gq * r (Qs = Q diag(qscale))
  float* xn;                       // (g, NC, DQ): bw_pre's Xn
  const void* c_states;            // (g, NC + 1, DQ, DV) 16-bit: the recomputed C states
  const void* g_states;            // (g, NC, DQ, DV) 16-bit: the gradient of C_{k+1} (after the scan)
  const float* gn;                 // (g, NC, DQ): the gradient of n_{k+1} (after the scan)
  const float* last_row;           // (g, NC): decay * <state k, G_{k+1}>, C and n together
  void *dq, *dk, *dv;              // (g, S, D) outputs, 16-bit
  float *di, *df;                  // (g, S) outputs
  int64_t num_blocks;              // g * NC
  int64_t S;
  int NC, L, DQ, DV;
  float qk_scale, eps;
  bool exact;
  bool n_signed;  // den holds the forward's nsum (vecN_signed): bw_pre reads its sign, not Q K^T
  bool grams_pipelined;  // bw_post at L = 128: dH V^T and Q K^T as one pipeline (bw_cuda.cpp)
  int ahead;             // bw_post: state-product steps in flight ahead of the one multiplied,
                         // 0 .. PostSmem<L>::kStages - 1 (bw_cuda.cpp)
};

constexpr int kLd = kBwTile + 8;  // row stride of a staged 16-bit tile: ldmatrix rows hit distinct banks
constexpr int kGateArrays = 8;     // per-chunk gate arrays of L floats (bw_kernels.cuh, Gates)

// Shared memory of bw_pre: the Q and K tiles, the gates, q . n, dH . H, a tile of n_k.
template <int L>
struct PreSmem {
  static constexpr int kBytes = 2 * L * kLd * 2 + ((kGateArrays + 2) * L + kBwTile) * 4;
};

// bw_post's warps (bw_kernels.cuh): kWC per 16-row strip of the chunk, each taking a column
// slice of the strip's L x L rows (kCols columns) and of each output tile (kOutCols). At L = 128
// two: 16 warps, so that S and dH V^T both stay in registers (no 64 KB park in shared memory) and
// twice the warps hide the copies of the one block that fits per SM.
template <int L>
struct PostWarps {
  static constexpr int kWC = L == 128 ? 2 : 1;
  static constexpr int kStrips = L / 16;
  static constexpr int kThreads = 32 * kStrips * kWC;
  static constexpr int kCols = L / kWC;
  static constexpr int kOutCols = kBwTile / kWC;
};

// Byte offsets: the Q/K (or dH) tiles, the two L x L operands, then one region that holds the
// parked dH V^T during the elementwise step (where one warp spans a strip; with two, it stays in
// registers) and the inter-chunk ring after it, then the floats.
// The ring has kStages slots, each an (L, 64) tile of dH, V or K and a 64 x 64 block of a state,
// and kAhead steps in flight besides the one waited for (bw_kernels.cuh, StateStream). At L = 128
// (one block per SM whatever its size) four slots, two ahead: one barrier a step (three ahead
// need a second one, and measured 1-3% slower; H100, NOTES.md "Seventeenth session"); 218 KB,
// under Hopper's 227. At L = 64 two slots, one ahead, so that three blocks still fit per SM.
template <int L>
struct PostSmem {
  static constexpr int kStages = L == 128 ? 4 : 2;
  static constexpr int kAhead = L == 128 ? 2 : 1;
  static constexpr int kLdL = L + 8;  // row stride of the L x L 16-bit matrices
  static constexpr int kTiles = 0;
  static constexpr int kDsp = kTiles + 2 * L * kLd * 2;
  static constexpr int kWr = kDsp + L * kLdL * 2;
  static constexpr int kFrag = kWr + L * kLdL * 2;
  static constexpr int kX = kFrag;                          // kStages (L, 64) tiles of dH, V or K
  static constexpr int kM = kX + kStages * L * kLd * 2;     // kStages 64 x 64 blocks of a state, 16-bit
  static constexpr int kInter = kStages * (L + kBwTile) * kLd * 2;
  static constexpr int kPark = PostWarps<L>::kWC == 1 ? L * L * 4 : 0;
  static constexpr int kRegion = kPark > kInter ? kPark : kInter;
  static constexpr int kFloats = kFrag + kRegion;
  static constexpr int kBytes = kFloats + (kGateArrays + 4) * L * 4;
};

// Whether one block of the kernels fits the device's shared memory per block (opt-in).
inline bool bw_fits(int L, int smem_per_block_optin) {
  const int need = L == 64 ? PostSmem<64>::kBytes : PostSmem<128>::kBytes;
  return need <= smem_per_block_optin;
}

// The state-product steps bw_post keeps in flight ahead at chunk size L: by default, and at most.
inline int bw_default_ahead(int L) { return L == 64 ? PostSmem<64>::kAhead : PostSmem<128>::kAhead; }
inline int bw_max_ahead(int L) { return (L == 64 ? PostSmem<64>::kStages : PostSmem<128>::kStages) - 1; }

// The kernels for L = 64 or 128, DQ and DV multiples of kBwTile, 16-bit inputs (one file per
// dtype): bw_pre when `post` is false, else bw_post.
void launch_bw_bf16(const BwParams& p, bool post, cudaStream_t stream);
void launch_bw_fp16(const BwParams& p, bool post, cudaStream_t stream);

}  // namespace mlstm::cuda
