// Attention with pair bias on the single representation (AF3 Alg. 24 without conditioning;
// Boltz `AttentionPairBias`, the Pairformer's s-track attention) — the plain Eigen reference,
// forward and backward.
//
//   s [N, c_s], z [N, N, c_z], mask m [N] (1 = valid token)  →  out [N, c_s]
//   ŝ   = LayerNorm_s(s)                                     (norm_s, eps 1e-5)
//   q   = ŝ W_qᵀ + b_q,  k = ŝ W_kᵀ,  v = ŝ W_vᵀ,  g = σ(ŝ W_gᵀ)     (heads H of d = c_s / H)
//   b^h_ij = (LayerNorm_z(z_ij) W_zᵀ)_h                      (proj_z.0, proj_z.1; no bias)
//   a^h_ij = softmax_j(q^h_i · k^h_j / √d + b^h_ij + μ_j)
//   out = (g ⊙ concat_h Σ_j a^h_ij v^h_j) W_oᵀ              (proj_o, no bias)
// Boltz adds μ_j = −10⁶ (1 − m_j). In exact arithmetic that is: masked keys get probability 0
// (e^−10⁶ underflows to 0 in f32 and f64 alike) unless every key is masked, when the common
// shift cancels and no key is excluded. That is what μ is here (−∞ or 0), so a fully masked
// sequence gives the unmasked softmax in every precision instead of Boltz's f32 logits rounded
// to the ulp of 10⁶ (2⁻⁴).
//
// The backward (gradients of Σ dout ⊙ out for s, z and every weight; the mask is not
// differentiable), by hand, in reverse:
//   dy = dout W_o, dW_o = doutᵀ y (y = g ⊙ o);  do = dy ⊙ g;  d(g pre-act.) = dy ⊙ o ⊙ g(1 − g)
//   per head: dv = Pᵀ do, dP = do vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dq = dS k/√d,
//             dk = dSᵀ q/√d, db^h = dS (the pair bias's gradient is the score gradient)
//   dW_z = dbᵀ ẑ, dẑ = db W_z → LayerNorm_z backward → dz;  dW_* = d*ᵀ ŝ, db_q = Σ dq,
//   dŝ = Σ d* W_* → LayerNorm_s backward → ds.
//
// One templated code path is the f64 oracle (T = double), the f32 baseline and the bf16 / f16
// baseline (T = float with s, z and the cotangent rounded to that dtype; weights and all
// arithmetic f32, as in the CPU kernel).
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <limits>
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

struct PairBiasDims {
  int64_t N = 0, c_s = 0, c_z = 0, H = 0;
  int64_t d() const { return c_s / H; }
};

/// Every weight with its shape ([out, in]), in the order of the gradients.
inline std::vector<std::pair<std::string, Shape>> pair_bias_weight_shapes(const PairBiasDims& d) {
  return {{"norm_s.weight", {d.c_s}},        {"norm_s.bias", {d.c_s}},          {"proj_q.weight", {d.c_s, d.c_s}},
          {"proj_q.bias", {d.c_s}},          {"proj_k.weight", {d.c_s, d.c_s}}, {"proj_v.weight", {d.c_s, d.c_s}},
          {"proj_g.weight", {d.c_s, d.c_s}}, {"proj_z.0.weight", {d.c_z}},      {"proj_z.0.bias", {d.c_z}},
          {"proj_z.1.weight", {d.H, d.c_z}}, {"proj_o.weight", {d.c_s, d.c_s}}};
}

/// The inputs (s, z, mask) with their shapes.
inline std::vector<std::pair<std::string, Shape>> pair_bias_input_shapes(const PairBiasDims& d) {
  return {{"s", {d.N, d.c_s}}, {"z", {d.N, d.N, d.c_z}}, {"mask", {d.N}}};
}

