// The one validation routine shared by every backend (CPU, CUDA).
// Each failure names the argument, what was expected and what came.
#include "hintra.h"

#include <c10/util/irange.h>

#include <cmath>

namespace mlstm {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + num(t.size(d));
  return s + "]";
}

namespace {


// float64 inputs run on the CPU only (gradcheck); the CUDA backend refuses them.
bool is_input_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, "parallel_fw_hintra: ", name, " must have ", num(rank), " dims ", layout,
              ", got ", num(t.dim()), " dims with shape ", shape_str(t));
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
               const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "parallel_fw_hintra: ", name, ".size(", num(dim), ") must be ",
              what, " = ", num(expected), ", got ", num(t.size(dim)), " (", name, " has shape ",
              shape_str(t), ")");
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& matQ) {
  TORCH_CHECK(t.device() == matQ.device(), "parallel_fw_hintra: ", name,
              " must be on the same device as matQ (", matQ.device(), "), got ", t.device());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "parallel_fw_hintra: ", name,
              " must be a floating tensor (float32, bfloat16, float16 or float64), got ",
              t.scalar_type());
}

// matC_all / vecN_all: dim 2 holds DHQK rows per state slot, at least NC slots.
void check_state_rows(const at::Tensor& t, const char* name, int64_t DHQK, int64_t NC) {
  const int64_t rows = t.size(2);
  TORCH_CHECK(rows >= NC * DHQK && (DHQK == 0 || rows % DHQK == 0), "parallel_fw_hintra: ", name,
              ".size(2) must be a multiple of DHQK = ", num(DHQK), " holding at least NC = ",
              num(NC), " state slots (expected (NC+1)*DHQK = ", num((NC + 1) * DHQK),
              " or NC*DHQK = ", num(NC * DHQK), "), got ", num(rows),
              (rows < NC * DHQK ? " (too few state slots)" : ""));
}

void check_positive_hint(std::optional<int64_t> v, const char* name) {
  TORCH_CHECK(!v.has_value() || *v > 0, "parallel_fw_hintra: launch hint ", name,
              " must be positive when given, got ", num(v.value_or(0)));
}

}  // namespace

