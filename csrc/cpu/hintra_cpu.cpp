// CPU kernel of mlstm::parallel_fw_hintra: one task per (batch*head, chunk), run in parallel with
// at::parallel_for. Names from SPEC.md.
//
// float32, bfloat16 and float16 inputs: each task packs its chunk of Q, K, V and C into float buffers
// (any input stride; states of any floating dtype are converted while packing, never copied whole),
// does the gate and stabiliser arithmetic in float64 and the products in float32 with
// register-blocked micro-kernels. Rows go in blocks of TQ (all L rows unless L is large), so the
// scratch holds a (TQ, L) tile of the weights, never the whole (L, L) matrix:
//   1. S = q K^T on the causal tiles only, q pre-scaled by qk_scale          (GEMM 1)
//   2. W[t, s] = S[t, s] exp(D[t, s] - F[t]) for s <= t, 0 above;  gq[t] = g'[t] q[t]
//   3. H = [W | gq] [V ; C] / (den' + eps e^delta), one pass over both operands  (GEMM 2)
// F[t] = m[t] - delta[t], delta[t] = min(64, m[t] - m_intra[t]) >= 0, is a per-row frame: every
// weight is taken relative to F instead of m, which scales numerator and denominator alike by
// e^delta (the same function as SPEC), but keeps exp(D - F) and exp(-F) representable in float32
// where m is large (exp(D - m) underflows once D - m < -87; eps = 0 then gave 0/0).
//
// A row whose fast result is not finite is recomputed from the inputs in float64 (exact_row). The
// GEMMs multiply masked-out keys by exact zeros, and a later key's NaN or Inf must not reach an
// earlier row (0 * NaN = NaN); rows that really are not finite come out the same from exact_row.
// So do the rare rows whose 1 / (den' + eps e^delta) is not a normal float32.
// float64 inputs (gradcheck) run every row through exact_row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "cpu/simd.h"
#include "hintra.h"

