// Invariant Point Attention (AlphaFold2 Alg. 22, OpenFold `InvariantPointAttention`,
// monomer) — the plain Eigen reference.
//
//   s [N, c_s], z [N, N, c_z], frames T_i = (R_i [3,3], t_i [3]), mask m [N]
//   q, k, v  [N, H, c]        (linear_q, linear_kv split per head: first c = k, next c = v)
//   q_p [N, H, P, 3], k_p [N, H, P, 3], v_p [N, H, P_v, 3]   in the global frame: T_i ∘ local
//   b [N, N, H] = linear_b(z)
//   a_ij^h = softmax_j( sqrt(1/(3c)) q_i·k_j + sqrt(1/3) b_ij^h
//                       − ½ γ_h Σ_p ‖q_ip − k_jp‖² + inf · m_i (m_j − 1) ),
//   γ_h = softplus(w_h) · sqrt(1 / (3 · P · 9/2)),  inf = 1e5
//   o_i = Σ_j a_ij v_j,  o_pt_i = T_i⁻¹(Σ_j a_ij v_jp),  ‖o_pt‖ = sqrt(|o_pt|² + 1e-8),
//   o_pair_i = Σ_j a_ij z_ij,
//   out = linear_out(concat[o, o_pt.x, o_pt.y, o_pt.z, ‖o_pt‖, o_pair])   [N, c_s]
//
// Mask: OpenFold adds inf · (m_i m_j − 1). We add inf · m_i (m_j − 1), which differs
// by the constant inf · (m_i − 1) along each softmax row, so the softmax is the same
// function; it keeps a fully masked residue's row free of the −1e5 offset (OpenFold's
// output for such a row is the unmasked softmax, and so is ours), and avoids losing
// the logits' low bits to the 1e5 offset in f32.
//
// One templated code path gives the f64 oracle (T = double), the f32 baseline
// (T = float) and the bf16 baseline (T = float with z rounded to bf16: for IPA, "bf16"
// means the pair representation z is stored in bf16, everything else is f32 — z is
// the only O(N²) input). Everything is materialized: logits [H, N, N], the pair bias
// [N, N, H], the squared point distances [N, N, H, P] and a converted copy of z.
// Weights are in PyTorch's [out, in] layout under OpenFold's state_dict names.
// Frames are rounded to f32 in every mode, as OpenFold's Rigid does (verified: with
// that rounding the f64 oracle reproduces OpenFold's own f64 output to 1e-15).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Dense>

#include "harness/dtype.hpp"
#include "harness/errors.hpp"
#include "harness/rng.hpp"
#include "harness/tensor.hpp"
#include "reference/common.hpp"

namespace attnbench::ref {

struct IpaDims {
  int64_t N = 0, c_s = 0, c_z = 0, c = 0, H = 0, P = 0, Pv = 0;
  /// Width of the concatenation fed to linear_out: H·(c + 4·P_v + c_z).
  int64_t concat_dim() const { return H * (c + 4 * Pv + c_z); }
};

inline constexpr double kIpaInf = 1e5;
inline constexpr double kIpaEps = 1e-8;
/// OpenFold's head_weights initial value: softplus⁻¹(1).
inline constexpr double kIpaHeadWeightInit = 0.541324854612918;

inline double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }

/// Scale of the point term per head: softplus(w_h) · sqrt(1 / (3 · P · 9/2)).
inline double ipa_point_weight(double w, int64_t P) {
  return softplus(w) * std::sqrt(1.0 / (3.0 * double(P) * 9.0 / 2.0));
}

/// A rigid transform x ↦ R x + t.
struct Rigid {
  Eigen::Matrix3d R = Eigen::Matrix3d::Identity();
  Eigen::Vector3d t = Eigen::Vector3d::Zero();
};

/// Haar-uniform rotation: a normalized 4-D Gaussian quaternion (w, x, y, z).
inline Eigen::Matrix3d haar_rotation(Rng& rng) {
  double q[4], n2 = 0;
  do {
    n2 = 0;
    for (double& x : q) {
      x = rng.normal();
      n2 += x * x;
    }
  } while (n2 < 1e-12);
  const double inv = 1.0 / std::sqrt(n2);
  const double w = q[0] * inv, x = q[1] * inv, y = q[2] * inv, z = q[3] * inv;
  Eigen::Matrix3d R;
  R << 1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),  //
      2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),   //
      2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y);
  return R;
}

