// Parameters of the fused CUDA kernel of the generation step (SPEC.md, "The inference step"):
// one launch computes h, C', n' and m' for every head. Shared by the kernel (step_kernel.cu) and
// its host entry (step_cuda.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mlstm::cuda {

// Tile of one block: 64 columns of DHHV (16 threads x 4 columns) and every row of DHQK, walked by
// 16 row groups; the q C partial sums of the row groups meet in shared memory.
constexpr int kStepThreads = 256;
constexpr int kStepCols = 64;
constexpr int kStepColThreads = kStepCols / 4;
constexpr int kStepRowGroups = kStepThreads / kStepColThreads;

// Inputs with the caller's strides (in elements); states and gates float32. A null state pointer
// means "absent": zeros.
struct StepParams {
  const void* q;
  int64_t q_sb, q_sh, q_sd;
  const void* k;
  int64_t k_sb, k_sh, k_sd;
  const void* v;
  int64_t v_sb, v_sh, v_sd;
  const float* i;
  int64_t i_sb, i_sh;
  const float* f;
  int64_t f_sb, f_sh;
  const float* m;  // nullptr: zeros
  int64_t m_sb, m_sh;
  const float* C;  // nullptr: zeros
  int64_t C_sb, C_sh, C_sr, C_sc;
  const float* n;  // nullptr: zeros
  int64_t n_sb, n_sh, n_sd;
  // Outputs, contiguous: H (B, NH, DHHV) in the input dtype, C' (B, NH, DHQK, DHHV), n' (B, NH,
  // DHQK), m' (B, NH), all float32.
  void* H;
  float* C_next;
  float* n_next;
  float* m_next;
  int64_t NH, DHQK, DHHV;
  int64_t n_dvt;  // column tiles per head (at least 1: tile 0 writes n' and m')
  double qk_scale, eps;
  bool c_vec;  // C rows 16-byte aligned with unit column stride: float4 loads
};

enum class StepDtype { kFloat32, kBFloat16, kFloat16 };

// One launch of B*NH*n_dvt blocks on `stream`.
void launch_step(const StepParams& p, int64_t num_bh, StepDtype dtype, cudaStream_t stream);

}  // namespace mlstm::cuda
