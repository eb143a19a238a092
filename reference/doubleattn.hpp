// The double-attention pair block (the protein seed project's cheaper alternative to triangle
// attention; "double attention" as in A²-Nets, Chen et al. 2018: gather, then distribute) —
// the plain Eigen reference, forward and backward. docs/doubleattn.md.
//
//   z [N, N, c_z] → X = z as E = N² edge rows [E, c_z]; D reduced channels (default c_z / 4)
//   F = X W_fᵀ,  G = X W_gᵀ + b_g,  K = X W_hᵀ + b_h                    [E, D]
//   (F has no bias: a constant per column cancels in the softmax over the edges, so its
//   gradient would be 0 identically — a parameter no check could test)
//   A = softmax over the E edges of each column of F                    (gather weights)
//   V = Aᵀ G                                                            [D, D]  (global context)
//   Q = softmax over the D channels of each row of K                    (distribute weights)
//   out = (Q V) W_oᵀ + b_o                                              [E, c_z]
// The block is z + out (like the Pairformer's operations, the variant is the update alone, so
// its checks see the update and not the residual's rounding). Every edge sees the whole pair
// representation through V at O(N²·D·(c_z + D)) cost.
//
// The backward (gradients of Σ dout ⊙ out for z and every weight), by hand, in reverse:
//   Y = Q V:  dY = dout W_o, dW_o = doutᵀ Y, db_o = Σ dout;  dQ = dY Vᵀ, dV = Qᵀ dY
//   row softmax:     dK = Q ⊙ (dQ − rowsum(dQ ⊙ Q))
//   V = Aᵀ G:        dA = G dVᵀ, dG = A dV
//   column softmax:  dF = A ⊙ (dA − colsum(dA ⊙ A))
//   dW_* = d*ᵀ X, db_g,h = Σ d*,  dz = dF W_f + dG W_g + dK W_h.
//
// One templated code path is the f64 oracle (T = double), the f32 baseline and the bf16 / f16
// baseline (T = float with z and the cotangent rounded to that dtype; weights and arithmetic f32).
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "harness/dtype.hpp"
#include "harness/errors.hpp"
#include "harness/tensor.hpp"
#include "reference/common.hpp"

namespace attnbench::ref {

struct DoubleAttnDims {
  int64_t N = 0, c_z = 0, D = 0;
};

/// Every weight with its shape ([out, in]; biases (out)), in the order of the gradients.
inline std::vector<std::pair<std::string, Shape>> doubleattn_weight_shapes(const DoubleAttnDims& d) {
  return {{"proj_f.weight", {d.D, d.c_z}}, {"proj_g.weight", {d.D, d.c_z}}, {"proj_g.bias", {d.D}},
          {"proj_h.weight", {d.D, d.c_z}}, {"proj_h.bias", {d.D}},          {"proj_o.weight", {d.c_z, d.D}},
          {"proj_o.bias", {d.c_z}}};
}

/// N, c_z from z and D from proj_f.weight; every other tensor checked against them.
inline DoubleAttnDims doubleattn_dims_from_tensors(const TensorMap& m) {
  const std::string where = "double attention tensors";
  const Shape& z = require_rank(m, "z", 3, where);
  const Shape& f = require_rank(m, "proj_f.weight", 2, where);
  DoubleAttnDims d{z[0], z[2], f[0]};
  if (z[1] != z[0])
    throw InputError(where + ": tensor 'z': expected a square pair representation (N, N, c_z), got " + shape_str(z));
  for (const auto& [name, shape] : doubleattn_weight_shapes(d)) {
    const Shape& got = require(m, name, where).shape();
    if (got != shape)
      throw InputError(where + ": tensor '" + name + "': expected shape " + shape_str(shape) + " (c_z = " +
                       std::to_string(d.c_z) + " from 'z' " + shape_str(z) + ", D = " + std::to_string(d.D) +
                       " from 'proj_f.weight' " + shape_str(f) + "), got " + shape_str(got));
  }
  return d;
}

template <class T>
struct DoubleAttnState {
  Matrix<T> X, Wf, Wg, bg, Wh, bh, Wo, bo;
  Matrix<T> A, G, Q, V, Y, out;
};

/// Softmax of each column of M over its rows (in place).
template <class T>
void softmax_columns(Matrix<T>& M) {
  for (int64_t c = 0; c < M.cols(); ++c) {
    const T m = M.col(c).maxCoeff();
    M.col(c) = (M.col(c).array() - m).exp().matrix();
    M.col(c) /= M.col(c).sum();
  }
}

template <class T>
void doubleattn_forward_state(const DoubleAttnDims& d, const TensorMap& in, DType z_round, DoubleAttnState<T>& s) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t E = d.N * d.N, cz = d.c_z, D = d.D;
  auto w = [&](const char* name, int64_t rows, int64_t cols) {
    return tensor_matrix<T>(in, name, rows, cols, tr, "double attention reference");
  };
  s.Wf = w("proj_f.weight", D, cz);
  s.Wg = w("proj_g.weight", D, cz);
  s.bg = w("proj_g.bias", 1, D);
  s.Wh = w("proj_h.weight", D, cz);
  s.bh = w("proj_h.bias", 1, D);
  s.Wo = w("proj_o.weight", cz, D);
  s.bo = w("proj_o.bias", 1, cz);
  s.X = tensor_matrix<T>(in, "z", E, cz, z_round, "double attention reference");
  s.A = s.X * s.Wf.transpose();
  softmax_columns<T>(s.A);
  s.G = s.X * s.Wg.transpose();
  s.G.rowwise() += s.bg.row(0);
  s.Q = s.X * s.Wh.transpose();
  s.Q.rowwise() += s.bh.row(0);
  for (int64_t e = 0; e < E; ++e) {
    const T m = s.Q.row(e).maxCoeff();
    s.Q.row(e) = (s.Q.row(e).array() - m).exp().matrix();
    s.Q.row(e) /= s.Q.row(e).sum();
  }
  s.V = s.A.transpose() * s.G;
  s.Y = s.Q * s.V;
  s.out = s.Y * s.Wo.transpose();
  s.out.rowwise() += s.bo.row(0);
}

