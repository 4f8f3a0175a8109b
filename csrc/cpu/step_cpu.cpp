// CPU kernel of the generation step's fused op (_recurrent_step_fused; SPEC.md, "The inference
// step"): the arithmetic of the ATen composite (csrc/step.cpp) in one pass over the state.
// Tasks are (batch*head, tile of DHHV columns); each forms its head's scalars (q . k and q . n in
// float64, the gate terms in float64 as the composite), then walks the rows of its columns of C
// once: q C accumulates from the old C while C' = decay C + (w_in k) v^T is written. The tile of
// the first columns also writes n' and m'. The inner loops run over contiguous columns (the
// compiler vectorises them); a state with a column stride takes the strided loop.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "step.h"
#include "step_scalars.h"

namespace mlstm {
namespace {

constexpr int64_t kCols = 256;  // DHHV columns per task

// T: input dtype; A: compute dtype (float, or double for float64 inputs).
template <typename T, typename A>
void step_typed(const StepArgs& a, at::Tensor& vecH, at::Tensor& C_next, at::Tensor& n_next, at::Tensor& m_next) {
  const int64_t B = a.vecQ.size(0), NH = a.vecQ.size(1), DHQK = a.vecQ.size(2), DHHV = a.vecV.size(2);
  const T *q = a.vecQ.data_ptr<T>(), *k = a.vecK.data_ptr<T>(), *v = a.vecV.data_ptr<T>();
  const A *gi = a.scaI.data_ptr<A>(), *gf = a.scaF.data_ptr<A>();
  const A* gm = a.scaM.defined() ? a.scaM.data_ptr<A>() : nullptr;
  const A* C = a.matC.defined() ? a.matC.data_ptr<A>() : nullptr;
  const A* n = a.vecN.defined() ? a.vecN.data_ptr<A>() : nullptr;
  T* H = vecH.data_ptr<T>();
  A *Cn = C_next.data_ptr<A>(), *nn = n_next.data_ptr<A>(), *mn = m_next.data_ptr<A>();
  const int64_t n_tiles = std::max<int64_t>(1, (DHHV + kCols - 1) / kCols);
  const auto qs = a.vecQ.strides(), ks = a.vecK.strides(), vs = a.vecV.strides();
  const c10::IntArrayRef ns = n != nullptr ? a.vecN.strides() : c10::IntArrayRef();

  at::parallel_for(0, B * NH * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qc(kCols), vt(kCols);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_tiles, j0 = (task % n_tiles) * kCols, b = bh / NH, h = bh % NH;
      const int64_t cols = std::max<int64_t>(0, std::min(kCols, DHHV - j0));
      const T* qh = q + b * qs[0] + h * qs[1];
      const T* kh = k + b * ks[0] + h * ks[1];
      const T* vh = v + b * vs[0] + h * vs[1];
      const A* nh = n != nullptr ? n + b * ns[0] + h * ns[1] : nullptr;
      double qk = 0.0, qn = 0.0;
      for (int64_t d = 0; d < DHQK; ++d) {
        const double qd = static_cast<double>(static_cast<A>(qh[d * qs[2]]));
        qk += qd * static_cast<double>(static_cast<A>(kh[d * ks[2]]));
        if (nh != nullptr) qn += qd * static_cast<double>(nh[d * ns[2]]);
      }
      const StepScalars s = step_scalars(
          qk, qn, gi[b * a.scaI.stride(0) + h * a.scaI.stride(1)], gf[b * a.scaF.stride(0) + h * a.scaF.stride(1)],
          gm != nullptr ? static_cast<double>(gm[b * a.scaM.stride(0) + h * a.scaM.stride(1)]) : 0.0, a.qk_scale, a.eps);
      const A decay = static_cast<A>(s.decay), w_in = static_cast<A>(s.w_in);

      // One pass over this task's columns of C.
      for (int64_t j = 0; j < cols; ++j) vt[j] = static_cast<A>(vh[(j0 + j) * vs[2]]), qc[j] = A(0);
      A* out = Cn + (bh * DHQK) * DHHV + j0;
      const A* Ch = C != nullptr ? C + b * a.matC.stride(0) + h * a.matC.stride(1) + j0 * a.matC.stride(3) : nullptr;
      const int64_t c_sr = C != nullptr ? a.matC.stride(2) : 0, c_sc = C != nullptr ? a.matC.stride(3) : 0;
      for (int64_t d = 0; d < DHQK; ++d) {
        const A qd = static_cast<A>(qh[d * qs[2]]), wk = w_in * static_cast<A>(kh[d * ks[2]]);
        A* o = out + d * DHHV;
        if (Ch == nullptr) {
          for (int64_t j = 0; j < cols; ++j) o[j] = wk * vt[j];
        } else if (c_sc == 1) {
          const A* c = Ch + d * c_sr;
          for (int64_t j = 0; j < cols; ++j) {
            qc[j] += qd * c[j];
            o[j] = decay * c[j] + wk * vt[j];
          }
        } else {
          const A* c = Ch + d * c_sr;
          for (int64_t j = 0; j < cols; ++j) {
            const A x = c[j * c_sc];
            qc[j] += qd * x;
            o[j] = decay * x + wk * vt[j];
          }
        }
      }
      // In float64: g / den passes float32's range when m is large and eps small (up to
      // qk_scale e^m), and q C may be exactly 0 (a zero state), where the product must stay 0.
      for (int64_t j = 0; j < cols; ++j) {
        H[bh * DHHV + j0 + j] = static_cast<T>(static_cast<A>(s.wv * static_cast<double>(vt[j]) +
                                                              s.wqc * static_cast<double>(qc[j])));
      }

      if (j0 == 0) {  // n' and m'
        for (int64_t d = 0; d < DHQK; ++d) {
          const A nd = nh != nullptr ? nh[d * ns[2]] : A(0);
          nn[bh * DHQK + d] = decay * nd + w_in * static_cast<A>(kh[d * ks[2]]);
        }
        mn[bh] = static_cast<A>(s.m_next);
      }
    }
  });
}

}  // namespace

void step_cpu(const StepArgs& a, StepOutputs& out) {
  auto& [vecH, matC_next, vecN_next, scaM_next] = out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.vecQ.scalar_type(), "recurrent_step_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    step_typed<scalar_t, A>(a, vecH, matC_next, vecN_next, scaM_next);
  });
}

}  // namespace mlstm
