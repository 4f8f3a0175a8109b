// The backward of the whole chunkwise mLSTM forward (SPEC.md, "Gradients" and "The backward"):
// the gradients of matH and the last states with respect to q, k, v, i, f and the initial C, n.
// Device-independent: batched GEMMs (cuBLAS tensor cores on CUDA) and elementwise ATen ops, the
// backend's states kernel to recompute the chunk-border states, and the reverse state scan
// (one kernel per backend) for the gradients flowing back through the recurrence.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "forward.h"

namespace mlstm {

struct BackwardArgs {
  ForwardArgs fw;            // the forward's inputs, sizes, qk_scale, eps
  at::Tensor matH;           // (B, NH, S, DHHV): the forward's output (read in "exact" mode only)
  at::Tensor vecN, vecM;     // (B, NH, S): the forward's den (nsum if fw.vecN_signed) and m, compute dtype
  at::Tensor matDeltaH;      // (B, NH, S, DHHV) or undefined (zero)
  at::Tensor matDeltaC_last; // (B, NH, DHQK, DHHV) compute dtype, or undefined (zero)
  at::Tensor vecDeltaN_last; // (B, NH, DHQK) compute dtype, or undefined (zero)
  bool exact = true;         // grad_mode "exact"; false: "normaliser_constant"
};

// dQ, dK, dV in the inputs' dtype; dI, dF (B, NH, S), dC_initial (B, NH, DHQK, DHHV) and
// dN_initial (B, NH, DHQK) in the compute dtype.
using BackwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BackwardArgs check_backward_args(
    const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV, const at::Tensor& vecI,
    const at::Tensor& vecF, const std::optional<at::Tensor>& matC_initial,
    const std::optional<at::Tensor>& vecN_initial, const std::optional<at::Tensor>& scaM_initial,
    const at::Tensor& matH, const at::Tensor& vecN, const at::Tensor& vecM,
    const std::optional<at::Tensor>& matDeltaH, const std::optional<at::Tensor>& matDeltaC_last,
    const std::optional<at::Tensor>& vecDeltaN_last, std::optional<double> qk_scale,
    int64_t chunk_size, double eps, c10::string_view grad_mode, bool vecN_signed);

BackwardOutputs allocate_backward_outputs(const BackwardArgs& a);

// The backend's states kernel (recurrent_fw_states' arithmetic), for the recompute.
using StatesKernel = void (*)(const StatesArgs&, at::Tensor&, at::Tensor&, at::Tensor&);

// The reverse scan over chunks of the state gradients, for g < G and every entry e < E:
//   X[g, k] holds on entry the gradient reaching state k from chunk k's queries; on exit the
//   gradient of state k+1 (what chunk k's keys and values read). first[g] gets state 0's.
//   G_NC = last[g] (zeros when undefined); G_k = X[g, k] + decay[g, k] * G_{k+1}.
//   dots[g, k, b] = partial sums over e (block b of the backend's choosing) of
//   states[g, k, e] * G_{k+1}[e]: the inner products the gradient of decay needs.
// X (G, NC, E), decay (G, NC), last (G, E), first (G, E) contiguous compute dtype; states[g, k]
// at states + g * states_stride_g + k * E. Returns dots (G, NC, nb).
at::Tensor reverse_state_scan_cpu(at::Tensor& X, const at::Tensor& decay, const at::Tensor& last,
                                  at::Tensor& first, const at::Tensor& states, int64_t states_stride_g);
#ifdef MLSTM_EXT_WITH_CUDA
at::Tensor reverse_state_scan_cuda(at::Tensor& X, const at::Tensor& decay, const at::Tensor& last,
                                   at::Tensor& first, const at::Tensor& states, int64_t states_stride_g);
// The same scan for C with X_k = Qs_k^T dH_k formed inside (csrc/cuda/scan_gram.cu): Qs (G, S,
// DQ), dH (G, S, DV) and the states 16-bit; G_out (G, NC, DQ * DV), their dtype, gets what X
// holds on exit above, rounded to it (the dots: the 16-bit states times the float32 values).
// With qscale (G, S) defined, Qs holds Q and its row t enters as Q[t] * qscale[t] (rounded to 16
// bits as bw_pre rounds Qs).
at::Tensor gram_scan_cuda(const at::Tensor& Qs, const at::Tensor& qscale, const at::Tensor& dH,
                          const at::Tensor& decay, const at::Tensor& last, at::Tensor& first,
                          const at::Tensor& states, int64_t states_stride_g, at::Tensor& G_out);
#endif

#ifdef MLSTM_EXT_WITH_CUDA
// The fused per-chunk CUDA kernels (csrc/cuda/bw_params.h): whether they serve these arguments
// (16-bit inputs on CUDA, chunk_size 64 or 128 where bw_post fits the device's shared memory,
// DHQK and DHHV multiples of 64, an incoming dH;
// MLSTM_EXT_FUSED_BACKWARD=0 turns them off), and their launch on one group's tensors: bw_pre
// (post = false) or bw_post. Rows (g, S, D) and (g, S), contiguous, 16-byte aligned.
struct FusedBackwardTensors {
  at::Tensor Q, K, V, dH, H, I, F, den, m;  // the inputs and the forward's outputs
  at::Tensor M_all, N_all;                  // the recomputed m and n states (g, NC+1[, DQ])
  at::Tensor dnsum, Qs, qscale, Xn;         // bw_pre's outputs (Qs, qscale: where defined)
  at::Tensor C_all, G, Gn, last_row;        // bw_post's other inputs (states and gradients;
                                            // C_all, G in the inputs' dtype, the others float32)
  at::Tensor dQ, dK, dV, dI, dF;            // bw_post's outputs
};
bool fused_backward_cuda_usable(const BackwardArgs& a);
// The arguments with the chunk size the fused kernels run fastest at (bw_cuda.cpp), or as given.
BackwardArgs planned_backward_chunk(const BackwardArgs& a);
void fused_backward_cuda(const FusedBackwardTensors& t, const BackwardArgs& a, bool post);
#endif

// Fills the outputs allocate_backward_outputs() made.
void chunkwise_bw_compute(const BackwardArgs& a, StatesKernel states, BackwardOutputs& out);

}  // namespace mlstm
