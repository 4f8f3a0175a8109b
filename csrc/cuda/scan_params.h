// The reverse state scan of the backward on CUDA (backward.h describes what it computes):
// parameters of the kernel in scan_bw.cu, filled by scan_cuda.cpp. Plain header (no ATen).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mlstm::cuda {

constexpr int kScanThreads = 256;
constexpr int kScanWarps = kScanThreads / 32;

struct ScanParams {
  float* X;             // (G, NC, E): in, the gradient from chunk k's rows; out, that of state k+1
  const float* decay;   // (G, NC)
  const float* last;    // (G, E) or nullptr (zeros): the gradient of state NC
  float* first;         // (G, E): the gradient of state 0
  const float* states;  // state k of pair g at states + g * states_stride_g + k * E
  int64_t states_stride_g;
  float* dots;          // (G, NC, warps_per_pair): per-warp partials of <state k, G_{k+1}>
  int64_t G, NC, E;
  int64_t blocks_per_pair, warps_per_pair;
  int vec;              // entries per thread: 4 (E and every base a multiple of 4 floats) or 1
};

void launch_reverse_state_scan(const ScanParams& p, cudaStream_t stream);

// The same reverse scan for the C states of the fused backward with the chunk products inside
// (scan_gram.cu): X_k = Qs_k^T dH_k is formed per chunk in mma accumulators and never reaches
// memory. One block of kGramThreads per (pair, kGramTile rows of DQ, kGramTile columns of DV);
// rows are contiguous, DQ and DV multiples of kGramTile, S = NC * L, L a multiple of kGramBL.
constexpr int kGramThreads = 128;  // 4 warps x 16 rows of the tile
constexpr int kGramTile = 64;
constexpr int kGramBL = 64;        // sequence positions per ring stage
constexpr int kGramStages = 3;
constexpr int kGramWarpsPerBlock = kGramThreads / 32;

struct GramScanParams {
  const void* qs;       // (G, S, DQ), the inputs' 16-bit dtype: Q (with qscale) or bw_pre's Qs
  const float* qscale;  // (G, S) or nullptr: row t of qs enters the products as qs[t] * qscale[t]
                        // rounded to 16 bits (bw_pre's Qs, formed here instead of stored)
  const void* dh;       // (G, S, DV), the same dtype
  const float* decay;   // (G, NC)
  const float* last;    // (G, DQ * DV) or nullptr (zeros): the gradient of C_NC
  const void* states;   // C_k of pair g at states + g * states_stride_g + k * DQ * DV, 16-bit
  int64_t states_stride_g;
  void* G;              // (G, NC, DQ * DV) out, the inputs' 16-bit dtype (what bw_post reads):
                        // slot k holds the gradient of C_{k+1}
  float* first;         // (G, DQ * DV) out: the gradient of C_0
  float* dots;          // (G, NC, warps_per_pair): per-warp partials of <C_k, G_{k+1}>
  int64_t num_pairs, S;
  int NC, L, DQ, DV;
  int n_qkt, n_hvt;     // tiles of DQ and DV per pair
  int warps_per_pair;   // n_qkt * n_hvt * kGramWarpsPerBlock
};

// is_bf16: bfloat16 rows, else float16.
void launch_gram_scan(const GramScanParams& p, bool is_bf16, cudaStream_t stream);

}  // namespace mlstm::cuda