namespace mlstm {
namespace {

// Largest frame shift delta (see the header): g' = e^delta <= e^64 leaves float32 a factor 5e10 of
// headroom for q C before overflow, and keeps exp(D - F), exp(-F) representable up to m ~ 150.
constexpr double kMaxFrameShift = 64.0;
// Per-thread tile of S / W: at most this many floats (4 MiB) once L is large, so the scratch grows
// like L (rows of TQ < L), not L^2.
constexpr int64_t kWTileFloats = int64_t(1) << 20;

// The hot loops are compiled twice on x86-64 (simd.h); hintra_cpu picks at run time.
using namespace cpu;

MLSTM_INLINE vf8 load8(const float* p) { return loadv<vf8>(p); }
MLSTM_INLINE void store8(float* p, vf8 x) { storev(p, x); }
MLSTM_INLINE float hsum8(vf8 x) {  // pairwise: the two halves first (one vector add)
  vf4 lo, hi;
  std::memcpy(&lo, &x, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof lo, sizeof hi);
  const vf4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// Lane-wise mask ? a : b, for masks from vector comparisons (lanes all ones or all zeros).
MLSTM_INLINE vf8 select8(vi8 mask, vf8 a, vf8 b) { return (vf8)(((vi8)a & mask) | ((vi8)b & ~mask)); }

// exp on 8 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial; about 1 ulp).
// Arguments below -87 (including -inf) give exactly 0; NaN gives NaN.
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

// 4 and 8 double lanes, for the float64 stabiliser arithmetic.
typedef double vd4 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));
typedef int64_t vl4 __attribute__((vector_size(32)));
MLSTM_INLINE vd4 loadd4(const double* p) {
  vd4 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}

// max(a, b) that returns NaN when either is NaN (std::max(a, NaN) returns a).
MLSTM_INLINE double nan_max(double a, double b) { return (a > b || std::isnan(a)) ? a : b; }

// SPEC.md steps 2-3 for row t: D[t, s] = (bg[t] - bg[s]) + i[s] for s <= t into d, formed per
// element in float64 (as bg[t] + (i[s] - bg[s]) the input gate vanishes beside a huge |bg|, e.g.
// f = -1e30). Returns m_intra[t] = max(-10, max_s D[t, s]), NaN when any D[t, s] is NaN.
MLSTM_INLINE double intra_max_row(int64_t t, const double* bg, const double* iv, double* d) {
  const double bgt = bg[t];
  vd4 best = vd4{} - std::numeric_limits<double>::infinity();
  vl4 nan = vl4{};
  int64_t s = 0;
  for (; s + 4 <= t + 1; s += 4) {
    const vd4 x = (bgt - loadd4(bg + s)) + loadd4(iv + s);
    std::memcpy(d + s, &x, sizeof x);
    nan |= x != x;
    best = x > best ? x : best;  // one maxpd: a NaN x keeps best, and nan remembers it
  }
  double b = std::max(std::max(best[0], best[1]), std::max(best[2], best[3]));
  bool any_nan = (nan[0] | nan[1] | nan[2] | nan[3]) != 0;
  for (; s <= t; ++s) {
    d[s] = (bgt - bg[s]) + iv[s];
    any_nan |= std::isnan(d[s]);
    b = d[s] > b ? d[s] : b;
  }
  return any_nan ? std::numeric_limits<double>::quiet_NaN() : std::max(kMinimumMaxVal, b);
}

// One register tile of 16 output columns and MR rows:
//   out[i, 0:16] = rscale[i] * (sum_{p<k1} A1[i, p] B1[p, 0:16] + sum_{p<k2} A2[i, p] B2[p, 0:16])
// A1 / A2 have row strides lda1 / lda2; B1 is a 16-wide panel (row stride kNR), B2 has row stride
// ldb2; rscale == nullptr means 1.
// MR = 6 keeps 12 accumulators + 2 B vectors + 1 broadcast in the 16 AVX2 registers.
constexpr int kNR = 16;

// V is the register vector: vf8 (AVX2) or vf4 (SSE2 / NEON); kNR / lanes of them span a tile row.
template <int MR, typename V>
MLSTM_INLINE void tile(const float* A1, int64_t lda1, const float* B1, int64_t k1, const float* A2,
                       int64_t lda2, const float* B2, int64_t k2, int64_t ldb2,
                       const float* rscale, float* out, int64_t ldo) {
  constexpr int W = sizeof(V) / sizeof(float), NV = kNR / W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  // acc += A[:, 0:k] B[0:k, 0:16] for one (A, B) pair; A rows are lda apart, B rows ldb apart.
  auto accumulate = [&](const float* A, int64_t lda, const float* B, int64_t k, int64_t ldb)
                        MLSTM_LAMBDA_INLINE {
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
  accumulate(A1, lda1, B1, k1, kNR);
  accumulate(A2, lda2, B2, k2, ldb2);
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
MLSTM_INLINE void tile_rows(int64_t mr, const float* A1, int64_t lda1, const float* B1, int64_t k1,
                            const float* A2, int64_t lda2, const float* B2, int64_t k2,
                            int64_t ldb2, const float* rscale, float* out, int64_t ldo) {
  if (mr == MR) return tile<MR, V>(A1, lda1, B1, k1, A2, lda2, B2, k2, ldb2, rscale, out, ldo);
  if constexpr (MR > 1)
    tile_rows<MR - 1, V>(mr, A1, lda1, B1, k1, A2, lda2, B2, k2, ldb2, rscale, out, ldo);
}

// One chunk's packed operands, gates and per-row results. Lc = L rounded up to kNR, DVp = DHHV
// rounded up to kNR. B operands are stored in 16-column panels (see pack_panels), so a micro-kernel
// streams contiguous memory instead of rows 2 KiB apart that would all fall into the same L1 sets.
struct ChunkBuffers {
  int64_t L, Lc, DHQK, DVp;
  int64_t TQ;        // rows per block (a multiple of 6, or L)
  float* q;          // (L, DHQK): q * qk_scale; each row scaled by g'[t] once GEMM 1 has used it
  float* w;          // (TQ, Lc): S, then W, for one block of rows
  const float* kt;   // (DHQK, Lc): K^T, columns >= L zero
  const float* vp;   // (Lc, DVp): V, columns >= DHHV zero
  const float* cp;   // (DHQK, DVp): C, columns >= DHHV zero
  const float* n;    // (DHQK) n state
  const double* bg;  // (L) inclusive cumulative log forget gate
  const double* iv;  // (L) input gate
  double m_prev;     // scaM_all[chunk]
  double* d;         // (Lc + 8) scratch: D[t, 0..t]
  double eps;
  double* m;         // (L) out: combined max m[t] (vecM)
  double* den;       // (L) out: vecN, SPEC's den[t] (nsum[t] if signed_n); NaN where matH's row is not finite
  float* inv;        // (L) out: 1 / (den' + eps e^delta), NaN where that is not a normal float
  float* num;        // (L, DVp) out: matH rows
  bool signed_n;     // vecN is nsum (HintraArgs::vecN_signed)
};

template <int kMR, typename V>
MLSTM_INLINE void chunk_compute(const ChunkBuffers& c) {
  const int64_t L = c.L, Lc = c.Lc, DHQK = c.DHQK;
  const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t r0 = 0; r0 < L; r0 += c.TQ) {
    const int64_t r1 = std::min(L, r0 + c.TQ);  // rows [r0, r1) see keys [0, r1)
    auto wrow = [&](int64_t t) { return c.w + (t - r0) * Lc; };  // row t of S / W

    // GEMM 1: S = q K^T, only the column tiles that reach the causal part of each row tile.
    for (int64_t t0 = r0; t0 < r1; t0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, r1 - t0);
      for (int64_t s0 = 0; s0 < t0 + mr; s0 += kNR)
        tile_rows<kMR, V>(mr, c.q + t0 * DHQK, DHQK, c.kt + s0 * DHQK, DHQK, nullptr, 0, nullptr,
                          0, 0, nullptr, wrow(t0) + s0, Lc);
    }

    // Steps 3-6 per row: stabiliser and frame, W = S exp(D - F) (masked by position, so a NaN or
    // Inf in a later key's S is dropped, not multiplied by 0), denominator, g' q.
    for (int64_t t = r0; t < r1; ++t) {
      float* w = wrow(t);
      float* qt = c.q + t * DHQK;
      const double mi = intra_max_row(t, c.bg, c.iv, c.d);
      const double mt = nan_max(c.bg[t] + c.m_prev, mi);
      const double delta = std::min(kMaxFrameShift, mt - mi);
      const double Ft = mt - delta;
      const double gt = std::exp(c.bg[t] + c.m_prev - Ft);
      c.m[t] = mt;
      const int64_t n8 = (t + 8) / 8 * 8;  // d[t + 1 .. n8) holds stale values (even NaN): masked
      vf8 wsum = vf8{};
      for (int64_t s = 0; s < n8; s += 8) {
        vd8 ds;  // D - F, formed in float64 (D and F may be huge), rounded to float for the exp
        std::memcpy(&ds, c.d + s, sizeof ds);
        const vf8 ev = __builtin_convertvector(ds - Ft, vf8);
        const vi8 causal = lane <= (vi8{} + (int32_t)std::min<int64_t>(t - s, 8));
        const vf8 ws = select8(causal, load8(w + s) * exp8(ev), vf8{});
        store8(w + s, ws);
        wsum += ws;
      }
      for (int64_t s = n8; s < r1; ++s) w[s] = 0.f;  // above the diagonal: GEMM 2 reads zeros
      vf8 qn8 = vf8{};  // q . n, 8 lanes at a time (a scalar float reduction would not vectorise)
      int64_t d = 0;
      for (; d + 8 <= DHQK; d += 8) qn8 += load8(qt + d) * load8(c.n + d);
      float qn = hsum8(qn8);
      for (; d < DHQK; ++d) qn += qt[d] * c.n[d];
      const double nsum = (double)hsum8(wsum) + gt * (double)qn;  // frame F
      const double den = nan_max(std::abs(nsum), std::exp(-Ft));    // den' = e^delta den
      // e^delta: the frame moves (delta > 0) only where the state term decides m, m = bg + m_prev,
      // and there g' = e^(m - F) = e^delta already.
      const double scale = delta > 0 ? gt : 1.0;
      const double inv = 1.0 / (den + c.eps * scale);
      c.den[t] = (c.signed_n ? nsum : den) / scale;
      using flt = std::numeric_limits<float>;
      c.inv[t] = inv >= flt::min() && inv <= flt::max() ? (float)inv : flt::quiet_NaN();
      const float gtf = (float)gt;
      for (d = 0; d < DHQK; ++d) qt[d] *= gtf;
    }

    // GEMM 2: H = ([W | g' q] [V ; C]) * inv. Column panels outer so a panel of B stays in L1.
    for (int64_t j0 = 0; j0 < c.DVp; j0 += kNR) {
      const float* vpanel = c.vp + j0 * Lc;
      const float* cpanel = c.cp + j0 * DHQK;
      for (int64_t t0 = r0; t0 < r1; t0 += kMR) {
        const int64_t mr = std::min<int64_t>(kMR, r1 - t0);
        tile_rows<kMR, V>(mr, wrow(t0), Lc, vpanel, t0 + mr,  // W V: keys s < t0 + mr
                          c.q + t0 * DHQK, DHQK, cpanel, DHQK, kNR,  // (g' q) C
                          c.inv + t0, c.num + t0 * c.DVp + j0, c.DVp);
      }
    }
    // A row with an Inf or NaN anywhere (its sum shows it; a sum that merely overflows costs a
    // recompute) goes to exact_row: den marks it.
    for (int64_t t = r0; t < r1; ++t) {
      vf8 sum = vf8{};
      for (int64_t j = 0; j < c.DVp; j += 8) sum += load8(c.num + t * c.DVp + j);
      if (!std::isfinite(hsum8(sum))) c.den[t] = std::numeric_limits<double>::quiet_NaN();
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
  double operator()(int64_t r, int64_t c) const { return static_cast<double>(p[r * rs + c * cs]); }
};

// One chunk's rows of x (B, NH, S, D) as a (rows, D) view.
template <typename T>
View2D<T> chunk_rows(const at::Tensor& x, int64_t b, int64_t h, int64_t s0) {
  return {x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1) + s0 * x.stride(2), x.stride(2), x.stride(3)};
}

// Calls fn(T{}) with T the C++ type of a floating dtype: states (and gates) are read in their own
// dtype, so a bfloat16 matC_all is never copied to float32 whole.
template <typename Fn>
void visit_float(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kBFloat16: return fn(at::BFloat16{});
    case at::kHalf: return fn(at::Half{});
    default: TORCH_INTERNAL_ASSERT(false, "hintra_cpu: gates and states must be floating tensors");
  }
}

// Element access to a 3-D or 4-D tensor of any floating dtype, in place, as float64.
struct AnyFloat {
  const void* p;
  at::ScalarType dtype;
  int64_t st[4];
  explicit AnyFloat(const at::Tensor& t) : p(t.data_ptr()), dtype(t.scalar_type()), st{0, 0, 0, 0} {
    for (int64_t i = 0; i < t.dim(); ++i) st[i] = t.stride(i);
  }
  double at(int64_t off) const {
    switch (dtype) {
      case at::kFloat: return static_cast<const float*>(p)[off];
      case at::kDouble: return static_cast<const double*>(p)[off];
      case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[off]);
      case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(p)[off]);
      default: return std::numeric_limits<double>::quiet_NaN();  // excluded by hintra_cpu
    }
  }
  double operator()(int64_t i0, int64_t i1, int64_t i2, int64_t i3 = 0) const {
    return at(i0 * st[0] + i1 * st[1] + i2 * st[2] + i3 * st[3]);
  }
};

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