/// out [E, c_z] in T.
template <class T>
Matrix<T> doubleattn_forward_reference(const DoubleAttnDims& d, const TensorMap& in, DType z_round) {
  DoubleAttnState<T> s;
  doubleattn_forward_state<T>(d, in, z_round, s);
  return s.out;
}

/// Gradients of Σ dout ⊙ out by name ("z" and every weight name), each [rows, cols] in T.
template <class T>
std::vector<std::pair<std::string, Matrix<T>>> doubleattn_backward_reference(const DoubleAttnDims& d,
                                                                             const TensorMap& in, DType z_round) {
  DoubleAttnState<T> s;
  doubleattn_forward_state<T>(d, in, z_round, s);
  const Matrix<T> dout = tensor_matrix<T>(in, "doutput", d.N * d.N, d.c_z, z_round, "double attention reference");
  const Matrix<T> dY = dout * s.Wo;
  const Matrix<T> dQ = dY * s.V.transpose(), dV = s.Q.transpose() * dY;
  const Vector<T> rq = (dQ.array() * s.Q.array()).rowwise().sum();
  const Matrix<T> dK = (s.Q.array() * (dQ.array().colwise() - rq.array())).matrix();
  const Matrix<T> dA = s.G * dV.transpose(), dG = s.A * dV;
  const Matrix<T> ca = (dA.array() * s.A.array()).colwise().sum();
  const Matrix<T> dF = (s.A.array() * (dA.array().rowwise() - ca.row(0).array())).matrix();
  const Matrix<T> dz = dF * s.Wf + dG * s.Wg + dK * s.Wh;
  auto sum = [](const Matrix<T>& x) { return Matrix<T>(x.colwise().sum()); };
  return {{"z", dz},
          {"proj_f.weight", dF.transpose() * s.X},
          {"proj_g.weight", dG.transpose() * s.X},
          {"proj_g.bias", sum(dG)},
          {"proj_h.weight", dK.transpose() * s.X},
          {"proj_h.bias", sum(dK)},
          {"proj_o.weight", dout.transpose() * s.Y},
          {"proj_o.bias", sum(dout)}};
}

/// Bytes the reference allocates beyond its inputs (arithmetic type of `elem` bytes): per edge
/// X and out (c_z each) and A, G, Q, Y (D each); the backward about as much again.
inline double doubleattn_reference_scratch_bytes(const DoubleAttnDims& d, double elem) {
  return elem * double(d.N) * double(d.N) * (2.0 * double(d.c_z) + 4.0 * double(d.D));
}

}  // namespace attnbench::ref
