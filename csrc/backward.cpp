// The backward of chunkwise_fw (SPEC.md, "The backward"), written once for every device: batched
// GEMMs over all chunks at once (on CUDA, 16-bit operands on tensor cores with float32 results),
// elementwise ATen ops for the gate arithmetic, the backend's states kernel for the recompute and
// the backend's reverse state scan. (batch, head) pairs run in groups so that the workspace stays
// under workspace_cap() whatever the batch.
#include <c10/core/DeviceGuard.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "backward.h"

// GEMMs of 16-bit operands with float32 results (aten::bmm.dtype, baddbmm.dtype) since torch 2.8;
// before, the operands are converted to float32.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MLSTM_EXT_OUT_DTYPE_GEMM 1
#endif

namespace mlstm {
namespace {

// Entries of one (batch, head) pair's NC + 1 states (C, n, m).
int64_t state_entries(const StatesArgs& s) { return (s.NC + 1) * (s.DHQK * s.DHHV + s.DHQK + 1); }

// The workspace cap: MLSTM_EXT_BACKWARD_WORKSPACE_MB if set, else 512 MiB or, where more, twice
// the bytes of the float32 states of every pair (which the forward held at its own peak). Small
// groups leave the states kernel and the scans a block per SM or less, where they are
// latency-bound: at (1, 8, 16384, 256, 512, 128) the fused path's 8 pairs (110 MB each) fit one
// group under this cap, not under the forward's state bytes alone (NOTES.md, seventh session).
// 512, not 640: with the fused path's 16-bit state gradients, 640 MiB took all 128 pairs of
// (8, 16, 4096, 128, 128, 128) in one group of 535 MiB and the peak of forward + backward passed
// Triton's (H200: 1195 MiB against 1182).
int64_t workspace_cap(const StatesArgs& s, int64_t BH) {
  const char* v = std::getenv("MLSTM_EXT_BACKWARD_WORKSPACE_MB");
  const long long mb = v != nullptr ? std::atoll(v) : 0;
  if (mb > 0) return static_cast<int64_t>(mb) << 20;
  return std::max<int64_t>(int64_t{512} << 20, 8 * BH * state_entries(s));
}

// How the fused CUDA path forms the C states' gradients, from MLSTM_EXT_GRAM_SCAN (read once per
// backward call, so that its workspace estimate and path agree; tests and A/B runs switch it in
// one process). kGram (default): the gram scan (csrc/cuda/scan_gram.cu) with bw_pre's
// Qs = Q diag(qscale) formed inside it; kGramQs ("qs"): the same scan reading a Qs that bw_pre
// stores; kGemm ("0"): a cuBLAS GEMM, then the plain scan.
enum class ScanMode { kGram, kGramQs, kGemm };
ScanMode scan_mode() {
  const char* v = std::getenv("MLSTM_EXT_GRAM_SCAN");
  if (v != nullptr && std::strcmp(v, "0") == 0) return ScanMode::kGemm;
  if (v != nullptr && std::strcmp(v, "qs") == 0) return ScanMode::kGramQs;
  return ScanMode::kGram;
}

// Workspace of one (batch, head) pair in bytes, as run_group holds it at its peak: the states,
// their gradients and 16-bit copies of both; per-position rows of the head dims (float32
// gradients, scaled 16-bit operands) and of the gates; three float32 L x L matrices per chunk and
// a float64 one (the spans of the gates).
// The fused CUDA path (run_group_fused) holds the C states and their gradients in 16 bits
// (kGemm: both in float32 too), per position dnsum and qscale (kGram) or bw_pre's Qs
// (the other modes), and Xn.
int64_t workspace_per_pair(const StatesArgs& s, bool fused, ScanMode mode) {
  const int64_t states = state_entries(s);
  if (fused) {
    const int64_t rows = mode == ScanMode::kGram ? 8 * s.S : 2 * s.S * (s.DHQK + 8);
    return (mode == ScanMode::kGemm ? 12 : 4) * states + rows + 4 * s.NC * s.DHQK;
  }
  return 12 * states + 4 * s.S * (5 * s.DHQK + 4 * s.DHHV + 16) + 16 * s.NC * s.L * s.L;
}

// An operand of the GEMMs below as they multiply it: rounded to lp, held in ct (where no GEMM
// takes 16-bit operands with float32 results: the CPU's emulation, torch before 2.8).
at::Tensor operand(const at::Tensor& x, at::ScalarType lp, at::ScalarType ct) {
  return lp == ct ? x.to(ct) : x.to(lp).to(ct);
}

// alpha * x @ y: 16-bit operands with float32 results (tensor cores) when lp != ct, else in ct.
at::Tensor bmm(const at::Tensor& x, const at::Tensor& y, at::ScalarType lp, at::ScalarType ct,
               double alpha = 1.0) {
  at::Tensor out;
#ifdef MLSTM_EXT_OUT_DTYPE_GEMM
  if (lp != ct && x.is_cuda()) out = at::bmm(x.to(lp), y.to(lp), ct);
#endif
  if (!out.defined()) out = at::bmm(operand(x, lp, ct), operand(y, lp, ct));
  return alpha == 1.0 ? out : out.mul_(alpha);
}

// acc += alpha * x @ y, accumulated by the GEMM itself (acc in ct).
void bmm_acc(at::Tensor& acc, const at::Tensor& x, const at::Tensor& y, at::ScalarType lp,
             at::ScalarType ct, double alpha = 1.0) {
#ifdef MLSTM_EXT_OUT_DTYPE_GEMM
  if (lp != ct && x.is_cuda()) {
    at::baddbmm_out(acc, acc, x.to(lp), y.to(lp), ct, 1.0, alpha);
    return;
  }
#endif
  acc.baddbmm_(operand(x, lp, ct), operand(y, lp, ct), 1.0, alpha);
}

// x * scale (broadcast) written in dtype lp: one pass, no float32 intermediate.
at::Tensor scaled(const at::Tensor& x, const at::Tensor& scale, at::ScalarType lp) {
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(lp));
  at::mul_out(out, x, scale);
  return out;
}

at::Tensor reverse_state_scan(at::Tensor& X, const at::Tensor& decay, const at::Tensor& last,
                              at::Tensor& first, const at::Tensor& states, int64_t states_stride_g) {
#ifdef MLSTM_EXT_WITH_CUDA
  if (X.is_cuda()) return reverse_state_scan_cuda(X, decay, last, first, states, states_stride_g);
#endif
  return reverse_state_scan_cpu(X, decay, last, first, states, states_stride_g);
}

struct Plan {
  const BackwardArgs& a;
  StatesKernel states_kernel;
  int64_t BH, S, DQ, DV, L, NC;
  at::ScalarType ct, lp;
  // (BH, ...) views of the inputs.
  at::Tensor Q, K, V, I, F, H, dH, den, m, C0, N0, M0, dCl, dNl;
  at::Tensor upper;  // (L, L): s > t, the entries no row reads
};

// The chunk-border states of g pairs starting at g0 (recurrent_fw_states of this group), NC+1
// slots: C (g, NC+1, DQ, DV) in c_dtype where given (on CUDA the 16-bit input dtype), else like
// n (g, NC+1, DQ) and m (g, NC+1) in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> recompute_states(const Plan& p, int64_t g0, int64_t g,
                                                                std::optional<at::ScalarType> c_dtype) {
  auto sl = [&](const at::Tensor& t) { return t.narrow(0, g0, g); };
  StatesArgs sa = p.a.fw.states;
  sa.B = 1, sa.NH = g;
  sa.matK = sl(p.K).unsqueeze(0), sa.matV = sl(p.V).unsqueeze(0);
  sa.vecI = sl(p.I).unsqueeze(0), sa.vecF = sl(p.F).unsqueeze(0);
  sa.matC_initial = p.C0.defined() ? sl(p.C0).unsqueeze(0) : at::Tensor();
  sa.vecN_initial = p.N0.defined() ? sl(p.N0).unsqueeze(0) : at::Tensor();
  sa.scaM_initial = p.M0.defined() ? sl(p.M0).unsqueeze(0) : at::Tensor();
  auto [C_all, N_all, M_all] = allocate_states_outputs(sa, c_dtype);
  p.states_kernel(sa, C_all, N_all, M_all);
  return {C_all.view({g, p.NC + 1, p.DQ, p.DV}), N_all.view({g, p.NC + 1, p.DQ}), M_all.view({g, p.NC + 1})};
}

