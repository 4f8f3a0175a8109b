// CPU kernel of mlstm::parallel_fw_hintra: one task per (batch*head, chunk), run in parallel with
// at::parallel_for. Each task copies its chunk of Q, K, V into float buffers (any input stride and
// dtype), does all gate and stabiliser arithmetic in float64 and the products in float32, and
// never materialises more than one chunk's (L, L) matrix.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "hintra.h"

namespace mlstm {
namespace {

constexpr double kMinimumMaxVal = -10.0;  // SPEC.md step 3 (the reference's MINIMUM_MAX_VAL)

// Compile the hot loops twice: for AVX2/FMA machines and a portable baseline; the loader picks.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MLSTM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MLSTM_CPU_CLONES
#endif

// One chunk's data, all float32 and row-major.
struct ChunkView {
  int64_t L, DHQK, DHHV;
  const float* q;       // (L, DHQK)
  const float* k;       // (L, DHQK)
  const float* v;       // (L, DHHV)
  const float* C;       // (DHQK, DHHV), row stride ldc
  int64_t ldc;
  const float* n;       // (DHQK), stride ldn
  int64_t ldn;
  const double* bg;     // (L) inclusive cumulative log forget gate
  const double* igate;  // (L)
  const double* m;      // (L) combined max state
  const double* g;      // (L) qk_scale * exp(bg + m_prev - m)
  double qk_scale;
};

// num[t] = sum_{s<=t} w[t,s] v_s + g[t] (q_t^T C);  nsum[t] = sum_{s<=t} w[t,s] + g[t] (q_t . n).
MLSTM_CPU_CLONES
void chunk_numerator(const ChunkView& c, float* num, double* nsum) {
  for (int64_t t = 0; t < c.L; ++t) {
    const float* qt = c.q + t * c.DHQK;
    float* out = num + t * c.DHHV;
    for (int64_t j = 0; j < c.DHHV; ++j) out[j] = 0.f;
    double ws = 0.0;
    const double row_shift = c.bg[t] - c.m[t];
    for (int64_t s = 0; s <= t; ++s) {
      const float* ks = c.k + s * c.DHQK;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < c.DHQK; ++d) dot += qt[d] * ks[d];
      // D[t, s] - m[t] = (bg[t] - bg[s] + i[s]) - m[t], formed in float64; float exp is enough.
      const double w = c.qk_scale * (double)dot * (double)std::exp((float)(row_shift - c.bg[s] + c.igate[s]));
      ws += w;
      const float wf = (float)w;
      const float* vs = c.v + s * c.DHHV;
#pragma omp simd
      for (int64_t j = 0; j < c.DHHV; ++j) out[j] += wf * vs[j];
    }
    // Inter-chunk term, scaled by g[t] once at the end.
    float qn = 0.f;
    const float gt = (float)c.g[t];
    for (int64_t d = 0; d < c.DHQK; ++d) {
      const float gq = gt * qt[d];
      const float* Cd = c.C + d * c.ldc;
#pragma omp simd
      for (int64_t j = 0; j < c.DHHV; ++j) out[j] += gq * Cd[j];
      qn += qt[d] * c.n[d * c.ldn];
    }
    nsum[t] = ws + c.g[t] * (double)qn;
  }
}

template <typename scalar_t>
void load_rows(const at::Tensor& x, int64_t b, int64_t h, int64_t s0, int64_t rows, float* dst) {
  const scalar_t* p = x.data_ptr<scalar_t>() + b * x.stride(0) + h * x.stride(1) + s0 * x.stride(2);
  const int64_t D = x.size(3), ss = x.stride(2), sd = x.stride(3);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<float>(p[r * ss + d * sd]);
}

template <typename scalar_t, typename out_t>
void hintra_cpu_typed(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  const int64_t NH = a.NH, L = a.L, NC = a.NC, DHQK = a.DHQK, DHHV = a.DHHV;
  // Gates and states in float32 once (no copy when they already are float32; strides kept).
  const at::Tensor vecI = a.vecI.to(at::kFloat), vecF = a.vecF.to(at::kFloat);
  const at::Tensor C_all = a.matC_all.to(at::kFloat).contiguous();
  const at::Tensor n_all = a.vecN_all.to(at::kFloat);
  const at::Tensor m_all = a.scaM_all.to(at::kFloat);
  const auto Ia = vecI.accessor<float, 3>(), Fa = vecF.accessor<float, 3>();
  const auto Ma = m_all.accessor<float, 3>();
  const float* n_ptr = n_all.data_ptr<float>();
  const float* C_ptr = C_all.data_ptr<float>();
  scalar_t* H_ptr = matH.data_ptr<scalar_t>();  // contiguous (B, NH, S, DHHV)
  out_t* N_ptr = vecN.data_ptr<out_t>();        // contiguous (B, NH, S)
  out_t* M_ptr = vecM.data_ptr<out_t>();

  const int64_t tasks = a.B * NH * NC;
  const int64_t work_per_task = L * L * (DHQK + DHHV) + L * DHQK * DHHV;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_task));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(L * DHQK), k(L * DHQK), v(L * DHHV), num(L * DHHV);
    std::vector<double> bg(L), ig(L), m(L), g(L), nsum(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / NC, chunk = task % NC, b = bh / NH, h = bh % NH;
      const int64_t s0 = chunk * L;
      // Steps 1-4 (SPEC.md): gates, intra max (prefix max of i[s] - bg[s]), combined max.
      const double m_prev = Ma[b][h][chunk];
      double acc = 0.0, best = -std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t < L; ++t) {
        const double f = Fa[b][h][s0 + t];
        acc += std::min(f, 0.0) - std::log1p(std::exp(-std::abs(f)));  // logsigmoid(f)
        bg[t] = acc;
        ig[t] = Ia[b][h][s0 + t];
        best = std::max(best, ig[t] - bg[t]);
        const double m_intra = std::max(kMinimumMaxVal, bg[t] + best);
        m[t] = std::max(bg[t] + m_prev, m_intra);
        g[t] = a.qk_scale * std::exp(bg[t] + m_prev - m[t]);
      }
      load_rows<scalar_t>(a.matQ, b, h, s0, L, q.data());
      load_rows<scalar_t>(a.matK, b, h, s0, L, k.data());
      load_rows<scalar_t>(a.matV, b, h, s0, L, v.data());
      ChunkView cv{L, DHQK, DHHV, q.data(), k.data(), v.data(),
                   C_ptr + (bh * C_all.size(2) + chunk * DHQK) * DHHV, DHHV,
                   n_ptr + b * n_all.stride(0) + h * n_all.stride(1) + chunk * DHQK * n_all.stride(2),
                   n_all.stride(2), bg.data(), ig.data(), m.data(), g.data(), a.qk_scale};
      chunk_numerator(cv, num.data(), nsum.data());
      // Steps 6-7: normaliser and outputs.
      const int64_t row0 = bh * a.S + s0;
      for (int64_t t = 0; t < L; ++t) {
        const double den = std::max(std::abs(nsum[t]), std::exp(-m[t]));
        const float inv = (float)(1.0 / (den + a.eps));
        scalar_t* Ht = H_ptr + (row0 + t) * DHHV;
        for (int64_t j = 0; j < DHHV; ++j) Ht[j] = static_cast<scalar_t>(num[t * DHHV + j] * inv);
        N_ptr[row0 + t] = static_cast<out_t>(den);
        M_ptr[row0 + t] = static_cast<out_t>(m[t]);
      }
    }
  });
}

}  // namespace

void hintra_cpu(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.matQ.scalar_type(), "hintra_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.output_dtype, "hintra_cpu_out", [&] {
      hintra_cpu_typed<in_t, scalar_t>(a, matH, vecN, vecM);
    });
  });
}

}  // namespace mlstm
