#include "harness/check.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace attnbench {

namespace {
struct Errors {
  double max_abs = 0, max_ref = 0, sq_err = 0, sq_ref = 0;
  int64_t nonfinite = 0;
  std::vector<int64_t> worst;  // indices of the largest errors, for the failure message
};

Errors measure(const Tensor& got, const Tensor& want) {
  Errors e;
  const int64_t n = want.numel();
  for (int64_t i = 0; i < n; ++i) {
    const double w = want.get(i), g = got.get(i);
    e.max_ref = std::max(e.max_ref, std::abs(w));
    e.sq_ref += w * w;
    if (!std::isfinite(g) && std::isfinite(w)) {
      ++e.nonfinite;
      if (e.worst.size() < 5) e.worst.push_back(i);
      continue;
    }
    const double d = std::abs(g - w);
    e.sq_err += d * d;
    e.max_abs = std::max(e.max_abs, d);
  }
  return e;
}

std::string mismatches(const Tensor& got, const Tensor& want, double bound) {
  std::string s;
  int shown = 0;
  for (int64_t i = 0; i < want.numel() && shown < 5; ++i) {
    const double g = got.get(i), w = want.get(i);
    if (!(std::abs(g - w) <= bound)) {
      s += fmt::format("{}[{}] got {:.6g} want {:.6g}", shown ? "; " : "", i, g, w);
      ++shown;
    }
  }
  return s;
}

CheckResult finish(const Errors& e, double bound, const Tensor& got, const Tensor& want) {
  CheckResult r;
  r.max_abs = e.nonfinite ? INFINITY : e.max_abs;
  r.max_rel = e.max_ref > 0 ? r.max_abs / e.max_ref : r.max_abs;
  r.rms_rel = e.sq_ref > 0 ? std::sqrt(e.sq_err / e.sq_ref) : std::sqrt(e.sq_err);
  r.bound = bound;
  r.passed = e.nonfinite == 0 && r.max_abs <= bound;
  if (!r.passed) {
    r.detail = e.nonfinite ? fmt::format("{} non-finite values; ", e.nonfinite) : "";
    r.detail += mismatches(got, want, bound);
  }
  return r;
}

void require_same_shape(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape())
    throw std::invalid_argument("check: shape " + shape_str(a.shape()) + " vs " + shape_str(b.shape()));
}
}  // namespace

CheckResult check_equivalence(const Tensor& impl, const Tensor& oracle, const Tensor& naive, DType dtype,
                              double floor_ulps) {
  require_same_shape(impl, oracle);
  require_same_shape(naive, oracle);
  const Errors naive_err = measure(naive, oracle);
  const Errors e = measure(impl, oracle);
  const double floor = floor_ulps * dtype_eps(dtype) * e.max_ref;
  const double naive_abs = naive_err.nonfinite ? INFINITY : naive_err.max_abs;
  CheckResult r = finish(e, 2.0 * naive_abs + floor, impl, oracle);
  r.naive_max_abs = naive_abs;
  if (!r.passed) r.detail = fmt::format("naive_T max_abs {:.3g}; ", naive_abs) + r.detail;
  return r;
}

CheckResult check_within(const Tensor& got, const Tensor& want, double bound) {
  require_same_shape(got, want);
  return finish(measure(got, want), bound, got, want);
}

CheckResult worst_of(const std::vector<CheckResult>& results) {
  if (results.empty()) return {};
  // Keep the result closest to (or furthest over) its bound, so the numbers
  // reported belong together; passed only if every result passed.
  auto ratio = [](const CheckResult& r) { return r.bound > 0 ? r.max_abs / r.bound : r.max_abs; };
  const CheckResult* w = &results.front();
  bool all = true;
  for (const auto& r : results) {
    all = all && r.passed;
    if ((!r.passed && w->passed) || (r.passed == w->passed && ratio(r) > ratio(*w))) w = &r;
  }
  CheckResult out = *w;
  out.passed = all;
  return out;
}

}  // namespace attnbench
