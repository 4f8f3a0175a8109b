// Operator schema and backend registration for mlstm::parallel_fw_hintra.
//
// The library links libtorch only (no Python), so it loads in a C++ process as well as through
// torch.ops.load_library. The fake kernel for torch.compile lives in mlstm_ext/_fake.py.
#include <torch/library.h>

#include "hintra.h"

namespace mlstm {
namespace {

template <void (*Backend)(const HintraArgs&, at::Tensor&, at::Tensor&, at::Tensor&)>
HintraOutputs parallel_fw_hintra(
    const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV,
    const at::Tensor& vecI, const at::Tensor& vecF, const at::Tensor& matC_all,
    const at::Tensor& vecN_all, const at::Tensor& scaM_all, std::optional<double> qk_scale,
    int64_t chunk_size, int64_t siz_b_LQ, int64_t siz_b_LKV, std::optional<int64_t> siz_b_DHQK,
    std::optional<int64_t> siz_b_DHHV, std::optional<int64_t> num_warps,
    std::optional<int64_t> num_stages, double eps, std::optional<at::ScalarType> output_dtype) {
  HintraArgs a = check_hintra_args(matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all,
                                   qk_scale, chunk_size, siz_b_LQ, siz_b_LKV, siz_b_DHQK,
                                   siz_b_DHHV, num_warps, num_stages, eps, output_dtype);
  auto [matH, vecN, vecM] = allocate_hintra_outputs(a);
  if (matH.numel() > 0 || vecN.numel() > 0) {
    Backend(a, matH, vecN, vecM);
  }
  return {matH, vecN, vecM};
}

#ifndef MLSTM_EXT_WITH_CUDA
void hintra_cuda_missing(const HintraArgs&, at::Tensor&, at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false,
              "parallel_fw_hintra: mlstm_ext was built without its CUDA kernels (no nvcc or a "
              "CPU-only torch at build time); rebuild with a CUDA-enabled torch, or pass CPU tensors");
}
#endif

bool built_with_cuda() {
#ifdef MLSTM_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Whether the library carries the Hopper (sm_90a) kernel, for tests and the benchmark.
bool built_with_sm90a() {
#ifdef MLSTM_EXT_SM90A
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(mlstm, m) {
  // Where Python finds the fake kernel when this library is loaded on its own.
  m.set_python_module("mlstm_ext._fake");
  m.def(
      "parallel_fw_hintra(Tensor matQ, Tensor matK, Tensor matV, Tensor vecI, Tensor vecF, "
      "Tensor matC_all, Tensor vecN_all, Tensor scaM_all, float? qk_scale=None, "
      "int chunk_size=64, int siz_b_LQ=32, int siz_b_LKV=32, int? siz_b_DHQK=None, "
      "int? siz_b_DHHV=None, int? num_warps=None, int? num_stages=None, float eps=1e-6, "
      "ScalarType? output_dtype=None) -> (Tensor matH, Tensor vecN, Tensor vecM)");
  m.def("_built_with_cuda() -> bool", &built_with_cuda);
  m.def("_built_with_sm90a() -> bool", &built_with_sm90a);
}

TORCH_LIBRARY_IMPL(mlstm, CPU, m) {
  m.impl("parallel_fw_hintra", &parallel_fw_hintra<hintra_cpu>);
}

TORCH_LIBRARY_IMPL(mlstm, CUDA, m) {
#ifdef MLSTM_EXT_WITH_CUDA
  m.impl("parallel_fw_hintra", &parallel_fw_hintra<hintra_cuda>);
#else
  m.impl("parallel_fw_hintra", &parallel_fw_hintra<hintra_cuda_missing>);
#endif
}

}  // namespace mlstm
