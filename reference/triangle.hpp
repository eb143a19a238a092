// Triangle attention (AlphaFold2 Alg. 13/14, OpenFold `TriangleAttention`) — the plain
// Eigen reference, forward and hand-written backward (triangle_backward_reference).
//
//   z [N, N, c_z], mask m [N, N]  →  out [N, N, c_z]          (starting node)
//   x = LayerNorm(z)                                   eps 1e-5, affine
//   q, k, v = x W_{q,k,v}ᵀ  [N, N, H·c] (no bias), head-major (channel h·c + d)
//   b^h_jk = (x W_bᵀ)[j, k, h]                         "linear", no bias, shared by all rows i
//   a^h_ijk = softmax_k( q^h_ij·k^h_ik / √c + b^h_jk + inf·(m_ik − 1) ),   inf = 1e9
//   o^h_ij = sigmoid(x W_gᵀ + b_g)^h_ij ⊙ Σ_k a^h_ijk v^h_ik
//   out_ij = concat_h(o^h_ij) W_oᵀ + b_o
// Ending node: the same on zᵀ and mᵀ, the output transposed back.
//
// Mask: OpenFold adds inf·(m_ik − 1). We add inf·(m_ik − max_k m_ik), which differs by a
// constant along each softmax row (the same function): with a binary mask a row that has a
// valid key is unchanged, and a fully masked row gets no offset at all instead of −1e9
// (OpenFold's result for such a row is the unmasked softmax, and so is ours — without
// losing the logits' low bits to the 1e9 offset, which in f32 would leave nothing).
//
// One templated code path gives the f64 oracle (T = double), the f32 baseline (T = float)
// and the bf16 baseline (T = float with z rounded to bf16: "bf16" means the pair
// representation is stored in bf16, everything else and all arithmetic are f32).
// Everything is materialized: the layer-normed x and the projections [N², ·], and per row i
// the logits [H, N, N] (H·N³ over all rows, one row at a time).
// Weights are in PyTorch's [out, in] layout under OpenFold's state_dict names.
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

struct TriangleDims {
  int64_t N = 0, c_z = 0, c = 0, H = 0;
  bool starting = true;
};

inline constexpr double kTriangleInf = 1e9;

/// Dims from the OpenFold weight shapes (PyTorch [out, in]) and the inputs. `starting`
/// cannot be told from tensors: it is left true.
inline TriangleDims triangle_dims_from_tensors(const TensorMap& m) {
  const std::string where = "triangle attention tensors";
  auto shape = [&](const char* name, size_t rank) -> const Shape& { return require_rank(m, name, rank, where); };
  TriangleDims d;
  const Shape& wb = shape("linear.weight", 2);
  d.H = wb[0];
  d.c_z = wb[1];
  const Shape& wq = shape("mha.linear_q.weight", 2);
  if (d.H <= 0 || wq[0] % d.H != 0)
    throw InputError(where + ": mha.linear_q.weight rows " + std::to_string(wq[0]) +
                     " not a multiple of H=" + std::to_string(d.H) + " (the rows of linear.weight)");
  d.c = wq[0] / d.H;
  const Shape& z = shape("z", 3);
  d.N = z[0];
  struct Expect {
    const char* name;
    Shape shape;
  };
  const int64_t Hc = d.H * d.c;
  const std::vector<Expect> expect = {
      {"layer_norm.weight", {d.c_z}},
      {"layer_norm.bias", {d.c_z}},
      {"linear.weight", {d.H, d.c_z}},
      {"mha.linear_q.weight", {Hc, d.c_z}},
      {"mha.linear_k.weight", {Hc, d.c_z}},
      {"mha.linear_v.weight", {Hc, d.c_z}},
      {"mha.linear_g.weight", {Hc, d.c_z}},
      {"mha.linear_g.bias", {Hc}},
      {"mha.linear_o.weight", {d.c_z, Hc}},
      {"mha.linear_o.bias", {d.c_z}},
      {"z", {d.N, d.N, d.c_z}},
      {"mask", {d.N, d.N}},
  };
  for (const Expect& e : expect) require_shape(m, e.name, e.shape, where);
  return d;
}

