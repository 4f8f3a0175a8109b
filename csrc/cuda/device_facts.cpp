// Device facts, cached per device, and the sm_90a switch (device_facts.h).
#include "cuda/device_facts.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "common.h"

namespace mlstm::cuda {
namespace {

constexpr int kMaxDevices = 64;

bool env_sm90_on() {
  const char* env = std::getenv("MLSTM_EXT_SM90");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

std::atomic<bool>& sm90_switch() {
  static std::atomic<bool> on{env_sm90_on()};
  return on;
}

}  // namespace

const DeviceFacts& device_facts(int device) {
  static std::array<DeviceFacts, kMaxDevices> facts;
  static std::array<std::once_flag, kMaxDevices> once;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "mlstm_ext: CUDA device index ", num(device),
              " out of the supported range");
  std::call_once(once[device], [device] {
    DeviceFacts& f = facts[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.smem_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.sm_count, cudaDevAttrMultiProcessorCount, device));
  });
  return facts[device];
}

bool sm90_enabled() {
#ifdef MLSTM_EXT_SM90A
  return sm90_switch().load();
#else
  return false;
#endif
}

bool set_sm90_enabled(bool on) { return sm90_switch().exchange(on); }

}  // namespace mlstm::cuda