// SPEC's den = max(|nsum|, exp(-m)) from the forward's vecN: den itself, or nsum where the forward
// ran with vecN_signed (at::maximum keeps NaN).
at::Tensor den_of(const at::Tensor& vecN, const at::Tensor& m, bool vecN_signed) {
  return vecN_signed ? at::maximum(vecN.abs(), at::exp(-m)) : vecN;
}

// The log forget gates (g, NC, L) in float64, finite ones clamped at kMinLogForget (SPEC.md step 1).
at::Tensor log_forget(const at::Tensor& F) {
  at::Tensor lf = at::log_sigmoid(F.to(at::kDouble));
  return at::where(lf.isinf(), lf, lf.clamp_min(kMinLogForget));
}

// The gradients of the group's initial states (outputs) and of its last states (undefined: zero),
// (g, E) and (g, DQ).
struct BorderGrads {
  at::Tensor dC0, dN0, dCl, dNl;
};
BorderGrads border_grads(const Plan& p, int64_t g0, int64_t g, BackwardOutputs& out) {
  return {std::get<5>(out).view({p.BH, p.DQ * p.DV}).narrow(0, g0, g),
          std::get<6>(out).view({p.BH, p.DQ}).narrow(0, g0, g),
          p.dCl.defined() ? p.dCl.narrow(0, g0, g) : at::Tensor(),
          p.dNl.defined() ? p.dNl.narrow(0, g0, g) : at::Tensor()};
}