/// N, c_s, c_z and H from s, z and proj_z.1.weight; every other tensor's shape checked against
/// them (InputError naming the tensor that disagrees and where its expected shape came from).
inline PairBiasDims pair_bias_dims_from_tensors(const TensorMap& m) {
  const std::string where = "attention with pair bias tensors";
  PairBiasDims d;
  const Shape& s = require_rank(m, "s", 2, where);
  const Shape& z = require_rank(m, "z", 3, where);
  const Shape& wz = require_rank(m, "proj_z.1.weight", 2, where);
  d.N = s[0];
  d.c_s = s[1];
  d.c_z = z[2];
  d.H = wz[0];
  const std::string from = " (N = " + std::to_string(d.N) + ", c_s = " + std::to_string(d.c_s) + " from 's' " +
                           shape_str(s) + ", c_z = " + std::to_string(d.c_z) + " from 'z' " + shape_str(z) +
                           ", H = " + std::to_string(d.H) + " from 'proj_z.1.weight' " + shape_str(wz) + ")";
  if (d.H < 1 || d.c_s % d.H != 0)
    throw InputError(where + ": tensor 'proj_z.1.weight': its " + std::to_string(d.H) +
                     " heads do not divide c_s = " + std::to_string(d.c_s) + " from 's' " + shape_str(s));
  std::vector<std::pair<std::string, Shape>> all = pair_bias_input_shapes(d);
  for (const auto& w : pair_bias_weight_shapes(d)) all.push_back(w);
  for (const auto& [name, shape] : all) {
    const Shape& got = require(m, name, where).shape();
    if (got != shape)
      throw InputError(where + ": tensor '" + name + "': expected shape " + shape_str(shape) + from + ", got " +
                       shape_str(got));
  }
  return d;
}

template <class T>
struct PairBiasState {
  Matrix<T> ln_s_w, ln_s_b, Wq, bq, Wk, Wv, Wg, ln_z_w, ln_z_b, Wz, Wo;
  Matrix<T> n_s, sh, q, k, v, g, n_z, zh, bz, o, y, out;
  Vector<T> rstd_s, rstd_z;
  std::vector<Matrix<T>> P;  // per head (N, N)
  Matrix<T> mu;              // (1, N): 0 or −∞ (see the header)
};

/// μ_j of the header: −∞ for a masked key, unless every key is masked (then all 0).
template <class T>
Matrix<T> pair_bias_key_bias(const Matrix<T>& mask) {
  bool any = false;
  for (int64_t j = 0; j < mask.size(); ++j) any = any || mask.data()[j] != T(0);
  Matrix<T> mu = Matrix<T>::Zero(1, mask.size());
  if (any)
    for (int64_t j = 0; j < mask.size(); ++j)
      if (mask.data()[j] == T(0)) mu(0, j) = -std::numeric_limits<T>::infinity();
  return mu;
}

template <class T>
void pair_bias_forward_state(const PairBiasDims& d, const TensorMap& in, DType x_round, PairBiasState<T>& s) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t N = d.N, cs = d.c_s, cz = d.c_z, H = d.H, hd = d.d();
  auto w = [&](const char* name, int64_t rows, int64_t cols) {
    return tensor_matrix<T>(in, name, rows, cols, tr, "attention with pair bias reference");
  };
  s.ln_s_w = w("norm_s.weight", 1, cs);
  s.ln_s_b = w("norm_s.bias", 1, cs);
  s.Wq = w("proj_q.weight", cs, cs);
  s.bq = w("proj_q.bias", 1, cs);
  s.Wk = w("proj_k.weight", cs, cs);
  s.Wv = w("proj_v.weight", cs, cs);
  s.Wg = w("proj_g.weight", cs, cs);
  s.ln_z_w = w("proj_z.0.weight", 1, cz);
  s.ln_z_b = w("proj_z.0.bias", 1, cz);
  s.Wz = w("proj_z.1.weight", H, cz);
  s.Wo = w("proj_o.weight", cs, cs);
  const Matrix<T> x = tensor_matrix<T>(in, "s", N, cs, x_round, "attention with pair bias reference");
  const Matrix<T> z = tensor_matrix<T>(in, "z", N * N, cz, x_round, "attention with pair bias reference");
  s.mu = pair_bias_key_bias<T>(tensor_matrix<T>(in, "mask", 1, N, tr, "attention with pair bias reference"));
  s.sh = layer_norm_rows<T>(x, s.ln_s_w, s.ln_s_b, s.n_s, s.rstd_s);
  s.q = s.sh * s.Wq.transpose();
  s.q.rowwise() += s.bq.row(0);
  s.k = s.sh * s.Wk.transpose();
  s.v = s.sh * s.Wv.transpose();
  const Matrix<T> gp = s.sh * s.Wg.transpose();
  s.g = (T(1) / (T(1) + (-gp.array()).exp())).matrix();
  s.zh = layer_norm_rows<T>(z, s.ln_z_w, s.ln_z_b, s.n_z, s.rstd_z);
  s.bz = s.zh * s.Wz.transpose();  // (N², H)
  const T scale = T(1) / std::sqrt(T(hd));
  s.o.resize(N, cs);
  s.P.assign(size_t(H), Matrix<T>());
  for (int64_t h = 0; h < H; ++h) {
    Matrix<T> S = s.q.middleCols(h * hd, hd) * s.k.middleCols(h * hd, hd).transpose() * scale;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) S(i, j) += s.bz(i * N + j, h) + s.mu(0, j);
    masked_softmax_rows<T>(S);
    s.o.middleCols(h * hd, hd) = S * s.v.middleCols(h * hd, hd);
    s.P[size_t(h)] = std::move(S);
  }
  s.y = (s.g.array() * s.o.array()).matrix();
  s.out = s.y * s.Wo.transpose();
}

