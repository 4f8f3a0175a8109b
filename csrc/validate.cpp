// The one validation routine of every op, shared by every backend (CPU, CUDA) and the Meta kernel
// (torch.compile / torch.export run it on meta tensors). Each failure names the op and the
// argument, what was expected and what came.
#include <c10/util/irange.h>

#include <cfloat>
#include <cmath>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "backward.h"
#include "forward.h"
#include "hintra.h"
#include "states.h"
#include "step.h"

namespace mlstm {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + num(t.size(d));
  return s + "]";
}

void check_not_float64_on_cuda(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": float64 inputs run on the CPU only; got float64 ",
              arg, " on ", t.device(), " (pass CPU tensors, or float32, bfloat16 or float16 on CUDA)");
}

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Checks of one op's arguments; `op` prefixes every message.
struct Checker {
  const char* op;

  void rank(const at::Tensor& t, const char* name, int64_t r, const char* layout) const {
    TORCH_CHECK(t.dim() == r, op, ": ", name, " must have ", num(r), " dims ", layout, ", got ",
                num(t.dim()), " dims with shape ", shape_str(t));
  }

  void dim(const at::Tensor& t, const char* name, int64_t d, int64_t expected, const char* what) const {
    TORCH_CHECK(t.size(d) == expected, op, ": ", name, ".size(", num(d), ") must be ", what, " = ",
                num(expected), ", got ", num(t.size(d)), " (", name, " has shape ", shape_str(t), ")");
  }

  // dim() for sizes 0, 1, ... of t in turn, each with what it should equal and its name.
  void dims(const at::Tensor& t, const char* name,
            std::initializer_list<std::pair<int64_t, const char*>> want) const {
    int64_t d = 0;
    for (const auto& [expected, what] : want) dim(t, name, d++, expected, what);
  }

  void device(const at::Tensor& t, const char* name, const at::Tensor& first, const char* first_name) const {
    TORCH_CHECK(t.device() == first.device(), op, ": ", name, " must be on the same device as ",
                first_name, " (", first.device(), "), got ", t.device());
  }

  void floating(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
                " must be a floating tensor (float32, bfloat16, float16 or float64), got ",
                t.scalar_type());
  }

  // Q/K/V: float32, bfloat16, float16, or float64 (CPU only; the CUDA backend refuses it).
  void input_dtype(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
                " must be float32, bfloat16, float16 or float64 (CPU), got ", t.scalar_type());
  }

  void same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) const {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name,
                "'s dtype (", ref.scalar_type(), "), got ", t.scalar_type());
  }

  // Chunking: S a multiple of chunk_size > 0. Returns NC.
  int64_t chunks(int64_t S, int64_t chunk_size, const char* s_from) const {
    TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive, got ", num(chunk_size));
    TORCH_CHECK(S % chunk_size == 0, op, ": the sequence length S = ", num(S), " (", s_from,
                ") must be a multiple of chunk_size = ", num(chunk_size));
    return S / chunk_size;
  }

  // A scalar the kernels hold in the compute dtype: finite there (1e39 is inf in float32).
  double scalar(double v, const char* name, at::ScalarType compute, bool non_negative) const {
    const bool f64 = compute == at::kDouble;
    TORCH_CHECK(std::isfinite(v) && std::fabs(v) <= (f64 ? DBL_MAX : FLT_MAX) && (!non_negative || v >= 0.0),
                op, ": ", name, " must be finite", (non_negative ? " and >= 0" : ""),
                " in the compute dtype (", compute, ": magnitude at most ", (f64 ? "1.8e308" : "3.4e38"),
                "), got ", num(v));
    return v;
  }
};

// A state tensor holding its slots along dim 2 (per_slot entries each): exactly NC+1 or NC.
void check_state_slots(const Checker& c, const at::Tensor& t, const char* name, int64_t per_slot,
                       const char* per_name, int64_t NC) {
  const int64_t n = t.size(2);
  if (n == (NC + 1) * per_slot || n == NC * per_slot) return;
  const std::string unit = per_slot == 1 ? "" : std::string("*") + per_name;
  TORCH_CHECK(false, c.op, ": ", name, ".size(2) must hold NC+1 or NC state slots",
              (per_slot == 1 ? std::string() : std::string(" of ") + per_name + " = " + num(per_slot) + " rows"),
              " (expected (NC+1)", unit, " = ", num((NC + 1) * per_slot), " or NC", unit, " = ",
              num(NC * per_slot), "; NC = S / chunk_size = ", num(NC), "), got ", num(n),
              (n < NC * per_slot ? " (too few state slots)"
                                 : " (states made with another chunk_size or sequence length?)"));
}

