// Masked attention, the plain reference (DESIGN §5 "Mask family").
//
//   q: (B, H, Nq, D)   k, v: (B, H, Nkv, D)   mask_logits (mask attention): (B, Nq, Nkv)
//   key mask (key_mask): keys (B, Nkv), allowed(b, i, j) = keys[b, j]
//   q_i, k_j ← RoPE at positions pos_q[i], pos_k[j] (optional, half-split pairs)
//   s_ij = mod_h(q_i · k_j / sqrt(D), i, j)          the score mod (none, relative, ...)
//   p_ij = softmax_j(s_ij over j with allowed(b, i, j))    0 for a row without allowed keys
//   o_i  = Σ_j p_ij v_j                                     o: (B, H, Nq, D)
//
// allowed() is written here from the definitions, independently of the mask
// functors the kernels use (impls/mask.hpp): a dense boolean (Nq, Nkv) mask per
// batch entry, built once, then applied to a materialized score matrix per head.
// That is the naive cost the block-sparse kernels avoid.
//
// Backward (masked_backward_reference), the gradients of Σ ⟨dO, O⟩, per head:
//   dP = dO·Vᵀ   Δ_i = Σ_d dO_id O_id   dS' = P ∘ (dP − Δ)   (gradient of the modded logits)
//   dS = dS' ∘ mod'(s)   (relative, cyclic, ALiBi: 1; softcap: 1 − tanh²(s/c)); 0 where not allowed
//   dQ' = dS·K'/√D   dK' = dSᵀ·Q'/√D   dV = Pᵀ·dO   dQ, dK = RoPEᵀ(dQ', dK') at the same positions
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "reference/common.hpp"

