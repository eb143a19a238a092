// Triangle multiplicative update (AlphaFold2 Alg. 11/12; AlphaFold3 Alg. 12/13) — the plain
// Eigen reference, forward and backward.
//
//   z [N, N, c_z], mask m [N, N] (1 = valid)  →  out [N, N, c_z]
//   x   = LayerNorm_in(z)                                       eps 1e-5, affine, over c_z
//   a   = m ⊙ sigmoid(x W_agᵀ + b_ag) ⊙ (x W_apᵀ + b_ap)      [N, N, c_h]
//   b   = m ⊙ sigmoid(x W_bgᵀ + b_bg) ⊙ (x W_bpᵀ + b_bp)      [N, N, c_h]
//   t_ij = Σ_k a_ik ⊙ b_jk   (outgoing, Alg. 11)      t_ij = Σ_k a_ki ⊙ b_kj   (incoming, Alg. 12)
//   out = sigmoid(x W_gᵀ + b_g) ⊙ (LayerNorm_out(t) W_oᵀ + b_o)
//
// Two published forms, one set of equations:
//   af2  OpenFold TriangleMultiplicationOutgoing/Incoming: every linear has a bias; weights
//        layer_norm_in.*, linear_a_p, linear_a_g, linear_b_p, linear_b_g (c_z → c_h),
//        linear_g (c_z → c_z), layer_norm_out.* (c_h), linear_z (c_h → c_z).
//   af3  AF3 / Boltz TriangleMultiplicationOutgoing/Incoming: no biases; weights norm_in.*,
//        p_in (c_z → 2·c_h: rows [0, c_h) are a's projection, [c_h, 2·c_h) b's), g_in (the same
//        for the gates), norm_out.* (c_h), p_out (c_h → c_z), g_out (c_z → c_z).
// Weights are PyTorch's [out, in] layout under those state_dict names.
//
// The backward (gradients of Σ dout ⊙ out for z and every weight and bias; the mask is not
// differentiable) is written by hand from the same stages, in reverse:
//   dy = dout ⊙ g, dg' = dout ⊙ y ⊙ g (1 − g);  dW_o = dyᵀ u, du = dy W_o;  LayerNorm backward
//   dt;  outgoing dA_c = dT_c B_c, dB_c = dT_cᵀ A_c (incoming dA_c = B_c dT_cᵀ, dB_c = A_c dT_c),
//   per channel c with A_c[i][k] = a_ikc;  the gates' chain rule;  dx = Σ ds W;  LayerNorm backward dz.
//
// One templated code path is the f64 oracle (T = double), the f32 baseline (T = float) and the
// bf16 baseline (T = float with z and the cotangent rounded to bf16: "bf16" means the pair
// representation is stored in bf16; weights and all arithmetic are f32, as in the CPU kernels).
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "harness/dtype.hpp"
#include "harness/errors.hpp"
#include "harness/tensor.hpp"
#include "reference/common.hpp"