void check_positive_hint(const Checker& c, std::optional<int64_t> v, const char* name) {
  TORCH_CHECK(!v.has_value() || *v > 0, c.op, ": launch hint ", name,
              " must be positive when given, got ", num(v.value_or(0)));
}

// qk_scale None: DHQK^-1/2 (1 when DHQK = 0, where nothing is scaled).
double default_qk_scale(int64_t DHQK) { return DHQK > 0 ? 1.0 / std::sqrt(static_cast<double>(DHQK)) : 1.0; }

at::ScalarType compute_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// K, V, gates and initial states: what recurrent_fw_states and the forward share. B, NH, S, DHQK
// come from matK (the forward checks matQ against them first); devices must match `first`.
StatesArgs check_states_common(const Checker& c, const at::Tensor& first, const char* first_name,
                               const at::Tensor& matK, const at::Tensor& matV,
                               const at::Tensor& vecI, const at::Tensor& vecF,
                               const std::optional<at::Tensor>& matC_initial,
                               const std::optional<at::Tensor>& vecN_initial,
                               const std::optional<at::Tensor>& scaM_initial, int64_t chunk_size) {
  StatesArgs a;
  c.rank(matK, "matK", 4, "(B, NH, S, DHQK)");
  c.rank(matV, "matV", 4, "(B, NH, S, DHHV)");
  c.rank(vecI, "vecI", 3, "(B, NH, S)");
  c.rank(vecF, "vecF", 3, "(B, NH, S)");
  a.B = matK.size(0), a.NH = matK.size(1), a.S = matK.size(2), a.DHQK = matK.size(3);
  a.DHHV = matV.size(3);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{matK, "matK"}, {matV, "matV"},
                         {vecI, "vecI"}, {vecF, "vecF"}}) {
    c.device(t, name, first, first_name);
  }
  c.input_dtype(matK, "matK");
  c.same_dtype(matV, "matV", matK, "matK");
  c.floating(vecI, "vecI");
  c.floating(vecF, "vecF");
  a.L = chunk_size;
  a.NC = c.chunks(a.S, chunk_size, "matK.size(2)");
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{matV, "matV"}, {vecI, "vecI"},
                         {vecF, "vecF"}}) {
    c.dims(t, name, {{a.B, "B"}, {a.NH, "NH"}, {a.S, "S"}});
  }
  const at::ScalarType compute = compute_dtype_of(matK);
  if (matC_initial.has_value()) {
    const at::Tensor& t = *matC_initial;
    c.rank(t, "matC_initial", 4, "(B, NH, DHQK, DHHV)");
    c.device(t, "matC_initial", first, first_name);
    c.floating(t, "matC_initial");
    c.dims(t, "matC_initial", {{a.B, "B"}, {a.NH, "NH"}, {a.DHQK, "DHQK"}, {a.DHHV, "DHHV"}});
    a.matC_initial = t.to(compute);
  }
  if (vecN_initial.has_value()) {
    const at::Tensor& t = *vecN_initial;
    c.rank(t, "vecN_initial", 3, "(B, NH, DHQK)");
    c.device(t, "vecN_initial", first, first_name);
    c.floating(t, "vecN_initial");
    c.dims(t, "vecN_initial", {{a.B, "B"}, {a.NH, "NH"}, {a.DHQK, "DHQK"}});
    a.vecN_initial = t.to(compute);
  }
  if (scaM_initial.has_value()) {
    const at::Tensor& t = *scaM_initial;
    TORCH_CHECK(t.dim() == 2 || (t.dim() == 3 && t.size(2) == 1), c.op,
                ": scaM_initial must have shape (B, NH) or (B, NH, 1), got ", num(t.dim()),
                " dims with shape ", shape_str(t));
    c.device(t, "scaM_initial", first, first_name);
    c.floating(t, "scaM_initial");
    c.dims(t, "scaM_initial", {{a.B, "B"}, {a.NH, "NH"}});
    a.scaM_initial = t.reshape({a.B, a.NH}).to(compute);
  }
  a.matK = matK;
  a.matV = matV;
  a.vecI = vecI.to(compute);
  a.vecF = vecF.to(compute);
  return a;
}

}  // namespace