HintraArgs check_hintra_args(
    const at::Tensor& matQ, const at::Tensor& matK, const at::Tensor& matV,
    const at::Tensor& vecI, const at::Tensor& vecF, const at::Tensor& matC_all,
    const at::Tensor& vecN_all, const at::Tensor& scaM_all, std::optional<double> qk_scale,
    int64_t chunk_size, int64_t siz_b_LQ, int64_t siz_b_LKV, std::optional<int64_t> siz_b_DHQK,
    std::optional<int64_t> siz_b_DHHV, std::optional<int64_t> num_warps,
    std::optional<int64_t> num_stages, double eps, std::optional<at::ScalarType> output_dtype) {
  HintraArgs a;
  // Ranks first: every size below is read from them.
  check_rank(matQ, "matQ", 4, "(B, NH, S, DHQK)");
  check_rank(matK, "matK", 4, "(B, NH, S, DHQK)");
  check_rank(matV, "matV", 4, "(B, NH, S, DHHV)");
  TORCH_CHECK(vecI.dim() == 3 || vecI.dim() == 4,
              "parallel_fw_hintra: vecI must have 3 dims (B, NH, S) or 4 dims (B, NH, NC, L), got ",
              num(vecI.dim()), " dims with shape ", shape_str(vecI));
  check_rank(vecF, "vecF", 3, "(B, NH, S)");
  check_rank(matC_all, "matC_all", 4, "(B, NH, (NC+1)*DHQK, DHHV)");
  check_rank(vecN_all, "vecN_all", 3, "(B, NH, (NC+1)*DHQK)");
  check_rank(scaM_all, "scaM_all", 3, "(B, NH, NC+1)");

  a.B = matQ.size(0);
  a.NH = matQ.size(1);
  a.S = matQ.size(2);
  a.DHQK = matQ.size(3);
  a.DHHV = matV.size(3);

  // Devices and dtypes.
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{matK, "matK"}, {matV, "matV"},
                         {vecI, "vecI"}, {vecF, "vecF"}, {matC_all, "matC_all"},
                         {vecN_all, "vecN_all"}, {scaM_all, "scaM_all"}}) {
    check_device(t, name, matQ);
  }
  TORCH_CHECK(is_input_dtype(matQ.scalar_type()),
              "parallel_fw_hintra: matQ must be float32, bfloat16, float16 or float64 (CPU), got ",
              matQ.scalar_type());
  TORCH_CHECK(matK.scalar_type() == matQ.scalar_type(),
              "parallel_fw_hintra: matK must have matQ's dtype (", matQ.scalar_type(), "), got ",
              matK.scalar_type());
  TORCH_CHECK(matV.scalar_type() == matQ.scalar_type(),
              "parallel_fw_hintra: matV must have matQ's dtype (", matQ.scalar_type(), "), got ",
              matV.scalar_type());
  check_float(vecI, "vecI");
  check_float(vecF, "vecF");
  check_float(matC_all, "matC_all");
  check_float(vecN_all, "vecN_all");
  check_float(scaM_all, "scaM_all");
  a.output_dtype = output_dtype.value_or(at::kFloat);
  TORCH_CHECK(is_float_dtype(a.output_dtype),
              "parallel_fw_hintra: output_dtype must be float32, bfloat16, float16 or float64, got ",
              a.output_dtype);

  // Chunking.
  TORCH_CHECK(chunk_size > 0, "parallel_fw_hintra: chunk_size must be positive, got ", num(chunk_size));
  TORCH_CHECK(a.S % chunk_size == 0, "parallel_fw_hintra: the sequence length S = ", num(a.S),
              " (matQ.size(2)) must be a multiple of chunk_size = ", num(chunk_size));
  a.L = chunk_size;
  a.NC = a.S / chunk_size;

  // Shapes against (B, NH, S, DHQK, DHHV, NC).
  const int64_t B = a.B, NH = a.NH, S = a.S, DHQK = a.DHQK, DHHV = a.DHHV, NC = a.NC;
  for (int64_t d = 0; d < 4; ++d) {
    check_dim(matK, "matK", d, matQ.size(d), d == 3 ? "DHQK (matQ.size(3))" : "matQ's");
  }
  check_dim(matV, "matV", 0, B, "B");
  check_dim(matV, "matV", 1, NH, "NH");
  check_dim(matV, "matV", 2, S, "S");
  check_dim(vecI, "vecI", 0, B, "B");
  check_dim(vecI, "vecI", 1, NH, "NH");
  if (vecI.dim() == 3) {
    check_dim(vecI, "vecI", 2, S, "S");
  } else {
    check_dim(vecI, "vecI", 2, NC, "NC = S / chunk_size");
    check_dim(vecI, "vecI", 3, a.L, "L = chunk_size");
  }
  check_dim(vecF, "vecF", 0, B, "B");
  check_dim(vecF, "vecF", 1, NH, "NH");
  check_dim(vecF, "vecF", 2, S, "S");

  // States: at least NC slots (slot NC, the state after the last chunk, is not read).
  check_dim(matC_all, "matC_all", 0, B, "B");
  check_dim(matC_all, "matC_all", 1, NH, "NH");
  check_dim(matC_all, "matC_all", 3, DHHV, "DHHV (matV.size(3))");
  check_state_rows(matC_all, "matC_all", DHQK, NC);
  check_dim(vecN_all, "vecN_all", 0, B, "B");
  check_dim(vecN_all, "vecN_all", 1, NH, "NH");
  check_state_rows(vecN_all, "vecN_all", DHQK, NC);
  check_dim(scaM_all, "scaM_all", 0, B, "B");
  check_dim(scaM_all, "scaM_all", 1, NH, "NH");
  TORCH_CHECK(scaM_all.size(2) >= NC, "parallel_fw_hintra: scaM_all.size(2) must hold at least NC = ",
              num(NC), " state slots (expected NC+1 = ", num(NC + 1), " or NC = ", num(NC),
              "), got ", num(scaM_all.size(2)), " (too few state slots)");

  // Scalars and launch hints. The hints are advisory here: any positive value is accepted
  // (more permissive than the reference's Triton asserts, which tie them to chunk_size).
  a.qk_scale = qk_scale.has_value() ? *qk_scale : (DHQK > 0 ? 1.0 / std::sqrt((double)DHQK) : 1.0);
  TORCH_CHECK(std::isfinite(a.qk_scale), "parallel_fw_hintra: qk_scale must be finite, got ",
              num(a.qk_scale));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0,
              "parallel_fw_hintra: eps must be finite and >= 0, got ", num(eps));
  a.eps = eps;
  check_positive_hint(siz_b_LQ, "siz_b_LQ");
  check_positive_hint(siz_b_LKV, "siz_b_LKV");
  check_positive_hint(siz_b_DHQK, "siz_b_DHQK");
  check_positive_hint(siz_b_DHHV, "siz_b_DHHV");
  check_positive_hint(num_warps, "num_warps");
  check_positive_hint(num_stages, "num_stages");
  a.siz_b_DHHV = siz_b_DHHV;

  a.matQ = matQ;
  a.matK = matK;
  a.matV = matV;
  // Every kernel reads gates and states in the compute dtype (float32; float64 for float64
  // inputs): a copy only when they come in another dtype.
  const at::ScalarType compute = matQ.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.vecI = (vecI.dim() == 4 ? vecI.reshape({B, NH, S}) : vecI).to(compute);
  a.vecF = vecF.to(compute);
  a.matC_all = matC_all.to(compute);
  a.vecN_all = vecN_all.to(compute);
  a.scaM_all = scaM_all.to(compute);
  return a;
}

HintraOutputs allocate_hintra_outputs(const HintraArgs& a) {
  auto opts = a.matQ.options();
  at::Tensor matH = at::empty({a.B, a.NH, a.S, a.DHHV}, opts);
  at::Tensor vecN = at::empty({a.B, a.NH, a.S}, opts.dtype(a.output_dtype));
  at::Tensor vecM = at::empty({a.B, a.NH, a.S}, opts.dtype(a.output_dtype));
  return {matH, vecN, vecM};
}

}  // namespace mlstm