namespace attnbench::ref {

enum class TrimulForm { af2, af3 };

struct TrimulDims {
  int64_t N = 0, c_z = 0, c_h = 0;
  bool outgoing = true;
  TrimulForm form = TrimulForm::af2;
};

/// The state_dict names of one form. For af3 the a/b projections are the two row halves of one
/// tensor (`p_in`, `g_in`); `a_row0`/`b_row0` say where each half starts.
struct TrimulNames {
  std::string ln_in_w, ln_in_b, ap, ag, bp, bg, g, ln_out_w, ln_out_b, o;
  bool biases = true;        // "<linear>.bias" tensors exist
  bool split = false;        // af3: ap and bp are one tensor (rows [0, c_h) and [c_h, 2 c_h))
};

inline TrimulNames trimul_names(TrimulForm f) {
  if (f == TrimulForm::af2)
    return {"layer_norm_in.weight", "layer_norm_in.bias", "linear_a_p", "linear_a_g", "linear_b_p", "linear_b_g",
            "linear_g", "layer_norm_out.weight", "layer_norm_out.bias", "linear_z", true, false};
  return {"norm_in.weight", "norm_in.bias", "p_in", "g_in", "p_in", "g_in", "g_out", "norm_out.weight", "norm_out.bias",
          "p_out", false, true};
}

/// Every tensor of a form with its shape ([out, in] weights), inputs included.
inline std::vector<std::pair<std::string, Shape>> trimul_tensor_shapes(const TrimulDims& d) {
  const TrimulNames n = trimul_names(d.form);
  std::vector<std::pair<std::string, Shape>> v = {{n.ln_in_w, {d.c_z}}, {n.ln_in_b, {d.c_z}}};
  if (d.form == TrimulForm::af2) {
    for (const std::string& s : {n.ap, n.ag, n.bp, n.bg}) {
      v.push_back({s + ".weight", {d.c_h, d.c_z}});
      v.push_back({s + ".bias", {d.c_h}});
    }
    v.push_back({n.g + ".weight", {d.c_z, d.c_z}});
    v.push_back({n.g + ".bias", {d.c_z}});
    v.push_back({n.o + ".weight", {d.c_z, d.c_h}});
    v.push_back({n.o + ".bias", {d.c_z}});
  } else {
    v.push_back({n.ap + ".weight", {2 * d.c_h, d.c_z}});
    v.push_back({n.ag + ".weight", {2 * d.c_h, d.c_z}});
    v.push_back({n.g + ".weight", {d.c_z, d.c_z}});
    v.push_back({n.o + ".weight", {d.c_z, d.c_h}});
  }
  v.push_back({n.ln_out_w, {d.c_h}});
  v.push_back({n.ln_out_b, {d.c_h}});
  v.push_back({"z", {d.N, d.N, d.c_z}});
  v.push_back({"mask", {d.N, d.N}});
  return v;
}

/// Names of the weights and biases (the differentiable tensors besides z).
inline std::vector<std::string> trimul_weight_names(TrimulForm f) {
  TrimulDims d;
  d.form = f;
  std::vector<std::string> v;
  for (const auto& [name, shape] : trimul_tensor_shapes(d))
    if (name != "z" && name != "mask") v.push_back(name);
  return v;
}

/// N, c_z, c_h from the weight shapes and z; every other tensor's shape checked against them
/// (InputError naming the tensor that disagrees). The direction cannot be told from tensors.
inline TrimulDims trimul_dims_from_tensors(const TensorMap& m, TrimulForm form) {
  const std::string where = form == TrimulForm::af2 ? "triangle multiplication (af2) tensors"
                                                    : "triangle multiplication (af3) tensors";
  const TrimulNames n = trimul_names(form);
  TrimulDims d;
  d.form = form;
  const Shape& o = require_rank(m, n.o + ".weight", 2, where);
  d.c_z = o[0];
  d.c_h = o[1];
  d.N = require_rank(m, "z", 3, where)[0];
  // Each disagreement names both tensors: the one read and the one its dims came from.
  auto str = [](const Shape& s) { return shape_str(s); };
  for (const auto& [name, shape] : trimul_tensor_shapes(d)) {
    const Shape& got = require(m, name, where).shape();
    if (got != shape)
      throw InputError(where + ": tensor '" + name + "': expected shape " + str(shape) + " (c_z = " +
                       std::to_string(d.c_z) + ", c_hidden = " + std::to_string(d.c_h) + " from '" + n.o +
                       ".weight' " + str(o) + ", N = " + std::to_string(d.N) + " from 'z'), got " + str(got));
  }
  return d;
}

/// The parameters as matrices in T (each value rounded to `round` first; biases zero for af3).
template <class T>
struct TrimulWeights {
  Matrix<T> ln_in_w, ln_in_b, Wap, Wag, Wbp, Wbg, Wg, ln_out_w, ln_out_b, Wo;  // [out, in]; LN as rows
  Matrix<T> bap, bag, bbp, bbg, bg, bo;                                       // (1, out)
};

template <class T>
Matrix<T> trimul_matrix(const Tensor& t, int64_t row0, int64_t rows, int64_t cols, DType round) {
  if (t.numel() < (row0 + rows) * cols) throw std::logic_error("trimul_matrix: size mismatch");
  Matrix<T> m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double v = t.get(row0 * cols + i);
    m.data()[i] = round == DType::f64 ? T(v) : T(round_to(round, v));
  }
  return m;
}

template <class T>
TrimulWeights<T> trimul_weights(const TrimulDims& d, const TensorMap& in, DType round) {
  const TrimulNames n = trimul_names(d.form);
  auto get = [&](const std::string& name, int64_t row0, int64_t rows, int64_t cols) {
    return trimul_matrix<T>(require(in, name, "trimul reference"), row0, rows, cols, round);
  };
  auto bias = [&](const std::string& name, int64_t row0, int64_t size) -> Matrix<T> {
    if (!n.biases) return Matrix<T>::Zero(1, size);
    return get(name + ".bias", row0, 1, size);
  };
  const int64_t h = d.c_h, cz = d.c_z, b0 = n.split ? h : 0;
  TrimulWeights<T> w;
  w.ln_in_w = get(n.ln_in_w, 0, 1, cz);
  w.ln_in_b = get(n.ln_in_b, 0, 1, cz);
  w.Wap = get(n.ap + ".weight", 0, h, cz);
  w.Wag = get(n.ag + ".weight", 0, h, cz);
  w.Wbp = get(n.bp + ".weight", b0, h, cz);
  w.Wbg = get(n.bg + ".weight", b0, h, cz);
  w.Wg = get(n.g + ".weight", 0, cz, cz);
  w.Wo = get(n.o + ".weight", 0, cz, h);
  w.ln_out_w = get(n.ln_out_w, 0, 1, h);
  w.ln_out_b = get(n.ln_out_b, 0, 1, h);
  w.bap = bias(n.ap, 0, h);
  w.bag = bias(n.ag, 0, h);
  w.bbp = bias(n.bp, 0, h);
  w.bbg = bias(n.bg, 0, h);
  w.bg = bias(n.g, 0, cz);
  w.bo = bias(n.o, 0, cz);
  return w;
}