/// A random rigid transform: Haar rotation, translation of norm `scale` in a uniform direction.
inline Rigid random_rigid(Rng& rng, double scale) {
  Rigid g;
  g.R = haar_rotation(rng);
  Eigen::Vector3d d;
  do {
    d = Eigen::Vector3d(rng.normal(), rng.normal(), rng.normal());
  } while (d.norm() < 1e-12);
  g.t = d.normalized() * scale;
  return g;
}

/// Dims from the OpenFold weight shapes (PyTorch [out, in]) and the inputs.
inline IpaDims ipa_dims_from_tensors(const TensorMap& m) {
  const std::string where = "IPA tensors";
  auto shape = [&](const char* name, size_t rank) -> const Shape& { return require_rank(m, name, rank, where); };
  IpaDims d;
  const Shape& hw = shape("head_weights", 1);
  d.H = hw[0];
  const Shape& wq = shape("linear_q.weight", 2);
  d.c_s = wq[1];
  if (d.H <= 0 || wq[0] % d.H != 0)
    throw InputError(where + ": linear_q.weight rows " + std::to_string(wq[0]) + " not a multiple of H=" +
                     std::to_string(d.H));
  d.c = wq[0] / d.H;
  const Shape& wqp = shape("linear_q_points.linear.weight", 2);
  if (wqp[0] % (3 * d.H) != 0)
    throw InputError(where + ": linear_q_points.linear.weight rows not a multiple of 3·H");
  d.P = wqp[0] / (3 * d.H);
  const Shape& wkvp = shape("linear_kv_points.linear.weight", 2);
  if (wkvp[0] % (3 * d.H) != 0 || wkvp[0] / (3 * d.H) <= d.P)
    throw InputError(where + ": linear_kv_points.linear.weight rows must be 3·H·(P+P_v) with P_v ≥ 1");
  d.Pv = wkvp[0] / (3 * d.H) - d.P;
  const Shape& wb = shape("linear_b.weight", 2);
  d.c_z = wb[1];
  const Shape& s = shape("s", 2);
  d.N = s[0];
  struct Expect {
    const char* name;
    Shape shape;
  };
  const std::vector<Expect> expect = {
      {"linear_q.weight", {d.H * d.c, d.c_s}},
      {"linear_q.bias", {d.H * d.c}},
      {"linear_kv.weight", {2 * d.H * d.c, d.c_s}},
      {"linear_kv.bias", {2 * d.H * d.c}},
      {"linear_q_points.linear.weight", {3 * d.H * d.P, d.c_s}},
      {"linear_q_points.linear.bias", {3 * d.H * d.P}},
      {"linear_kv_points.linear.weight", {3 * d.H * (d.P + d.Pv), d.c_s}},
      {"linear_kv_points.linear.bias", {3 * d.H * (d.P + d.Pv)}},
      {"linear_b.weight", {d.H, d.c_z}},
      {"linear_b.bias", {d.H}},
      {"head_weights", {d.H}},
      {"linear_out.weight", {d.c_s, d.concat_dim()}},
      {"linear_out.bias", {d.c_s}},
      {"s", {d.N, d.c_s}},
      {"z", {d.N, d.N, d.c_z}},
      {"rotations", {d.N, 3, 3}},
      {"translations", {d.N, 3}},
      {"mask", {d.N}},
  };
  for (const Expect& e : expect) require_shape(m, e.name, e.shape, where);
  return d;
}

template <class T>
using Vec3 = Eigen::Matrix<T, 3, 1>;
template <class T>
using Mat3 = Eigen::Matrix<T, 3, 3>;

