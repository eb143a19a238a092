// Helpers shared by the Eigen references (one header per variant family).
//
// A reference is written once, templated on its arithmetic type `Scalar`
// (double for the f64 oracle, float for f32 and for the "naive in T" baselines
// of bf16/f16). The 16-bit baselines compute in float and round to the dtype
// at stage boundaries, like an eager PyTorch module in that dtype: call
// `round_inplace(x, dtype)` after each stage.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "harness/dtype.hpp"
#include "harness/errors.hpp"
#include "harness/tensor.hpp"

namespace attnbench::ref {

/// Arithmetic type of the reference in `dtype`: f64 computes in double, every
/// other floating dtype in float (rounding to 16 bits happens at stage boundaries).
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// Rounds every coefficient of `x` to the nearest value representable in
/// `dtype` (no-op for f64 and f32; f32 values are already float).
template <class Derived>
void round_inplace(Eigen::DenseBase<Derived>& x, DType dtype) {
  if (dtype != DType::bf16 && dtype != DType::f16) return;
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (Eigen::Index j = 0; j < x.cols(); ++j)
      x(i, j) = static_cast<typename Derived::Scalar>(round_to(dtype, double(x(i, j))));
}

/// Rounds one value to `dtype` in the scalar type of the computation.
template <class Scalar>
Scalar round_scalar(Scalar x, DType dtype) {
  return static_cast<Scalar>(round_to(dtype, double(x)));
}

/// Softmax of every row of S in place, over its finite entries (−inf marks a
/// masked pair and becomes 0); a row without any finite entry becomes all zeros.
template <class Scalar>
void masked_softmax_rows(Matrix<Scalar>& S) {
  const Scalar neg_inf = -std::numeric_limits<Scalar>::infinity();
  for (Eigen::Index i = 0; i < S.rows(); ++i) {
    const Scalar m = S.row(i).maxCoeff();
    if (m == neg_inf) {
      S.row(i).setZero();
      continue;
    }
    Scalar sum = 0;
    for (Eigen::Index j = 0; j < S.cols(); ++j) {
      S(i, j) = S(i, j) == neg_inf ? Scalar(0) : std::exp(S(i, j) - m);
      sum += S(i, j);
    }
    S.row(i) /= sum;
  }
}

/// Tensor `name` of `in` as a (rows, cols) matrix in T, each value rounded to `round` first
/// (f64: as stored); `where` names the reference in the missing-tensor error.
template <class T>
Matrix<T> tensor_matrix(const TensorMap& in, const std::string& name, int64_t rows, int64_t cols, DType round,
                        const std::string& where) {
  const Tensor& t = require(in, name, where);
  if (t.numel() != rows * cols) throw std::logic_error(where + ": size mismatch for " + name);
  Matrix<T> m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double v = t.get(i);
    m.data()[i] = round == DType::f64 ? T(v) : T(round_to(round, v));
  }
  return m;
}

inline constexpr double kLayerNormEps = 1e-5;  // OpenFold, Boltz (torch.nn.LayerNorm default)

/// LayerNorm over the columns of each row (biased variance, eps inside the square root, as
/// torch.nn.LayerNorm); `n` gets the normalized rows, `rstd` 1/σ; w, b are (1, cols).
template <class T>
Matrix<T> layer_norm_rows(const Matrix<T>& x, const Matrix<T>& w, const Matrix<T>& b, Matrix<T>& n, Vector<T>& rstd) {
  n.resize(x.rows(), x.cols());
  rstd.resize(x.rows());
  for (int64_t r = 0; r < x.rows(); ++r) {
    const T mean = x.row(r).mean();
    const T var = (x.row(r).array() - mean).square().mean();
    rstd(r) = T(1) / std::sqrt(var + T(kLayerNormEps));
    n.row(r) = ((x.row(r).array() - mean) * rstd(r)).matrix();
  }
  Matrix<T> y = (n.array().rowwise() * w.row(0).array()).matrix();
  y.rowwise() += b.row(0);
  return y;
}

/// LayerNorm backward: dx from dy and the forward's n, rstd; sets the gradients dw, db (1, cols).
template <class T>
Matrix<T> layer_norm_rows_backward(const Matrix<T>& dy, const Matrix<T>& n, const Vector<T>& rstd, const Matrix<T>& w,
                                   Matrix<T>& dw, Matrix<T>& db) {
  dw = (dy.array() * n.array()).colwise().sum().matrix();
  db = dy.colwise().sum();
  const Matrix<T> dn = (dy.array().rowwise() * w.row(0).array()).matrix();
  Matrix<T> dx(dy.rows(), dy.cols());
  const T inv_c = T(1) / T(dy.cols());
  for (int64_t r = 0; r < dy.rows(); ++r) {
    const T m1 = dn.row(r).sum() * inv_c;
    const T m2 = dn.row(r).dot(n.row(r)) * inv_c;
    dx.row(r) = (rstd(r) * (dn.row(r).array() - m1 - n.row(r).array() * m2)).matrix();
  }
  return dx;
}

}  // namespace attnbench::ref
