// CPU kernel of mlstm::parallel_fw_hintra: one task per (batch*head, chunk), run in parallel with
// at::parallel_for. Each task packs its chunk of Q, K, V and C into float buffers (any input stride
// and dtype), does the gate and stabiliser arithmetic in float64 and the products in float32 with
// register-blocked micro-kernels, and never materialises more than one chunk's (L, L) matrix.
//
// Per chunk (names from SPEC.md), with q pre-scaled by qk_scale:
//   1. S = q K^T on the causal tiles only                              (GEMM 1)
//   2. W[t, s] = S[t, s] exp(D[t, s] - m[t]) for s <= t, 0 above;  gq[t] = g[t] q[t]
//   3. num = [W | gq] [V ; C], one pass over both operands            (GEMM 2)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "hintra.h"

namespace mlstm {
namespace {

constexpr double kMinimumMaxVal = -10.0;  // SPEC.md step 3 (the reference's MINIMUM_MAX_VAL)

// The hot loops are compiled twice on x86-64: for AVX2/FMA (16 ymm registers: 6-row tiles of 8-lane
// vectors) and for the SSE2 baseline (16 xmm registers: 2-row tiles of 4-lane vectors);
// hintra_cpu picks at run time. MLSTM_EXT_CPU_PORTABLE=1 forces the baseline (tests use it).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MLSTM_CPU_X86 1
#define MLSTM_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
constexpr int kMRPortable = 2;
#else
#define MLSTM_CPU_X86 0
constexpr int kMRPortable = 6;  // e.g. aarch64: 32 vector registers
#endif
#define MLSTM_INLINE inline __attribute__((always_inline))
#define MLSTM_LAMBDA_INLINE __attribute__((always_inline))
// The vf8 helpers are always inlined, so the AVX-vs-SSE argument ABI GCC warns about never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

// 8 float lanes (GCC/Clang vector extension): one AVX2 register in the x86-64-v3 clone, two SSE
// registers in the default one, what the target has elsewhere.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

MLSTM_INLINE vf8 load8(const float* p) {
  vf8 r;
  std::memcpy(&r, p, sizeof r);  // unaligned load
  return r;
}
MLSTM_INLINE void store8(float* p, vf8 x) { std::memcpy(p, &x, sizeof x); }
MLSTM_INLINE float hsum8(vf8 x) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += x[i];
  return s;
}

// Lane-wise mask ? a : b, for masks from vector comparisons (lanes all ones or all zeros).
MLSTM_INLINE vf8 select8(vi8 mask, vf8 a, vf8 b) { return (vf8)(((vi8)a & mask) | ((vi8)b & ~mask)); }

// exp on 8 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial; about 1 ulp).
// Arguments below -87 (including -inf, used to mask lanes) give exactly 0.
MLSTM_INLINE vf8 exp8(vf8 x) {
  const vf8 xc = select8(x < -87.f, vf8{} - 87.f, select8(x > 88.f, vf8{} + 88.f, x));
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no -ffast-math here, so it is not folded away).
  const vf8 fx = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const vf8 r = xc - fx * 0.693359375f - fx * -2.12194440e-4f;
  vf8 p = 1.9875691500e-4f + vf8{};
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const vi8 pow2n = (__builtin_convertvector(fx, vi8) + 127) << 23;  // 2^n as float bits
  const vf8 y = p * (vf8)pow2n;
  return select8(x < -87.f, vf8{}, y);
}

// One register tile of 16 output columns and MR rows:
//   out[i, 0:16] = rscale[i] * (sum_{p<k1} A1[i, p] B1[p, 0:16] + sum_{p<k2} A2[i, p] B2[p, 0:16])
// A1 and A2 share the row stride lda; B1 is a 16-wide panel (row stride kNR), B2 has row stride
// ldb2; rscale == nullptr means 1.
// MR = 6 keeps 12 accumulators + 2 B vectors + 1 broadcast in the 16 AVX2 registers.
constexpr int kMRAvx2 = 6, kNR = 16;

template <typename V>
MLSTM_INLINE V loadv(const float* p) {
  V r;
  std::memcpy(&r, p, sizeof r);
  return r;
}

