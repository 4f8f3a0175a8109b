// What the host hands the H-step kernels: the params (pointers, strides, sizes) and the plan
// (which kernel, tiles, threads, shared memory, grid). Plain structs, read by host and device.
// plan_hintra() (hintra_plan.cpp) is the one place that chooses; nothing below it asks for facts.
#pragma once

#include <cstdint>

namespace mlstm::cuda {

// Everything a kernel reads: pointers and element strides, taken from the tensors as they come
// (the last dim of Q/K/V/C has stride 1; the entry makes it so).
struct HintraParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;
  const float* igate;
  int64_t i_sb, i_sh, i_ss;
  const float* fgate;
  int64_t f_sb, f_sh, f_ss;
  const float* C;  // slot k = rows k*DHQK..(k+1)*DHQK-1
  int64_t C_sb, C_sh, C_sr;
  const float* n;
  int64_t n_sb, n_sh, n_sr;
  const float* m;
  int64_t m_sb, m_sh, m_ss;
  void* H;      // (B, NH, S, DHHV) contiguous, matQ's dtype
  float* vecN;  // (B, NH, S) contiguous
  float* vecM;
  int64_t NH, S;
  int DHQK, DHHV, L, NC;
  int rows_per_block;  // query rows of one block
  int n_qt, n_dvt;     // query-row tiles per chunk, DHHV tiles
  float qk_scale, eps;
  bool q_vec, k_vec, v_vec, c_vec;  // rows 16-byte aligned: cp.async path
  bool n_signed;                    // vecN gets nsum instead of den (HintraArgs::vecN_signed)
};

enum class InputType { kFloat32, kBFloat16, kFloat16 };
enum class HintraKernel { kSm80, kSm90 };  // mma.sync (sm_80 and later) or wgmma (sm_90a)

// Facts of one device, read once per device (device_facts.cpp).
struct DeviceFacts {
  int cc_major = 0, cc_minor = 0;
  int smem_per_block_optin = 0;  // bytes
  int smem_per_sm = 0;           // bytes
  int sm_count = 0;              // streaming multiprocessors
};

struct HintraPlan {
  HintraKernel kernel = HintraKernel::kSm80;
  bool sm90_wide = false;    // the Hopper kernel's wide-head layout (Sm90Traits kWide)
  int bdv = 128;             // DHHV columns per block
  int rows_per_block = 64;   // query rows per block
  int threads = 128;
  int smem_bytes = 0;
  int n_qt = 1, n_dvt = 1;   // tiles per chunk: query rows, DHHV columns
  int64_t blocks = 0;        // B*NH * NC * n_qt * n_dvt
};

struct HintraShape {
  int64_t BNH, NC;
  int DHQK, DHHV, L;
};

// The plan for one call: kernel variant (sm_90a wgmma kernel for 16-bit inputs on compute
// capability 9.0 when three of its blocks fit per SM and `allow_sm90`), DHHV tile
// (`dv_tile_hint`: 64 or 128 asks for that tile, 16-bit inputs only; 0 picks), threads and shared
// memory. Raises a clear error when even the smallest plan does not fit the device.
HintraPlan plan_hintra(const HintraShape& s, InputType type, int dv_tile_hint, const DeviceFacts& dev,
                       bool allow_sm90);

}  // namespace mlstm::cuda
