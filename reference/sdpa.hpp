// Scaled-dot-product attention, the plain reference (DESIGN §5 "SDPA").
//
//   q: (B, H, Nq, D)   k: (B, Hkv, Nkv, D)   v: (B, Hkv, Nkv, Dv)   kv_len: (B,) int32
//   head h reads kv head h / (H / Hkv)                              (GQA)
//   q, k ← RoPE(q, k)   query i at position i + Nkv − Nq, key j at j  (optional)
//   s_ij = scale · q_i · k_j,   scale = 1 / sqrt(D)
//   allowed(i, j) = j < kv_len[b]  and (not causal or j ≤ i + Nkv − Nq)
//   p_ij = softmax_j(s_ij over allowed j)   (0 when row i has no allowed key)
//   o_i  = Σ_j p_ij v_j                      o: (B, H, Nq, Dv)  weights p: (B, H, Nq, Nkv)
// Dv, the values' head dimension, is D unless set otherwise (MLA-style heads; the
// fused selective attention's values, docs/selective.md).
//
// RoPE rotates dims (a, b) by pos · θ_i, θ_i = 10000^(−2i/D), i < D/2:
// a' = a cos − b sin, b' = b cos + a sin, with (a, b) = (i, i + D/2) for the
// half-split convention (ESM, the selective-attention seed) or (2i, 2i + 1) for
// the interleaved one.
//
// The same code is the f64 oracle (Scalar = double), the f32 baseline and the
// bf16/f16 "naive in T" baseline (Scalar = float, values rounded to T after
// RoPE, after q·kᵀ·scale, after softmax and after p·v, like an eager PyTorch
// module in T). It materializes one (Nq, Nkv) score matrix per head: that is
// the naive cost the fused kernels avoid.
//
// Backward (sdpa_backward_reference), the gradients of Σ ⟨dO, O⟩, per head:
//   dP = dO·Vᵀ   Δ_i = Σ_d dO_id O_id   dS = P ∘ (dP − Δ)   (dS = 0 where p = 0)
//   dQ' = dS·K'·scale   dK' = dSᵀ·Q'·scale   dV = Pᵀ·dO       (' : after RoPE)
//   dQ = RoPEᵀ(dQ'), dK = RoPEᵀ(dK')   (the rotation's transpose: by −angle)
//   GQA: dK, dV of a kv head are summed over the query heads that read it.
// A row without keys has P = 0, so its dQ is 0 and it adds nothing to dK, dV.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "reference/common.hpp"

