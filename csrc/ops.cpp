// Operator schemas and their registration: one kernel per op, templated over the backend (CPU,
// CUDA, Meta), so every device runs the same validation (validate.cpp) and allocation.
//
// The library links libtorch only (no Python), so it loads in a C++ process as well as through
// torch.ops.load_library. Python adds fake kernels (mlstm_ext/ops.py) that run the Meta kernels
// below for validation and give symbolic output shapes to torch.compile / torch.export.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#ifdef MLSTM_EXT_WITH_CUDA
#include "cuda/device_facts.h"
#endif
#include "backward.h"
#include "forward.h"
#include "hintra.h"
#include "states.h"
#include "step.h"

namespace mlstm {
namespace {

// ---- Backends: which kernels fill the outputs. ----
// stats_dtype: the dtype a backend writes vecN / vecM in (the op converts to output_dtype after).
// The CPU kernel's gate arithmetic is float64, so it writes output_dtype directly (a float64 vecN
// keeps e^-m below float32's range); the CUDA kernels write float32.
struct CpuBackend {
  static at::ScalarType stats_dtype(const HintraArgs& a) { return a.output_dtype; }
  static void hintra(const HintraArgs& a, at::Tensor& H, at::Tensor& N, at::Tensor& M) { hintra_cpu(a, H, N, M); }
  static void states(const StatesArgs& a, at::Tensor& C, at::Tensor& n, at::Tensor& m) { states_cpu(a, C, n, m); }
  static void backward(const BackwardArgs& a, BackwardOutputs& out) { chunkwise_bw_compute(a, &states_cpu, out); }
  static void step(const StepArgs& a, StepOutputs& out) { step_cpu(a, out); }
  static bool fused_forward(const ForwardArgs&, ForwardOutputs&) { return false; }
  static ForwardArgs two_step_plan(const ForwardArgs& f) { return f; }
};

#ifdef MLSTM_EXT_WITH_CUDA
struct CudaBackend {
  static at::ScalarType stats_dtype(const HintraArgs&) { return at::kFloat; }
  static void hintra(const HintraArgs& a, at::Tensor& H, at::Tensor& N, at::Tensor& M) { hintra_cuda(a, H, N, M); }
  static void states(const StatesArgs& a, at::Tensor& C, at::Tensor& n, at::Tensor& m) { states_cuda(a, C, n, m); }
  static void backward(const BackwardArgs& a, BackwardOutputs& out) {
    check_not_float64_on_cuda("chunkwise_bw", "matQ", a.fw.matQ);
    chunkwise_bw_compute(planned_backward_chunk(a), &states_cuda, out);
  }
  static void step(const StepArgs& a, StepOutputs& out) { step_cuda(a, out); }
  static bool fused_forward(const ForwardArgs& f, ForwardOutputs& out) { return fused_forward_cuda(f, out); }
  static ForwardArgs two_step_plan(const ForwardArgs& f) { return planned_two_step_chunk(f); }
};
#else
struct CudaBackend {
  static at::ScalarType stats_dtype(const HintraArgs& a) { return a.output_dtype; }
  [[noreturn]] static void missing() {
    TORCH_CHECK(false,
                "mlstm_ext was built without its CUDA kernels (no nvcc or a CPU-only torch at build "
                "time); rebuild with a CUDA-enabled torch, or pass CPU tensors");
  }
  static void hintra(const HintraArgs&, at::Tensor&, at::Tensor&, at::Tensor&) { missing(); }
  static void states(const StatesArgs&, at::Tensor&, at::Tensor&, at::Tensor&) { missing(); }
  static void backward(const BackwardArgs&, BackwardOutputs&) { missing(); }
  static void step(const StepArgs&, StepOutputs&) { missing(); }
  static bool fused_forward(const ForwardArgs&, ForwardOutputs&) { return false; }
  static ForwardArgs two_step_plan(const ForwardArgs& f) { return f; }
};
#endif

// Meta: validation and output shapes only (torch.compile / torch.export trace with these).
struct MetaBackend {
  static at::ScalarType stats_dtype(const HintraArgs& a) { return a.output_dtype; }
  static void hintra(const HintraArgs&, at::Tensor&, at::Tensor&, at::Tensor&) {}
  static void states(const StatesArgs&, at::Tensor&, at::Tensor&, at::Tensor&) {}
  static void backward(const BackwardArgs&, BackwardOutputs&) {}
  static void step(const StepArgs&, StepOutputs&) {}
  static bool fused_forward(const ForwardArgs&, ForwardOutputs&) { return false; }
  static ForwardArgs two_step_plan(const ForwardArgs& f) { return f; }
};

// Forward-mode AD (torch.func.jvp, forward_ad.make_dual): no op of the library has a tangent
// formula, so an input with a tangent is refused by name (recurrent_step's ATen path has them).
void check_no_tangents(const std::string& op, const std::vector<std::pair<std::string, at::Tensor>>& inputs) {
  std::string names;
  for (const auto& [name, t] : inputs) {
    if (t.defined() && t._fw_grad(/*level=*/0).defined()) names += (names.empty() ? "" : ", ") + name;
  }
  TORCH_CHECK(names.empty(), op, ": forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
              "supported, but ", names, " carry a tangent. Use reverse mode (backward(), torch.func.vjp "
              "or torch.func.grad)");
}

// The tensor arguments on a boxed stack, by schema name.
std::vector<std::pair<std::string, at::Tensor>> tensor_args(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto in = torch::jit::last(*stack, args.size());
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < args.size(); ++i) {
    if (in[i].isTensor()) out.emplace_back(args[i].name(), in[i].toTensor());
  }
  return out;
}

// ---- Op kernels. ----
template <class Backend>
HintraOutputs run_hintra(const HintraArgs& a) {
  auto [matH, vecN, vecM] = allocate_hintra_outputs(a, Backend::stats_dtype(a));
  if (matH.numel() > 0 || vecN.numel() > 0) Backend::hintra(a, matH, vecN, vecM);
  return {matH, vecN, vecM};
}

template <class Backend>
StatesOutputs run_states(const StatesArgs& a) {
  auto [matC_all, vecN_all, scaM_all] = allocate_states_outputs(a);
  if (scaM_all.numel() > 0) Backend::states(a, matC_all, vecN_all, scaM_all);
  return {matC_all, vecN_all, scaM_all};
}

template <class Backend>
HintraOutputs parallel_fw_hintra(
    const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV,
    const at::Tensor& vecI, const at::Tensor& vecF, const at::Tensor& matC_all,
    const at::Tensor& vecN_all, const at::Tensor& scaM_all, std::optional<double> qk_scale,
    int64_t chunk_size, int64_t siz_b_LQ, int64_t siz_b_LKV, std::optional<int64_t> siz_b_DHQK,
    std::optional<int64_t> siz_b_DHHV, std::optional<int64_t> num_warps,
    std::optional<int64_t> num_stages, double eps, std::optional<at::ScalarType> output_dtype) {
  const HintraArgs a = check_hintra_args(matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all,
                                         qk_scale, chunk_size, siz_b_LQ, siz_b_LKV, siz_b_DHQK,
                                         siz_b_DHHV, num_warps, num_stages, eps, output_dtype);
  auto [matH, vecN, vecM] = run_hintra<Backend>(a);
  return {matH, vecN.to(a.output_dtype), vecM.to(a.output_dtype)};
}

template <class Backend>
StatesOutputs recurrent_fw_states(const at::Tensor& matK, const at::Tensor& matV,
                                  const at::Tensor& vecI, const at::Tensor& vecF,
                                  const std::optional<at::Tensor>& matC_initial,
                                  const std::optional<at::Tensor>& vecN_initial,
                                  const std::optional<at::Tensor>& scaM_initial, int64_t chunk_size) {
  return run_states<Backend>(check_states_args(matK, matV, vecI, vecF, matC_initial, vecN_initial,
                                               scaM_initial, chunk_size));
}

template <class Backend>
ForwardOutputs chunkwise_fw(const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV,
                            const at::Tensor& vecI, const at::Tensor& vecF,
                            const std::optional<at::Tensor>& matC_initial,
                            const std::optional<at::Tensor>& vecN_initial,
                            const std::optional<at::Tensor>& scaM_initial,
                            std::optional<double> qk_scale, int64_t chunk_size, double eps,
                            c10::string_view grad_mode, bool vecN_signed) {
  // Its autograd formula (mlstm_ext/autograd.py) is reverse mode only.
  check_no_tangents("chunkwise_fw", {{"matQ", matQ}, {"matK", matK}, {"matV", matV}, {"vecI", vecI}, {"vecF", vecF},
                                     {"matC_initial", matC_initial.value_or(at::Tensor())},
                                     {"vecN_initial", vecN_initial.value_or(at::Tensor())},
                                     {"scaM_initial", scaM_initial.value_or(at::Tensor())}});
  const ForwardArgs f = check_forward_args(matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial,
                                           scaM_initial, qk_scale, chunk_size, eps, grad_mode, vecN_signed);
  if (ForwardOutputs fused; Backend::fused_forward(f, fused)) return fused;
  const ForwardArgs g = Backend::two_step_plan(f);
  auto [matC_all, vecN_all, scaM_all] = run_states<Backend>(g.states);
  auto [matH, vecN, vecM] = run_hintra<Backend>(hintra_args_for_forward(g, matC_all, vecN_all, scaM_all));
  // The last slot, copied so that the (NC+1)-slot buffers are freed here.
  const int64_t NC = g.states.NC, DHQK = g.states.DHQK;
  return {matH, matC_all.narrow(2, NC * DHQK, DHQK).clone(), vecN_all.narrow(2, NC * DHQK, DHQK).clone(),
          scaM_all.select(2, NC).clone(), vecN, vecM};
}

template <class Backend>
BackwardOutputs chunkwise_bw(const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV,
                             const at::Tensor& vecI, const at::Tensor& vecF,
                             const std::optional<at::Tensor>& matC_initial,
                             const std::optional<at::Tensor>& vecN_initial,
                             const std::optional<at::Tensor>& scaM_initial, const at::Tensor& matH,
                             const at::Tensor& vecN, const at::Tensor& vecM,
                             const std::optional<at::Tensor>& matDeltaH,
                             const std::optional<at::Tensor>& matDeltaC_last,
                             const std::optional<at::Tensor>& vecDeltaN_last,
                             std::optional<double> qk_scale, int64_t chunk_size, double eps,
                             c10::string_view grad_mode, bool vecN_signed) {
  const BackwardArgs a = check_backward_args(matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial,
                                             scaM_initial, matH, vecN, vecM, matDeltaH, matDeltaC_last,
                                             vecDeltaN_last, qk_scale, chunk_size, eps, grad_mode,
                                             vecN_signed);
  BackwardOutputs out = allocate_backward_outputs(a);
  Backend::backward(a, out);
  return out;
}

// Autograd key: ops without a backward refuse inputs that require grad (under grad mode) rather
// than return results whose backward() silently gives None gradients, and inputs carrying a
// forward-mode tangent rather than return outputs whose tangents are silently zero.
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto inputs = tensor_args(op, stack);
  check_no_tangents(op.schema().name(), inputs);
  if (at::GradMode::is_enabled()) {
    std::string names;
    for (const auto& [name, t] : inputs) {
      if (t.defined() && t.requires_grad()) names += (names.empty() ? "" : ", ") + name;
    }
    const bool step = op.schema().name() == "mlstm::_recurrent_step_fused";
    TORCH_CHECK(names.empty(), op.schema().name(), ": this op has no backward, but ", names,
                " require grad. For training use ",
                step ? "torch.ops.mlstm.recurrent_step" : "mlstm_ext.mlstm_chunkwise",
                " (differentiable); for inference call it under torch.no_grad() or pass detached tensors");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

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

// Lets tests and A/B timing turn the sm_90a kernel off and on at run time; returns the old setting.
bool set_sm90_enabled(bool on) {
#ifdef MLSTM_EXT_WITH_CUDA
  return cuda::set_sm90_enabled(on);
#else
  (void)on;
  return false;
#endif
}

// The schemas, each written once: the op, and its "_check_" twin (same schema) whose Meta kernel
// is the op's validation and shapes; the Python fake kernels (mlstm_ext/ops.py) call the twin,
// since a Python fake and a C++ Meta kernel cannot both sit on the op itself.
// Argument names and order of parallel_fw_hintra follow mlstm_kernels' mlstm_chunkwise__parallel_fw_Hintra.
constexpr const char* kHintraSchema =
    "(Tensor matQ, Tensor matK, Tensor matV, Tensor vecI, Tensor vecF, Tensor matC_all, "
    "Tensor vecN_all, Tensor scaM_all, float? qk_scale=None, int chunk_size=64, int siz_b_LQ=32, "
    "int siz_b_LKV=32, int? siz_b_DHQK=None, int? siz_b_DHHV=None, int? num_warps=None, "
    "int? num_stages=None, float eps=1e-6, ScalarType? output_dtype=None) -> (Tensor matH, "
    "Tensor vecN, Tensor vecM)";
// The chunk-border states (NC+1 slots, slot 0 the initial state).
constexpr const char* kStatesSchema =
    "(Tensor matK, Tensor matV, Tensor vecI, Tensor vecF, Tensor? matC_initial=None, "
    "Tensor? vecN_initial=None, Tensor? scaM_initial=None, int chunk_size=64) -> (Tensor matC_all, "
    "Tensor vecN_all, Tensor scaM_all)";
// The whole forward: states, then the H step; the last states and the H step's vecN, vecM.
// grad_mode picks the backward's convention (SPEC.md, "Gradients"): "exact" or
// "normaliser_constant"; the forward is the same for both. vecN_signed: vecN is nsum (signed,
// before |.| and the floor e^-m; den = max(|vecN|, e^-vecM)), so that the backward, given the
// same flag, reads nsum's sign instead of recomputing nsum (mlstm_chunkwise turns it on).
constexpr const char* kForwardSchema =
    "(Tensor matQ, Tensor matK, Tensor matV, Tensor vecI, Tensor vecF, Tensor? matC_initial=None, "
    "Tensor? vecN_initial=None, Tensor? scaM_initial=None, float? qk_scale=None, int chunk_size=64, "
    "float eps=1e-6, str grad_mode=\"exact\", bool vecN_signed=False) -> (Tensor matH, Tensor matC_last, "
    "Tensor vecN_last, Tensor scaM_last, Tensor vecN, Tensor vecM)";

// The backward of chunkwise_fw: the forward's inputs and the outputs it reads (matH, vecN, vecM),
// the incoming gradients (None: zero), the forward's scalars. Returns the gradients of matQ, matK,
// matV (their dtype), vecI, vecF, matC_initial, vecN_initial (compute dtype; zeros for absent
// initial states).
constexpr const char* kBackwardSchema =
    "(Tensor matQ, Tensor matK, Tensor matV, Tensor vecI, Tensor vecF, Tensor? matC_initial, "
    "Tensor? vecN_initial, Tensor? scaM_initial, Tensor matH, Tensor vecN, Tensor vecM, "
    "Tensor? matDeltaH, Tensor? matDeltaC_last, Tensor? vecDeltaN_last, float? qk_scale=None, "
    "int chunk_size=64, float eps=1e-6, str grad_mode=\"exact\", bool vecN_signed=False) -> "
    "(Tensor matDeltaQ, Tensor matDeltaK, Tensor matDeltaV, Tensor vecDeltaI, Tensor vecDeltaF, "
    "Tensor matDeltaC_initial, Tensor vecDeltaN_initial)";

// One position of the recurrence, for generation (SPEC.md, "The inference step"). recurrent_step
// is a composite (csrc/step.cpp: ATen ops, autograd through them); where no gradient is wanted on
// the CPU or CUDA it calls _recurrent_step_fused, the same step as one kernel, whose C++ Meta kernel
// (with symbolic sizes) is what torch.compile / torch.export trace: neither needs a Python fake.
constexpr const char* kStepSchema =
    "(Tensor vecQ, Tensor vecK, Tensor vecV, Tensor scaI, Tensor scaF, "
    "Tensor? matC=None, Tensor? vecN=None, Tensor? scaM=None, float? qk_scale=None, "
    "float eps=1e-6) -> (Tensor vecH, Tensor matC_next, Tensor vecN_next, Tensor scaM_next)";

// _recurrent_step_fused: the fused kernel of the backend (Meta: shapes only). Absent states stay
// absent: the kernels read none.
template <class Backend>
StepOutputs recurrent_step_fused(const at::Tensor& vecQ, const at::Tensor& vecK, const at::Tensor& vecV,
                                 const at::Tensor& scaI, const at::Tensor& scaF,
                                 const std::optional<at::Tensor>& matC, const std::optional<at::Tensor>& vecN,
                                 const std::optional<at::Tensor>& scaM, std::optional<double> qk_scale, double eps) {
  const StepArgs a = check_step_args(vecQ, vecK, vecV, scaI, scaF, matC, vecN, scaM, qk_scale, eps, false);
  StepOutputs out = allocate_step_outputs(a);
  Backend::step(a, out);  // (no size check here: Meta sizes may be symbolic; empty grids do nothing)
  return out;
}

template <class Backend>
void register_kernels(torch::Library& m, const std::string& prefix = "") {
  m.impl((prefix + "parallel_fw_hintra").c_str(), &parallel_fw_hintra<Backend>);
  m.impl((prefix + "recurrent_fw_states").c_str(), &recurrent_fw_states<Backend>);
  m.impl((prefix + "chunkwise_fw").c_str(), &chunkwise_fw<Backend>);
  m.impl((prefix + "chunkwise_bw").c_str(), &chunkwise_bw<Backend>);
  m.impl("_recurrent_step_fused", &recurrent_step_fused<Backend>);  // no "_check_" twin (C++ Meta)
}

}  // namespace

TORCH_LIBRARY(mlstm, m) {
  // Where Python finds the fake kernels when this library is loaded on its own.
  m.set_python_module("mlstm_ext.ops");
  for (const std::string prefix : {"", "_check_"}) {
    m.def((prefix + "parallel_fw_hintra" + kHintraSchema).c_str());
    m.def((prefix + "recurrent_fw_states" + kStatesSchema).c_str());
    m.def((prefix + "chunkwise_fw" + kForwardSchema).c_str());
    m.def((prefix + "chunkwise_bw" + kBackwardSchema).c_str());
  }
  m.def((std::string("recurrent_step") + kStepSchema).c_str());
  m.def((std::string("_recurrent_step_fused") + kStepSchema).c_str());
  m.def("_built_with_cuda() -> bool", &built_with_cuda);
  m.def("_built_with_sm90a() -> bool", &built_with_sm90a);
  m.def("_set_sm90_enabled(bool on) -> bool", &set_sm90_enabled);
}

TORCH_LIBRARY_IMPL(mlstm, CPU, m) { register_kernels<CpuBackend>(m); }
TORCH_LIBRARY_IMPL(mlstm, CUDA, m) { register_kernels<CudaBackend>(m); }
TORCH_LIBRARY_IMPL(mlstm, Meta, m) { register_kernels<MetaBackend>(m, "_check_"); }

TORCH_LIBRARY_IMPL(mlstm, CompositeImplicitAutograd, m) { m.impl("recurrent_step", &recurrent_step); }

TORCH_LIBRARY_IMPL(mlstm, Autograd, m) {
  // chunkwise_fw is differentiable: its autograd formula is registered from Python
  // (mlstm_ext/autograd.py).
  // chunkwise_bw has no backward of its own (no double backward).
  // _recurrent_step_fused: recurrent_step is the differentiable entry.
  for (const char* op : {"parallel_fw_hintra", "recurrent_fw_states", "chunkwise_bw", "_recurrent_step_fused"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  }
}

}  // namespace mlstm