// What every task reads besides Q, K, V: gates and states through their strides, in any dtype.
struct TaskInputs {
  const HintraArgs& a;
  AnyFloat I, F, M, C, N;
  explicit TaskInputs(const HintraArgs& args)
      : a(args), I(args.vecI), F(args.vecF), M(args.scaM_all), C(args.matC_all), N(args.vecN_all) {}

  // SPEC.md step 1 for chunk k of (b, h): bg (inclusive cumulative logsigmoid(f)) and i, in
  // float64; returns m_prev = scaM_all[k].
  double gates(int64_t b, int64_t h, int64_t chunk, double* bg, double* iv) const {
    const int64_t s0 = chunk * a.L;
    double acc = 0.0;
    for (int64_t t = 0; t < a.L; ++t) {
      const double f = F(b, h, s0 + t);
      const double lf = std::min(f, 0.0) - std::log1p(std::exp(-std::abs(f)));  // logsigmoid(f), NaN kept
      // SPEC.md step 1: finite gates below kMinLogForget count as it (the sum stays exact beside
      // ordinary gates; -1e30 would absorb them even in float64).
      acc += (lf < kMinLogForget && std::isfinite(lf)) ? kMinLogForget : lf;
      bg[t] = acc;
      iv[t] = I(b, h, s0 + t);
    }
    return M(b, h, chunk);
  }
};