namespace attnbench::ref {

enum class RopeMode { none, half, interleaved };

inline RopeMode parse_rope_mode(const std::string& s) {
  if (s == "none") return RopeMode::none;
  if (s == "half") return RopeMode::half;
  if (s == "interleaved") return RopeMode::interleaved;
  throw std::invalid_argument("rope: expected \"none\", \"half\" or \"interleaved\", got \"" + s + "\"");
}

struct SdpaDims {
  int64_t B = 1, H = 1, Hkv = 1, Nq = 1, Nkv = 1, D = 1;
  bool causal = false;
  RopeMode rope = RopeMode::none;
  int64_t Dv = 0;  // head dimension of v, o and dout; 0 = D
  int64_t dv() const { return Dv > 0 ? Dv : D; }
};

/// Key j is visible to query i (causal aligned bottom-right, keys ≥ kv_len padded).
inline bool sdpa_allowed(const SdpaDims& d, int64_t i, int64_t j, int64_t kv_len) {
  if (j >= kv_len) return false;
  return !d.causal || j <= i + (d.Nkv - d.Nq);
}

/// Rotates each row r of x (rows, D) by position pos0 + r (in place); `inverse`
/// rotates by the negative angles (the transpose, which carries gradients back).
template <class Scalar>
void rope_rotate_rows(Matrix<Scalar>& x, int64_t pos0, RopeMode mode, bool inverse = false) {
  if (mode == RopeMode::none) return;
  const int64_t D = x.cols(), half = D / 2;
  for (int64_t r = 0; r < x.rows(); ++r) {
    const Scalar pos = Scalar(pos0 + r);
    for (int64_t i = 0; i < half; ++i) {
      const Scalar theta = std::pow(Scalar(10000), -Scalar(2 * i) / Scalar(D));
      const Scalar c = std::cos(pos * theta), s = (inverse ? -1 : 1) * std::sin(pos * theta);
      const int64_t ia = mode == RopeMode::half ? i : 2 * i;
      const int64_t ib = mode == RopeMode::half ? i + half : 2 * i + 1;
      const Scalar a = x(r, ia), b = x(r, ib);
      x(r, ia) = a * c - b * s;
      x(r, ib) = b * c + a * s;
    }
  }
}

/// The forward pass. Inputs and outputs are dense row-major doubles (the values
/// of the tensors in whatever dtype they were stored); `round` is the dtype whose
/// stage-boundary rounding the computation imitates (f64/f32: none).
/// `weights` may be null.
template <class Scalar>
void sdpa_forward_reference(const SdpaDims& d, DType round,
                            double* o,              // (B, H, Nq, Dv)
                            double* weights,        // (B, H, Nq, Nkv) or null
                            const double* q,        // (B, H, Nq, D)
                            const double* k,        // (B, Hkv, Nkv, D)
                            const double* v,        // (B, Hkv, Nkv, Dv)
                            const int32_t* kv_len)  // (B,)
{
  const int64_t group = d.H / d.Hkv, Dv = d.dv();
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(d.D));
  const Scalar neg_inf = -std::numeric_limits<Scalar>::infinity();
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t hk = h / group;
      const double* qp = q + (b * d.H + h) * d.Nq * d.D;
      const double* kp = k + (b * d.Hkv + hk) * d.Nkv * d.D;
      const double* vp = v + (b * d.Hkv + hk) * d.Nkv * Dv;
      Matrix<Scalar> Q = Eigen::Map<const Matrix<double>>(qp, d.Nq, d.D).cast<Scalar>();
      Matrix<Scalar> K = Eigen::Map<const Matrix<double>>(kp, d.Nkv, d.D).cast<Scalar>();
      Matrix<Scalar> V = Eigen::Map<const Matrix<double>>(vp, d.Nkv, Dv).cast<Scalar>();
      rope_rotate_rows(Q, d.Nkv - d.Nq, d.rope);
      rope_rotate_rows(K, 0, d.rope);
      round_inplace(Q, round);
      round_inplace(K, round);

      // S = Q Kᵀ · scale, the materialized (Nq, Nkv) score matrix.
      Matrix<Scalar> S = (Q * K.transpose()) * scale;
      round_inplace(S, round);

      // Masked row softmax; a row without any allowed key becomes all zeros.
      for (int64_t i = 0; i < d.Nq; ++i)
        for (int64_t j = 0; j < d.Nkv; ++j)
          if (!sdpa_allowed(d, i, j, kv_len[b])) S(i, j) = neg_inf;
      masked_softmax_rows(S);
      round_inplace(S, round);

      Matrix<Scalar> O = S * V;
      round_inplace(O, round);

      double* op = o + (b * d.H + h) * d.Nq * Dv;
      Eigen::Map<Matrix<double>>(op, d.Nq, Dv) = O.template cast<double>();
      if (weights) {
        double* wp = weights + (b * d.H + h) * d.Nq * d.Nkv;
        Eigen::Map<Matrix<double>>(wp, d.Nq, d.Nkv) = S.template cast<double>();
      }
    }
  }
}