template <class T>
Matrix<T> trimul_sigmoid(const Matrix<T>& x) {
  return (T(1) / (T(1) + (-x.array()).exp())).matrix();
}

/// Per channel c the [N, N] matrix M_c[i][k] = x[(i·N + k), c] of a pair-major [N², c] matrix.
template <class T>
Matrix<T> trimul_channel(const Matrix<T>& x, int64_t N, int64_t c) {
  Matrix<T> m(N, N);
  for (int64_t i = 0; i < N * N; ++i) m.data()[i] = x(i, c);
  return m;
}

/// Everything the forward computes (the backward recomputes it).
template <class T>
struct TrimulForwardState {
  Matrix<T> x, n_in, sap, sag, sbp, sbg, a, b, t, n_out, u, y, g, out;
  Vector<T> rstd_in, rstd_out;
  Matrix<T> m;  // (N², 1)
};

template <class T>
void trimul_forward_state(const TrimulDims& d, const TrimulWeights<T>& w, const TensorMap& in, DType z_round,
                          TrimulForwardState<T>& s) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t N = d.N, NN = N * N;
  const Matrix<T> z = trimul_matrix<T>(require(in, "z", "trimul reference"), 0, NN, d.c_z, z_round);
  s.m = trimul_matrix<T>(require(in, "mask", "trimul reference"), 0, NN, 1, tr);
  s.x = layer_norm_rows<T>(z, w.ln_in_w, w.ln_in_b, s.n_in, s.rstd_in);
  auto lin = [&](const Matrix<T>& W, const Matrix<T>& bias) {
    Matrix<T> y = s.x * W.transpose();
    y.rowwise() += bias.row(0);
    return y;
  };
  s.sap = lin(w.Wap, w.bap);
  s.sag = lin(w.Wag, w.bag);
  s.sbp = lin(w.Wbp, w.bbp);
  s.sbg = lin(w.Wbg, w.bbg);
  s.a = ((trimul_sigmoid<T>(s.sag).array() * s.sap.array()).colwise() * s.m.col(0).array()).matrix();
  s.b = ((trimul_sigmoid<T>(s.sbg).array() * s.sbp.array()).colwise() * s.m.col(0).array()).matrix();
  s.t.resize(NN, d.c_h);
  for (int64_t c = 0; c < d.c_h; ++c) {
    const Matrix<T> A = trimul_channel<T>(s.a, N, c), B = trimul_channel<T>(s.b, N, c);
    const Matrix<T> Tc = d.outgoing ? Matrix<T>(A * B.transpose()) : Matrix<T>(A.transpose() * B);
    for (int64_t i = 0; i < NN; ++i) s.t(i, c) = Tc.data()[i];
  }
  s.u = layer_norm_rows<T>(s.t, w.ln_out_w, w.ln_out_b, s.n_out, s.rstd_out);
  s.y = s.u * w.Wo.transpose();
  s.y.rowwise() += w.bo.row(0);
  s.g = trimul_sigmoid<T>(lin(w.Wg, w.bg));
  s.out = (s.g.array() * s.y.array()).matrix();
}

/// The forward in arithmetic type T; `z_round` is z's storage dtype. Returns out [N·N, c_z].
template <class T>
Matrix<T> trimul_forward_reference(const TrimulDims& d, const TensorMap& in, DType z_round) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const TrimulWeights<T> w = trimul_weights<T>(d, in, tr);
  TrimulForwardState<T> s;
  trimul_forward_state<T>(d, w, in, z_round, s);
  return s.out;
}