namespace attnbench::ref {

/// The mask, by definition. Fields unused by `kind` are ignored.
struct MaskDefinition {
  std::string kind = "none";  // as the `mask` parameter of the masked variant
  int64_t Nq = 1, Nkv = 1;
  int64_t window = 0;  // w; h = w / 2 (sliding_window: w keys, 0 ≤ i − j < w)
  bool cyclic = false, causal = false, attend_all = false;
  int64_t prefix = 0, registers = 0;
  std::vector<int32_t> doc;                   // document / prefix: document of each token (−1 in the prefix)
  std::vector<int32_t> node;                  // dag: node of each token
  std::vector<std::vector<int32_t>> parents;  // dag: parents of each node
  std::vector<double> logits;                 // maskattn: (B, Nq, Nkv)
  double threshold = 0.5;                     // maskattn: on sigmoid(logit)
  std::vector<uint8_t> keys;                  // key_mask: (B, Nkv) 1 = key kept
};

struct ScoreModDefinition {
  std::string kind = "none";  // none, relative, cyclic, alibi, softcap
  double softcap = 0;
  int64_t H = 1;
};

/// round(x) with ties to even (torch.round).
inline int64_t round_half_even(double x) { return int64_t(std::nearbyint(x)); }

/// Nodes each node sees: its parents, or (ancestors) the transitive closure.
inline std::vector<std::vector<bool>> dag_visibility(const std::vector<std::vector<int32_t>>& parents, bool ancestors) {
  const size_t n = parents.size();
  std::vector<std::vector<bool>> sees(n, std::vector<bool>(n, false));
  for (size_t a = 0; a < n; ++a) {
    std::vector<int32_t> stack(parents[a].begin(), parents[a].end());
    while (!stack.empty()) {
      const int32_t p = stack.back();
      stack.pop_back();
      if (sees[a][size_t(p)]) continue;
      sees[a][size_t(p)] = true;
      if (ancestors) stack.insert(stack.end(), parents[size_t(p)].begin(), parents[size_t(p)].end());
    }
  }
  return sees;
}

/// The dense mask of batch entry b: allowed[i * Nkv + j].
inline std::vector<bool> dense_mask(const MaskDefinition& m, int64_t b) {
  const int64_t Nq = m.Nq, Nkv = m.Nkv, h = m.window / 2;
  std::vector<bool> allowed(size_t(Nq * Nkv));
  std::vector<std::vector<bool>> sees;
  if (m.kind == "dag" || m.kind == "dag_ancestors") sees = dag_visibility(m.parents, m.kind == "dag_ancestors");
  for (int64_t i = 0; i < Nq; ++i)
    for (int64_t j = 0; j < Nkv; ++j) {
      const int64_t d = std::llabs(i - j);
      bool a = true;
      if (m.kind == "causal") {
        a = j <= i + Nkv - Nq;
      } else if (m.kind == "window") {
        a = d <= h;
      } else if (m.kind == "sliding_window") {
        a = j <= i && i - j < m.window;
      } else if (m.kind == "wrapped_window") {
        a = std::min(d, Nkv - d) <= h;
      } else if (m.kind == "strided" || m.kind == "strided_t") {
        // strided: query i's centre among the keys; strided_t: the transpose.
        const bool t = m.kind == "strided_t";
        const int64_t n = t ? Nq : Nkv;
        const int64_t c = t ? round_half_even(double(j) * double(Nq) / double(Nkv))
                            : round_half_even(double(i) * double(Nkv) / double(Nq));
        const int64_t x = t ? i : j;
        a = std::llabs(x - c) <= h || (m.cyclic && (std::llabs(x - c + n) <= h || std::llabs(x - c - n) <= h));
      } else if (m.kind == "document") {
        a = m.doc[size_t(i)] == m.doc[size_t(j)] && (!m.causal || j <= i);
      } else if (m.kind == "prefix") {
        a = j < m.prefix || (m.doc[size_t(i)] == m.doc[size_t(j)] && j <= i);
      } else if (m.kind == "registers") {
        a = i < m.registers || j < m.registers || d <= h;
      } else if (m.kind == "dag" || m.kind == "dag_ancestors") {
        const int32_t ni = m.node[size_t(i)], nj = m.node[size_t(j)];
        a = ni == nj ? j <= i : bool(sees[size_t(ni)][size_t(nj)]);
      } else if (m.kind == "maskattn") {
        const double x = m.logits[size_t((b * Nq + i) * Nkv + j)];
        a = 1.0 / (1.0 + std::exp(-x)) >= m.threshold;
      } else if (m.kind == "key_mask") {
        a = m.keys[size_t(b * Nkv + j)] != 0;
      }
      allowed[size_t(i * Nkv + j)] = a;
    }
  if (m.kind == "maskattn" && m.attend_all)
    for (int64_t i = 0; i < Nq; ++i) {
      bool any = false;
      for (int64_t j = 0; j < Nkv && !any; ++j) any = allowed[size_t(i * Nkv + j)];
      if (!any)
        for (int64_t j = 0; j < Nkv; ++j) allowed[size_t(i * Nkv + j)] = true;
    }
  return allowed;
}

/// The score mod of head h (of H) applied to the scaled logit s.
template <class Scalar>
Scalar score_mod(const ScoreModDefinition& mod, Scalar s, int64_t h, int64_t i, int64_t j, int64_t Nkv) {
  const int64_t d = std::llabs(i - j);
  if (mod.kind == "relative") return s - Scalar(d);
  if (mod.kind == "cyclic") return s - Scalar(std::min(d, Nkv - d));
  if (mod.kind == "alibi") return s + std::exp2(Scalar(-8) * Scalar(h + 1) / Scalar(mod.H)) * Scalar(j - i);
  if (mod.kind == "softcap") return Scalar(mod.softcap) * std::tanh(s / Scalar(mod.softcap));
  return s;
}

/// d mod(s) / ds of the score mod at the scaled logit s.
template <class Scalar>
Scalar score_mod_derivative(const ScoreModDefinition& mod, Scalar s) {
  if (mod.kind == "softcap") {
    const Scalar t = std::tanh(s / Scalar(mod.softcap));
    return Scalar(1) - t * t;
  }
  return Scalar(1);  // none, and the additive mods (relative, cyclic, ALiBi)
}

/// Rotates each row r of x (rows, D) by position pos[r], half-split pairs (i, i + D/2);
/// `inverse` rotates by the negative angles (the transpose, for gradients).
template <class Scalar>
void rope_rotate_positions(Matrix<Scalar>& x, const std::vector<int32_t>& pos, bool inverse = false) {
  const int64_t D = x.cols(), half = D / 2;
  for (int64_t r = 0; r < x.rows(); ++r)
    for (int64_t i = 0; i < half; ++i) {
      const Scalar angle = Scalar(pos[size_t(r)]) * std::pow(Scalar(10000), -Scalar(2 * i) / Scalar(D));
      const Scalar c = std::cos(angle), s = (inverse ? -1 : 1) * std::sin(angle), a = x(r, i), b = x(r, i + half);
      x(r, i) = a * c - b * s;
      x(r, i + half) = b * c + a * s;
    }
}

/// The forward pass over dense row-major doubles; `round` is the dtype whose
/// stage-boundary rounding the computation imitates (f64/f32: none). Empty
/// pos_q/pos_k: no RoPE.
template <class Scalar>
void masked_forward_reference(int64_t B, int64_t H, int64_t D, const MaskDefinition& mask,
                              const ScoreModDefinition& mod, const std::vector<int32_t>& pos_q,
                              const std::vector<int32_t>& pos_k, DType round,
                              double* o,        // (B, H, Nq, D)
                              const double* q,  // (B, H, Nq, D)
                              const double* k,  // (B, H, Nkv, D)
                              const double* v)  // (B, H, Nkv, D)
{
  const int64_t Nq = mask.Nq, Nkv = mask.Nkv;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(D));
  const Scalar neg_inf = -std::numeric_limits<Scalar>::infinity();
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<bool> allowed = dense_mask(mask, b);
    for (int64_t h = 0; h < H; ++h) {
      Matrix<Scalar> Q = Eigen::Map<const Matrix<double>>(q + (b * H + h) * Nq * D, Nq, D).cast<Scalar>();
      Matrix<Scalar> K = Eigen::Map<const Matrix<double>>(k + (b * H + h) * Nkv * D, Nkv, D).cast<Scalar>();
      Matrix<Scalar> V = Eigen::Map<const Matrix<double>>(v + (b * H + h) * Nkv * D, Nkv, D).cast<Scalar>();
      if (!pos_q.empty()) {
        rope_rotate_positions(Q, pos_q);
        rope_rotate_positions(K, pos_k);
      }
      round_inplace(Q, round);
      round_inplace(K, round);
      Matrix<Scalar> S = (Q * K.transpose()) * scale;
      round_inplace(S, round);
      for (int64_t i = 0; i < Nq; ++i)
        for (int64_t j = 0; j < Nkv; ++j)
          S(i, j) = allowed[size_t(i * Nkv + j)] ? score_mod(mod, S(i, j), h, i, j, Nkv) : neg_inf;
      masked_softmax_rows(S);
      round_inplace(S, round);
      Matrix<Scalar> O = S * V;
      round_inplace(O, round);
      Eigen::Map<Matrix<double>>(o + (b * H + h) * Nq * D, Nq, D) = O.template cast<double>();
    }
  }
}

