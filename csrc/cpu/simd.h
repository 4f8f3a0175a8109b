// What the CPU kernels share to write their hot loops once over a register vector type V and
// compile them twice on x86-64: for AVX2/FMA (the x86-64-v3 target attribute; 16 ymm registers:
// 6-row tiles of 8-lane vectors) and for the SSE2 baseline (16 xmm registers: 2-row tiles of 4-lane
// vectors), picked at run time (MLSTM_EXT_CPU_PORTABLE=1 forces the baseline). Elsewhere (e.g.
// aarch64, 32 vector registers) the portable build uses 6-row tiles of 4-lane vectors.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MLSTM_CPU_X86 1
#define MLSTM_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define MLSTM_CPU_X86 0
#endif
#define MLSTM_INLINE inline __attribute__((always_inline))
#define MLSTM_LAMBDA_INLINE __attribute__((always_inline))
// The vector helpers are always inlined, so the AVX-vs-SSE argument ABI GCC warns about never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlstm::cpu {

constexpr int kMRAvx2 = 6;  // 12 accumulators + 2 B vectors + 1 broadcast: 15 of 16 ymm
#if MLSTM_CPU_X86
constexpr int kMRPortable = 2;
#else
constexpr int kMRPortable = 6;
#endif

// GCC/Clang vector extensions: one AVX2 register in the x86-64-v3 build, two SSE registers in the
// baseline, what the target has elsewhere.
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef double vd2 __attribute__((vector_size(16)));

template <typename V, typename T>
MLSTM_INLINE V loadv(const T* p) {
  V r;
  std::memcpy(&r, p, sizeof r);  // unaligned
  return r;
}
template <typename V, typename T>
MLSTM_INLINE void storev(T* p, V x) {
  std::memcpy(p, &x, sizeof x);
}

}  // namespace mlstm::cpu
