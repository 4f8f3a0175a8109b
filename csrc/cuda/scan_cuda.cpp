// CUDA entries of the backward's reverse state scans (backward.h): layout checks, the caller's
// stream, the kernels of scan_bw.cu and scan_gram.cu.
#include <c10/cuda/CUDAStream.h>

#include "backward.h"
#include "cuda/scan_params.h"

namespace mlstm {

at::Tensor reverse_state_scan_cuda(at::Tensor& X, const at::Tensor& decay, const at::Tensor& last,
                                   at::Tensor& first, const at::Tensor& states, int64_t states_stride_g) {
  const int64_t G = X.size(0), NC = X.size(1), E = X.size(2);
  TORCH_CHECK(X.scalar_type() == at::kFloat, "chunkwise_bw: the CUDA state scan runs in float32, got ",
              X.scalar_type());
  cuda::ScanParams p{};
  p.G = G, p.NC = NC, p.E = E;
  const at::Tensor l = last.defined() ? last.to(at::kFloat).contiguous() : at::Tensor();
  // 16-byte accesses where every row of four floats starts 16-byte aligned.
  auto aligned = [](const at::Tensor& t) {
    return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  p.vec = (E % 4 == 0 && states_stride_g % 4 == 0 && aligned(X) && aligned(first) && aligned(states) &&
           aligned(l)) ? 4 : 1;
  const int64_t threads_per_pair = (E + p.vec - 1) / p.vec;
  p.blocks_per_pair = (threads_per_pair + cuda::kScanThreads - 1) / cuda::kScanThreads;
  p.warps_per_pair = p.blocks_per_pair * cuda::kScanWarps;
  TORCH_CHECK(G * p.blocks_per_pair < (int64_t(1) << 31), "chunkwise_bw: ", num(G * p.blocks_per_pair),
              " thread blocks for the state scan exceed the CUDA grid limit");
  at::Tensor dots = at::zeros({G, NC, p.warps_per_pair}, X.options());
  TORCH_INTERNAL_ASSERT(X.is_contiguous() && first.is_contiguous() && states.is_contiguous());
  const at::Tensor d = decay.contiguous();
  p.X = X.data_ptr<float>();
  p.decay = d.data_ptr<float>();
  p.last = l.defined() ? l.data_ptr<float>() : nullptr;
  p.first = first.data_ptr<float>();
  p.states = states.data_ptr<float>();
  p.states_stride_g = states_stride_g;
  p.dots = dots.data_ptr<float>();
  cuda::launch_reverse_state_scan(p, c10::cuda::getCurrentCUDAStream());
  return dots;
}

at::Tensor gram_scan_cuda(const at::Tensor& Qs, const at::Tensor& qscale, const at::Tensor& dH,
                          const at::Tensor& decay, const at::Tensor& last, at::Tensor& first,
                          const at::Tensor& states, int64_t states_stride_g, at::Tensor& G_out) {
  const int64_t num_pairs = Qs.size(0), S = Qs.size(1), DQ = Qs.size(2), DV = dH.size(2);
  const int64_t NC = decay.size(1), L = NC > 0 ? S / NC : 0;
  using cuda::kGramTile;
  // The fused backward's shapes (fused_backward_cuda_usable): checked again, since the kernel
  // reads whole tiles and 8-byte pieces without bounds.
  TORCH_CHECK((Qs.scalar_type() == at::kBFloat16 || Qs.scalar_type() == at::kHalf) &&
                  dH.scalar_type() == Qs.scalar_type() && decay.scalar_type() == at::kFloat &&
                  G_out.scalar_type() == Qs.scalar_type() && states.scalar_type() == Qs.scalar_type(),
              "chunkwise_bw: the CUDA gram scan takes 16-bit Qs, dH, states and G_out of one dtype");
  TORCH_CHECK(NC > 0 && S == NC * L && L % cuda::kGramBL == 0 && DQ % kGramTile == 0 && DV % kGramTile == 0 &&
                  dH.size(0) == num_pairs && dH.size(1) == S && NC * (L / cuda::kGramBL) < (int64_t(1) << 31),
              "chunkwise_bw: the CUDA gram scan needs S = NC * L with L a multiple of ", cuda::kGramBL,
              " and DHQK, DHHV multiples of ", kGramTile, "; got S = ", num(S), ", NC = ", num(NC), ", DHQK = ",
              num(DQ), ", DHHV = ", num(DV));
  TORCH_INTERNAL_ASSERT(!qscale.defined() || (qscale.scalar_type() == at::kFloat && qscale.is_contiguous() &&
                                               qscale.numel() == num_pairs * S &&
                                               reinterpret_cast<uintptr_t>(qscale.data_ptr()) % 16 == 0));
  TORCH_INTERNAL_ASSERT(Qs.is_contiguous() && dH.is_contiguous() && first.is_contiguous() &&
                        states.is_contiguous() && G_out.is_contiguous() && states_stride_g % 2 == 0);
  // The kernel reads `last` in 8-byte pieces: a caller's gradient at an odd float offset is copied.
  at::Tensor l = last.defined() ? last.to(at::kFloat).contiguous() : at::Tensor();
  if (l.defined() && reinterpret_cast<uintptr_t>(l.data_ptr()) % 8 != 0) l = l.clone();
  const at::Tensor d = decay.contiguous();
  cuda::GramScanParams p{};
  p.num_pairs = num_pairs, p.S = S;
  p.NC = static_cast<int>(NC), p.L = static_cast<int>(L), p.DQ = static_cast<int>(DQ), p.DV = static_cast<int>(DV);
  p.n_qkt = static_cast<int>(DQ / kGramTile), p.n_hvt = static_cast<int>(DV / kGramTile);
  p.warps_per_pair = p.n_qkt * p.n_hvt * cuda::kGramWarpsPerBlock;
  TORCH_CHECK(num_pairs * p.n_qkt * p.n_hvt < (int64_t(1) << 31), "chunkwise_bw: ",
              num(num_pairs * p.n_qkt * p.n_hvt), " thread blocks for the gram scan exceed the CUDA grid limit");
  at::Tensor dots = at::empty({num_pairs, NC, p.warps_per_pair}, decay.options().dtype(at::kFloat));
  p.qs = Qs.data_ptr(), p.dh = dH.data_ptr();
  p.qscale = qscale.defined() ? qscale.data_ptr<float>() : nullptr;
  p.decay = d.data_ptr<float>();
  p.last = l.defined() ? l.data_ptr<float>() : nullptr;
  p.states = states.data_ptr(), p.states_stride_g = states_stride_g;
  p.G = G_out.data_ptr(), p.first = first.data_ptr<float>(), p.dots = dots.data_ptr<float>();
  cuda::launch_gram_scan(p, Qs.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream());
  return dots;
}

}  // namespace mlstm
