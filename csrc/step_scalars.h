// The generation step's per-head scalars (SPEC.md, "The inference step"), in float64, written once
// for the fused CPU kernel (csrc/cpu/step_cpu.cpp) and the fused CUDA kernel
// (csrc/cuda/step_kernel.cu); the ATen composite (csrc/step.cpp) forms the same with tensor ops.
#pragma once

#include <cmath>

#include "common.h"

#ifdef __CUDACC__
#define MLSTM_HOST_DEVICE __host__ __device__
#else
#define MLSTM_HOST_DEVICE
#endif

namespace mlstm {

struct StepScalars {
  double wv, wqc;       // h = wv v + wqc (q C): w / den and g / den
  double decay, w_in;   // C' = decay C + w_in k v^T (and n alike)
  double m_next;        // m'
};

MLSTM_HOST_DEVICE inline bool step_isnan(double x) { return x != x; }

// max that keeps NaN, as torch.maximum.
MLSTM_HOST_DEVICE inline double step_max(double a, double b) {
  return (step_isnan(a) || step_isnan(b)) ? a + b : (a > b ? a : b);
}

// log(sigmoid(x)) without overflow: min(x, 0) - log1p(e^-|x|); NaN stays NaN.
MLSTM_HOST_DEVICE inline double step_log_sigmoid(double x) {
  return step_isnan(x) ? x : (x < 0.0 ? x : 0.0) - log1p(exp(-fabs(x)));
}

// From q . k, q . n, the gates and the incoming m of one head.
MLSTM_HOST_DEVICE inline StepScalars step_scalars(double qk, double qn, double i, double f, double m,
                                                  double qk_scale, double eps) {
  double lf = step_log_sigmoid(f);
  if (!step_isnan(lf) && fabs(lf) != INFINITY) lf = step_max(lf, kMinLogForget);  // SPEC step 1
  const double carried = lf + m;  // log weight of the incoming state
  StepScalars s;
  s.m_next = step_max(carried, i);
  const double m_row = step_max(carried, step_isnan(i) ? i : step_max(i, kMinimumMaxVal));
  const double w = qk_scale * qk * exp(i - m_row), g = qk_scale * exp(carried - m_row);
  const double den = step_max(fabs(w + g * qn), exp(-m_row)) + eps;
  s.wv = w / den, s.wqc = g / den;
  s.decay = exp(carried - s.m_next), s.w_in = exp(i - s.m_next);
  return s;
}

}  // namespace mlstm
