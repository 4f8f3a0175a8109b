// CPU kernel of mlstm::recurrent_fw_states (SPEC.md, "How the states are made").
//
// The recurrence is sequential over chunks but every row of C (and entry of n) evolves on its own:
// C_{k+1}[r, :] = decay_k C_k[r, :] + sum_s w_k[s] K[s, r] V[s, :]. So the work is split over
// (batch*head, tile of C rows) with at::parallel_for, and a task carries its rows through the
// whole sequence; small B*NH still fill every core. The tasks of one head each redo that head's
// O(L) gate arithmetic per chunk, cheap next to their RT*L*DHHV products. Per chunk a task
//   1. forms the gates in float64: a[s] = (sum of logsigmoid(f) after s) + i[s], m_{k+1}, the
//      weights w[s] = exp(a[s] - m_{k+1}) and decay = exp(g_k + m_k - m_{k+1});
//   2. packs (K diag(w))^T for its rows and V into buffers of the compute type (any input strides
//      and dtype), and updates n (kept in float64);
//   3. updates its C rows in place, C = decay C + (K diag(w))^T V, with a register-blocked
//      micro-kernel (AVX2/FMA or SSE2, picked at run time as in hintra_cpu.cpp);
//   4. writes its rows of slot k+1 (and, for the first row tile, m_{k+1}).
// Float64 inputs run the same code in double (gradcheck path). Results do not depend on the
// tiling: each row sees the same operations in the same order whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/simd.h"
#include "states.h"

