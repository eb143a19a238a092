// Selective attention (per-query keys and values), the plain reference that
// materializes them exactly as the selective-attention seed does (DESIGN §5).
//
//   x: (B, T, d)   wq: (d, d)   wk, wv: (d, 2d)   (PyTorch [out, in] layout, no
//   biases) q_i  = wq x_i                                        (d) k_ij = wk
//   [q_i ; x_j],  v_ij = wv [q_i ; x_j]        (d) for every pair j ≤ i: (T, T,
//   d) split heads (dh = d / H); RoPE (half-split pairs (t, t + dh/2), θ_t =
//   10000^(−2t/dh), reference/sdpa.hpp's convention) rotates q_i by position i
//   and k_ij by position j (optional) s_ij = q_i · k_ij / sqrt(dh),   causal: j
//   ≤ i o_i  = Σ_j softmax_j(s_ij) v_ij                      o: (B, T, d),
//   heads concatenated
// There is no output projection: the model's W_o belongs to the layer around
// it.
//
// The same code is the f64 oracle (Scalar = double), the f32 baseline and the
// bf16/f16 "naive in T" baseline (Scalar = float, values rounded to T after q,
// after the materialized keys and values, after RoPE, after the scores, the
// softmax and p·v, like an eager PyTorch module in T). The backward is written
// by hand (dx, dwq, dwk, dwv of Σ do·o) and recomputes the forward per query;
// its bf16 baseline rounds the forward stages the same way and the gradient of
// each materialized key/value block.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reference/common.hpp"

namespace attnbench::ref {

struct SelectiveDims {
  int64_t B = 1, T = 1, d = 2, H = 1;
  bool rope = true;
  int64_t dh() const { return d / H; }
};

/// Rotates the head slices of row r of x (rows, d) by position pos (half-split
/// pairs within each head; `sign` −1 rotates by −pos, the transpose).
template <class Scalar>
void selective_rope_row(Scalar* x, int64_t d, int64_t H, int64_t pos, Scalar sign = Scalar(1)) {
  const int64_t dh = d / H, half = dh / 2;
  for (int64_t h = 0; h < H; ++h) {
    Scalar* xh = x + h * dh;
    for (int64_t t = 0; t < half; ++t) {
      const Scalar theta = std::pow(Scalar(10000), -Scalar(2 * t) / Scalar(dh));
      const Scalar c = std::cos(Scalar(pos) * theta), s = sign * std::sin(Scalar(pos) * theta);
      const Scalar a = xh[t], b = xh[t + half];
      xh[t] = a * c - b * s;
      xh[t + half] = b * c + a * s;
    }
  }
}

/// Per batch element: X (T, d), Q = X wqᵀ, and for one query i the materialized
/// Z_i = [q_i ; x_j]_j (i+1, 2d), K_i = Z_i wkᵀ, V_i = Z_i wvᵀ (i+1, d).
template <class Scalar>
struct SelectiveQuery {
  Matrix<Scalar> Z, K, V, Kr;  // Kr: K with RoPE by key position
  Matrix<Scalar> P;            // (H, i+1) probabilities
  Vector<Scalar> qr;           // q_i with RoPE by position i
};

template <class Scalar>
void selective_query(const SelectiveDims& d, DType round, const Matrix<Scalar>& X, const Matrix<Scalar>& Q,
                     const Matrix<Scalar>& Wk, const Matrix<Scalar>& Wv, int64_t i, SelectiveQuery<Scalar>& s) {
  const int64_t n = i + 1, dm = d.d, H = d.H, dh = d.dh();
  s.Z.resize(n, 2 * dm);
  for (int64_t j = 0; j < n; ++j) {
    s.Z.row(j).head(dm) = Q.row(i);
    s.Z.row(j).tail(dm) = X.row(j);
  }
  s.K = s.Z * Wk.transpose();
  s.V = s.Z * Wv.transpose();
  round_inplace(s.K, round);
  round_inplace(s.V, round);
  s.Kr = s.K;
  s.qr = Q.row(i).transpose();
  if (d.rope) {
    for (int64_t j = 0; j < n; ++j) selective_rope_row(s.Kr.row(j).data(), dm, H, j);
    selective_rope_row(s.qr.data(), dm, H, i);
    round_inplace(s.Kr, round);
    round_inplace(s.qr, round);
  }
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  s.P.resize(H, n);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < n; ++j)
      s.P(h, j) = round_scalar(Scalar(s.qr.segment(h * dh, dh).dot(s.Kr.row(j).segment(h * dh, dh))) * scale, round);
  masked_softmax_rows(s.P);
  round_inplace(s.P, round);
}

template <class Scalar>
Matrix<Scalar> selective_load(const double* p, int64_t rows, int64_t cols) {
  return Eigen::Map<const Matrix<double>>(p, rows, cols).cast<Scalar>();
}

