// Triangle attention (AlphaFold2 Alg. 13/14, OpenFold `TriangleAttention`) — the plain
// Eigen reference.
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
inline constexpr double kTriangleLnEps = 1e-5;

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

/// The triangle attention forward in arithmetic type T (double: the oracle; float: the f32
/// baseline). `z_round` is the dtype z is stored in (bf16 for the bf16 baseline); every other
/// input is rounded to T. Returns out [N·N, c_z] (row i·N + j = pair (i, j)).
/// `openfold_mask`: add OpenFold's literal inf·(m_ik − 1) instead (to reproduce an
/// OpenFold dump's arithmetic: in a fully masked row the −1e9 offset costs the
/// logits their low bits).
template <class T>
Matrix<T> triangle_forward_reference(const TriangleDims& d, const TensorMap& in, DType z_round,
                                     bool openfold_mask = false) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t N = d.N, H = d.H, c = d.c, c_z = d.c_z, Hc = d.H * d.c;
  auto mat = [&](const char* name, int64_t rows, int64_t cols) {
    return triangle_matrix<T>(require(in, name, "triangle reference"), rows, cols, tr);
  };
  // Pair (a, b) of the problem is pair (a, b) of z (starting) or (b, a) (ending: zᵀ).
  auto src = [&](int64_t a, int64_t b) { return d.starting ? a * N + b : b * N + a; };
  const Matrix<T> z_in = triangle_matrix<T>(require(in, "z", "triangle reference"), N * N, c_z, z_round);
  const Matrix<T> m_in = mat("mask", N * N, 1);
  Matrix<T> z(N * N, c_z), mask(N, N);
  for (int64_t a = 0; a < N; ++a)
    for (int64_t b = 0; b < N; ++b) {
      z.row(a * N + b) = z_in.row(src(a, b));
      mask(a, b) = m_in(src(a, b), 0);
    }

  // x = LayerNorm(z) over channels (biased variance, eps inside the square root).
  const Matrix<T> ln_w = mat("layer_norm.weight", 1, c_z), ln_b = mat("layer_norm.bias", 1, c_z);
  Matrix<T> x(N * N, c_z);
  for (int64_t r = 0; r < N * N; ++r) {
    const T mean = z.row(r).mean();
    const T var = (z.row(r).array() - mean).square().mean();
    const T inv = T(1) / std::sqrt(var + T(kTriangleLnEps));
    x.row(r) = ((z.row(r).array() - mean) * inv * ln_w.row(0).array() + ln_b.row(0).array()).matrix();
  }

  // Projections (OpenFold Attention: q /= √c after the linear; gate sigmoid(linear_g)).
  const Matrix<T> q = (x * mat("mha.linear_q.weight", Hc, c_z).transpose()) / std::sqrt(T(c));
  const Matrix<T> k = x * mat("mha.linear_k.weight", Hc, c_z).transpose();
  const Matrix<T> v = x * mat("mha.linear_v.weight", Hc, c_z).transpose();
  Matrix<T> g = x * mat("mha.linear_g.weight", Hc, c_z).transpose();
  g.rowwise() += mat("mha.linear_g.bias", 1, Hc).row(0);
  g = (T(1) / (T(1) + (-g.array()).exp())).matrix();
  const Matrix<T> b = x * mat("linear.weight", H, c_z).transpose();  // [N·N, H]: b(j·N + k, h)

  Matrix<T> o(N * N, Hc);
  for (int64_t i = 0; i < N; ++i) {
    // Mask bias of row i: inf·(m_ik − max_k m_ik) (see the file comment).
    const T mmax = openfold_mask ? T(1) : mask.row(i).maxCoeff();
    for (int64_t h = 0; h < H; ++h) {
      // Logits [N (j), N (k)] of row i, head h: q_ij·k_ik + b_jk + mask bias.
      const Matrix<T> qh = q.block(i * N, h * c, N, c), kh = k.block(i * N, h * c, N, c);
      const Matrix<T> vh = v.block(i * N, h * c, N, c);
      Matrix<T> a = qh * kh.transpose();
      for (int64_t j = 0; j < N; ++j)
        for (int64_t kk = 0; kk < N; ++kk) a(j, kk) += b(j * N + kk, h) + T(kTriangleInf) * (mask(i, kk) - mmax);
      for (int64_t j = 0; j < N; ++j) {
        const T mx = a.row(j).maxCoeff();
        a.row(j) = (a.row(j).array() - mx).exp().matrix();
        a.row(j) /= a.row(j).sum();
      }
      o.block(i * N, h * c, N, c) = a * vh;
    }
  }
  o = (o.array() * g.array()).matrix();
  Matrix<T> out_p = o * mat("mha.linear_o.weight", c_z, Hc).transpose();
  out_p.rowwise() += mat("mha.linear_o.bias", 1, c_z).row(0);
  // Back to z's layout (a transposition for the ending node).
  Matrix<T> out(N * N, c_z);
  for (int64_t a = 0; a < N; ++a)
    for (int64_t bb = 0; bb < N; ++bb) out.row(src(a, bb)) = out_p.row(a * N + bb);
  return out;
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
