// The fused backward's reverse scan of the C-state gradients with the chunk products inside
// (scan_params.h, GramScanParams). One block per (pair, 64 x 64 tile of the state) walks the
// chunks from last to first with its tile of G in mma accumulators, as the states kernel walks
// them forward:
//
//   chunk k (from NC - 1 down to 0), with G = G_{k+1}:
//     store G into slot k (rounded to the inputs' 16-bit dtype: bw_post multiplies it in that
//     dtype), dots <- <C_k, G> (per warp: the 16-bit C_k, the float32 accumulators),
//     G <- decay_k G + Qs_k^T dH_k
//   after chunk 0: store G = G_0 into `first`.
//
// Before, cuBLAS wrote X_k = Qs_k^T dH_k for every chunk in float32 and the scan read it back and
// rewrote it (16 bytes per state entry and chunk besides a float32 C); here X is never written:
// 4 bytes (C read, G written, both 16-bit) plus the Qs and dH rows. The products are the GEMM's
// (16-bit operands, float32 accumulators); Qs_k^T is the A operand by ldmatrix .trans of the
// row-major rows, as K^T in the states kernel. With qscale, Qs = Q diag(qscale) is formed as the
// fragments are loaded, with bw_pre's rounding (the float product rounded once to 16 bits), so it
// needs no buffer of its own.
#include <c10/cuda/CUDAException.h>

#include "cuda/mma.cuh"
#include "cuda/scan_params.h"
#include "cuda/tile_copy.cuh"