/// A tensor's elements as a [rows, cols] matrix in T, each rounded to `round` first.
template <class T>
Matrix<T> ipa_matrix(const Tensor& t, int64_t rows, int64_t cols, DType round) {
  if (t.numel() != rows * cols) throw std::logic_error("ipa_matrix: size mismatch");
  Matrix<T> m(rows, cols);
  T* out = m.data();
  const int64_t n = rows * cols;
  const bool exact = round == DType::f64 || (round == DType::f32 && t.dtype() == DType::f32);
  if (t.dtype() == DType::f64 && exact) {
    const double* p = t.data<double>();
    for (int64_t i = 0; i < n; ++i) out[i] = T(p[i]);
  } else if (t.dtype() == DType::f32 && exact) {
    const float* p = t.data<float>();
    for (int64_t i = 0; i < n; ++i) out[i] = T(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = T(round_to(round, t.get(i)));
  }
  return m;
}

/// y = x Wᵀ + b (PyTorch nn.Linear).
template <class T>
Matrix<T> ipa_linear(const Matrix<T>& x, const Matrix<T>& w, const Matrix<T>& b) {
  Matrix<T> y = x * w.transpose();
  y.rowwise() += b.row(0);
  return y;
}

/// The IPA forward pass in arithmetic type T (double: the oracle; float: the f32
/// baseline). `z_round` is the dtype z is stored in (bf16 for the bf16 baseline);
/// every other input is rounded to T. Returns out [N, c_s]. `openfold_mask`: add
/// OpenFold's literal inf · (m_i m_j − 1) instead (to reproduce an OpenFold dump's
/// arithmetic: in a masked row the −1e5 offset costs the logits their low bits).
template <class T>
Matrix<T> ipa_forward_reference(const IpaDims& d, const TensorMap& in, DType z_round, bool openfold_mask = false) {
  const DType tr = std::is_same_v<T, double> ? DType::f64 : DType::f32;
  const int64_t N = d.N, H = d.H, c = d.c, P = d.P, Pv = d.Pv, PP = P + Pv, c_z = d.c_z;
  auto mat = [&](const char* name, int64_t rows, int64_t cols) {
    return ipa_matrix<T>(require(in, name, "ipa reference"), rows, cols, tr);
  };
  auto linear = [&](const Matrix<T>& x, const std::string& name, int64_t out, int64_t inner) {
    return ipa_linear<T>(x, mat((name + ".weight").c_str(), out, inner), mat((name + ".bias").c_str(), 1, out));
  };
  const Matrix<T> s = mat("s", N, d.c_s);
  // OpenFold's Rigid casts rotations and translations to float32 ("force full
  // precision"), whatever the module's dtype: frames are f32 values here too.
  const Matrix<T> rot = ipa_matrix<T>(require(in, "rotations", "ipa reference"), N, 9, DType::f32);
  const Matrix<T> trans = ipa_matrix<T>(require(in, "translations", "ipa reference"), N, 3, DType::f32);
  const Matrix<T> mask = mat("mask", N, 1);
  const Matrix<T> hw = mat("head_weights", 1, H);

  // Projections (OpenFold: q.view(N, H, c); kv.view(N, H, 2c) split into k | v).
  const Matrix<T> q = linear(s, "linear_q", H * c, d.c_s);
  const Matrix<T> kv = linear(s, "linear_kv", 2 * H * c, d.c_s);
  // Points: linear → [x block | y block | z block], stacked to [N, H·P, 3], T_i applied.
  auto global_points = [&](const Matrix<T>& local, int64_t count) {
    std::vector<Vec3<T>> g(size_t(N * count));
    for (int64_t i = 0; i < N; ++i) {
      Mat3<T> R;
      for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) R(r, k) = rot(i, 3 * r + k);
      const Vec3<T> t(trans(i, 0), trans(i, 1), trans(i, 2));
      for (int64_t n = 0; n < count; ++n) {
        const Vec3<T> x(local(i, n), local(i, count + n), local(i, 2 * count + n));
        g[size_t(i * count + n)] = R * x + t;
      }
    }
    return g;
  };
  const auto q_pts = global_points(linear(s, "linear_q_points.linear", 3 * H * P, d.c_s), H * P);        // [N, H, P]
  const auto kv_pts = global_points(linear(s, "linear_kv_points.linear", 3 * H * PP, d.c_s), H * PP);  // [N, H, P+P_v]

  // Pair bias b = linear_b(z): [N·N, H].
  const Matrix<T> z = ipa_matrix<T>(require(in, "z", "ipa reference"), N * N, c_z, z_round);
  const Matrix<T> b = linear(z, "linear_b", H, c_z);

  // Squared point distances Σ_p ‖q_ip − k_jp‖², materialized [N, N, H, P] like OpenFold's pt_att.
  std::vector<T> d2(size_t(N * N * H * P));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t p = 0; p < P; ++p)
          d2[size_t(((i * N + j) * H + h) * P + p)] =
              (q_pts[size_t((i * H + h) * P + p)] - kv_pts[size_t((j * H + h) * PP + p)]).squaredNorm();

  const T scale_qk = T(std::sqrt(1.0 / (3.0 * double(c))));
  const T scale_b = T(std::sqrt(1.0 / 3.0));
  const int64_t F = d.concat_dim();
  Matrix<T> feat = Matrix<T>::Zero(N, F);
  const int64_t off_pt = H * c, off_norm = H * (c + 3 * Pv), off_pair = H * (c + 4 * Pv);
  Matrix<T> o_pt_global = Matrix<T>::Zero(N, H * Pv * 3);
  for (int64_t h = 0; h < H; ++h) {
    const T gamma = T(ipa_point_weight(double(hw(0, h)), P));
    Matrix<T> qh(N, c), kh(N, c), vh(N, c);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < c; ++k) {
        qh(i, k) = q(i, h * c + k);
        kh(i, k) = kv(i, h * 2 * c + k);
        vh(i, k) = kv(i, h * 2 * c + c + k);
      }
    // Logits [N, N] and the row-wise softmax.
    Matrix<T> a = scale_qk * (qh * kh.transpose());
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        T pt = 0;
        for (int64_t p = 0; p < P; ++p) pt += d2[size_t(((i * N + j) * H + h) * P + p)];
        if (openfold_mask) {
          // OpenFold's order: ((q·k + b) + pt_att) + mask. In a masked query row the −1e5
          // offset rounds the sum to its ulp (1.5e-11), so the order of the additions shows.
          a(i, j) = ((a(i, j) + scale_b * b(i * N + j, h)) + (-T(0.5) * gamma * pt)) +
                    T(kIpaInf) * (mask(i, 0) * mask(j, 0) - T(1));
        } else {
          a(i, j) += scale_b * b(i * N + j, h) - T(0.5) * gamma * pt + T(kIpaInf) * mask(i, 0) * (mask(j, 0) - T(1));
        }
      }
    for (int64_t i = 0; i < N; ++i) {
      const T mx = a.row(i).maxCoeff();
      a.row(i) = (a.row(i).array() - mx).exp().matrix();
      a.row(i) /= a.row(i).sum();
    }
    // Scalar output and the point values' weighted sum in the global frame.
    feat.block(0, h * c, N, c) = a * vh;
    for (int axis = 0; axis < 3; ++axis) {
      Matrix<T> vp(N, Pv);
      for (int64_t j = 0; j < N; ++j)
        for (int64_t p = 0; p < Pv; ++p) vp(j, p) = kv_pts[size_t((j * H + h) * PP + P + p)](axis);
      const Matrix<T> o = a * vp;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t p = 0; p < Pv; ++p) o_pt_global(i, (h * Pv + p) * 3 + axis) = o(i, p);
    }
    // Pair output Σ_j a_ij z_ij, one row of z at a time.
    for (int64_t i = 0; i < N; ++i) {
      Eigen::Map<const Matrix<T>> zi(z.data() + i * N * c_z, N, c_z);
      feat.block(i, off_pair + h * c_z, 1, c_z) = a.row(i) * zi;
    }
  }
  // Points back to the local frame of i: R_iᵀ (x − t_i); x, y, z blocks, then norms.
  for (int64_t i = 0; i < N; ++i) {
    Mat3<T> R;
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 3; ++k) R(r, k) = rot(i, 3 * r + k);
    const Vec3<T> t(trans(i, 0), trans(i, 1), trans(i, 2));
    for (int64_t hp = 0; hp < H * Pv; ++hp) {
      const Vec3<T> g(o_pt_global(i, hp * 3), o_pt_global(i, hp * 3 + 1), o_pt_global(i, hp * 3 + 2));
      const Vec3<T> l = R.transpose() * (g - t);
      for (int axis = 0; axis < 3; ++axis) feat(i, off_pt + axis * H * Pv + hp) = l(axis);
      feat(i, off_norm + hp) = std::sqrt(l.squaredNorm() + T(kIpaEps));
    }
  }
  return linear(feat, "linear_out", d.c_s, F);
}

/// Bytes the reference allocates beyond its inputs, in arithmetic type of `elem` bytes:
/// z copy and pair bias, logits and probabilities (one head at a time), squared
/// point distances, projections and the concatenation.
inline double ipa_reference_scratch_bytes(const IpaDims& d, double elem) {
  const double NN = double(d.N) * double(d.N);
  const double pairs = NN * (double(d.c_z) + double(d.H) + double(d.H * d.P) + 2.0);
  const double rows = double(d.N) * (double(d.c_s) + 3.0 * double(d.H * d.c) + 6.0 * double(d.H * (d.P + d.Pv)) +
                                     2.0 * double(d.concat_dim()) + 3.0 * double(d.H * d.Pv));
  return elem * (pairs + rows) + 24.0 * double(d.N * d.H * (2 * d.P + d.Pv));
}

}  // namespace attnbench::ref