/// The forward pass on dense row-major doubles (values of the tensors in their
/// dtype).
template <class Scalar>
void selective_forward_reference(const SelectiveDims& d, DType round,
                                 double* o,         // (B, T, d)
                                 const double* x,   // (B, T, d)
                                 const double* wq,  // (d, d)
                                 const double* wk,  // (d, 2d)
                                 const double* wv)  // (d, 2d)
{
  const int64_t T = d.T, dm = d.d, dh = d.dh();
  const Matrix<Scalar> Wq = selective_load<Scalar>(wq, dm, dm);
  const Matrix<Scalar> Wk = selective_load<Scalar>(wk, dm, 2 * dm);
  const Matrix<Scalar> Wv = selective_load<Scalar>(wv, dm, 2 * dm);
  SelectiveQuery<Scalar> s;
  for (int64_t b = 0; b < d.B; ++b) {
    const Matrix<Scalar> X = selective_load<Scalar>(x + b * T * dm, T, dm);
    Matrix<Scalar> Q = X * Wq.transpose();
    round_inplace(Q, round);
    Matrix<Scalar> O(T, dm);
    for (int64_t i = 0; i < T; ++i) {
      selective_query(d, round, X, Q, Wk, Wv, i, s);
      for (int64_t h = 0; h < d.H; ++h) O.row(i).segment(h * dh, dh) = s.P.row(h) * s.V.middleCols(h * dh, dh);
    }
    round_inplace(O, round);
    Eigen::Map<Matrix<double>>(o + b * T * dm, T, dm) = O.template cast<double>();
  }
}

/// The backward: gradients of Σ do·o. Outputs are overwritten (dense,
/// row-major).
template <class Scalar>
void selective_backward_reference(const SelectiveDims& d, DType round,
                                  double* dx,          // (B, T, d)
                                  double* dwq,         // (d, d)
                                  double* dwk,         // (d, 2d)
                                  double* dwv,         // (d, 2d)
                                  const double* x,     // (B, T, d)
                                  const double* wq,    // (d, d)
                                  const double* wk,    // (d, 2d)
                                  const double* wv,    // (d, 2d)
                                  const double* dout)  // (B, T, d) cotangent of o
{
  const int64_t T = d.T, dm = d.d, H = d.H, dh = d.dh();
  const Matrix<Scalar> Wq = selective_load<Scalar>(wq, dm, dm);
  const Matrix<Scalar> Wk = selective_load<Scalar>(wk, dm, 2 * dm);
  const Matrix<Scalar> Wv = selective_load<Scalar>(wv, dm, 2 * dm);
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  Matrix<Scalar> dWq = Matrix<Scalar>::Zero(dm, dm), dWk = Matrix<Scalar>::Zero(dm, 2 * dm),
                 dWv = Matrix<Scalar>::Zero(dm, 2 * dm);
  SelectiveQuery<Scalar> s;
  for (int64_t b = 0; b < d.B; ++b) {
    const Matrix<Scalar> X = selective_load<Scalar>(x + b * T * dm, T, dm);
    const Matrix<Scalar> dO = selective_load<Scalar>(dout + b * T * dm, T, dm);
    Matrix<Scalar> Q = X * Wq.transpose();
    round_inplace(Q, round);
    Matrix<Scalar> dQ = Matrix<Scalar>::Zero(T, dm), dX = Matrix<Scalar>::Zero(T, dm);
    for (int64_t i = 0; i < T; ++i) {
      selective_query(d, round, X, Q, Wk, Wv, i, s);
      const int64_t n = i + 1;
      Matrix<Scalar> dV(n, dm), dKr(n, dm);
      Vector<Scalar> dqr = Vector<Scalar>::Zero(dm);
      for (int64_t h = 0; h < H; ++h) {
        const auto doh = dO.row(i).segment(h * dh, dh);
        // dV_ij = p_ij do_i; dp_ij = do_i · v_ij; ds_ij = p_ij (dp_ij − Σ_j
        // p_ij dp_ij).
        Vector<Scalar> dp(n);
        for (int64_t j = 0; j < n; ++j) {
          dV.row(j).segment(h * dh, dh) = s.P(h, j) * doh;
          dp(j) = doh.dot(s.V.row(j).segment(h * dh, dh));
        }
        const Scalar sum = s.P.row(h).dot(dp.transpose());
        for (int64_t j = 0; j < n; ++j) {
          const Scalar ds = s.P(h, j) * (dp(j) - sum) * scale;
          dqr.segment(h * dh, dh) += ds * s.Kr.row(j).segment(h * dh, dh).transpose();
          dKr.row(j).segment(h * dh, dh) = ds * s.qr.segment(h * dh, dh).transpose();
        }
      }
      // Undo RoPE: the transpose of a rotation by pos is the rotation by −pos.
      Matrix<Scalar> dK = dKr;
      if (d.rope) {
        for (int64_t j = 0; j < n; ++j) selective_rope_row(dK.row(j).data(), dm, H, j, Scalar(-1));
        selective_rope_row(dqr.data(), dm, H, i, Scalar(-1));
      }
      round_inplace(dK, round);
      round_inplace(dV, round);
      dWk += dK.transpose() * s.Z;
      dWv += dV.transpose() * s.Z;
      const Matrix<Scalar> dZ = dK * Wk + dV * Wv;  // (n, 2d)
      dQ.row(i) += dqr.transpose() + dZ.leftCols(dm).colwise().sum();
      dX.topRows(n) += dZ.rightCols(dm);
    }
    round_inplace(dQ, round);
    dWq += dQ.transpose() * X;
    dX += dQ * Wq;
    Eigen::Map<Matrix<double>>(dx + b * T * dm, T, dm) = dX.template cast<double>();
  }
  Eigen::Map<Matrix<double>>(dwq, dm, dm) = dWq.template cast<double>();
  Eigen::Map<Matrix<double>>(dwk, dm, 2 * dm) = dWk.template cast<double>();
  Eigen::Map<Matrix<double>>(dwv, dm, 2 * dm) = dWv.template cast<double>();
}

}  // namespace attnbench::ref
