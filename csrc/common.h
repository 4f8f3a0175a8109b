// Helpers every translation unit of the library shares: error-message formatting. Light on
// purpose (no ATen): the CUDA files include it too.
#pragma once

#include <string>
#include <type_traits>

namespace at {
class Tensor;
}

namespace mlstm {

// Numbers in error messages go through std::to_string, never through an ostream: some toolchains
// (seen on the GPU build machine) link a private libstdc++ into the library, and formatting a
// number with a stream made there crashes. Strings, dtypes and devices print safely.
template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int>>>
inline std::string num(Int v) { return std::to_string(static_cast<long long>(v)); }
inline std::string num(double v) { return std::to_string(v); }
std::string shape_str(const at::Tensor& t);  // "[2, 3, 64]"
// The CUDA kernels take float32, bfloat16 and float16: a float64 `arg` of `op` gets an error
// saying where float64 runs (validate.cpp).
void check_not_float64_on_cuda(const char* op, const char* arg, const at::Tensor& t);

// SPEC.md step 1: finite log forget gates below this count as it. e^-1e6 is 0 in any precision,
// and prefix sums of such gates stay exact beside ordinary ones (mlstm_ext.reference.MIN_LOG_FORGET).
constexpr double kMinLogForget = -1e6;
// SPEC.md step 3: the floor of the intra-chunk stabiliser (the reference's MINIMUM_MAX_VAL).
constexpr double kMinimumMaxVal = -10.0;

}  // namespace mlstm
