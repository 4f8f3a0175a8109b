// plan_hintra (hintra_params.h): the one place that chooses kernel, tiles, threads and shared
// memory for an H-step call, from the shapes and the cached device facts.
#include <c10/util/Exception.h>

#include <algorithm>

#include "common.h"
#include "cuda/hintra_params.h"
#include "cuda/hintra_tiles.h"

namespace mlstm::cuda {
namespace {

using Bf16 = __nv_bfloat16;  // both 16-bit dtypes have the same tiles and layouts

int sm80_smem(InputType type, int bdv, int DHQK, int L) {
  if (type == InputType::kFloat32) return make_smem_layout<HintraTraits<float, MLSTM_EXT_FP32_BDV>>(DHQK, L).bytes;
  return bdv == 64 ? make_smem_layout<HintraTraits<Bf16, 64>>(DHQK, L).bytes
                   : make_smem_layout<HintraTraits<Bf16, 128>>(DHQK, L).bytes;
}

int sm90_smem(int bdv, int DHQK, int L) {
  return bdv == 64 ? make_sm90_layout<Sm90Traits<Bf16, 64>>(DHQK, L).bytes
                   : make_sm90_layout<Sm90Traits<Bf16, 128>>(DHQK, L).bytes;
}

int sm90_wide_smem(int DHQK, int L) { return make_sm90_layout<Sm90Traits<Bf16, 128, true>>(DHQK, L).bytes; }

}  // namespace

HintraPlan plan_hintra(const HintraShape& s, InputType type, int dv_tile_hint, const DeviceFacts& dev,
                       bool allow_sm90) {
  HintraPlan plan;
  // The gate scratch holds a few floats per key of the chunk: larger chunks cannot fit (and the
  // byte counts below stay in int range).
  TORCH_CHECK(s.L <= (1 << 16) && s.DHQK <= (1 << 16), "parallel_fw_hintra: chunk_size = ", num(s.L),
              " and DHQK = ", num(s.DHQK), " need more shared memory per block than the CUDA kernel "
              "can have (chunk_size and DHQK must be at most 65536, and smaller together); use a "
              "smaller chunk_size, or CPU tensors");
  const bool f32 = type == InputType::kFloat32;
  // DHHV tile: 128 columns (64 for small DHHV); float32 uses the tile its kernel was built with.
  plan.bdv = f32 ? MLSTM_EXT_FP32_BDV : (s.DHHV <= 64 ? 64 : 128);
  if (!f32 && (dv_tile_hint == 64 || dv_tile_hint == 128)) plan.bdv = dv_tile_hint;
  plan.n_dvt = std::max(1, (s.DHHV + plan.bdv - 1) / plan.bdv);

  // The Hopper kernel serves 16-bit inputs on compute capability 9.0 when three of its blocks fit
  // on a multiprocessor (with two it measured slower than the sm_80 kernel: benchmarks/NOTES.md);
  // wide heads (DHQK above one K part) get its wide layout when only that fits three.
  bool sm90 = false;
  if (!f32 && allow_sm90 && dev.cc_major == 9 && dev.cc_minor == 0 && s.DHQK <= 4096) {
    const auto fits3 = [&](int bytes) { return 3 * (bytes + 1024) <= dev.smem_per_sm; };  // 1 KB per block is the driver's
    const int bytes = sm90_smem(plan.bdv, s.DHQK, s.L);
    if (fits3(bytes)) {
      sm90 = true, plan.smem_bytes = bytes;
    } else if (plan.bdv == 128 && s.DHQK > Sm90Traits<Bf16, 128, true>::kKPart && fits3(sm90_wide_smem(s.DHQK, s.L))) {
      sm90 = true, plan.sm90_wide = true, plan.smem_bytes = sm90_wide_smem(s.DHQK, s.L);
    }
  }
  if (sm90) {
    plan.kernel = HintraKernel::kSm90;
    plan.rows_per_block = 64;  // one warpgroup, wgmma M = 64
    plan.threads = 128;
  } else {
    plan.kernel = HintraKernel::kSm80;
    plan.rows_per_block = std::min(64, (s.L + 15) / 16 * 16);  // one warp per 16 query rows
    // Four warps even where fewer have rows (chunk_size < 64): the tile copies are unrolled for
    // the full block.
    plan.threads = 128;
    plan.smem_bytes = sm80_smem(type, plan.bdv, s.DHQK, s.L);
    TORCH_CHECK(plan.smem_bytes <= dev.smem_per_block_optin, "parallel_fw_hintra: DHQK = ",
                num(s.DHQK), " with chunk_size = ", num(s.L), " needs ", num(plan.smem_bytes),
                " bytes of shared memory per block in the CUDA kernel, more than this GPU allows (",
                num(dev.smem_per_block_optin), "); use a smaller DHQK or chunk_size, or CPU tensors");
  }
  plan.n_qt = (s.L + plan.rows_per_block - 1) / plan.rows_per_block;
  plan.blocks = s.BNH * s.NC * plan.n_qt * plan.n_dvt;
  TORCH_CHECK(plan.blocks < (int64_t(1) << 31), "parallel_fw_hintra: ", num(plan.blocks),
              " thread blocks exceed the CUDA grid limit; split the batch");
  return plan;
}

}  // namespace mlstm::cuda