HintraArgs check_hintra_args(
    const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV,
    const at::Tensor& vecI, const at::Tensor& vecF, const at::Tensor& matC_all,
    const at::Tensor& vecN_all, const at::Tensor& scaM_all, std::optional<double> qk_scale,
    int64_t chunk_size, int64_t siz_b_LQ, int64_t siz_b_LKV, std::optional<int64_t> siz_b_DHQK,
    std::optional<int64_t> siz_b_DHHV, std::optional<int64_t> num_warps,
    std::optional<int64_t> num_stages, double eps, std::optional<at::ScalarType> output_dtype) {
  const Checker c{"parallel_fw_hintra"};
  HintraArgs a;
  // Ranks first: every size below is read from them.
  c.rank(matQ, "matQ", 4, "(B, NH, S, DHQK)");
  c.rank(matK, "matK", 4, "(B, NH, S, DHQK)");
  c.rank(matV, "matV", 4, "(B, NH, S, DHHV)");
  TORCH_CHECK(vecI.dim() == 3 || vecI.dim() == 4,
              "parallel_fw_hintra: vecI must have 3 dims (B, NH, S) or 4 dims (B, NH, NC, L), got ",
              num(vecI.dim()), " dims with shape ", shape_str(vecI));
  c.rank(vecF, "vecF", 3, "(B, NH, S)");
  c.rank(matC_all, "matC_all", 4, "(B, NH, (NC+1)*DHQK, DHHV)");
  c.rank(vecN_all, "vecN_all", 3, "(B, NH, (NC+1)*DHQK)");
  c.rank(scaM_all, "scaM_all", 3, "(B, NH, NC+1)");

  a.B = matQ.size(0);
  a.NH = matQ.size(1);
  a.S = matQ.size(2);
  a.DHQK = matQ.size(3);
  a.DHHV = matV.size(3);

  // Devices and dtypes.
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{matK, "matK"}, {matV, "matV"},
                         {vecI, "vecI"}, {vecF, "vecF"}, {matC_all, "matC_all"},
                         {vecN_all, "vecN_all"}, {scaM_all, "scaM_all"}}) {
    c.device(t, name, matQ, "matQ");
  }
  c.input_dtype(matQ, "matQ");
  c.same_dtype(matK, "matK", matQ, "matQ");
  c.same_dtype(matV, "matV", matQ, "matQ");
  c.floating(vecI, "vecI");
  c.floating(vecF, "vecF");
  c.floating(matC_all, "matC_all");
  c.floating(vecN_all, "vecN_all");
  c.floating(scaM_all, "scaM_all");
  a.output_dtype = output_dtype.value_or(at::kFloat);
  TORCH_CHECK(is_float_dtype(a.output_dtype),
              "parallel_fw_hintra: output_dtype must be float32, bfloat16, float16 or float64, got ",
              a.output_dtype);

  a.L = chunk_size;
  a.NC = c.chunks(a.S, chunk_size, "matQ.size(2)");

  // Shapes against (B, NH, S, DHQK, DHHV, NC).
  const int64_t B = a.B, NH = a.NH, S = a.S, DHQK = a.DHQK, DHHV = a.DHHV, NC = a.NC;
  for (int64_t d = 0; d < 4; ++d) {
    c.dim(matK, "matK", d, matQ.size(d), d == 3 ? "DHQK (matQ.size(3))" : "matQ's");
  }
  c.dims(matV, "matV", {{B, "B"}, {NH, "NH"}, {S, "S"}});
  if (vecI.dim() == 3) {
    c.dims(vecI, "vecI", {{B, "B"}, {NH, "NH"}, {S, "S"}});
  } else {
    c.dims(vecI, "vecI", {{B, "B"}, {NH, "NH"}, {NC, "NC = S / chunk_size"}, {a.L, "L = chunk_size"}});
  }
  c.dims(vecF, "vecF", {{B, "B"}, {NH, "NH"}, {S, "S"}});

  // States: NC+1 slots (as recurrent_fw_states makes them) or NC (slot NC is never read).
  c.dims(matC_all, "matC_all", {{B, "B"}, {NH, "NH"}});
  c.dim(matC_all, "matC_all", 3, DHHV, "DHHV (matV.size(3))");
  check_state_slots(c, matC_all, "matC_all", DHQK, "DHQK", NC);
  c.dims(vecN_all, "vecN_all", {{B, "B"}, {NH, "NH"}});
  check_state_slots(c, vecN_all, "vecN_all", DHQK, "DHQK", NC);
  c.dims(scaM_all, "scaM_all", {{B, "B"}, {NH, "NH"}});
  check_state_slots(c, scaM_all, "scaM_all", 1, "1", NC);

  // Scalars (finite in the compute dtype) and launch hints. The hints are advisory: any positive
  // value is accepted (more permissive than the reference's Triton asserts, which tie them to
  // chunk_size).
  const at::ScalarType compute = compute_dtype_of(matQ);
  a.qk_scale = c.scalar(qk_scale.has_value() ? *qk_scale : default_qk_scale(DHQK), "qk_scale", compute, false);
  a.eps = c.scalar(eps, "eps", compute, true);
  check_positive_hint(c, siz_b_LQ, "siz_b_LQ");
  check_positive_hint(c, siz_b_LKV, "siz_b_LKV");
  check_positive_hint(c, siz_b_DHQK, "siz_b_DHQK");
  check_positive_hint(c, siz_b_DHHV, "siz_b_DHHV");
  check_positive_hint(c, num_warps, "num_warps");
  check_positive_hint(c, num_stages, "num_stages");
  a.siz_b_DHHV = siz_b_DHHV;

  a.matQ = matQ;
  a.matK = matK;
  a.matV = matV;
  // Gates in the compute dtype (float32; float64 for float64 inputs): a copy only when they come
  // in another dtype. States stay as they come: the CPU kernel reads any float dtype in place,
  // the CUDA entry makes them float32.
  a.vecI = (vecI.dim() == 4 ? vecI.reshape({B, NH, S}) : vecI).to(compute);
  a.vecF = vecF.to(compute);
  a.matC_all = matC_all;
  a.vecN_all = vecN_all;
  a.scaM_all = scaM_all;
  return a;
}