// SPEC.md steps 5-7 for row t of chunk `chunk` of (b, h), in float64 straight from the definition,
// summing keys s <= t only: a later key cannot reach the row, whatever it holds. Writes the row of
// matH to Ht and returns vecN's value (den, or nsum where a.vecN_signed); scratch holds 2 * DHHV
// doubles.
template <typename in_t>
double exact_row(const TaskInputs& in, int64_t b, int64_t h, int64_t chunk, int64_t t,
                 const double* bg, const double* iv, double m_prev, double mt, in_t* Ht,
                 double* scratch) {
  const HintraArgs& a = in.a;
  const int64_t DHQK = a.DHQK, DHHV = a.DHHV, s0 = chunk * a.L;
  const View2D<in_t> q = chunk_rows<in_t>(a.matQ, b, h, s0), k = chunk_rows<in_t>(a.matK, b, h, s0),
                     v = chunk_rows<in_t>(a.matV, b, h, s0);
  double* num = scratch;
  double* qC = scratch + DHHV;
  std::fill(scratch, scratch + 2 * DHHV, 0.0);
  double nsum = 0.0;
  for (int64_t s = 0; s <= t; ++s) {
    double qk = 0.0;
    for (int64_t d = 0; d < DHQK; ++d) qk += q(t, d) * k(s, d);
    const double w = a.qk_scale * qk * std::exp(((bg[t] - bg[s]) + iv[s]) - mt);
    nsum += w;
    for (int64_t j = 0; j < DHHV; ++j) num[j] += w * v(s, j);
  }
  // Inter-chunk part: q C_k and q . n_k with the slot-k states.
  double qn = 0.0;
  for (int64_t d = 0; d < DHQK; ++d) {
    const double qd = q(t, d);
    qn += qd * in.N(b, h, chunk * DHQK + d);
    for (int64_t j = 0; j < DHHV; ++j) qC[j] += qd * in.C(b, h, chunk * DHQK + d, j);
  }
  const double g = a.qk_scale * std::exp(bg[t] + m_prev - mt);
  nsum += g * qn;
  const double den = nan_max(std::abs(nsum), std::exp(-mt));
  for (int64_t j = 0; j < DHHV; ++j) Ht[j] = static_cast<in_t>((num[j] + g * qC[j]) / (den + a.eps));
  return a.vecN_signed ? nsum : den;
}