/// Gradients of Σ dout ⊙ out, by name ("z" and every weight name), each [rows, cols] in T.
template <class T>
std::vector<std::pair<std::string, Matrix<T>>> trimul_backward_reference(const TrimulDims& d, const TensorMap& in,
                                                                         DType z_round) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t N = d.N, NN = N * N, h = d.c_h;
  const TrimulWeights<T> w = trimul_weights<T>(d, in, tr);
  TrimulForwardState<T> s;
  trimul_forward_state<T>(d, w, in, z_round, s);
  const Matrix<T> dout = trimul_matrix<T>(require(in, "doutput", "trimul reference"), 0, NN, d.c_z, z_round);

  const Matrix<T> dy = (dout.array() * s.g.array()).matrix();
  const Matrix<T> dsg = (dout.array() * s.y.array() * s.g.array() * (T(1) - s.g.array())).matrix();
  const Matrix<T> dWo = dy.transpose() * s.u, dbo = dy.colwise().sum();
  const Matrix<T> du = dy * w.Wo;
  Matrix<T> dln_out_w, dln_out_b;
  const Matrix<T> dt = layer_norm_rows_backward<T>(du, s.n_out, s.rstd_out, w.ln_out_w, dln_out_w, dln_out_b);

  Matrix<T> da(NN, h), db(NN, h);
  for (int64_t c = 0; c < h; ++c) {
    const Matrix<T> A = trimul_channel<T>(s.a, N, c), B = trimul_channel<T>(s.b, N, c);
    const Matrix<T> dT = trimul_channel<T>(dt, N, c);
    Matrix<T> dA, dB;
    if (d.outgoing) {  // T = A Bᵀ
      dA = dT * B;
      dB = dT.transpose() * A;
    } else {  // T = Aᵀ B
      dA = B * dT.transpose();
      dB = A * dT;
    }
    for (int64_t i = 0; i < NN; ++i) {
      da(i, c) = dA.data()[i];
      db(i, c) = dB.data()[i];
    }
  }
  const auto m = s.m.col(0).array();
  const Matrix<T> sig_ag = trimul_sigmoid<T>(s.sag), sig_bg = trimul_sigmoid<T>(s.sbg);
  const Matrix<T> dsap = ((da.array() * sig_ag.array()).colwise() * m).matrix();
  const Matrix<T> dsag = ((da.array() * s.sap.array() * sig_ag.array() * (T(1) - sig_ag.array())).colwise() * m).matrix();
  const Matrix<T> dsbp = ((db.array() * sig_bg.array()).colwise() * m).matrix();
  const Matrix<T> dsbg = ((db.array() * s.sbp.array() * sig_bg.array() * (T(1) - sig_bg.array())).colwise() * m).matrix();
  const Matrix<T> dx = dsap * w.Wap + dsag * w.Wag + dsbp * w.Wbp + dsbg * w.Wbg + dsg * w.Wg;
  Matrix<T> dln_in_w, dln_in_b;
  const Matrix<T> dz = layer_norm_rows_backward<T>(dx, s.n_in, s.rstd_in, w.ln_in_w, dln_in_w, dln_in_b);

  const TrimulNames n = trimul_names(d.form);
  std::vector<std::pair<std::string, Matrix<T>>> g;
  g.push_back({"z", dz});
  g.push_back({n.ln_in_w, dln_in_w});
  g.push_back({n.ln_in_b, dln_in_b});
  auto sum = [](const Matrix<T>& x) { return Matrix<T>(x.colwise().sum()); };
  if (d.form == TrimulForm::af2) {
    g.push_back({n.ap + ".weight", dsap.transpose() * s.x});
    g.push_back({n.ap + ".bias", sum(dsap)});
    g.push_back({n.ag + ".weight", dsag.transpose() * s.x});
    g.push_back({n.ag + ".bias", sum(dsag)});
    g.push_back({n.bp + ".weight", dsbp.transpose() * s.x});
    g.push_back({n.bp + ".bias", sum(dsbp)});
    g.push_back({n.bg + ".weight", dsbg.transpose() * s.x});
    g.push_back({n.bg + ".bias", sum(dsbg)});
    g.push_back({n.g + ".weight", dsg.transpose() * s.x});
    g.push_back({n.g + ".bias", sum(dsg)});
    g.push_back({n.o + ".weight", dWo});
    g.push_back({n.o + ".bias", dbo});
  } else {
    Matrix<T> dp(2 * h, d.c_z), dgi(2 * h, d.c_z);
    dp.topRows(h) = dsap.transpose() * s.x;
    dp.bottomRows(h) = dsbp.transpose() * s.x;
    dgi.topRows(h) = dsag.transpose() * s.x;
    dgi.bottomRows(h) = dsbg.transpose() * s.x;
    g.push_back({n.ap + ".weight", dp});
    g.push_back({n.ag + ".weight", dgi});
    g.push_back({n.g + ".weight", dsg.transpose() * s.x});
    g.push_back({n.o + ".weight", dWo});
  }
  g.push_back({n.ln_out_w, dln_out_w});
  g.push_back({n.ln_out_b, dln_out_b});
  return g;
}

/// Bytes the reference allocates beyond its inputs (arithmetic type of `elem` bytes): per pair
/// z, x, n_in, four projections, a, b, t, n_out, u, y, g, out (and as many again in the backward).
inline double trimul_reference_scratch_bytes(const TrimulDims& d, double elem) {
  const double NN = double(d.N) * double(d.N);
  return elem * NN * (6.0 * double(d.c_z) + 9.0 * double(d.c_h) + 4.0);
}

}  // namespace attnbench::ref