/// The backward pass of sdpa_forward_reference: dq, dk, dv (dense, overwritten)
/// from the inputs and the cotangent dout (B, H, Nq, Dv), with the same stage
/// rounding (`round`) as the forward: after RoPE, the scores, the softmax and
/// O as there, then after dP, dS, each gradient product and the rotation back.
template <class Scalar>
void sdpa_backward_reference(const SdpaDims& d, DType round,
                             double* dq,             // (B, H, Nq, D)
                             double* dk,             // (B, Hkv, Nkv, D)
                             double* dv,             // (B, Hkv, Nkv, Dv)
                             const double* q,        // (B, H, Nq, D)
                             const double* k,        // (B, Hkv, Nkv, D)
                             const double* v,        // (B, Hkv, Nkv, Dv)
                             const int32_t* kv_len,  // (B,)
                             const double* dout)     // (B, H, Nq, Dv)
{
  const int64_t group = d.H / d.Hkv, Dv = d.dv();
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(d.D));
  const Scalar neg_inf = -std::numeric_limits<Scalar>::infinity();
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t hk = 0; hk < d.Hkv; ++hk) {
      const double* kp = k + (b * d.Hkv + hk) * d.Nkv * d.D;
      const double* vp = v + (b * d.Hkv + hk) * d.Nkv * Dv;
      Matrix<Scalar> K = Eigen::Map<const Matrix<double>>(kp, d.Nkv, d.D).cast<Scalar>();
      const Matrix<Scalar> V = Eigen::Map<const Matrix<double>>(vp, d.Nkv, Dv).cast<Scalar>();
      rope_rotate_rows(K, 0, d.rope);
      round_inplace(K, round);
      Matrix<Scalar> dK = Matrix<Scalar>::Zero(d.Nkv, d.D), dV = Matrix<Scalar>::Zero(d.Nkv, Dv);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const double* qp = q + (b * d.H + h) * d.Nq * d.D;
        const double* gp = dout + (b * d.H + h) * d.Nq * Dv;
        Matrix<Scalar> Q = Eigen::Map<const Matrix<double>>(qp, d.Nq, d.D).cast<Scalar>();
        const Matrix<Scalar> dO = Eigen::Map<const Matrix<double>>(gp, d.Nq, Dv).cast<Scalar>();
        rope_rotate_rows(Q, d.Nkv - d.Nq, d.rope);
        round_inplace(Q, round);

        // The forward, as sdpa_forward_reference computes it.
        Matrix<Scalar> P = (Q * K.transpose()) * scale;
        round_inplace(P, round);
        for (int64_t i = 0; i < d.Nq; ++i)
          for (int64_t j = 0; j < d.Nkv; ++j)
            if (!sdpa_allowed(d, i, j, kv_len[b])) P(i, j) = neg_inf;
        masked_softmax_rows(P);
        round_inplace(P, round);
        Matrix<Scalar> O = P * V;
        round_inplace(O, round);

        Matrix<Scalar> dP = dO * V.transpose();
        round_inplace(dP, round);
        const Vector<Scalar> delta = (dO.array() * O.array()).rowwise().sum();
        Matrix<Scalar> dS = (P.array() * (dP.array().colwise() - delta.array())).matrix();
        round_inplace(dS, round);
        Matrix<Scalar> dQ = (dS * K) * scale;
        round_inplace(dQ, round);
        Matrix<Scalar> dKh = (dS.transpose() * Q) * scale;
        round_inplace(dKh, round);
        Matrix<Scalar> dVh = P.transpose() * dO;
        round_inplace(dVh, round);
        dK += dKh;
        dV += dVh;

        rope_rotate_rows(dQ, d.Nkv - d.Nq, d.rope, true);
        round_inplace(dQ, round);
        Eigen::Map<Matrix<double>>(dq + (b * d.H + h) * d.Nq * d.D, d.Nq, d.D) = dQ.template cast<double>();
      }
      rope_rotate_rows(dK, 0, d.rope, true);
      round_inplace(dK, round);
      round_inplace(dV, round);
      Eigen::Map<Matrix<double>>(dk + (b * d.Hkv + hk) * d.Nkv * d.D, d.Nkv, d.D) = dK.template cast<double>();
      Eigen::Map<Matrix<double>>(dv + (b * d.Hkv + hk) * d.Nkv * Dv, d.Nkv, Dv) = dV.template cast<double>();
    }
  }
}

}  // namespace attnbench::ref