// V is the register vector: vf8 (AVX2) or vf4 (SSE2 / NEON); kNR / lanes of them span a tile row.
template <int MR, typename V>
MLSTM_INLINE void tile(const float* A1, const float* B1, int64_t k1, const float* A2,
                       const float* B2, int64_t k2, int64_t ldb2, int64_t lda, const float* rscale,
                       float* out, int64_t ldo) {
  constexpr int W = sizeof(V) / sizeof(float), NV = kNR / W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  // acc += A[:, 0:k] B[0:k, 0:16] for one (A, B) pair; B rows are ldb apart.
  auto accumulate = [&](const float* A, const float* B, int64_t k, int64_t ldb) MLSTM_LAMBDA_INLINE {
    for (int64_t p = 0; p < k; ++p) {
      V b[NV];
      for (int j = 0; j < NV; ++j) b[j] = loadv<V>(B + p * ldb + j * W);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const float a = A[i * lda + p];
        for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
      }
    }
  };
  accumulate(A1, B1, k1, kNR);
  accumulate(A2, B2, k2, ldb2);
  for (int i = 0; i < MR; ++i) {
    const float sc = rscale ? rscale[i] : 1.f;
    for (int j = 0; j < NV; ++j) {
      const V o = acc[i][j] * sc;
      std::memcpy(out + i * ldo + j * W, &o, sizeof o);
    }
  }
}

// tile<> for mr = 1..MR rows (the last row block of a chunk may be short).
template <int MR, typename V>
MLSTM_INLINE void tile_rows(int64_t mr, const float* A1, const float* B1, int64_t k1,
                            const float* A2, const float* B2, int64_t k2, int64_t ldb2,
                            int64_t lda, const float* rscale, float* out, int64_t ldo) {
  if (mr == MR) return tile<MR, V>(A1, B1, k1, A2, B2, k2, ldb2, lda, rscale, out, ldo);
  if constexpr (MR > 1) tile_rows<MR - 1, V>(mr, A1, B1, k1, A2, B2, k2, ldb2, lda, rscale, out, ldo);
}

// One chunk's packed operands and gates. Lc = L rounded up to kNR, DVp = DHHV rounded up to kNR.
struct ChunkBuffers {
  int64_t L, Lc, DHQK, DHHV, DVp;
  // aop: (L, Lc + DHQK), row stride lda. Columns [0, Lc): S, then W; [Lc, Lc + DHQK): q, then g q.
  float* aop;
  int64_t lda;
  // B operands in 16-column panels (see pack_panels), so a micro-kernel streams contiguous memory
  // instead of rows 2 KiB apart that would all fall into the same few L1 sets.
  const float* kt;   // (DHQK, Lc): K^T, columns >= L zero
  const float* vp;   // (Lc, DVp): V, columns >= DHHV zero
  const float* cp;   // (DHQK, DVp): C, columns >= DHHV zero
  const float* n;    // (DHQK) n state
  const double* bg;  // (L) inclusive cumulative log forget gate
  const double* ib;  // (L) igate[s] - bg[s]
  const double* m;   // (L) combined max state
  const double* g;   // (L) exp(bg + m_prev - m) (qk_scale is already in q)
  float* e;          // (Lc) scratch: exponents of one row
  float* inv;        // (L) out: 1 / (den + eps)
  double* den;       // (L) out: SPEC.md step 6 denominator
  float* num;        // (L, DVp) out: matH rows (num * inv)
  double eps;
};

template <int kMR, typename V>
MLSTM_INLINE void chunk_compute(const ChunkBuffers& c) {
  const int64_t L = c.L, Lc = c.Lc, DHQK = c.DHQK, lda = c.lda;
  float* const q = c.aop + Lc;  // q rows, stride lda

  // GEMM 1: S = q K^T, only the column tiles that reach the causal part of each row block.
  for (int64_t t0 = 0; t0 < L; t0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, L - t0);
    for (int64_t s0 = 0; s0 < t0 + mr; s0 += kNR)
      tile_rows<kMR, V>(mr, q + t0 * lda, c.kt + s0 * DHQK, DHQK, nullptr, nullptr, 0, 0, lda, nullptr,
                c.aop + t0 * lda + s0, lda);
  }

  // Step 5-6 per row: W = S exp(D - m), masked causal; row sums; denominator; g q.
  for (int64_t t = 0; t < L; ++t) {
    float* w = c.aop + t * lda;
    float* qt = q + t * lda;
    const double row_shift = c.bg[t] - c.m[t];
    // D[t, s] - m[t] formed in float64 (bg may be large), rounded to float for the exp.
    for (int64_t s = 0; s <= t; ++s) c.e[s] = (float)(row_shift + c.ib[s]);
    const int64_t n8 = (t + 8) / 8 * 8;
    for (int64_t s = t + 1; s < n8; ++s) c.e[s] = -std::numeric_limits<float>::infinity();
    vf8 wsum = vf8{};
    for (int64_t s = 0; s < n8; s += 8) {
      const vf8 ev = load8(c.e + s);
      vf8 ws = load8(w + s) * exp8(ev);
      ws = select8(ev == -std::numeric_limits<float>::infinity(), vf8{}, ws);  // exact 0, even for S = inf
      store8(w + s, ws);
      wsum += ws;
    }
    for (int64_t s = n8; s < Lc; ++s) w[s] = 0.f;  // above the diagonal: GEMM 2 reads zeros
    vf8 qn8 = vf8{};  // q . n, 8 lanes at a time (a scalar float reduction would not vectorise)
    int64_t d = 0;
    for (; d + 8 <= DHQK; d += 8) qn8 += load8(qt + d) * load8(c.n + d);
    float qn = hsum8(qn8);
    for (; d < DHQK; ++d) qn += qt[d] * c.n[d];
    const double nsum = (double)hsum8(wsum) + c.g[t] * (double)qn;
    const double den = std::max(std::abs(nsum), std::exp(-c.m[t]));
    c.den[t] = den;
    c.inv[t] = (float)(1.0 / (den + c.eps));
    const float gt = (float)c.g[t];
    for (d = 0; d < DHQK; ++d) qt[d] *= gt;
  }

  // GEMM 2: num = ([W | g q] [V ; C]) * inv. Column panels outer so a panel of B stays in L1.
  for (int64_t j0 = 0; j0 < c.DVp; j0 += kNR) {
    const float* vpanel = c.vp + j0 * Lc;
    const float* cpanel = c.cp + j0 * DHQK;
    for (int64_t t0 = 0; t0 < L; t0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, L - t0);
      tile_rows<kMR, V>(mr, c.aop + t0 * lda, vpanel, t0 + mr,       // W V: keys s < t0 + mr
                q + t0 * lda, cpanel, DHQK, kNR,             // (g q) C
                lda, c.inv + t0, c.num + t0 * c.DVp + j0, c.DVp);
    }
  }
}

