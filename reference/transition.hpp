// The Pairformer's transition (AF3 Alg. 11; Boltz `Transition`): a SwiGLU MLP on the pair or
// the single representation — the plain Eigen reference, forward and backward.
//
//   x [R, c] (R = N² pairs or N tokens)  →  out [R, c]
//   n   = LayerNorm(x)                                       eps 1e-5, affine (norm.weight, norm.bias)
//   a   = n W_1ᵀ,  b = n W_2ᵀ                                fc1, fc2: c → hidden, no bias
//   hid = silu(a) ⊙ b = a σ(a) ⊙ b
//   out = hid W_3ᵀ                                           fc3: hidden → c, no bias
// Weights are PyTorch's [out, in] layout under Boltz's state_dict names.
//
// The backward (gradients of Σ dout ⊙ out for x and every weight), by hand, in reverse:
//   dhid = dout W_3,  dW_3 = doutᵀ hid;
//   da = dhid ⊙ b ⊙ σ(a)(1 + a(1 − σ(a))),  db = dhid ⊙ silu(a);
//   dW_1 = daᵀ n,  dW_2 = dbᵀ n,  dn = da W_1 + db W_2;  LayerNorm backward gives dx.
//
// One templated code path is the f64 oracle (T = double), the f32 baseline (T = float) and the
// bf16 / f16 baseline (T = float with x and the cotangent rounded to that dtype; weights and all
// arithmetic f32, as in the CPU kernel).
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

struct TransitionDims {
  int64_t N = 0, c = 0, hidden = 0;
  bool pair = true;  // x is (N, N, c) (the pair track) or (N, c) (the single track)
  int64_t rows() const { return pair ? N * N : N; }
  Shape x_shape() const { return pair ? Shape{N, N, c} : Shape{N, c}; }
};

/// The weights with their shapes ([out, in]), in the order of the gradients.
inline std::vector<std::pair<std::string, Shape>> transition_weight_shapes(const TransitionDims& d) {
  return {{"norm.weight", {d.c}},
          {"norm.bias", {d.c}},
          {"fc1.weight", {d.hidden, d.c}},
          {"fc2.weight", {d.hidden, d.c}},
          {"fc3.weight", {d.c, d.hidden}}};
}

/// N, c and hidden from x and fc1.weight; every other tensor's shape checked against them
/// (InputError naming the tensor that disagrees and the tensors its expected shape came from).
inline TransitionDims transition_dims_from_tensors(const TensorMap& m) {
  const std::string where = "transition tensors";
  const Tensor& x = require(m, "x", where);
  if (x.shape().size() != 2 && x.shape().size() != 3)
    throw InputError(where + ": tensor 'x': expected (N, N, c) or (N, c), got " + shape_str(x.shape()));
  TransitionDims d;
  d.pair = x.shape().size() == 3;
  d.N = x.shape()[0];
  d.c = x.shape().back();
  const Shape& fc1 = require_rank(m, "fc1.weight", 2, where);
  d.hidden = fc1[0];
  if (d.pair && x.shape()[1] != d.N)
    throw InputError(where + ": tensor 'x': expected a square pair representation (N, N, c), got " +
                     shape_str(x.shape()));
  for (const auto& [name, shape] : transition_weight_shapes(d)) {
    const Shape& got = require(m, name, where).shape();
    if (got != shape)
      throw InputError(where + ": tensor '" + name + "': expected shape " + shape_str(shape) +
                       " (c = " + std::to_string(d.c) + " from 'x' " + shape_str(x.shape()) + ", hidden = " +
                       std::to_string(d.hidden) + " from 'fc1.weight' " + shape_str(fc1) + "), got " + shape_str(got));
  }
  return d;
}

template <class T>
struct TransitionState {
  Matrix<T> ln_w, ln_b, W1, W2, W3;  // LN parameters as rows; weights [out, in]
  Matrix<T> n, xn, a, b, sig, hid, out;
  Vector<T> rstd;
};

/// The forward in T; `x_round` is x's storage dtype (weights are rounded to T's own).
template <class T>
void transition_forward_state(const TransitionDims& d, const TensorMap& in, DType x_round, TransitionState<T>& s) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t R = d.rows(), c = d.c, h = d.hidden;
  s.ln_w = tensor_matrix<T>(in, "norm.weight", 1, c, tr, "transition reference");
  s.ln_b = tensor_matrix<T>(in, "norm.bias", 1, c, tr, "transition reference");
  s.W1 = tensor_matrix<T>(in, "fc1.weight", h, c, tr, "transition reference");
  s.W2 = tensor_matrix<T>(in, "fc2.weight", h, c, tr, "transition reference");
  s.W3 = tensor_matrix<T>(in, "fc3.weight", c, h, tr, "transition reference");
  const Matrix<T> x = tensor_matrix<T>(in, "x", R, c, x_round, "transition reference");
  s.xn = layer_norm_rows<T>(x, s.ln_w, s.ln_b, s.n, s.rstd);
  s.a = s.xn * s.W1.transpose();
  s.b = s.xn * s.W2.transpose();
  s.sig = (T(1) / (T(1) + (-s.a.array()).exp())).matrix();
  s.hid = (s.a.array() * s.sig.array() * s.b.array()).matrix();
  s.out = s.hid * s.W3.transpose();
}

/// out [R, c] in T.
template <class T>
Matrix<T> transition_forward_reference(const TransitionDims& d, const TensorMap& in, DType x_round) {
  TransitionState<T> s;
  transition_forward_state<T>(d, in, x_round, s);
  return s.out;
}

/// Gradients of Σ dout ⊙ out by name ("x" and every weight name), each [rows, cols] in T.
template <class T>
std::vector<std::pair<std::string, Matrix<T>>> transition_backward_reference(const TransitionDims& d,
                                                                             const TensorMap& in, DType x_round) {
  TransitionState<T> s;
  transition_forward_state<T>(d, in, x_round, s);
  const Matrix<T> dout = tensor_matrix<T>(in, "doutput", d.rows(), d.c, x_round, "transition reference");
  const Matrix<T> dhid = dout * s.W3;
  const auto sg = s.sig.array();
  const Matrix<T> da = (dhid.array() * s.b.array() * sg * (T(1) + s.a.array() * (T(1) - sg))).matrix();
  const Matrix<T> db = (dhid.array() * s.a.array() * sg).matrix();
  const Matrix<T> dxn = da * s.W1 + db * s.W2;
  Matrix<T> dln_w, dln_b;
  const Matrix<T> dx = layer_norm_rows_backward<T>(dxn, s.n, s.rstd, s.ln_w, dln_w, dln_b);
  return {{"x", dx},
          {"norm.weight", dln_w},
          {"norm.bias", dln_b},
          {"fc1.weight", da.transpose() * s.xn},
          {"fc2.weight", db.transpose() * s.xn},
          {"fc3.weight", dout.transpose() * s.hid}};
}

/// Bytes the reference allocates beyond its inputs (arithmetic type of `elem` bytes): per row
/// x, n, xn, out (c each) and a, b, σ, hid (hidden each); the backward about as much again.
inline double transition_reference_scratch_bytes(const TransitionDims& d, double elem) {
  return elem * double(d.rows()) * (4.0 * double(d.c) + 4.0 * double(d.hidden));
}

}  // namespace attnbench::ref