// The n states' part of the way back (Xn becomes the gradient of n_{k+1}, dN0 is written), joined
// with the C states' partial dots: decay_k <(C_k, n_k), G_{k+1}>, the gradient of log decay_k
// (g, NC).
at::Tensor scan_n_back(const Plan& p, BorderGrads& b, at::Tensor& Xn, const at::Tensor& decay,
                       const at::Tensor& N_all, const at::Tensor& dots_C) {
  const at::Tensor dots_n = reverse_state_scan(Xn, decay, b.dNl, b.dN0, N_all, (p.NC + 1) * p.DQ);
  return decay * (dots_C.sum(-1) + dots_n.sum(-1));
}

// Back through the recurrence for the g pairs from g0 (both paths): X[k], the gradient reaching
// state k from chunk k's rows, becomes the gradient of state k+1 (Xn likewise for n), and the
// initial states' gradients go to their outputs. Returns decay_k <(C_k, n_k), G_{k+1}>, the
// gradient of log decay_k (g, NC).
at::Tensor scan_back(const Plan& p, int64_t g0, int64_t g, at::Tensor& X, at::Tensor& Xn,
                     const at::Tensor& decay, const at::Tensor& C_all, const at::Tensor& N_all,
                     BackwardOutputs& out) {
  BorderGrads b = border_grads(p, g0, g, out);
  const at::Tensor dots_C = reverse_state_scan(X, decay, b.dCl, b.dC0, C_all, (p.NC + 1) * p.DQ * p.DV);
  return scan_n_back(p, b, Xn, decay, N_all, dots_C);
}

