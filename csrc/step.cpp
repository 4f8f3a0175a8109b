// recurrent_step (step.h): SPEC.md's arithmetic for one position, in ATen ops. The output is the H
// step at chunk_size 1 (so a step continues a chunkwise prefill exactly), the states are the
// recurrence of "The chunk-border states" for one position. The per-head scalars (gates,
// stabilisers, normaliser) are formed in float64, as the CPU kernel forms its gate terms: the
// lower bound exp(-m) then never underflows, so no frame shift is needed; the vectors (q C,
// the state update) run in the compute dtype.
#include "step.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace mlstm {

namespace {

// The fused kernels serve CPU inputs and CUDA inputs (not float64) when no gradient is wanted, in
// either mode: they have no derivative, and the ATen path below has autograd's.
bool fused_kernel_applies(const at::Tensor& vecQ, std::initializer_list<const at::Tensor*> inputs) {
#ifdef MLSTM_EXT_WITH_CUDA
  const bool cuda = vecQ.is_cuda() && vecQ.scalar_type() != at::kDouble;
#else
  const bool cuda = false;
#endif
  if (!cuda && !vecQ.is_cpu()) return false;
  const bool grad_mode = at::GradMode::is_enabled();
  for (const at::Tensor* t : inputs) {  // a tangent: the ATen ops have forward-mode formulas too
    if (t->defined() && (t->_fw_grad(/*level=*/0).defined() || (grad_mode && t->requires_grad()))) return false;
  }
  return true;
}

}  // namespace

StepOutputs recurrent_step(const at::Tensor& vecQ, const at::Tensor& vecK, const at::Tensor& vecV,
                           const at::Tensor& scaI, const at::Tensor& scaF,
                           const std::optional<at::Tensor>& matC, const std::optional<at::Tensor>& vecN,
                           const std::optional<at::Tensor>& scaM, std::optional<double> qk_scale,
                           double eps) {
  // Under autocast the matmul of step_aten would run in 16 bits (C rounded to bf16): like the
  // kernel ops, the step computes in its own dtypes whatever the autocast state.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor none;
  if (fused_kernel_applies(vecQ, {&vecQ, &vecK, &vecV, &scaI, &scaF, matC ? &*matC : &none,
                                  vecN ? &*vecN : &none, scaM ? &*scaM : &none})) {
    static const auto fused = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("mlstm::_recurrent_step_fused", "")
                                  .typed<decltype(recurrent_step)>();
    return fused.call(vecQ, vecK, vecV, scaI, scaF, matC, vecN, scaM, qk_scale, eps);
  }
  return step_aten(check_step_args(vecQ, vecK, vecV, scaI, scaF, matC, vecN, scaM, qk_scale, eps));
}

StepOutputs allocate_step_outputs(const StepArgs& a) {
  const c10::SymInt B = a.vecQ.sym_size(0), NH = a.vecQ.sym_size(1), DHQK = a.vecQ.sym_size(2);
  const c10::SymInt DHHV = a.vecV.sym_size(2);
  const auto state = a.vecQ.options().dtype(a.compute);
  return {at::empty_symint({B, NH, DHHV}, a.vecQ.options()), at::empty_symint({B, NH, DHQK, DHHV}, state),
          at::empty_symint({B, NH, DHQK}, state),
          a.m_keepdim ? at::empty_symint({B, NH, 1}, state) : at::empty_symint({B, NH}, state)};
}

StepOutputs step_aten(const StepArgs& a) {
  const at::ScalarType cd = a.compute;
  const at::Tensor q = a.vecQ.to(cd), k = a.vecK.to(cd), v = a.vecV.to(cd);

  // Gates in float64. SPEC step 1: finite log forget gates below kMinLogForget count as it.
  at::Tensor lf = at::log_sigmoid(a.scaF.to(at::kDouble));
  lf = at::where(at::isinf(lf), lf, lf.clamp_min(kMinLogForget));
  const at::Tensor i = a.scaI.to(at::kDouble);
  const at::Tensor m = a.scaM.to(at::kDouble).detach();  // a stabiliser: no gradient (SPEC.md)
  const at::Tensor carried = lf + m;  // log weight of the incoming state
  // Stabilisers are constants (SPEC.md, "Gradients"); maximum keeps NaN.
  const at::Tensor m_next = at::maximum(carried, i).detach();                       // the state's
  const at::Tensor m_row = at::maximum(carried, i.clamp_min(kMinimumMaxVal)).detach();  // steps 3-4

  // Output (SPEC steps 5-7 with L = 1): num = w v + g q C, nsum = w + g q . n, old states.
  const at::Tensor qk = (q * k).sum(-1).to(at::kDouble);
  const at::Tensor qn = (q * a.vecN).sum(-1).to(at::kDouble);
  const at::Tensor w = a.qk_scale * qk * at::exp(i - m_row);   // (B, NH)
  const at::Tensor g = a.qk_scale * at::exp(carried - m_row);  // (B, NH)
  const at::Tensor den = at::maximum((w + g * qn).abs(), at::exp(-m_row)) + a.eps;
  const at::Tensor qC = at::matmul(q.unsqueeze(-2), a.matC).squeeze(-2);  // (B, NH, DHHV)
  const at::Tensor num = w.unsqueeze(-1) * v.to(at::kDouble) + g.unsqueeze(-1) * qC.to(at::kDouble);
  const at::Tensor vecH = (num / den.unsqueeze(-1)).to(a.vecQ.scalar_type());

  // States: C' = e^(carried - m') C + e^(i - m') k v^T, n' likewise, m' = max(carried, i).
  const at::Tensor decay = at::exp(carried - m_next).to(cd), w_in = at::exp(i - m_next).to(cd);
  // Two passes over C (scale, then the rank-1 update), not four.
  const at::Tensor wk = w_in.unsqueeze(-1) * k;
  const at::Tensor matC_next = at::addcmul(decay.unsqueeze(-1).unsqueeze(-1) * a.matC, wk.unsqueeze(-1), v.unsqueeze(-2));
  const at::Tensor vecN_next = decay.unsqueeze(-1) * a.vecN + wk;
  at::Tensor scaM_next = m_next.to(cd);
  if (a.m_keepdim) scaM_next = scaM_next.unsqueeze(-1);
  return {vecH, matC_next, vecN_next, scaM_next};
}

}  // namespace mlstm