/// out [N, c_s] in T.
template <class T>
Matrix<T> pair_bias_forward_reference(const PairBiasDims& d, const TensorMap& in, DType x_round) {
  PairBiasState<T> s;
  pair_bias_forward_state<T>(d, in, x_round, s);
  return s.out;
}

/// Gradients of Σ dout ⊙ out by name ("s", "z" and every weight name), each [rows, cols] in T.
template <class T>
std::vector<std::pair<std::string, Matrix<T>>> pair_bias_backward_reference(const PairBiasDims& d, const TensorMap& in,
                                                                            DType x_round) {
  PairBiasState<T> s;
  pair_bias_forward_state<T>(d, in, x_round, s);
  const int64_t N = d.N, cs = d.c_s, H = d.H, hd = d.d();
  const T scale = T(1) / std::sqrt(T(hd));
  const Matrix<T> dout = tensor_matrix<T>(in, "doutput", N, cs, x_round, "attention with pair bias reference");
  const Matrix<T> dy = dout * s.Wo;
  const Matrix<T> dWo = dout.transpose() * s.y;
  const Matrix<T> dO = (dy.array() * s.g.array()).matrix();
  const Matrix<T> dgp = (dy.array() * s.o.array() * s.g.array() * (T(1) - s.g.array())).matrix();
  Matrix<T> dq(N, cs), dk(N, cs), dv(N, cs), dbz(N * N, H);
  for (int64_t h = 0; h < H; ++h) {
    const Matrix<T>& P = s.P[size_t(h)];
    const Matrix<T> doh = dO.middleCols(h * hd, hd);
    dv.middleCols(h * hd, hd) = P.transpose() * doh;
    const Matrix<T> dP = doh * s.v.middleCols(h * hd, hd).transpose();
    const Vector<T> delta = (dP.array() * P.array()).rowwise().sum();
    const Matrix<T> dS = (P.array() * (dP.array().colwise() - delta.array())).matrix();
    dq.middleCols(h * hd, hd) = dS * s.k.middleCols(h * hd, hd) * scale;
    dk.middleCols(h * hd, hd) = dS.transpose() * s.q.middleCols(h * hd, hd) * scale;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) dbz(i * N + j, h) = dS(i, j);
  }
  Matrix<T> dln_z_w, dln_z_b, dln_s_w, dln_s_b;
  const Matrix<T> dz = layer_norm_rows_backward<T>(dbz * s.Wz, s.n_z, s.rstd_z, s.ln_z_w, dln_z_w, dln_z_b);
  const Matrix<T> dsh = dq * s.Wq + dk * s.Wk + dv * s.Wv + dgp * s.Wg;
  const Matrix<T> ds = layer_norm_rows_backward<T>(dsh, s.n_s, s.rstd_s, s.ln_s_w, dln_s_w, dln_s_b);
  return {{"s", ds},
          {"z", dz},
          {"norm_s.weight", dln_s_w},
          {"norm_s.bias", dln_s_b},
          {"proj_q.weight", dq.transpose() * s.sh},
          {"proj_q.bias", Matrix<T>(dq.colwise().sum())},
          {"proj_k.weight", dk.transpose() * s.sh},
          {"proj_v.weight", dv.transpose() * s.sh},
          {"proj_g.weight", dgp.transpose() * s.sh},
          {"proj_z.0.weight", dln_z_w},
          {"proj_z.0.bias", dln_z_b},
          {"proj_z.1.weight", dbz.transpose() * s.zh},
          {"proj_o.weight", dWo}};
}

/// Bytes the reference allocates beyond its inputs (arithmetic type of `elem` bytes): per pair
/// z, its norm twice, the bias (H) and the probabilities (H); per token about 12·c_s.
inline double pair_bias_reference_scratch_bytes(const PairBiasDims& d, double elem) {
  const double NN = double(d.N) * double(d.N);
  return elem * (NN * (3.0 * double(d.c_z) + 2.0 * double(d.H)) + double(d.N) * 12.0 * double(d.c_s));
}

}  // namespace attnbench::ref
