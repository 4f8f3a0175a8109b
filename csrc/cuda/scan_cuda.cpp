// CUDA entry of the backward's reverse state scan (backward.h): layout checks, the caller's
// stream, the kernel of scan_bw.cu.
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

}  // namespace mlstm