/// A tensor's elements as a [rows, cols] matrix in T, each rounded to `round` first.
template <class T>
Matrix<T> triangle_matrix(const Tensor& t, int64_t rows, int64_t cols, DType round) {
  if (t.numel() != rows * cols) throw std::logic_error("triangle_matrix: size mismatch");
  Matrix<T> m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i)
    m.data()[i] = round == DType::f64 ? T(t.get(i)) : T(round_to(round, t.get(i)));
  return m;
}

/// Everything the forward computes, in the problem's pair order (row a·N + b = pair (a, b) of
/// the problem: (a, b) of z for the starting node, (b, a) for the ending node).
template <class T>
struct TriangleForwardState {
  Matrix<T> n, x, q, k, v, g, b, o, gated, mask;  // q scaled by 1/√c; g = sigmoid(gate); o ungated
  Vector<T> rstd;
  Matrix<T> mmax;  // (N, 1): the mask bias offset of each row (see the file comment)
};

/// Problem pair (a, b)'s row in z's layout.
inline int64_t triangle_src(const TriangleDims& d, int64_t a, int64_t b) {
  return d.starting ? a * d.N + b : b * d.N + a;
}

/// A [N·N, cols] tensor in z's layout as a matrix in the problem's pair order, rounded to `round`.
template <class T>
Matrix<T> triangle_pairs(const TriangleDims& d, const Tensor& t, int64_t cols, DType round) {
  const int64_t N = d.N;
  const Matrix<T> m = triangle_matrix<T>(t, N * N, cols, round);
  Matrix<T> p(N * N, cols);
  for (int64_t a = 0; a < N; ++a)
    for (int64_t b = 0; b < N; ++b) p.row(a * N + b) = m.row(triangle_src(d, a, b));
  return p;
}

/// The attention probabilities [N (j), N (k)] of row i, head h.
template <class T>
Matrix<T> triangle_probs(const TriangleDims& d, const TriangleForwardState<T>& s, int64_t i, int64_t h) {
  const int64_t N = d.N, c = d.c;
  Matrix<T> a = s.q.block(i * N, h * c, N, c) * s.k.block(i * N, h * c, N, c).transpose();
  for (int64_t j = 0; j < N; ++j)
    for (int64_t kk = 0; kk < N; ++kk)
      a(j, kk) += s.b(j * N + kk, h) + T(kTriangleInf) * (s.mask(i * N + kk, 0) - s.mmax(i, 0));
  for (int64_t j = 0; j < N; ++j) {
    const T mx = a.row(j).maxCoeff();
    a.row(j) = (a.row(j).array() - mx).exp().matrix();
    a.row(j) /= a.row(j).sum();
  }
  return a;
}

/// The forward in arithmetic type T (double: the oracle; float: the f32 baseline). `z_round` is
/// the dtype z is stored in (bf16 for the bf16 baseline); every other input is rounded to T.
/// `openfold_mask`: add OpenFold's literal inf·(m_ik − 1) instead (to reproduce an OpenFold
/// dump's arithmetic: in a fully masked row the −1e9 offset costs the logits their low bits).
template <class T>
void triangle_forward_state(const TriangleDims& d, const TensorMap& in, DType z_round, bool openfold_mask,
                            TriangleForwardState<T>& s) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t N = d.N, H = d.H, c = d.c, c_z = d.c_z, Hc = d.H * d.c;
  auto mat = [&](const char* name, int64_t rows, int64_t cols) {
    return triangle_matrix<T>(require(in, name, "triangle reference"), rows, cols, tr);
  };
  const Matrix<T> z = triangle_pairs<T>(d, require(in, "z", "triangle reference"), c_z, z_round);
  s.mask = triangle_pairs<T>(d, require(in, "mask", "triangle reference"), 1, tr);
  s.mmax.resize(N, 1);
  for (int64_t i = 0; i < N; ++i) s.mmax(i, 0) = openfold_mask ? T(1) : s.mask.block(i * N, 0, N, 1).maxCoeff();

  s.x = layer_norm_rows<T>(z, mat("layer_norm.weight", 1, c_z), mat("layer_norm.bias", 1, c_z), s.n, s.rstd);
  // Projections (OpenFold Attention: q /= √c after the linear; gate sigmoid(linear_g)).
  s.q = (s.x * mat("mha.linear_q.weight", Hc, c_z).transpose()) / std::sqrt(T(c));
  s.k = s.x * mat("mha.linear_k.weight", Hc, c_z).transpose();
  s.v = s.x * mat("mha.linear_v.weight", Hc, c_z).transpose();
  s.g = s.x * mat("mha.linear_g.weight", Hc, c_z).transpose();
  s.g.rowwise() += mat("mha.linear_g.bias", 1, Hc).row(0);
  s.g = (T(1) / (T(1) + (-s.g.array()).exp())).matrix();
  s.b = s.x * mat("linear.weight", H, c_z).transpose();  // [N·N, H]: b(j·N + k, h)

  s.o.resize(N * N, Hc);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < H; ++h)
      s.o.block(i * N, h * c, N, c) = triangle_probs<T>(d, s, i, h) * s.v.block(i * N, h * c, N, c);
  s.gated = (s.o.array() * s.g.array()).matrix();
}

