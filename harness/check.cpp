#include "harness/check.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace attnbench {

namespace {
struct Errors {
  double max_abs = 0, max_ref = 0, sq_err = 0, sq_ref = 0;
  int64_t count = 0;
  // Non-finite values never compare equal (DESIGN §3): one in the checked
  // tensor or in the oracle fails the check, whichever side it is on.
  int64_t nonfinite_got = 0, nonfinite_want = 0;
  int64_t nonfinite() const { return nonfinite_got + nonfinite_want; }
};

Errors measure(const Tensor& got, const Tensor& want) {
  Errors e;
  e.count = want.numel();
  for (int64_t i = 0; i < e.count; ++i) {
    const double w = want.get(i), g = got.get(i);
    const bool wf = std::isfinite(w), gf = std::isfinite(g);
    e.nonfinite_want += !wf;
    e.nonfinite_got += !gf;
    if (!wf || !gf) continue;
    e.max_ref = std::max(e.max_ref, std::abs(w));
    e.sq_ref += w * w;
    const double d = std::abs(g - w);
    e.sq_err += d * d;
    e.max_abs = std::max(e.max_abs, d);
  }
  return e;
}

/// Why a check cannot pass whatever the bound: empty, or non-finite values.
std::string vacuous(const Errors& e, const char* got_name) {
  if (e.count == 0) return "nothing compared (0 elements)";
  std::string s;
  if (e.nonfinite_got) s = fmt::format("{} non-finite values in the {}", e.nonfinite_got, got_name);
  if (e.nonfinite_want)
    s += fmt::format("{}{} non-finite values in the oracle", s.empty() ? "" : ", ", e.nonfinite_want);
  return s;
}

std::string mismatches(const Tensor& got, const Tensor& want, double bound) {
  std::string s;
  int shown = 0;
  for (int64_t i = 0; i < want.numel() && shown < 5; ++i) {
    const double g = got.get(i), w = want.get(i);
    if (!(std::abs(g - w) <= bound)) {
      // Enough digits to show the difference between two f64 values.
      s += fmt::format("{}[{}] got {:.17g} want {:.17g}", shown ? "; " : "", i, g, w);
      ++shown;
    }
  }
  return s;
}

CheckResult finish(const Errors& e, double bound, const Tensor& got, const Tensor& want) {
  CheckResult r;
  const std::string why = vacuous(e, "output");
  r.max_abs = why.empty() ? e.max_abs : INFINITY;
  r.max_rel = e.max_ref > 0 ? r.max_abs / e.max_ref : r.max_abs;
  r.rms_rel = e.sq_ref > 0 ? std::sqrt(e.sq_err / e.sq_ref) : std::sqrt(e.sq_err);
  r.bound = bound;
  r.passed = why.empty() && r.max_abs <= bound;
  if (!r.passed) r.detail = (why.empty() ? "" : why + "; ") + mismatches(got, want, bound);
  return r;
}

void require_same_shape(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape())
    throw std::invalid_argument("check: shape " + shape_str(a.shape()) + " vs " + shape_str(b.shape()));
}
}  // namespace

CheckResult check_equivalence(const Tensor& impl, const Tensor& oracle, const Tensor& naive, DType dtype,
                              double floor_ulps, double floor_magnitude) {
  require_same_shape(impl, oracle);
  require_same_shape(naive, oracle);
  const Errors naive_err = measure(naive, oracle);
  const Errors e = measure(impl, oracle);
  const double floor = floor_ulps * dtype_eps(dtype) * std::max(e.max_ref, floor_magnitude);
  // A non-finite naive_T would make the bound infinite: nothing could fail.
  const std::string naive_why = vacuous(naive_err, "naive_T baseline");
  const double naive_abs = naive_why.empty() ? naive_err.max_abs : INFINITY;
  CheckResult r = finish(e, naive_why.empty() ? 2.0 * naive_abs + floor : floor, impl, oracle);
  r.naive_max_abs = naive_abs;
  if (!naive_why.empty()) r.passed = false;
  if (!r.passed)
    r.detail = fmt::format("naive_T max_abs {:.3g}; ", naive_abs) + (naive_why.empty() ? "" : naive_why + "; ") + r.detail;
  return r;
}

CheckResult check_within(const Tensor& got, const Tensor& want, double bound) {
  require_same_shape(got, want);
  return finish(measure(got, want), bound, got, want);
}

std::string nonfinite_inputs(const TensorMap& inputs) {
  std::string s;
  for (const auto& [name, t] : inputs) {
    if (!is_floating(t.dtype())) continue;
    int64_t bad = 0;
    for (int64_t i = 0; i < t.numel(); ++i) bad += !std::isfinite(t.get(i));
    if (bad) s += fmt::format("{}'{}' ({} of {})", s.empty() ? "" : ", ", name, bad, t.numel());
  }
  return s;
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
