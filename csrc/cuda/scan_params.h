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

}  // namespace mlstm::cuda