namespace mlstm::cuda {
namespace {

constexpr int kLd = kGramTile + 8;  // stage row stride (elements): ldmatrix rows on distinct banks
constexpr int kNT = kGramTile / 8;  // n-tiles of 8 columns per warp

template <typename T>
struct GramSmem {
  static constexpr int kTileBytes = kGramBL * kLd * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = 2 * kTileBytes + kGramBL * 4;  // Qs (or Q) rows, dH rows, qscale
  static constexpr int kBytes = kGramStages * kStageBytes;
};

// The accumulator layout (mma.cuh): element e of n-tile nt sits at row r0 (e < 2) or r0 + 8 and
// column 8 nt + 2 tq + (e & 1) of the tile. x points at the tile's (0, 0) entry, row stride ld;
// float32 or 16-bit entries.
template <typename I>
__device__ __forceinline__ float2 load_pair(const I* x) {
  if constexpr (sizeof(I) == 4) {
    return __ldg(reinterpret_cast<const float2*>(x));
  } else {
    return unpack2<I>(__ldg(reinterpret_cast<const unsigned int*>(x)));
  }
}
template <typename I>
__device__ __forceinline__ void load_acc(float (&acc)[kNT][4], const I* x, int64_t ld, int r0, int tq) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const float2 a = load_pair(x + r0 * ld + nt * 8 + 2 * tq);
    const float2 b = load_pair(x + (r0 + 8) * ld + nt * 8 + 2 * tq);
    acc[nt][0] = a.x, acc[nt][1] = a.y, acc[nt][2] = b.x, acc[nt][3] = b.y;
  }
}
template <typename O>
__device__ __forceinline__ void store_acc(O* x, int64_t ld, const float (&acc)[kNT][4], int r0, int tq) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    O* a = x + r0 * ld + nt * 8 + 2 * tq;
    O* b = x + (r0 + 8) * ld + nt * 8 + 2 * tq;
    if constexpr (sizeof(O) == 4) {
      *reinterpret_cast<float2*>(a) = make_float2(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<float2*>(b) = make_float2(acc[nt][2], acc[nt][3]);
    } else {
      *reinterpret_cast<uint32_t*>(a) = pack2<O>(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<uint32_t*>(b) = pack2<O>(acc[nt][2], acc[nt][3]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGramThreads, 4) gram_scan_kernel(const GramScanParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  using Sm = GramSmem<T>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, tq = lane % 4;
  int64_t blk = blockIdx.x;
  const int hvt = static_cast<int>(blk % p.n_hvt);
  blk /= p.n_hvt;
  const int qkt = static_cast<int>(blk % p.n_qkt);
  const int64_t pair = blk / p.n_qkt;
  const int dq0 = qkt * kGramTile, dv0 = hvt * kGramTile;
  const int wr = warp * 16, r0 = wr + lane / 4;  // the lane's rows r0, r0 + 8 within the tile
  const int64_t E = static_cast<int64_t>(p.DQ) * p.DV;
  const int64_t tile0 = static_cast<int64_t>(dq0) * p.DV + dv0;  // the tile's (0, 0) in a state

  float acc[kNT][4];  // G_{k+1}, starting with G_NC
  if (p.last != nullptr) {
    load_acc(acc, p.last + pair * E + tile0, p.DV, r0, tq);
  } else {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  }
  // C_k's entries at the accumulator positions, fetched a chunk ahead (for the dots).
  const T* C = static_cast<const T*>(p.states) + pair * p.states_stride_g + tile0;
  float c[kNT][4];
  load_acc(c, C + static_cast<int64_t>(p.NC - 1) * E, p.DV, r0, tq);

  // The ring: step j covers positions [sub * kGramBL, +kGramBL) of chunk NC - 1 - j / n_sub.
  const int n_sub = p.L / kGramBL;
  const int total = p.NC * n_sub;  // < 2^31 (checked by the host)
  const T* gQ = static_cast<const T*>(p.qs) + pair * p.S * p.DQ + dq0;
  const T* gH = static_cast<const T*>(p.dh) + pair * p.S * p.DV + dv0;
  const bool scaled = p.qscale != nullptr;
  const float* gS = scaled ? p.qscale + pair * p.S : nullptr;
  int issued = 0;
  auto issue = [&](int buf) {  // always commits a group, empty past the end: uniform wait counts
    if (issued < total) {
      unsigned char* st = smem + buf * Sm::kStageBytes;
      const int64_t t0 = static_cast<int64_t>(p.NC - 1 - issued / n_sub) * p.L + (issued % n_sub) * kGramBL;
      stage_tile<T, kGramBL, kGramTile, kGramThreads>(reinterpret_cast<T*>(st), kLd, gQ + t0 * p.DQ, p.DQ,
                                                      kGramBL, kGramTile, true);
      stage_tile<T, kGramBL, kGramTile, kGramThreads>(reinterpret_cast<T*>(st + Sm::kTileBytes), kLd,
                                                      gH + t0 * p.DV, p.DV, kGramBL, kGramTile, true);
      if (scaled && threadIdx.x < kGramBL / 4) {
        cp_async_16(st + 2 * Sm::kTileBytes + threadIdx.x * 16, gS + t0 + threadIdx.x * 4, 16);
      }
      ++issued;
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kGramStages - 1; ++s) issue(s);

  float* dots = p.dots + pair * p.NC * p.warps_per_pair + (qkt * p.n_hvt + hvt) * kGramWarpsPerBlock + warp;
  int buf = 0;
  for (int j = 0; j < total; ++j) {
    cp_async_wait<kGramStages - 2>();  // this thread's copies of step j have landed
    __syncthreads();                   // everyone's have; everyone is done with step j - 1's slot
    issue((buf + kGramStages - 1) % kGramStages);

    if (j % n_sub == 0) {  // chunk start: acc holds G_{k+1}
      const int k = p.NC - 1 - j / n_sub;
      store_acc(static_cast<T*>(p.G) + (pair * p.NC + k) * E + tile0, p.DV, acc, r0, tq);
      float dot = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dot = fmaf(c[nt][e], acc[nt][e], dot);
      }
      dot = warp_sum(dot);
      if (lane == 0) dots[static_cast<int64_t>(k) * p.warps_per_pair] = dot;
      if (k > 0) load_acc(c, C + static_cast<int64_t>(k - 1) * E, p.DV, r0, tq);  // in flight meanwhile
      const float decay = p.decay[pair * p.NC + k];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= decay;
      }
    }

    const T* sQ = reinterpret_cast<const T*>(smem + buf * Sm::kStageBytes);
    const T* sH = reinterpret_cast<const T*>(smem + buf * Sm::kStageBytes + Sm::kTileBytes);
    const float* sS = reinterpret_cast<const float*>(smem + buf * Sm::kStageBytes + 2 * Sm::kTileBytes);
#pragma unroll
    for (int ks = 0; ks < kGramBL / 16; ++ks) {
      // Qs^T fragment (rows of the tile = DQ, k = positions) by ldmatrix .trans of the row-major
      // Qs stage; dH fragments (k = positions, n = DV columns) of n-tiles 2np, 2np + 1.
      uint32_t a[4];
      ldmatrix_x4_trans(a, sQ + (ks * 16 + (lane & 7) + ((lane >> 4) << 3)) * kLd + wr + ((lane >> 3) & 1) * 8);
      if (scaled) {
        // a[0], a[1] hold positions 2tq, 2tq + 1 of the k-step (rows r0, r0 + 8), a[2], a[3]
        // positions 2tq + 8, 2tq + 9.
        const float2 s0 = *reinterpret_cast<const float2*>(sS + ks * 16 + 2 * tq);
        const float2 s8 = *reinterpret_cast<const float2*>(sS + ks * 16 + 2 * tq + 8);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 q = unpack2<T>(a[i]), s = i < 2 ? s0 : s8;
          a[i] = pack2<T>(q.x * s.x, q.y * s.y);
        }
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sH + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + np * 16 + (lane >> 4) * 8);
        mma_16816<T>(acc[2 * np], a, b[0], b[1]);
        mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    buf = (buf + 1) % kGramStages;
  }
  store_acc(p.first + pair * E + tile0, p.DV, acc, r0, tq);
}

template <typename T>
void launch(const GramScanParams& p, cudaStream_t stream) {
  const int64_t blocks = p.num_pairs * p.n_qkt * p.n_hvt;
  if (blocks == 0) return;
  constexpr int smem = GramSmem<T>::kBytes;
  auto kernel = gram_scan_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(blocks), kGramThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_gram_scan(const GramScanParams& p, bool is_bf16, cudaStream_t stream) {
  if (is_bf16) {
    launch<__nv_bfloat16>(p, stream);
  } else {
    launch<__half>(p, stream);
  }
}

}  // namespace mlstm::cuda