// Gradients of g pairs starting at g0, written into the outputs' slices.
void run_group(const Plan& p, int64_t g0, int64_t g, BackwardOutputs& out) {
  const int64_t NC = p.NC, L = p.L, DQ = p.DQ, DV = p.DV, E = DQ * DV;
  const at::ScalarType ct = p.ct, lp = p.lp;
  const double qk_scale = p.a.fw.qk_scale;
  auto sl = [&](const at::Tensor& t) { return t.narrow(0, g0, g); };
  auto [C_all, N_all, M_all] = recompute_states(p, g0, g, std::nullopt);

  // Gates (g, NC, L) and per-chunk factors (g, NC); m_k, m_{k+1}, m[t] are constants.
  const at::Tensor I = sl(p.I).view({g, NC, L}), F = sl(p.F).view({g, NC, L});
  const at::Tensor m = sl(p.m).view({g, NC, L});
  // The log forget gates and their prefix sum bg in float64, finite gates clamped at
  // kMinLogForget (SPEC.md step 1): a span bg[t] - bg[s] keeps an ordinary gate beside a huge one
  // before it (-1e12 would absorb every other gate of the chunk in a float32 sum), and -1e38
  // cannot overflow the sum.
  const at::Tensor bg = log_forget(F).cumsum(-1);
  const at::Tensor m_prev = M_all.narrow(1, 0, NC), m_next = M_all.narrow(1, 1, NC);
  const at::Tensor g_k = bg.select(-1, L - 1);
  // gq[t]: weight of the incoming state in row t; ga[s]: of key s in the next state.
  const at::Tensor gq = at::exp((bg + m_prev.unsqueeze(-1)) - m).mul_(qk_scale).to(ct);
  const at::Tensor ga = at::exp((g_k.unsqueeze(-1) - bg) + (I - m_next.unsqueeze(-1))).to(ct);
  const at::Tensor decay = at::exp((g_k + m_prev) - m_next).to(ct);

  // Inputs as (g * NC, L, D) batches of chunks, in their own dtype. V contiguous: dnsum's dots
  // (below) cancel, so they must not take another rounding order for another caller's strides.
  const at::Tensor Q = sl(p.Q).reshape({g * NC, L, DQ}), K = sl(p.K).reshape({g * NC, L, DQ});
  const at::Tensor V = sl(p.V).reshape({g * NC, L, DV}).contiguous();
  auto rows = [&](const at::Tensor& t) { return t.view({g, NC, L, t.size(-1)}); };

  // Intra-chunk weights W = qk_scale (q_t . k_s) P[t, s], P = exp(bg[t] - bg[s] + i[s] - m[t]);
  // the masks keep later rows (even NaN or Inf ones) out of earlier ones.
  at::Tensor P = (bg.unsqueeze(-1) - bg.unsqueeze(-2)).to(ct);
  P.add_(I.unsqueeze(-2)).sub_(m.unsqueeze(-1)).exp_().masked_fill_(p.upper, 0);
  at::Tensor W = bmm(Q, K.transpose(1, 2), lp, ct, qk_scale).view({g, NC, L, L});
  W.mul_(P).masked_fill_(p.upper, 0);

  // Incoming gradients of num and nsum: H = num / (den + eps). dnum in lp, and scaled by gq
  // (what the incoming state's terms need).
  const at::Tensor r = (den_of(sl(p.den).view({g, NC, L}), m, p.a.fw.vecN_signed) + p.a.fw.eps).reciprocal();
  const at::Tensor dH = p.dH.defined() ? sl(p.dH).view({g, NC, L, DV}) : at::Tensor();
  const auto lp_opts = Q.options().dtype(lp);
  // Without an incoming dH, one tensor of zeros (only read) stands for all three.
  const at::Tensor dH3 = dH.defined() ? dH.reshape({g * NC, L, DV}).to(lp) : at::zeros({g * NC, L, DV}, lp_opts);
  const at::Tensor dnum = dH.defined() ? scaled(dH, r.unsqueeze(-1), lp).view({g * NC, L, DV}) : dH3;
  const at::Tensor dnum_gq = dH.defined() ? scaled(dH, (r * gq).unsqueeze(-1), lp).view({g * NC, L, DV}) : dH3;
  const at::Tensor N_prev = N_all.narrow(1, 0, NC).reshape({g * NC, DQ, 1});
  const at::Tensor C_prev = C_all.narrow(1, 0, NC).to(lp).reshape({g * NC, DQ, DV});
  // Intra-chunk part: dW = r dH v^T (+ dnsum), dV = W^T dnum, d(q.k) = qk_scale dW P,
  // d log P = dW W. The incoming state's part of dQ: gq[t] r[t] dH_t C_k^T (+ dnsum's). Both
  // multiply dH as it came and take r and gq on their float32 results: dnsum is formed from them
  // (below), and it cancels where the rounding of r dH to 16 bits would show.
  at::Tensor dW = bmm(dH3, V.transpose(1, 2), lp, ct).view({g, NC, L, L}).mul_(r.unsqueeze(-1));
  dW.masked_fill_(p.upper, 0);
  at::Tensor dQg = bmm(dH3, C_prev.transpose(1, 2), lp, ct).mul_((r * gq).view({g * NC, L, 1}));
  at::Tensor dnsum;  // (g, NC, L), "exact" with an incoming dH only
  at::Tensor Qc;     // Q in ct, for the normaliser's terms: nsum's sign and dnsum cancel finely
  if (p.a.exact && dH.defined()) {
    // den = max(|nsum|, exp(-m)): the gradient follows |nsum| where it is the larger. nsum is
    // the forward's where it saved it (vecN_signed), else formed again.
    Qc = Q.to(ct).contiguous();  // likewise
    const at::Tensor nsum = p.a.fw.vecN_signed ? sl(p.den).view({g, NC, L})
                                               : W.sum(-1) + gq * at::bmm(Qc, N_prev).view({g, NC, L});
    // dden = -r (dH . H), with dH . H = r (dH . num) from the float32 products, never from the
    // stored H: H is rounded to the inputs' dtype, and where nsum is a cancellation |H| is large
    // and dH . H cancels by orders of magnitude (a 16-bit H lost 5-30% of dnsum there: NOTES.md,
    // seventeenth session). num = sum_s W[t, s] v_s + gq[t] q_t C_k, and dW, dQg hold its dot
    // with r dH. (The fused CUDA kernels still read H.)
    const at::Tensor dH_H = (dW * W).sum(-1) + (rows(dQg) * rows(Qc)).sum(-1);
    const at::Tensor dden = dH_H.mul(r).neg_();
    dnsum = at::where(nsum.abs() < at::exp(-m), 0.0, dden * nsum.sign());
    dW.add_(dnsum.unsqueeze(-1)).masked_fill_(p.upper, 0);
  }
  const at::Tensor W_lp = W.to(lp).view({g * NC, L, L});
  const at::Tensor dSP = scaled(P, dW, lp).view({g * NC, L, L});
  P.reset();
  dW.mul_(W);
  W.reset();
  const at::Tensor cols = dW.sum(-2);
  at::Tensor dbg = dW.sum(-1) - cols;  // d/d bg[t], m held fixed
  at::Tensor dI = cols;
  dW.reset();

  // dQ: the incoming state's term gq[t] q_t (C_k, n_k) first (its gate gradient is q_t . dQ),
  // then the intra-chunk term.
  at::Tensor gq_dnsum;  // (g * NC, L, 1)
  if (dnsum.defined()) {
    gq_dnsum = (gq * dnsum).view({g * NC, L, 1});
    dQg.baddbmm_(gq_dnsum, N_prev.transpose(1, 2));
  }
  dbg.add_((rows(dQg) * rows(Q)).sum(-1));
  bmm_acc(dQg, dSP, K, lp, ct, qk_scale);

  // The gradient reaching state k from chunk k's rows: sum_t gq[t] q_t^T (dnum_t, dnsum_t).
  at::Tensor X = bmm(Q.transpose(1, 2), dnum_gq, lp, ct).view({g, NC, E});
  at::Tensor Xn = gq_dnsum.defined() ? at::bmm(Qc.transpose(1, 2), gq_dnsum).view({g, NC, DQ})
                                     : at::zeros({g, NC, DQ}, Q.options().dtype(ct));

  // Back through the recurrence: X[k] becomes the gradient of state k+1.
  const at::Tensor d_log_decay = scan_back(p, g0, g, X, Xn, decay, C_all, N_all, out);

  // State k+1 = decay_k state k + sum_s ga[s] k_s (v_s^T, 1): dK gets ga[s] (G v_s + Gn),
  // dV gets ga[s] k_s G, and log ga[s] gets k_s . (its dK term).
  const at::Tensor G_next = X.view({g * NC, DQ, DV}).to(lp);
  const at::Tensor ga3 = ga.view({g * NC, L, 1});
  at::Tensor dKg = bmm(scaled(V, ga3, lp), G_next.transpose(1, 2), lp, ct);
  rows(dKg).addcmul_(ga.unsqueeze(-1), Xn.unsqueeze(2));
  const at::Tensor da = (rows(dKg) * rows(K)).sum(-1);
  bmm_acc(dKg, dSP.transpose(1, 2), Q, lp, ct, qk_scale);
  at::Tensor dVg = bmm(scaled(K, ga3, lp), G_next, lp, ct);
  bmm_acc(dVg, W_lp.transpose(1, 2), dnum, lp, ct);

  dI.add_(da);
  dbg.sub_(da);
  // g_k = bg[L-1] enters every ga of the chunk and the decay.
  dbg.select(-1, L - 1).add_(da.sum(-1) + d_log_decay);
  // bg[t] = sum_{r <= t} logsigmoid(f[r]): a reverse cumulative sum within the chunk (the clamp
  // passes no gradient: every weight such a gate enters is 0).
  const at::Tensor dF = dbg.flip(-1).cumsum(-1).flip(-1).mul_(at::sigmoid(-F));

  std::get<0>(out).view({p.BH, p.S, DQ}).narrow(0, g0, g).copy_(dQg.view({g, p.S, DQ}));
  std::get<1>(out).view({p.BH, p.S, DQ}).narrow(0, g0, g).copy_(dKg.view({g, p.S, DQ}));
  std::get<2>(out).view({p.BH, p.S, DV}).narrow(0, g0, g).copy_(dVg.view({g, p.S, DV}));
  std::get<3>(out).view({p.BH, p.S}).narrow(0, g0, g).copy_(dI.view({g, p.S}));
  std::get<4>(out).view({p.BH, p.S}).narrow(0, g0, g).copy_(dF.view({g, p.S}));
}