namespace mlstm {
namespace {

// The micro-kernel is compiled twice on x86-64, as in hintra_cpu.cpp (simd.h).
using namespace cpu;

constexpr int kNR = 16;  // columns per register tile and per packed V panel
constexpr int kRowQuantum = 6;  // row tiles are multiples of this (kMRAvx2, a multiple of kMRPortable)
constexpr int64_t kMaxRows = 128;

// One register tile, MR rows of C by kNR columns:
//   c[i, 0:kNR] = decay * c[i, 0:kNR] + sum_{p<k} A[p, i] Vp[p, 0:kNR]
// A is (K diag(w))^T stored key-major (A[p * lda + i]), Vp one packed V panel (row stride kNR).
template <int MR, typename V, typename T>
MLSTM_INLINE void tile(const T* A, int64_t lda, const T* Vp, int64_t k, T decay, T* c,
                       int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(T), NV = kNR / W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = loadv<V>(c + i * ldc + j * W) * decay;
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
    for (int j = 0; j < NV; ++j) b[j] = loadv<V>(Vp + p * kNR + j * W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T a = A[p * lda + i];
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) storev(c + i * ldc + j * W, acc[i][j]);
}

// tile<> for mr = 1..MR rows (the last row block of a task may be short).
template <int MR, typename V, typename T>
MLSTM_INLINE void tile_rows(int64_t mr, const T* A, int64_t lda, const T* Vp, int64_t k,
                            T decay, T* c, int64_t ldc) {
  if (mr == MR) return tile<MR, V>(A, lda, Vp, k, decay, c, ldc);
  if constexpr (MR > 1) tile_rows<MR - 1, V>(mr, A, lda, Vp, k, decay, c, ldc);
}

// One chunk's update of a task's rows of C: c (rows, DVp) = decay c + A^T [V panels].
template <typename T>
struct Update {
  int64_t rows, L, DVp;
  const T* A;   // (L, lda): A[s * lda + r] = w[s] K[s, r0 + r]
  int64_t lda;
  const T* vp;  // (L, DVp) as DVp / kNR panels of (L, kNR); columns >= DHHV zero
  T decay;
  T* c;         // (rows, DVp), row stride DVp
};

template <int MR, typename V, typename T>
MLSTM_INLINE void update_rows(const Update<T>& u) {
  // Column panels outer: one V panel (L * kNR values) stays in L1 while every row block uses it.
  for (int64_t j0 = 0; j0 < u.DVp; j0 += kNR) {
    const T* panel = u.vp + j0 * u.L;
    for (int64_t i0 = 0; i0 < u.rows; i0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, u.rows - i0);
      tile_rows<MR, V>(mr, u.A + i0, u.lda, panel, u.L, u.decay, u.c + i0 * u.DVp + j0, u.DVp);
    }
  }
}

#if MLSTM_CPU_X86
MLSTM_TARGET_AVX2 void update_avx2(const Update<float>& u) { update_rows<kMRAvx2, vf8>(u); }
#endif
void update_portable(const Update<float>& u) { update_rows<kMRPortable, vf4>(u); }
void update_double(const Update<double>& u) { update_rows<2, vd2>(u); }

template <typename T>
using UpdateFn = void (*)(const Update<T>&);

UpdateFn<float> pick_update(float*) {
  const char* force = std::getenv("MLSTM_EXT_CPU_PORTABLE");
  if (force != nullptr && force[0] == '1') return update_portable;
#if MLSTM_CPU_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return update_avx2;
#endif
  return update_portable;
}
UpdateFn<double> pick_update(double*) { return update_double; }

// max that propagates NaN from either side (std::max drops a NaN first argument).
inline double nan_max(double x, double y) { return (x > y || std::isnan(x)) ? x : y; }

inline double log_sigmoid(double f) { return std::min(f, 0.0) - std::log1p(std::exp(-std::abs(f))); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Asks for the cache lines of n elements p[0], p[stride], ... (unit stride only: a strided row
// touches too many lines to be worth it).
template <typename T>
inline void prefetch_row(const T* p, int64_t n, int64_t stride) {
  if (stride != 1) return;
  constexpr int64_t per_line = 64 / sizeof(T);
  for (int64_t e = 0; e < n; e += per_line) __builtin_prefetch(p + e, 0, 2);
}

// scalar_t: matK/matV dtype; T: compute and output dtype (float, or double for double inputs).
template <typename scalar_t, typename T>
void states_typed(const StatesArgs& a, at::Tensor& matC_all, at::Tensor& vecN_all,
                  at::Tensor& scaM_all) {
  const int64_t NH = a.NH, L = a.L, NC = a.NC, DHQK = a.DHQK, DHHV = a.DHHV;
  const int64_t BH = a.B * NH, DVp = ceil_div(DHHV, kNR) * kNR;

  // Row tiles: at most kMaxRows rows (a task's C rows, A and V stay in L2), and enough tiles that
  // there are two tasks per thread when B*NH is small; no more, since every tile packs its head's
  // V again.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t tiles = std::max(ceil_div(DHQK, kMaxRows), ceil_div(2 * threads, std::max<int64_t>(BH, 1)));
  tiles = std::max<int64_t>(1, std::min(tiles, ceil_div(DHQK, kRowQuantum)));
  const int64_t RT = std::max<int64_t>(kRowQuantum, ceil_div(ceil_div(DHQK, tiles), kRowQuantum) * kRowQuantum);
  tiles = std::max<int64_t>(1, ceil_div(DHQK, RT));

  // Gates and initial states are in T (check_states_args), with any strides.
  const auto Ia = a.vecI.accessor<T, 3>(), Fa = a.vecF.accessor<T, 3>();
  const bool hasC0 = a.matC_initial.defined(), hasN0 = a.vecN_initial.defined(),
             hasM0 = a.scaM_initial.defined();
  const auto C0 = hasC0 ? a.matC_initial : at::empty({0, 0, 0, 0}, a.vecI.options());
  const auto N0 = hasN0 ? a.vecN_initial : at::empty({0, 0, 0}, a.vecI.options());
  const auto M0 = hasM0 ? a.scaM_initial : at::empty({0, 0}, a.vecI.options());
  const auto C0a = C0.accessor<T, 4>();
  const auto N0a = N0.accessor<T, 3>();
  const auto M0a = M0.accessor<T, 2>();
  const scalar_t* K_ptr = a.matK.data_ptr<scalar_t>();
  const scalar_t* V_ptr = a.matV.data_ptr<scalar_t>();
  const int64_t sK[4] = {a.matK.stride(0), a.matK.stride(1), a.matK.stride(2), a.matK.stride(3)};
  const int64_t sV[4] = {a.matV.stride(0), a.matV.stride(1), a.matV.stride(2), a.matV.stride(3)};
  // Outputs: contiguous (allocate_states_outputs).
  T* C_out = matC_all.data_ptr<T>();
  T* N_out = vecN_all.data_ptr<T>();
  T* M_out = scaM_all.data_ptr<T>();
  const UpdateFn<T> update = pick_update(static_cast<T*>(nullptr));

  const int64_t tasks = BH * tiles;
  const int64_t work_per_task = std::max<int64_t>(1, (NC + 1) * RT * (L + 1) * DVp);
  const int64_t grain = std::max<int64_t>(1, 65536 / work_per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> A(L * RT), vp(L * DVp), c(RT * DVp);
    std::vector<double> n(RT), av(L), w(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / tiles, tile_idx = task % tiles, b = bh / NH, h = bh % NH;
      const int64_t r0 = tile_idx * RT, rows = std::max<int64_t>(0, std::min(RT, DHQK - r0));
      const bool writes_m = tile_idx == 0;
      const scalar_t* Kbh = K_ptr + b * sK[0] + h * sK[1];
      const scalar_t* Vbh = V_ptr + b * sV[0] + h * sV[1];
      const auto Ibh = Ia[b][h];
      const auto Fbh = Fa[b][h];

      // Slot 0: the initial state (zeros when not given).
      double m = hasM0 ? static_cast<double>(M0a[b][h]) : 0.0;
      std::fill(c.begin(), c.end(), T(0));
      for (int64_t r = 0; r < rows; ++r) {
        n[r] = hasN0 ? static_cast<double>(N0a[b][h][r0 + r]) : 0.0;
        if (hasC0)
          for (int64_t j = 0; j < DHHV; ++j) c[r * DVp + j] = C0a[b][h][r0 + r][j];
      }
      auto write_slot = [&](int64_t slot) {
        const int64_t base = bh * (NC + 1) + slot;
        for (int64_t r = 0; r < rows; ++r) {
          if (DHHV > 0)
            std::memcpy(C_out + (base * DHQK + r0 + r) * DHHV, c.data() + r * DVp, DHHV * sizeof(T));
          N_out[base * DHQK + r0 + r] = static_cast<T>(n[r]);
        }
        if (writes_m) M_out[base] = static_cast<T>(m);
      };
      write_slot(0);

      for (int64_t k = 0; k < NC; ++k) {
        const int64_t s0 = k * L;
        // 1. Gates, backwards: fsum is sum_{r>s} logsigmoid(f[r]) = g_k - bg[s], formed without
        // subtracting two cumulative sums, so i[s] survives forget gates like -1e30.
        double fsum = 0.0, amax = -std::numeric_limits<double>::infinity();
        for (int64_t s = L - 1; s >= 0; --s) {
          av[s] = fsum + static_cast<double>(Ibh[s0 + s]);
          amax = nan_max(amax, av[s]);
          fsum += log_sigmoid(static_cast<double>(Fbh[s0 + s]));
        }
        const double g = fsum;  // g_k
        const double m_new = nan_max(g + m, amax);
        const double decay = std::exp(g + m - m_new);
        for (int64_t s = 0; s < L; ++s) w[s] = std::exp(av[s] - m_new);

        // 2. A = (K diag(w))^T for this task's rows (key-major), n = decay n + K^T w, V panels.
        for (int64_t r = 0; r < rows; ++r) n[r] *= decay;
        for (int64_t s = 0; s < L; ++s) {
          const scalar_t* ks = Kbh + (s0 + s) * sK[2] + r0 * sK[3];
          if (k + 1 < NC) {  // the next chunk's rows of K and V, into cache while this one computes
            prefetch_row(ks + L * sK[2], rows, sK[3]);
            prefetch_row(Vbh + (s0 + L + s) * sV[2], DHHV, sV[3]);
          }
          T* As = A.data() + s * RT;
          const double ws = w[s];
          for (int64_t r = 0; r < rows; ++r) {
            const double kw = static_cast<double>(ks[r * sK[3]]) * ws;
            As[r] = static_cast<T>(kw);
            n[r] += kw;
          }
        }
        const int64_t full = DHHV / kNR * kNR;
        for (int64_t s = 0; s < L; ++s) {
          const scalar_t* vs = Vbh + (s0 + s) * sV[2];
          T* dst = vp.data() + s * kNR;
          if (sV[3] == 1) {
            for (int64_t j0 = 0; j0 < full; j0 += kNR)
              for (int i = 0; i < kNR; ++i) dst[j0 * L + i] = static_cast<T>(vs[j0 + i]);
          } else {
            for (int64_t j0 = 0; j0 < full; j0 += kNR)
              for (int i = 0; i < kNR; ++i) dst[j0 * L + i] = static_cast<T>(vs[(j0 + i) * sV[3]]);
          }
          for (int64_t j = full; j < DHHV; ++j) dst[full * L + j - full] = static_cast<T>(vs[j * sV[3]]);
        }

        // 3. C rows: decay C + A^T V.
        update(Update<T>{rows, L, DVp, A.data(), RT, vp.data(), static_cast<T>(decay), c.data()});

        // 4. Slot k+1.
        m = m_new;
        write_slot(k + 1);
      }
    }
  });
}

}  // namespace

void states_cpu(const StatesArgs& a, at::Tensor& matC_all, at::Tensor& vecN_all, at::Tensor& scaM_all) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.matK.scalar_type(), "states_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      states_typed<double, double>(a, matC_all, vecN_all, scaM_all);
    } else {
      states_typed<scalar_t, float>(a, matC_all, vecN_all, scaM_all);
    }
  });
}

}  // namespace mlstm