// Per-thread scratch that may be large (it grows like L): running out of memory is an error that
// says how much was asked for, and what for.
template <typename Alloc>
void allocate_scratch(const HintraArgs& a, int64_t bytes, const char* what, Alloc&& alloc) {
  try {
    alloc();
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, "parallel_fw_hintra: out of memory: the CPU kernel needs ", num(bytes),
                " bytes (", num(bytes >> 20), " MiB) of scratch per thread for ", what,
                " at chunk_size = ", num(a.L), ", DHQK = ", num(a.DHQK), ", DHHV = ",
                num(a.DHHV), "; a smaller chunk_size or fewer threads need less");
  }
}

// float32 / bfloat16 / float16 inputs (in_t), vecN / vecM in out_t.
template <typename in_t, typename out_t>
void hintra_cpu_fast(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  const int64_t NH = a.NH, L = a.L, NC = a.NC, DHQK = a.DHQK, DHHV = a.DHHV;
  const int64_t Lc = (L + kNR - 1) / kNR * kNR, DVp = (DHHV + kNR - 1) / kNR * kNR;
  // Rows per block: all of them unless the (L, Lc) tile of S / W would pass kWTileFloats.
  const int64_t TQ = L * Lc <= kWTileFloats ? L : std::max<int64_t>(6, kWTileFloats / Lc / 6 * 6);
  const TaskInputs in(a);
  in_t* H_ptr = matH.data_ptr<in_t>();  // contiguous (B, NH, S, DHHV)
  out_t* N_ptr = vecN.data_ptr<out_t>();  // contiguous (B, NH, S)
  out_t* M_ptr = vecM.data_ptr<out_t>();
  const at::Tensor &C_all = a.matC_all, &n_all = a.vecN_all;

  // Per-thread scratch (allocated below): O(L * (TQ + DHQK + DHHV)), never O(L^2) once L is large.
  const int64_t floats =
      L * DHQK + TQ * Lc + DHQK * Lc + Lc * DVp + DHQK * DVp + L * DVp + DHQK + L;
  const int64_t doubles = 4 * L + Lc + 8 + 2 * DHHV;
  const int64_t scratch_bytes = floats * (int64_t)sizeof(float) + doubles * (int64_t)sizeof(double);

  const int64_t tasks = a.B * NH * NC;
  const int64_t work_per_task = L * L * (DHQK + DHHV) + L * DHQK * DHHV;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_task));
  const ChunkFn chunk_compute_fn = pick_chunk_compute();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    // Zero-initialised once: padding columns/rows are never written afterwards.
    std::vector<float> q, w, kt, vp, cp, num, n, inv;
    std::vector<double> bg, iv, m, den, d, exact;
    allocate_scratch(a, scratch_bytes, "one chunk's packed Q, K, V, C and a tile of its weights", [&] {
      for (auto [v, size] : {std::pair{&q, L * DHQK}, {&w, TQ * Lc}, {&kt, DHQK * Lc},
                             {&vp, Lc * DVp}, {&cp, DHQK * DVp}, {&num, L * DVp}, {&n, DHQK},
                             {&inv, L}}) {
        v->resize(size);
      }
      for (auto [v, size] : {std::pair{&bg, L}, {&iv, L}, {&m, L}, {&den, L}, {&d, Lc + 8},
                             {&exact, 2 * DHHV}}) {
        v->resize(size);
      }
    });
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / NC, chunk = task % NC, b = bh / NH, h = bh % NH;
      const int64_t s0 = chunk * L;
      const double m_prev = in.gates(b, h, chunk, bg.data(), iv.data());
      // Pack: q * qk_scale, K^T, V, C and n (states in their own dtype, converted here).
      const View2D<in_t> Kv = chunk_rows<in_t>(a.matK, b, h, s0);
      pack_rows(chunk_rows<in_t>(a.matQ, b, h, s0), L, DHQK, (float)a.qk_scale, q.data(), DHQK);
      pack_panels(View2D<in_t>{Kv.p, Kv.cs, Kv.rs}, DHQK, L, kt.data(), DHQK, 0);  // transposed
      pack_panels(chunk_rows<in_t>(a.matV, b, h, s0), L, DHHV, vp.data(), Lc, 0);
      visit_float(C_all.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        pack_panels(View2D<T>{C_all.data_ptr<T>() + b * C_all.stride(0) + h * C_all.stride(1) +
                                  chunk * DHQK * C_all.stride(2),
                              C_all.stride(2), C_all.stride(3)},
                    DHQK, DHHV, cp.data(), DHQK, 0);
      });
      visit_float(n_all.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        pack_rows(View2D<T>{n_all.data_ptr<T>() + b * n_all.stride(0) + h * n_all.stride(1) +
                                chunk * DHQK * n_all.stride(2),
                            0, n_all.stride(2)},
                  1, DHQK, 1.f, n.data(), 0);
      });
      const ChunkBuffers cb{L,        Lc,        DHQK,      DVp,       TQ,        q.data(),
                            w.data(), kt.data(), vp.data(), cp.data(), n.data(),  bg.data(),
                            iv.data(), m_prev,   d.data(),  a.eps,     m.data(),
                            den.data(), inv.data(), num.data(), a.vecN_signed};
      chunk_compute_fn(cb);
      // Step 7: outputs. A row that is not finite (or whose scale did not fit) goes to exact_row.
      const int64_t row0 = bh * a.S + s0;
      for (int64_t t = 0; t < L; ++t) {
        in_t* Ht = H_ptr + (row0 + t) * DHHV;
        const float* nt = num.data() + t * DVp;
        for (int64_t j = 0; j < DHHV; ++j) Ht[j] = static_cast<in_t>(nt[j]);
        double dent = den[t];
        if (!std::isfinite(dent)) {  // not finite, or marked so by chunk_compute
          dent = exact_row<in_t>(in, b, h, chunk, t, bg.data(), iv.data(), m_prev, m[t], Ht,
                                 exact.data());
        }
        N_ptr[row0 + t] = static_cast<out_t>(dent);
        M_ptr[row0 + t] = static_cast<out_t>(m[t]);
      }
    }
  });
}

