// The generation step as one kernel (SPEC.md, "The inference step"; the same arithmetic as the
// ATen composite in csrc/step.cpp). Per head, every block of the head first forms the scalars:
//   q . k and q . n (block reductions), then in float64 (as the composite) log sigmoid(f), the
//   stabilisers m' = max(log f + m, i) and m_row = max(log f + m, i, -10), the weights
//   w = s (q . k) e^(i - m_row), g = s e^(log f + m - m_row), den = max(|w + g q . n|, e^-m_row) + eps;
// then streams its 64 columns of C once: q C accumulates from the old C while
//   C' = e^(log f + m - m') C + (e^(i - m') k) v^T
// is written, and h = (w / den) v + (g / den) q C. The state is read once and written once: the
// bytes floor of a step.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common.h"
#include "cuda/mma.cuh"
#include "cuda/step_params.h"
#include "step_scalars.h"

namespace mlstm::cuda {
namespace {

// Sum over the block; every thread gets it. `scratch`: one float per warp.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kStepThreads / 32; ++w) s += scratch[w];
  return s;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kStepThreads) step_kernel(const StepParams p) {
  __shared__ float red[2][kStepThreads / 32];
  __shared__ float coef[2];    // decay, weight of the new k v^T
  __shared__ double hcoef[2];  // w / den, g / den: the latter passes float32's range for large m
  __shared__ float part[kStepRowGroups][kStepCols + 4];

  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x / p.n_dvt;
  const int64_t dvt = blockIdx.x % p.n_dvt;
  const int64_t b = bh / p.NH, h = bh % p.NH;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const float* n = p.n != nullptr ? p.n + b * p.n_sb + h * p.n_sh : nullptr;

  // ---- The head's scalars. ----
  float qk = 0.f, qn = 0.f;
  for (int64_t d = tid; d < p.DHQK; d += kStepThreads) {
    const float qd = to_float(q[d * p.q_sd]);
    qk = fmaf(qd, to_float(k[d * p.k_sd]), qk);
    if (n != nullptr) qn = fmaf(qd, n[d * p.n_sd], qn);
  }
  qk = block_sum(qk, red[0]);
  qn = block_sum(qn, red[1]);
  double m_next = 0.0;
  if (tid == 0) {
    const StepScalars s = step_scalars(qk, qn, p.i[b * p.i_sb + h * p.i_sh], p.f[b * p.f_sb + h * p.f_sh],
                                       p.m != nullptr ? p.m[b * p.m_sb + h * p.m_sh] : 0.f, p.qk_scale, p.eps);
    m_next = s.m_next;
    hcoef[0] = s.wv;
    hcoef[1] = s.wqc;
    coef[0] = static_cast<float>(s.decay);
    coef[1] = static_cast<float>(s.w_in);
  }
  __syncthreads();
  const float decay = coef[0], w_in = coef[1];

  // ---- One pass over this block's 64 columns of C. ----
  const int cg = tid % kStepColThreads, rg = tid / kStepColThreads;
  const int64_t col = dvt * kStepCols + 4 * cg;
  const bool out_vec = (p.DHHV % 4) == 0;
  float vc[4], acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int e = 0; e < 4; ++e) vc[e] = col + e < p.DHHV ? to_float(v[(col + e) * p.v_sd]) : 0.f;
  if (col < p.DHHV) {
    const float* C = p.C != nullptr ? p.C + b * p.C_sb + h * p.C_sh + col * p.C_sc : nullptr;
    float* Cn = p.C_next + bh * p.DHQK * p.DHHV + col;
#pragma unroll 4
    for (int64_t d = rg; d < p.DHQK; d += kStepRowGroups) {
      const float qd = to_float(q[d * p.q_sd]), wk = w_in * to_float(k[d * p.k_sd]);
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      if (C != nullptr) {
        if (kVec && col + 4 <= p.DHHV) {
          const float4 x = __ldcs(reinterpret_cast<const float4*>(C + d * p.C_sr));
          c[0] = x.x, c[1] = x.y, c[2] = x.z, c[3] = x.w;
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) c[e] = col + e < p.DHHV ? C[d * p.C_sr + e * p.C_sc] : 0.f;
        }
      }
      float cn[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[e] = fmaf(qd, c[e], acc[e]);
        cn[e] = fmaf(wk, vc[e], decay * c[e]);
      }
      float* dst = Cn + d * p.DHHV;
      if (out_vec && col + 4 <= p.DHHV) {
        *reinterpret_cast<float4*>(dst) = make_float4(cn[0], cn[1], cn[2], cn[3]);
      } else {
        for (int e = 0; e < 4 && col + e < p.DHHV; ++e) dst[e] = cn[e];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) part[rg][4 * cg + e] = acc[e];
  __syncthreads();
  if (tid < kStepCols) {
    const int64_t j = dvt * kStepCols + tid;
    if (j < p.DHHV) {
      float qc = 0.f;
#pragma unroll
      for (int r = 0; r < kStepRowGroups; ++r) qc += part[r][tid];
      // In float64: g / den may pass float32's range (large m, small eps) while q C is exactly 0.
      const double vj = to_float(v[j * p.v_sd]);
      static_cast<T*>(p.H)[bh * p.DHHV + j] = from_float<T>(static_cast<float>(fma(hcoef[0], vj, hcoef[1] * qc)));
    }
  }

  // ---- n' and m': the head's first column tile. ----
  if (dvt == 0) {
    for (int64_t d = tid; d < p.DHQK; d += kStepThreads) {
      const float nd = n != nullptr ? n[d * p.n_sd] : 0.f;
      p.n_next[bh * p.DHQK + d] = fmaf(w_in, to_float(k[d * p.k_sd]), decay * nd);
    }
    if (tid == 0) p.m_next[bh] = static_cast<float>(m_next);
  }
}

template <typename T>
void launch_typed(const StepParams& p, int64_t blocks, cudaStream_t stream) {
  if (p.c_vec) {
    step_kernel<T, true><<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(p);
  } else {
    step_kernel<T, false><<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_step(const StepParams& p, int64_t num_bh, StepDtype dtype, cudaStream_t stream) {
  const int64_t blocks = num_bh * p.n_dvt;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "recurrent_step: ", num(blocks),
              " thread blocks exceed the CUDA grid limit; split the batch");
  if (blocks == 0) return;
  switch (dtype) {
    case StepDtype::kFloat32: launch_typed<float>(p, blocks, stream); break;
    case StepDtype::kBFloat16: launch_typed<__nv_bfloat16>(p, blocks, stream); break;
    case StepDtype::kFloat16: launch_typed<__half>(p, blocks, stream); break;
  }
}

}  // namespace mlstm::cuda