/// A problem-order [N·N, cols] matrix back in z's layout (a transposition for the ending node).
template <class T>
Matrix<T> triangle_unpairs(const TriangleDims& d, const Matrix<T>& p) {
  Matrix<T> m(p.rows(), p.cols());
  for (int64_t a = 0; a < d.N; ++a)
    for (int64_t b = 0; b < d.N; ++b) m.row(triangle_src(d, a, b)) = p.row(a * d.N + b);
  return m;
}

/// The forward's output [N·N, c_z] in z's layout (row a·N + b = pair (a, b) of z).
template <class T>
Matrix<T> triangle_forward_reference(const TriangleDims& d, const TensorMap& in, DType z_round,
                                     bool openfold_mask = false) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  TriangleForwardState<T> s;
  triangle_forward_state<T>(d, in, z_round, openfold_mask, s);
  Matrix<T> out = s.gated * triangle_matrix<T>(require(in, "mha.linear_o.weight", "triangle reference"), d.c_z,
                                               d.H * d.c, tr)
                                .transpose();
  out.rowwise() += triangle_matrix<T>(require(in, "mha.linear_o.bias", "triangle reference"), 1, d.c_z, tr).row(0);
  return triangle_unpairs<T>(d, out);
}

/// Names of the weights and biases (the differentiable tensors besides z; the mask is not).
inline std::vector<std::string> triangle_weight_names() {
  return {"layer_norm.weight",   "layer_norm.bias",     "linear.weight",       "mha.linear_q.weight",
          "mha.linear_k.weight", "mha.linear_v.weight", "mha.linear_g.weight", "mha.linear_g.bias",
          "mha.linear_o.weight", "mha.linear_o.bias"};
}