// float64 inputs: every row by exact_row (small shapes: gradcheck, references).
template <typename out_t>
void hintra_cpu_f64(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  const int64_t NH = a.NH, L = a.L, NC = a.NC, DHHV = a.DHHV;
  const TaskInputs in(a);
  double* H_ptr = matH.data_ptr<double>();
  out_t* N_ptr = vecN.data_ptr<out_t>();
  out_t* M_ptr = vecM.data_ptr<out_t>();
  const int64_t scratch_bytes = (3 * L + 4 + 2 * DHHV) * (int64_t)sizeof(double);
  const int64_t tasks = a.B * NH * NC;
  const int64_t work_per_task = L * L * (a.DHQK + DHHV) + L * a.DHQK * DHHV;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_task));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> bg, iv, d, exact;
    allocate_scratch(a, scratch_bytes, "one chunk's gates", [&] {
      bg.resize(L);
      iv.resize(L);
      d.resize(L + 4);
      exact.resize(2 * DHHV);
    });
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / NC, chunk = task % NC, b = bh / NH, h = bh % NH;
      const double m_prev = in.gates(b, h, chunk, bg.data(), iv.data());
      const int64_t row0 = bh * a.S + chunk * L;
      for (int64_t t = 0; t < L; ++t) {
        const double mt = nan_max(bg[t] + m_prev, intra_max_row(t, bg.data(), iv.data(), d.data()));
        const double den = exact_row<double>(in, b, h, chunk, t, bg.data(), iv.data(), m_prev, mt,
                                             H_ptr + (row0 + t) * DHHV, exact.data());
        N_ptr[row0 + t] = static_cast<out_t>(den);
        M_ptr[row0 + t] = static_cast<out_t>(mt);
      }
    }
  });
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void hintra_cpu(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  for (const at::Tensor* t : {&a.vecI, &a.vecF, &a.matC_all, &a.vecN_all, &a.scaM_all}) {
    TORCH_INTERNAL_ASSERT(is_float_dtype(t->scalar_type()), "hintra_cpu: gates and states must be floats");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, vecN.scalar_type(), "hintra_cpu_out", [&] {
    using out_t = scalar_t;
    switch (a.matQ.scalar_type()) {
      case at::kFloat: return hintra_cpu_fast<float, out_t>(a, matH, vecN, vecM);
      case at::kBFloat16: return hintra_cpu_fast<at::BFloat16, out_t>(a, matH, vecN, vecM);
      case at::kHalf: return hintra_cpu_fast<at::Half, out_t>(a, matH, vecN, vecM);
      case at::kDouble: return hintra_cpu_f64<out_t>(a, matH, vecN, vecM);
      default:
        TORCH_CHECK(false, "parallel_fw_hintra: matQ must be float32, bfloat16, float16 or float64, got ",
                    a.matQ.scalar_type());
    }
  });
}

}  // namespace mlstm