/// The backward pass of masked_forward_reference: dq, dk, dv (dense,
/// overwritten) from the inputs and the cotangent dout (B, H, Nq, D), with the
/// forward's stage rounding (`round`) and after dP, dS, each gradient product
/// and the rotation back.
template <class Scalar>
void masked_backward_reference(int64_t B, int64_t H, int64_t D, const MaskDefinition& mask,
                               const ScoreModDefinition& mod, const std::vector<int32_t>& pos_q,
                               const std::vector<int32_t>& pos_k, DType round,
                               double* dq,          // (B, H, Nq, D)
                               double* dk,          // (B, H, Nkv, D)
                               double* dv,          // (B, H, Nkv, D)
                               const double* q,     // (B, H, Nq, D)
                               const double* k,     // (B, H, Nkv, D)
                               const double* v,     // (B, H, Nkv, D)
                               const double* dout)  // (B, H, Nq, D)
{
  const int64_t Nq = mask.Nq, Nkv = mask.Nkv;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(D));
  const Scalar neg_inf = -std::numeric_limits<Scalar>::infinity();
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<bool> allowed = dense_mask(mask, b);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t qo = (b * H + h) * Nq * D, ko = (b * H + h) * Nkv * D;
      Matrix<Scalar> Q = Eigen::Map<const Matrix<double>>(q + qo, Nq, D).cast<Scalar>();
      Matrix<Scalar> K = Eigen::Map<const Matrix<double>>(k + ko, Nkv, D).cast<Scalar>();
      const Matrix<Scalar> V = Eigen::Map<const Matrix<double>>(v + ko, Nkv, D).cast<Scalar>();
      const Matrix<Scalar> dO = Eigen::Map<const Matrix<double>>(dout + qo, Nq, D).cast<Scalar>();
      if (!pos_q.empty()) {
        rope_rotate_positions(Q, pos_q);
        rope_rotate_positions(K, pos_k);
      }
      round_inplace(Q, round);
      round_inplace(K, round);
      Matrix<Scalar> S = (Q * K.transpose()) * scale;
      round_inplace(S, round);
      Matrix<Scalar> P(Nq, Nkv);
      for (int64_t i = 0; i < Nq; ++i)
        for (int64_t j = 0; j < Nkv; ++j)
          P(i, j) = allowed[size_t(i * Nkv + j)] ? score_mod(mod, S(i, j), h, i, j, Nkv) : neg_inf;
      masked_softmax_rows(P);
      round_inplace(P, round);
      Matrix<Scalar> O = P * V;
      round_inplace(O, round);

      Matrix<Scalar> dP = dO * V.transpose();
      round_inplace(dP, round);
      const Vector<Scalar> delta = (dO.array() * O.array()).rowwise().sum();
      Matrix<Scalar> dS = (P.array() * (dP.array().colwise() - delta.array())).matrix();
      round_inplace(dS, round);
      if (mod.kind != "none") {
        for (int64_t i = 0; i < Nq; ++i)
          for (int64_t j = 0; j < Nkv; ++j)
            dS(i, j) = allowed[size_t(i * Nkv + j)] ? dS(i, j) * score_mod_derivative(mod, S(i, j)) : Scalar(0);
        round_inplace(dS, round);
      }
      Matrix<Scalar> dQ = (dS * K) * scale;
      Matrix<Scalar> dK = (dS.transpose() * Q) * scale;
      Matrix<Scalar> dV = P.transpose() * dO;
      round_inplace(dQ, round);
      round_inplace(dK, round);
      round_inplace(dV, round);
      if (!pos_q.empty()) {
        rope_rotate_positions(dQ, pos_q, true);
        rope_rotate_positions(dK, pos_k, true);
        round_inplace(dQ, round);
        round_inplace(dK, round);
      }
      Eigen::Map<Matrix<double>>(dq + qo, Nq, D) = dQ.template cast<double>();
      Eigen::Map<Matrix<double>>(dk + ko, Nkv, D) = dK.template cast<double>();
      Eigen::Map<Matrix<double>>(dv + ko, Nkv, D) = dV.template cast<double>();
    }
  }
}

}  // namespace attnbench::ref