#ifdef MLSTM_EXT_WITH_CUDA
// The same gradients on CUDA through the fused per-chunk kernels (csrc/cuda/bw_params.h): bw_pre,
// the reverse scan of the states' gradients with the chunk products inside (scan_gram.cu), bw_post.
void run_group_fused(const Plan& p, int64_t g0, int64_t g, BackwardOutputs& out, ScanMode mode) {
  const int64_t NC = p.NC, L = p.L, DQ = p.DQ, DV = p.DV, E = DQ * DV;
  const at::ScalarType ct = p.ct, lp = p.lp;
  auto sl = [&](const at::Tensor& t) { return t.narrow(0, g0, g); };
  // The kernels read rows with 16-byte loads: contiguous, and copied where a caller's storage
  // offset leaves them unaligned.
  auto rows = [&](const at::Tensor& t) {
    at::Tensor c = sl(t).contiguous();
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
  };
  // C in 16 bits for the gram scan and bw_post (both multiply it in that dtype; the scan's dots
  // <C_k, G_{k+1}> then see the rounded C too); float32 for the plain scan of kGemm.
  auto [C_all, N_all, M_all] =
      recompute_states(p, g0, g, mode == ScanMode::kGemm ? std::nullopt : std::optional<at::ScalarType>(lp));
  const at::Tensor m_prev = M_all.narrow(1, 0, NC), m_next = M_all.narrow(1, 1, NC);
  const at::Tensor g_k = log_forget(sl(p.F).view({g, NC, L})).sum(-1);
  const at::Tensor decay = at::exp((g_k + m_prev) - m_next).to(ct);

  FusedBackwardTensors t;
  t.Q = rows(p.Q), t.K = rows(p.K), t.V = rows(p.V), t.dH = rows(p.dH);
  t.H = p.a.exact ? rows(p.H) : t.dH;  // read in exact mode only
  t.I = sl(p.I).contiguous(), t.F = sl(p.F).contiguous();
  t.den = sl(p.den).contiguous(), t.m = sl(p.m).contiguous();
  t.M_all = M_all, t.N_all = N_all;
  const auto f32 = t.Q.options().dtype(ct);
  t.dnsum = at::empty({g, p.S}, f32);
  if (mode == ScanMode::kGram) {
    t.qscale = at::empty({g, p.S}, f32);
  } else {
    t.Qs = at::empty({g, p.S, DQ}, t.Q.options());
  }
  t.Xn = at::empty({g, NC, DQ}, f32);
  fused_backward_cuda(t, p.a, false);

  // Back through the recurrence: the gradient reaching state k from chunk k's rows (for C:
  // X_k = Qs_k^T dH_k) becomes the gradient of state k+1 (G, and Gn for n).
  at::Tensor G;
  if (mode != ScanMode::kGemm) {
    // X_k formed inside the scan (csrc/cuda/scan_gram.cu): never written to memory.
    BorderGrads b = border_grads(p, g0, g, out);
    G = at::empty({g, NC, E}, t.Q.options());  // 16-bit, as bw_post multiplies it
    const bool scaled = mode == ScanMode::kGram;
    const at::Tensor dots_C = gram_scan_cuda(scaled ? t.Q : t.Qs, t.qscale, t.dH, decay, b.dCl, b.dC0, C_all,
                                             (NC + 1) * E, G);
    t.last_row = scan_n_back(p, b, t.Xn, decay, N_all, dots_C).contiguous();
  } else {  // cuBLAS for X, then the plain scan
    G = bmm(t.Qs.view({g * NC, L, DQ}).transpose(1, 2), t.dH.view({g * NC, L, DV}), lp, ct).view({g, NC, E});
    t.last_row = scan_back(p, g0, g, G, t.Xn, decay, C_all, N_all, out).contiguous();
    G = G.to(lp);
  }
  t.C_all = C_all.to(lp), t.G = G, t.Gn = t.Xn;  // bw_post reads both in 16 bits
  t.dQ = std::get<0>(out).view({p.BH, p.S, DQ}).narrow(0, g0, g);
  t.dK = std::get<1>(out).view({p.BH, p.S, DQ}).narrow(0, g0, g);
  t.dV = std::get<2>(out).view({p.BH, p.S, DV}).narrow(0, g0, g);
  t.dI = std::get<3>(out).view({p.BH, p.S}).narrow(0, g0, g);
  t.dF = std::get<4>(out).view({p.BH, p.S}).narrow(0, g0, g);
  fused_backward_cuda(t, p.a, true);
}
#endif

}  // namespace