// The two compiled versions of chunk_compute (see MLSTM_CPU_X86).
#if MLSTM_CPU_X86
MLSTM_TARGET_AVX2 void chunk_compute_avx2(const ChunkBuffers& c) { chunk_compute<kMRAvx2, vf8>(c); }
#endif
void chunk_compute_portable(const ChunkBuffers& c) { chunk_compute<kMRPortable, vf4>(c); }

using ChunkFn = void (*)(const ChunkBuffers&);
ChunkFn pick_chunk_compute() {
  const char* force = std::getenv("MLSTM_EXT_CPU_PORTABLE");
  if (force != nullptr && force[0] == '1') return chunk_compute_portable;
#if MLSTM_CPU_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return chunk_compute_avx2;
#endif
  return chunk_compute_portable;
}

// A strided 2-D view of input data: element (r, c) is p[r * rs + c * cs].
template <typename T>
struct View2D {
  const T* p;
  int64_t rs, cs;
};

// One chunk's rows of x (B, NH, S, D) as a (rows, D) view.
template <typename T>
View2D<T> chunk_rows(const at::Tensor& x, int64_t b, int64_t h, int64_t s0) {
  return {x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1) + s0 * x.stride(2), x.stride(2), x.stride(3)};
}

// dst[r * ldd + c] = scale * src(r, c) for r < rows, c < cols. Contiguous rows get their own loop
// so the compiler vectorises the conversion.
template <typename T>
void pack_rows(View2D<T> src, int64_t rows, int64_t cols, float scale, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* sr = src.p + r * src.rs;
    float* dr = dst + r * ldd;
    if (src.cs == 1) {
      for (int64_t c = 0; c < cols; ++c) dr[c] = scale * static_cast<float>(sr[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) dr[c] = scale * static_cast<float>(sr[c * src.cs]);
    }
  }
}

// The same into a (K, N) matrix stored as N / kNR panels of (K, kNR), rows row0.. of it:
// element (row, col) lives at dst[(col / kNR) * K * kNR + row * kNR + col % kNR].
// Source rows are read in order (C comes from memory: strided reads would defeat the hardware
// prefetcher); full panels copy kNR values with a constant trip count, so they vectorise.
template <typename T>
void pack_panels(View2D<T> src, int64_t rows, int64_t cols, float* dst, int64_t K, int64_t row0) {
  const int64_t full = cols / kNR * kNR;
  for (int64_t r = 0; r < rows; ++r) {
    const T* sr = src.p + r * src.rs;
    float* dr = dst + (row0 + r) * kNR;
    if (src.cs == 1) {
      for (int64_t c0 = 0; c0 < full; c0 += kNR)
        for (int i = 0; i < kNR; ++i) dr[c0 * K + i] = static_cast<float>(sr[c0 + i]);
    } else {
      for (int64_t c0 = 0; c0 < full; c0 += kNR)
        for (int i = 0; i < kNR; ++i) dr[c0 * K + i] = static_cast<float>(sr[(c0 + i) * src.cs]);
    }
    for (int64_t c = full; c < cols; ++c) dr[full * K + c - full] = static_cast<float>(sr[c * src.cs]);
  }
}