StatesArgs check_states_args(const at::Tensor& matK, const at::Tensor& matV,
                             const at::Tensor& vecI, const at::Tensor& vecF,
                             const std::optional<at::Tensor>& matC_initial,
                             const std::optional<at::Tensor>& vecN_initial,
                             const std::optional<at::Tensor>& scaM_initial, int64_t chunk_size) {
  return check_states_common(Checker{"recurrent_fw_states"}, matK, "matK", matK, matV, vecI, vecF, matC_initial,
                             vecN_initial, scaM_initial, chunk_size);
}

namespace {

// The forward's inputs, for chunkwise_fw and for its backward (messages name `op`).
ForwardArgs check_forward_common(const Checker& c, const at::Tensor& matQ, const at::Tensor& matK,
                                 const at::Tensor& matV, const at::Tensor& vecI,
                                 const at::Tensor& vecF, const std::optional<at::Tensor>& matC_initial,
                                 const std::optional<at::Tensor>& vecN_initial,
                                 const std::optional<at::Tensor>& scaM_initial,
                                 std::optional<double> qk_scale, int64_t chunk_size, double eps,
                                 c10::string_view grad_mode, bool vecN_signed) {
  TORCH_CHECK(grad_mode == "exact" || grad_mode == "normaliser_constant", c.op,
              ": grad_mode must be \"exact\" or \"normaliser_constant\", got \"",
              std::string(grad_mode), "\"");
  c.rank(matQ, "matQ", 4, "(B, NH, S, DHQK)");
  c.rank(matK, "matK", 4, "(B, NH, S, DHQK)");
  c.input_dtype(matQ, "matQ");
  c.device(matK, "matK", matQ, "matQ");
  c.same_dtype(matK, "matK", matQ, "matQ");
  for (int64_t d = 0; d < 4; ++d) {
    c.dim(matK, "matK", d, matQ.size(d), d == 3 ? "DHQK (matQ.size(3))" : "matQ's");
  }
  ForwardArgs a;
  a.states = check_states_common(c, matQ, "matQ", matK, matV, vecI, vecF, matC_initial, vecN_initial,
                                 scaM_initial, chunk_size);
  a.matQ = matQ;
  const at::ScalarType compute = compute_dtype_of(matQ);
  const int64_t DHQK = a.states.DHQK;
  a.qk_scale = c.scalar(qk_scale.has_value() ? *qk_scale : default_qk_scale(DHQK), "qk_scale", compute, false);
  a.eps = c.scalar(eps, "eps", compute, true);
  a.vecN_signed = vecN_signed;
  return a;
}

// An optional tensor of the given shape on matQ's device; returned in `dtype`, undefined if absent.
at::Tensor check_optional(const Checker& c, const std::optional<at::Tensor>& t, const char* name,
                          const char* layout, std::initializer_list<std::pair<int64_t, const char*>> want,
                          const at::Tensor& matQ, at::ScalarType dtype) {
  if (!t.has_value()) return at::Tensor();
  c.rank(*t, name, static_cast<int64_t>(want.size()), layout);
  c.device(*t, name, matQ, "matQ");
  c.floating(*t, name);
  c.dims(*t, name, want);
  return t->to(dtype);
}

}  // namespace

