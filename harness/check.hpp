// The correctness rule (DESIGN §3, FlashAttention's):
//   an implementation in dtype T passes when
//   max_abs(impl − oracle) ≤ 2 · max_abs(naive_T − oracle) + floor,
// where the oracle is the reference in f64 on the same (T-rounded) inputs,
// naive_T the same reference algorithm computed in T, and
// floor = floor_ulps · eps(T) · max|oracle|. A non-finite value anywhere
// (the checked tensor, the oracle, naive_T) fails the check, and so does a
// check that compared nothing (0 elements): a check can never pass vacuously.
#pragma once

#include "harness/variant.hpp"

namespace attnbench {

inline constexpr double kDefaultFloorUlps = 8.0;

/// `floor_magnitude`: the floor is taken at max(max|oracle|, floor_magnitude).
/// Gradients pass the largest gradient of their case: a gradient that is
/// exactly zero in f64 (dq and dk of a row with one key) is a difference of
/// O(1) terms in a kernel, and 8 ulps of 0 would demand exact cancellation.
CheckResult check_equivalence(const Tensor& impl, const Tensor& oracle, const Tensor& naive, DType dtype,
                              double floor_ulps = kDefaultFloorUlps, double floor_magnitude = 0);

/// Passes when max_abs(got − want) ≤ bound (property checks with their own bound).
CheckResult check_within(const Tensor& got, const Tensor& want, double bound);

/// "'q' (3 of 4096), 'z' (1 of 2048)": the floating tensors holding NaN or
/// infinity, "" when all are finite. Non-finite inputs fail a case, named.
std::string nonfinite_inputs(const TensorMap& inputs);

/// Combines per-output results: passed if all passed, the worst numbers kept.
CheckResult worst_of(const std::vector<CheckResult>& results);

}  // namespace attnbench
