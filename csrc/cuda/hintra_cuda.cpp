// CUDA backend entry: device guard, current stream, input preparation, tile choice, launch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>

#include "cuda/hintra_launch.h"
#include "hintra.h"

namespace mlstm {
namespace {

// The kernel reads rows with unit column stride; other layouts get a deliberate contiguous copy.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// 16-byte copies are legal when the base and every row/batch/head step are 16-byte aligned.
bool rows_aligned16(const at::Tensor& t, int64_t row_dim) {
  const int64_t es = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d <= row_dim; ++d)
    if (t.size(d) > 1 && (t.stride(d) * es) % 16 != 0) return false;
  return true;
}

bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

// The Hopper kernel serves 16-bit inputs on compute capability 9.0 when the library carries
// sm_90a code and three of its blocks fit on a multiprocessor (with two it measured no faster
// than the sm_80 kernel: benchmarks/NOTES.md). MLSTM_EXT_SM90=0 turns it off (A/B runs, tests).
bool use_sm90(const at::Tensor& q, int bdv, int64_t DHQK, int64_t L) {
#ifdef MLSTM_EXT_SM90A
  if (q.scalar_type() == at::kFloat || env_is("MLSTM_EXT_SM90", "0")) return false;
  int dev = 0, major = 0, minor = 0, sm_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0 || DHQK > 4096 || L > (1 << 20)) return false;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  const int per_block = cuda::sm90_smem_bytes(bdv, static_cast<int>(DHQK), static_cast<int>(L));
  return 3 * (per_block + 1024) <= sm_smem;  // 1 KB per block is reserved by the driver
#else
  (void)q, (void)bdv, (void)DHQK, (void)L;
  return false;
#endif
}

}  // namespace

void hintra_cuda(const HintraArgs& a, at::Tensor& matH, at::Tensor& vecN, at::Tensor& vecM) {
  TORCH_CHECK(a.matQ.scalar_type() != at::kDouble,
              "parallel_fw_hintra: float64 inputs run on the CPU only; got float64 matQ on ",
              a.matQ.device());
  const c10::cuda::CUDAGuard guard(a.matQ.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor q = unit_last_stride(a.matQ), k = unit_last_stride(a.matK),
                   v = unit_last_stride(a.matV);
  // Gates and states are float32 already (check_hintra_args).
  const at::Tensor &vi = a.vecI, &vf = a.vecF, &n = a.vecN_all, &m = a.scaM_all;
  const at::Tensor C = unit_last_stride(a.matC_all);
  const bool f32_out = a.output_dtype == at::kFloat;
  at::Tensor N32 = f32_out ? vecN : at::empty(vecN.sizes(), vecN.options().dtype(at::kFloat));
  at::Tensor M32 = f32_out ? vecM : at::empty(vecM.sizes(), vecM.options().dtype(at::kFloat));

  cuda::HintraParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.igate = vi.data_ptr<float>();
  p.i_sb = vi.stride(0), p.i_sh = vi.stride(1), p.i_ss = vi.stride(2);
  p.fgate = vf.data_ptr<float>();
  p.f_sb = vf.stride(0), p.f_sh = vf.stride(1), p.f_ss = vf.stride(2);
  p.C = C.data_ptr<float>();
  p.C_sb = C.stride(0), p.C_sh = C.stride(1), p.C_sr = C.stride(2);
  p.n = n.data_ptr<float>();
  p.n_sb = n.stride(0), p.n_sh = n.stride(1), p.n_sr = n.stride(2);
  p.m = m.data_ptr<float>();
  p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_ss = m.stride(2);
  p.H = matH.data_ptr();
  p.vecN = N32.data_ptr<float>();
  p.vecM = M32.data_ptr<float>();
  p.NH = a.NH;
  p.S = a.S;
  TORCH_CHECK(a.DHQK < (1 << 20) && a.DHHV < (1 << 20) && a.L < (1 << 30),
              "parallel_fw_hintra: head dims must be < 2^20 and chunk_size < 2^30 on CUDA");
  p.DHQK = static_cast<int>(a.DHQK);
  p.DHHV = static_cast<int>(a.DHHV);
  p.L = static_cast<int>(a.L);
  p.NC = static_cast<int>(a.NC);
  p.qk_scale = static_cast<float>(a.qk_scale);
  p.eps = static_cast<float>(a.eps);
  p.q_vec = rows_aligned16(q, 2);
  p.k_vec = rows_aligned16(k, 2);
  p.v_vec = rows_aligned16(v, 2);
  p.c_vec = rows_aligned16(C, 2);

  // Tiles: one warp per 16 query rows, up to 4 warps (the Hopper kernel: always 64 rows, one
  // warpgroup); DHHV tiles of 128 columns (64 for small DHHV; float32 inputs use the tile their
  // kernel was built with). For 16-bit inputs siz_b_DHHV may ask for 64 or 128.
  const bool is_f32 = a.matQ.scalar_type() == at::kFloat;
  int bdv = is_f32 ? cuda::fp32_dv_tile() : (a.DHHV <= 64 ? 64 : 128);
  if (!is_f32 && a.siz_b_DHHV.has_value() && (*a.siz_b_DHHV == 64 || *a.siz_b_DHHV == 128))
    bdv = static_cast<int>(*a.siz_b_DHHV);
  p.n_dvt = static_cast<int>(std::max<int64_t>(1, (a.DHHV + bdv - 1) / bdv));
  const bool sm90 = use_sm90(a.matQ, bdv, a.DHQK, a.L);
  p.rows_per_block = sm90 ? 64 : static_cast<int>(std::min<int64_t>(64, (a.L + 15) / 16 * 16));
  p.n_qt = static_cast<int>((a.L + p.rows_per_block - 1) / p.rows_per_block);

  const int64_t num_bh = a.B * a.NH;
  switch (a.matQ.scalar_type()) {
    case at::kBFloat16:
      if (sm90) cuda::launch_hintra_sm90_bf16(p, bdv, num_bh, stream);
      else cuda::launch_hintra_bf16(p, bdv, num_bh, stream);
      break;
    case at::kHalf:
      if (sm90) cuda::launch_hintra_sm90_fp16(p, bdv, num_bh, stream);
      else cuda::launch_hintra_fp16(p, bdv, num_bh, stream);
      break;
    case at::kFloat: cuda::launch_hintra_fp32(p, bdv, num_bh, stream); break;
    default: TORCH_CHECK(false, "parallel_fw_hintra: unsupported dtype ", a.matQ.scalar_type());
  }
  if (!f32_out) {
    vecN.copy_(N32);
    vecM.copy_(M32);
  }
}

}  // namespace mlstm