ForwardArgs check_forward_args(const at::Tensor& matQ, const at::Tensor& matK,
                               const at::Tensor& matV, const at::Tensor& vecI,
                               const at::Tensor& vecF, const std::optional<at::Tensor>& matC_initial,
                               const std::optional<at::Tensor>& vecN_initial,
                               const std::optional<at::Tensor>& scaM_initial,
                               std::optional<double> qk_scale, int64_t chunk_size, double eps,
                               c10::string_view grad_mode, bool vecN_signed) {
  return check_forward_common(Checker{"chunkwise_fw"}, matQ, matK, matV, vecI, vecF, matC_initial,
                              vecN_initial, scaM_initial, qk_scale, chunk_size, eps, grad_mode, vecN_signed);
}

BackwardArgs check_backward_args(
    const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV, const at::Tensor& vecI,
    const at::Tensor& vecF, const std::optional<at::Tensor>& matC_initial,
    const std::optional<at::Tensor>& vecN_initial, const std::optional<at::Tensor>& scaM_initial,
    const at::Tensor& matH, const at::Tensor& vecN, const at::Tensor& vecM,
    const std::optional<at::Tensor>& matDeltaH, const std::optional<at::Tensor>& matDeltaC_last,
    const std::optional<at::Tensor>& vecDeltaN_last, std::optional<double> qk_scale,
    int64_t chunk_size, double eps, c10::string_view grad_mode, bool vecN_signed) {
  const Checker c{"chunkwise_bw"};
  BackwardArgs a;
  a.fw = check_forward_common(c, matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial,
                              scaM_initial, qk_scale, chunk_size, eps, grad_mode, vecN_signed);
  a.exact = grad_mode == "exact";
  const StatesArgs& s = a.fw.states;
  const at::ScalarType compute = compute_dtype_of(matQ);
  // The forward's outputs it reads: matH in matQ's dtype, vecN and vecM in any float dtype.
  c.rank(matH, "matH", 4, "(B, NH, S, DHHV)");
  c.device(matH, "matH", matQ, "matQ");
  c.same_dtype(matH, "matH", matQ, "matQ");
  c.dims(matH, "matH", {{s.B, "B"}, {s.NH, "NH"}, {s.S, "S"}, {s.DHHV, "DHHV"}});
  a.matH = matH;
  for (auto [t, name, out] : {std::tuple<const at::Tensor&, const char*, at::Tensor*>{vecN, "vecN", &a.vecN},
                              {vecM, "vecM", &a.vecM}}) {
    c.rank(t, name, 3, "(B, NH, S)");
    c.device(t, name, matQ, "matQ");
    c.floating(t, name);
    c.dims(t, name, {{s.B, "B"}, {s.NH, "NH"}, {s.S, "S"}});
    *out = t.to(compute);
  }
  // Incoming gradients (None: zero).
  a.matDeltaH = check_optional(c, matDeltaH, "matDeltaH", "(B, NH, S, DHHV)",
                               {{s.B, "B"}, {s.NH, "NH"}, {s.S, "S"}, {s.DHHV, "DHHV"}}, matQ,
                               matDeltaH.has_value() ? matDeltaH->scalar_type() : compute);
  a.matDeltaC_last = check_optional(c, matDeltaC_last, "matDeltaC_last", "(B, NH, DHQK, DHHV)",
                                    {{s.B, "B"}, {s.NH, "NH"}, {s.DHQK, "DHQK"}, {s.DHHV, "DHHV"}},
                                    matQ, compute);
  a.vecDeltaN_last = check_optional(c, vecDeltaN_last, "vecDeltaN_last", "(B, NH, DHQK)",
                                    {{s.B, "B"}, {s.NH, "NH"}, {s.DHQK, "DHQK"}}, matQ, compute);
  return a;
}

