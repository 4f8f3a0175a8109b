// The H step of the chunkwise mLSTM forward pass (SPEC.md): shared declarations.
//
// Every backend entry goes through check_hintra_args() (validate.cpp), so every device rejects the
// same bad input with the same message, then gets a HintraArgs with the sizes already worked out.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

#include <optional>
#include <string>
#include <type_traits>
#include <tuple>

namespace mlstm {

// Sizes use SPEC.md's names. vecI is already viewed as (B, NH, S); gates are float32 (float64 when
// matQ is float64, a CPU-only case); states keep the caller's float dtype and strides.
struct HintraArgs {
  at::Tensor matQ, matK, matV;  // (B, NH, S, DHQK), (B, NH, S, DHQK), (B, NH, S, DHHV)
  at::Tensor vecI, vecF;        // (B, NH, S)
  at::Tensor matC_all;          // (B, NH, >= NC*DHQK, DHHV); slot k = rows k*DHQK..(k+1)*DHQK-1
  at::Tensor vecN_all;          // (B, NH, >= NC*DHQK)
  at::Tensor scaM_all;          // (B, NH, >= NC)
  int64_t B = 0, NH = 0, S = 0, DHQK = 0, DHHV = 0, L = 0, NC = 0;
  double qk_scale = 0.0;
  double eps = 0.0;
  at::ScalarType output_dtype = at::kFloat;
  bool vecN_signed = false;  // write nsum instead of den (chunkwise_fw's vecN_signed; forward.h)
  // Launch hints (the reference's Triton block sizes); a backend may use or ignore them.
  std::optional<int64_t> siz_b_DHHV;
};

using HintraOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // matH, vecN, vecM


HintraArgs check_hintra_args(
    const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV,
    const at::Tensor& vecI, const at::Tensor& vecF, const at::Tensor& matC_all,
    const at::Tensor& vecN_all, const at::Tensor& scaM_all, std::optional<double> qk_scale,
    int64_t chunk_size, int64_t siz_b_LQ, int64_t siz_b_LKV, std::optional<int64_t> siz_b_DHQK,
    std::optional<int64_t> siz_b_DHHV, std::optional<int64_t> num_warps,
    std::optional<int64_t> num_stages, double eps, std::optional<at::ScalarType> output_dtype);

// Empty outputs on matQ's device: matH in matQ's dtype, vecN/vecM in the backend's stats_dtype
// (ops.cpp; the op converts them to output_dtype).
HintraOutputs allocate_hintra_outputs(const HintraArgs& a, at::ScalarType stats_dtype);

// Backends fill the outputs allocate_hintra_outputs() made.
void hintra_cpu(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM);
#ifdef MLSTM_EXT_WITH_CUDA
void hintra_cuda(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM);
#endif

}  // namespace mlstm