void chunkwise_bw_compute(const BackwardArgs& a, StatesKernel states_kernel, BackwardOutputs& out) {
  const StatesArgs& s = a.fw.states;
  const c10::OptionalDeviceGuard guard(a.fw.matQ.device());
  const int64_t BH = s.B * s.NH;
  const at::ScalarType ct = s.vecI.scalar_type(), in = a.fw.matQ.scalar_type();
  // 16-bit operands with float32 results on CUDA's tensor cores; on the CPU only where
  // MLSTM_EXT_CPU_16BIT_GEMM=1 (read at every call) emulates them (tests: the CUDA path's
  // arithmetic where there is no GPU).
  const bool half = in == at::kBFloat16 || in == at::kHalf;
  const char* emulate = std::getenv("MLSTM_EXT_CPU_16BIT_GEMM");
  const bool tensor_cores =
      half && (a.fw.matQ.is_cuda() || (emulate != nullptr && std::strcmp(emulate, "1") == 0));
  Plan p{a, states_kernel, BH, s.S, s.DHQK, s.DHHV, s.L, s.NC, ct, tensor_cores ? in : ct};

  if (BH == 0) return;
  if (s.S == 0) {  // no chunks: the initial states' gradients are the last states'
    const auto zero_or = [](at::Tensor& dst, const at::Tensor& src) {
      src.defined() ? dst.copy_(src) : dst.zero_();
    };
    zero_or(std::get<5>(out), a.matDeltaC_last);
    zero_or(std::get<6>(out), a.vecDeltaN_last);
    return;
  }
  auto flat = [&](const at::Tensor& t, std::initializer_list<int64_t> rest) {
    if (!t.defined()) return at::Tensor();
    std::vector<int64_t> shape{BH};
    shape.insert(shape.end(), rest);
    return t.reshape(shape);
  };
  p.Q = flat(a.fw.matQ, {s.S, s.DHQK});
  p.K = flat(s.matK, {s.S, s.DHQK});
  p.V = flat(s.matV, {s.S, s.DHHV});
  p.I = flat(s.vecI, {s.S});
  p.F = flat(s.vecF, {s.S});
  p.H = flat(a.matH, {s.S, s.DHHV});
  p.dH = flat(a.matDeltaH, {s.S, s.DHHV});
  p.den = flat(a.vecN, {s.S});
  p.m = flat(a.vecM, {s.S});
  p.C0 = flat(s.matC_initial, {s.DHQK, s.DHHV});
  p.N0 = flat(s.vecN_initial, {s.DHQK});
  p.M0 = flat(s.scaM_initial, {});
  p.dCl = flat(a.matDeltaC_last, {s.DHQK * s.DHHV});
  p.dNl = flat(a.vecDeltaN_last, {s.DHQK});
  p.upper = at::ones({s.L, s.L}, a.fw.matQ.options().dtype(at::kBool)).triu(1);

  const ScanMode mode = scan_mode();
  bool fused = false;
#ifdef MLSTM_EXT_WITH_CUDA
  if (fused_backward_cuda_usable(a)) {
    fused = true;
    // Its kernels read dH in the inputs' dtype: another dtype is rounded to it once here (the
    // batched-GEMM path rounds its 16-bit operands the same way).
    if (p.dH.scalar_type() != in) p.dH = p.dH.to(in);
  }
#endif
  const int64_t per = std::max<int64_t>(1, workspace_per_pair(s, fused, mode));
  const int64_t G_max = std::clamp<int64_t>(workspace_cap(s, BH) / per, 1, BH);
  const int64_t G = (BH + (BH + G_max - 1) / G_max - 1) / ((BH + G_max - 1) / G_max);  // balanced
  for (int64_t g0 = 0; g0 < BH; g0 += G) {
    const int64_t n = std::min(G, BH - g0);
#ifdef MLSTM_EXT_WITH_CUDA
    if (fused) {
      run_group_fused(p, g0, n, out, mode);
      continue;
    }
#endif
    run_group(p, g0, n, out);
  }
}

BackwardOutputs allocate_backward_outputs(const BackwardArgs& a) {
  const StatesArgs& s = a.fw.states;
  const auto in = a.fw.matQ.options();
  const auto ct = in.dtype(s.vecI.scalar_type());
  return {at::empty({s.B, s.NH, s.S, s.DHQK}, in), at::empty({s.B, s.NH, s.S, s.DHQK}, in),
          at::empty({s.B, s.NH, s.S, s.DHHV}, in), at::empty({s.B, s.NH, s.S}, ct),
          at::empty({s.B, s.NH, s.S}, ct),         at::empty({s.B, s.NH, s.DHQK, s.DHHV}, ct),
          at::empty({s.B, s.NH, s.DHQK}, ct)};
}

}  // namespace mlstm