// recurrent_step's checks work on symbolic sizes too (torch.export with a dynamic batch traces
// the composite op itself): sizes are compared as SymInts and asserted, never specialised.
namespace {

// Only for messages (a failed check raises anyway): a symbolic size prints its example value.
std::string sym_str(const c10::SymInt& v) {
  if (const std::optional<int64_t> x = v.maybe_as_int()) return num(*x);
  return v.has_hint() ? num(v.guard_int(__FILE__, __LINE__)) : std::string("a symbolic size");
}

std::string sym_shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + sym_str(t.sym_size(d));
  return s + "]";
}

// t.size(d) == expected for d = 0, 1, ... in turn, each with its name.
void sym_dims(const Checker& c, const at::Tensor& t, const char* name,
              std::initializer_list<std::pair<c10::SymInt, const char*>> want) {
  int64_t d = 0;
  for (const auto& [expected, what] : want) {
    TORCH_SYM_CHECK(t.sym_size(d).sym_eq(expected), c.op, ": ", name, ".size(", num(d), ") must be ",
                    what, " = ", sym_str(expected), ", got ", sym_str(t.sym_size(d)), " (", name,
                    " has shape ", sym_shape_str(t), ")");
    ++d;
  }
}

// A state or gate of one step: rank, device, floating, sizes; returned in `dtype`.
at::Tensor step_tensor(const Checker& c, const at::Tensor& t, const char* name, const char* layout,
                       std::initializer_list<std::pair<c10::SymInt, const char*>> want,
                       const at::Tensor& vecQ, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(want.size()), c.op, ": ", name, " must have ",
              num(want.size()), " dims ", layout, ", got ", num(t.dim()), " dims with shape ",
              sym_shape_str(t));
  c.device(t, name, vecQ, "vecQ");
  c.floating(t, name);
  sym_dims(c, t, name, want);
  return t.to(dtype);
}

// A per-head value: (B, NH) or (B, NH, 1), returned as (B, NH) in `dtype`.
at::Tensor step_per_head(const Checker& c, const at::Tensor& t, const char* name, const c10::SymInt& B,
                         const c10::SymInt& NH, const at::Tensor& vecQ, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, c.op, ": ", name, " must have shape (B, NH) or (B, NH, 1), got ",
              num(t.dim()), " dims with shape ", sym_shape_str(t));
  if (t.dim() == 2) return step_tensor(c, t, name, "(B, NH)", {{B, "B"}, {NH, "NH"}}, vecQ, dtype);
  TORCH_SYM_CHECK(t.sym_size(2).sym_eq(1), c.op, ": ", name, " must have shape (B, NH) or (B, NH, 1), got ",
                  sym_shape_str(t));
  return step_tensor(c, t, name, "(B, NH, 1)", {{B, "B"}, {NH, "NH"}, {1, "1"}}, vecQ, dtype).squeeze(2);
}

}  // namespace

