// CPU reverse state scan of the backward (backward.h): one task per (pair, block of kBlock
// entries), walking the chunks from last to first with the running gradient in a local row.
#include <ATen/Parallel.h>

#include <vector>

#include "backward.h"

namespace mlstm {
namespace {

constexpr int64_t kBlock = 1024;

template <typename T>
void scan(T* X, const T* decay, const T* last, T* first, const T* states, int64_t states_stride_g,
          T* dots, int64_t G, int64_t NC, int64_t E) {
  const int64_t nb = (E + kBlock - 1) / kBlock;
  at::parallel_for(0, G * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> prev(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / nb, b = task % nb, e0 = b * kBlock, n = std::min(kBlock, E - e0);
      for (int64_t e = 0; e < n; ++e) prev[e] = last ? last[g * E + e0 + e] : T(0);
      for (int64_t k = NC - 1; k >= 0; --k) {
        T* x = X + (g * NC + k) * E + e0;
        const T* st = states + g * states_stride_g + k * E + e0;
        const T d = decay[g * NC + k];
        double dot = 0.0;
        for (int64_t e = 0; e < n; ++e) {
          const T xe = x[e], pe = prev[e];
          dot += static_cast<double>(st[e]) * pe;  // <state k, gradient of state k+1>
          x[e] = pe;
          prev[e] = xe + d * pe;
        }
        dots[(g * NC + k) * nb + b] = static_cast<T>(dot);
      }
      for (int64_t e = 0; e < n; ++e) first[g * E + e0 + e] = prev[e];
    }
  });
}

}  // namespace

at::Tensor reverse_state_scan_cpu(at::Tensor& X, const at::Tensor& decay, const at::Tensor& last,
                                  at::Tensor& first, const at::Tensor& states, int64_t states_stride_g) {
  const int64_t G = X.size(0), NC = X.size(1), E = X.size(2);
  const int64_t nb = (E + kBlock - 1) / kBlock;
  at::Tensor dots = at::zeros({G, NC, nb}, X.options());
  TORCH_INTERNAL_ASSERT(X.is_contiguous() && first.is_contiguous() && states.is_contiguous());
  const at::Tensor d = decay.contiguous();
  const at::Tensor l = last.defined() ? last.to(X.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "reverse_state_scan_cpu", [&] {
    scan<scalar_t>(X.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), l.defined() ? l.data_ptr<scalar_t>() : nullptr,
                   first.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(), states_stride_g,
                   dots.data_ptr<scalar_t>(), G, NC, E);
  });
  return dots;
}

}  // namespace mlstm