/// Gradients of Σ doutput ⊙ out by name ("z" and every weight name), each [rows, cols] in T
/// (z's gradient [N·N, c_z] in z's layout). Written by hand from the forward's stages, in reverse:
///   dW_o = doutᵀ·gated, db_o = Σ dout, dgated = dout·W_o;  do = dgated ⊙ g, dg' = dgated ⊙ o ⊙ g(1 − g)
///   per row i, head h (P the probabilities, D_j = Σ_k P_jk dP_jk = do_j · o_j):
///     dP = do·vᵀ, dS = P ⊙ (dP − D);  dq = dS·k/√c, dk = dSᵀ·q/√c, dv = Pᵀ·do;  db^h_jk += dS_jk
///     (q, k the projections before the 1/√c scale)
///   (the pair bias is shared by every row i, so its gradient sums over them);
///   dx = Σ_p dy_p·W_p over q, k, v, g', b;  dW_p = dy_pᵀ·x;  the layer norm's backward gives dz.
template <class T>
std::vector<std::pair<std::string, Matrix<T>>> triangle_backward_reference(const TriangleDims& d, const TensorMap& in,
                                                                           DType z_round) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t N = d.N, H = d.H, c = d.c, c_z = d.c_z, Hc = d.H * d.c;
  auto mat = [&](const char* name, int64_t rows, int64_t cols) {
    return triangle_matrix<T>(require(in, name, "triangle reference"), rows, cols, tr);
  };
  TriangleForwardState<T> s;
  triangle_forward_state<T>(d, in, z_round, false, s);
  const Matrix<T> dout = triangle_pairs<T>(d, require(in, "doutput", "triangle reference"), c_z, z_round);

  const Matrix<T> Wo = mat("mha.linear_o.weight", c_z, Hc);
  const Matrix<T> dWo = dout.transpose() * s.gated, dbo = dout.colwise().sum();
  const Matrix<T> dgated = dout * Wo;
  const Matrix<T> dov = (dgated.array() * s.g.array()).matrix();
  const Matrix<T> dgp = (dgated.array() * s.o.array() * s.g.array() * (T(1) - s.g.array())).matrix();

  Matrix<T> dq = Matrix<T>::Zero(N * N, Hc), dk = dq, dv = dq, db = Matrix<T>::Zero(N * N, H);
  const T inv_sqrt_c = T(1) / std::sqrt(T(c));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const Matrix<T> P = triangle_probs<T>(d, s, i, h);
      const Matrix<T> doh = dov.block(i * N, h * c, N, c);
      const Matrix<T> dP = doh * s.v.block(i * N, h * c, N, c).transpose();
      Matrix<T> dS(N, N);
      for (int64_t j = 0; j < N; ++j) {
        const T D = doh.row(j).dot(s.o.block(i * N + j, h * c, 1, c).row(0));
        dS.row(j) = (P.row(j).array() * (dP.row(j).array() - D)).matrix();
      }
      dq.block(i * N, h * c, N, c) = dS * s.k.block(i * N, h * c, N, c) * inv_sqrt_c;
      dk.block(i * N, h * c, N, c) = dS.transpose() * s.q.block(i * N, h * c, N, c);  // q holds q/√c
      dv.block(i * N, h * c, N, c) = P.transpose() * doh;
      for (int64_t j = 0; j < N; ++j)
        for (int64_t kk = 0; kk < N; ++kk) db(j * N + kk, h) += dS(j, kk);
    }

  const Matrix<T> Wq = mat("mha.linear_q.weight", Hc, c_z), Wk = mat("mha.linear_k.weight", Hc, c_z);
  const Matrix<T> Wv = mat("mha.linear_v.weight", Hc, c_z), Wg = mat("mha.linear_g.weight", Hc, c_z);
  const Matrix<T> Wb = mat("linear.weight", H, c_z);
  const Matrix<T> dx = dq * Wq + dk * Wk + dv * Wv + dgp * Wg + db * Wb;
  Matrix<T> dln_w, dln_b;
  const Matrix<T> dz = layer_norm_rows_backward<T>(dx, s.n, s.rstd, mat("layer_norm.weight", 1, c_z), dln_w, dln_b);

  return {{"z", triangle_unpairs<T>(d, dz)},
          {"layer_norm.weight", dln_w},
          {"layer_norm.bias", dln_b},
          {"linear.weight", db.transpose() * s.x},
          {"mha.linear_q.weight", dq.transpose() * s.x},
          {"mha.linear_k.weight", dk.transpose() * s.x},
          {"mha.linear_v.weight", dv.transpose() * s.x},
          {"mha.linear_g.weight", dgp.transpose() * s.x},
          {"mha.linear_g.bias", dgp.colwise().sum()},
          {"mha.linear_o.weight", dWo},
          {"mha.linear_o.bias", dbo}};
}

/// Bytes the reference allocates beyond its inputs, in an arithmetic type of `elem` bytes:
/// per pair the transposed copy of z, x, q, k, v, g, o, two output buffers, the pair bias and
/// the mask; one head's logits [N, N] at a time plus the per-head blocks.
inline double triangle_reference_scratch_bytes(const TriangleDims& d, double elem) {
  const double NN = double(d.N) * double(d.N);
  const double per_pair = 5.0 * double(d.c_z) + 5.0 * double(d.H * d.c) + double(d.H) + 3.0;
  return elem * (NN * per_pair + 2.0 * NN + 4.0 * double(d.N) * double(d.c));
}

}  // namespace attnbench::ref