StepArgs check_step_args(const at::Tensor& vecQ, const at::Tensor& vecK, const at::Tensor& vecV,
                         const at::Tensor& scaI, const at::Tensor& scaF,
                         const std::optional<at::Tensor>& matC, const std::optional<at::Tensor>& vecN,
                         const std::optional<at::Tensor>& scaM, std::optional<double> qk_scale, double eps,
                         bool absent_as_zeros) {
  const Checker c{"recurrent_step"};
  c.input_dtype(vecQ, "vecQ");
  TORCH_CHECK(vecQ.dim() == 3, c.op, ": vecQ must have 3 dims (B, NH, DHQK), got ", num(vecQ.dim()),
              " dims with shape ", sym_shape_str(vecQ));
  const c10::SymInt B = vecQ.sym_size(0), NH = vecQ.sym_size(1), DHQK = vecQ.sym_size(2);
  StepArgs a;
  a.compute = compute_dtype_of(vecQ);
  a.vecQ = vecQ;
  a.vecK = step_tensor(c, vecK, "vecK", "(B, NH, DHQK)", {{B, "B"}, {NH, "NH"}, {DHQK, "DHQK (vecQ.size(2))"}},
                       vecQ, vecK.scalar_type());
  TORCH_CHECK(vecV.dim() == 3, c.op, ": vecV must have 3 dims (B, NH, DHHV), got ", num(vecV.dim()),
              " dims with shape ", sym_shape_str(vecV));
  const c10::SymInt DHHV = vecV.sym_size(2);
  a.vecV = step_tensor(c, vecV, "vecV", "(B, NH, DHHV)", {{B, "B"}, {NH, "NH"}, {DHHV, "DHHV"}}, vecQ,
                       vecV.scalar_type());
  c.same_dtype(vecK, "vecK", vecQ, "vecQ");
  c.same_dtype(vecV, "vecV", vecQ, "vecQ");
  a.scaI = step_per_head(c, scaI, "scaI", B, NH, vecQ, a.compute);
  a.scaF = step_per_head(c, scaF, "scaF", B, NH, vecQ, a.compute);
  const auto opts = vecQ.options().dtype(a.compute);
  a.matC = matC.has_value() ? step_tensor(c, *matC, "matC", "(B, NH, DHQK, DHHV)",
                                          {{B, "B"}, {NH, "NH"}, {DHQK, "DHQK"}, {DHHV, "DHHV"}}, vecQ, a.compute)
                            : absent_as_zeros ? at::zeros_symint({B, NH, DHQK, DHHV}, opts) : at::Tensor();
  a.vecN = vecN.has_value() ? step_tensor(c, *vecN, "vecN", "(B, NH, DHQK)", {{B, "B"}, {NH, "NH"}, {DHQK, "DHQK"}},
                                          vecQ, a.compute)
                            : absent_as_zeros ? at::zeros_symint({B, NH, DHQK}, opts) : at::Tensor();
  a.m_keepdim = scaM.has_value() && scaM->dim() == 3;
  a.scaM = scaM.has_value() ? step_per_head(c, *scaM, "scaM", B, NH, vecQ, a.compute)
                            : absent_as_zeros ? at::zeros_symint({B, NH}, opts) : at::Tensor();
  // The default scale needs DHQK's value (a head dim: static in practice).
  a.qk_scale = c.scalar(qk_scale.has_value() ? *qk_scale : default_qk_scale(DHQK.guard_int(__FILE__, __LINE__)),
                        "qk_scale", a.compute, false);
  a.eps = c.scalar(eps, "eps", a.compute, true);
  return a;
}

HintraArgs hintra_args_for_forward(const ForwardArgs& f, const at::Tensor& matC_all,
                                   const at::Tensor& vecN_all, const at::Tensor& scaM_all) {
  const StatesArgs& s = f.states;
  HintraArgs a;
  a.matQ = f.matQ, a.matK = s.matK, a.matV = s.matV, a.vecI = s.vecI, a.vecF = s.vecF;
  a.matC_all = matC_all, a.vecN_all = vecN_all, a.scaM_all = scaM_all;
  a.B = s.B, a.NH = s.NH, a.S = s.S, a.DHQK = s.DHQK, a.DHHV = s.DHHV, a.L = s.L, a.NC = s.NC;
  a.qk_scale = f.qk_scale;
  a.eps = f.eps;
  a.output_dtype = compute_dtype_of(f.matQ);
  a.vecN_signed = f.vecN_signed;
  return a;
}

HintraOutputs allocate_hintra_outputs(const HintraArgs& a, at::ScalarType stats_dtype) {
  auto opts = a.matQ.options();
  at::Tensor matH = at::empty({a.B, a.NH, a.S, a.DHHV}, opts);
  const auto stat = opts.dtype(stats_dtype);
  at::Tensor vecN = at::empty({a.B, a.NH, a.S}, stat);
  at::Tensor vecM = at::empty({a.B, a.NH, a.S}, stat);
  return {matH, vecN, vecM};
}

StatesOutputs allocate_states_outputs(const StatesArgs& a, std::optional<at::ScalarType> c_dtype) {
  const auto opts = a.matK.options().dtype(compute_dtype_of(a.matK));
  return {at::empty({a.B, a.NH, (a.NC + 1) * a.DHQK, a.DHHV}, c_dtype ? opts.dtype(*c_dtype) : opts),
          at::empty({a.B, a.NH, (a.NC + 1) * a.DHQK}, opts),
          at::empty({a.B, a.NH, a.NC + 1}, opts)};
}

}  // namespace mlstm