template <typename scalar_t, typename out_t>
void hintra_cpu_typed(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  const int64_t NH = a.NH, L = a.L, NC = a.NC, DHQK = a.DHQK, DHHV = a.DHHV;
  const int64_t Lc = (L + kNR - 1) / kNR * kNR, DVp = (DHHV + kNR - 1) / kNR * kNR;
  // Gates and states are float32 (check_hintra_args), in the caller's strides.
  const at::Tensor &C_all = a.matC_all, &n_all = a.vecN_all;
  const auto Ia = a.vecI.accessor<float, 3>(), Fa = a.vecF.accessor<float, 3>();
  const auto Ma = a.scaM_all.accessor<float, 3>();
  const float* C_ptr = C_all.data_ptr<float>();
  const float* n_ptr = n_all.data_ptr<float>();
  scalar_t* H_ptr = matH.data_ptr<scalar_t>();  // contiguous (B, NH, S, DHHV)
  out_t* N_ptr = vecN.data_ptr<out_t>();        // contiguous (B, NH, S)
  out_t* M_ptr = vecM.data_ptr<out_t>();

  const int64_t tasks = a.B * NH * NC;
  const int64_t work_per_task = L * L * (DHQK + DHHV) + L * DHQK * DHHV;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_task));
  const ChunkFn chunk_compute_fn = pick_chunk_compute();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t lda = Lc + DHQK;  // aop row stride
    // Zero-initialised once: padding columns/rows are never written afterwards.
    std::vector<float> aop(L * lda), kt(DHQK * Lc), vp(Lc * DVp), cp(DHQK * DVp);
    std::vector<float> num(L * DVp);
    std::vector<float> e(Lc + 8), inv(L), n(DHQK);
    std::vector<double> bg(L), ib(L), m(L), g(L), den(L);
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
        ib[t] = Ia[b][h][s0 + t] - bg[t];
        best = std::max(best, ib[t]);
        const double m_intra = std::max(kMinimumMaxVal, bg[t] + best);
        m[t] = std::max(bg[t] + m_prev, m_intra);
        g[t] = std::exp(bg[t] + m_prev - m[t]);
      }
      // Pack: q * qk_scale into aop, K^T, [V ; C] and n.
      const View2D<scalar_t> Qv = chunk_rows<scalar_t>(a.matQ, b, h, s0), Kv = chunk_rows<scalar_t>(a.matK, b, h, s0);
      pack_rows(Qv, L, DHQK, (float)a.qk_scale, aop.data() + Lc, lda);
      pack_panels(View2D<scalar_t>{Kv.p, Kv.cs, Kv.rs}, DHQK, L, kt.data(), DHQK, 0);  // transposed
      pack_panels(chunk_rows<scalar_t>(a.matV, b, h, s0), L, DHHV, vp.data(), Lc, 0);
      pack_panels(View2D<float>{C_ptr + b * C_all.stride(0) + h * C_all.stride(1) + chunk * DHQK * C_all.stride(2),
                                C_all.stride(2), C_all.stride(3)},
                  DHQK, DHHV, cp.data(), DHQK, 0);
      pack_rows(View2D<float>{n_ptr + b * n_all.stride(0) + h * n_all.stride(1) + chunk * DHQK * n_all.stride(2),
                              0, n_all.stride(2)},
                1, DHQK, 1.f, n.data(), 0);
      ChunkBuffers cb{L,         Lc,       DHQK,      DHHV,     DVp,      aop.data(), lda,
                      kt.data(), vp.data(), cp.data(),      n.data(),   bg.data(),
                      ib.data(), m.data(), g.data(),  e.data(), inv.data(), den.data(), num.data(),
                      a.eps};
      chunk_compute_fn(cb);
      // Step 7: outputs (num is already divided by den + eps).
      const int64_t row0 = bh * a.S + s0;
      for (int64_t t = 0; t < L; ++t) {
        scalar_t* Ht = H_ptr + (row0 + t) * DHHV;
        const float* nt = num.data() + t * DVp;
        for (int64_t j = 0; j < DHHV; ++j) Ht[j] = static_cast<scalar_t>(nt[j]);
        N_ptr[row0 + t] = static_cast<out_t>(den[t]);
        M_ptr[row0 + t] = static_cast<out_t>(m[t]);
      }
    }
  });
}

}  // namespace

void hintra_cpu(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.matQ.scalar_type(), "hintra_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, vecN.scalar_type(), "hintra_cpu_out", [&] {
      hintra_cpu_typed<in_t, scalar_t>(a, matH, vecN, vecM);
    });
  });
}

}  // namespace mlstm
