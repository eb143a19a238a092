// The tiny GPT's layers (DESIGN §5 "Tiny GPT"), forward and hand-written
// backward, on raw row-major pointers: linear (no bias), LayerNorm (gain, no
// bias), ReLU, the block options' gate, SwiGLU, LayerScale and value mix,
// embedding, softmax cross-entropy and Adam. Templated on the
// arithmetic type (float for training, double for the f64 oracle in the
// tests); both are instantiated in impls/cpu/gpt_layers.cpp.
//
// Determinism: every reduction runs in a fixed order that depends only on the
// shapes and `threads` (no atomics, no dynamic scheduling), so the same inputs
// and thread count give bit-identical outputs.
#pragma once

#include <cstdint>

namespace attnbench::gpt {

/// y (N, out) = x (N, in) · Wᵀ, W (out, in) in PyTorch's layout. GEMM: f32 on
/// impls/cpu/gemm.hpp, f64 on Eigen's kernel per thread on a fixed row partition of x.
template <class Real>
void linear_forward(Real* y, const Real* x, const Real* W, int64_t N, int64_t in, int64_t out, int threads);

/// dx (N, in) = dy · W (overwritten, or added when accumulate_dx; null skips
/// it) and dW (out, in) = dyᵀ · x (overwritten).
template <class Real>
void linear_backward(Real* dx, Real* dW, const Real* dy, const Real* x, const Real* W, int64_t N, int64_t in,
                     int64_t out, bool accumulate_dx, int threads);

/// y = (x − mean) · rstd · g per row of x (N, C); mean and rstd (N) saved for
/// the backward; rstd = 1 / sqrt(var + eps), var the biased variance.
template <class Real>
void layernorm_forward(Real* y, Real* mean, Real* rstd, const Real* x, const Real* g, int64_t N, int64_t C,
                       Real eps, int threads);

/// dx (overwritten) and dg (overwritten) from dy and the forward's x, mean, rstd.
template <class Real>
void layernorm_backward(Real* dx, Real* dg, const Real* dy, const Real* x, const Real* mean, const Real* rstd,
                        const Real* g, int64_t N, int64_t C, int threads);

/// y = max(x, 0) (y may alias x).
template <class Real>
void relu_forward(Real* y, const Real* x, int64_t n, int threads);
/// dx = dy where x > 0, else 0 (dx may alias dy).
template <class Real>
void relu_backward(Real* dx, const Real* dy, const Real* x, int64_t n, int threads);

/// The block options' element-wise layers (docs/train.md "Block options").
/// Attention output gating (AlphaFold 2): g = σ(g) in place (g holds the
/// gate's pre-activation on entry), y = g ∘ a.
template <class Real>
void sigmoid_gate_forward(Real* y, Real* g, const Real* a, int64_t n, int threads);
/// da = dy ∘ g and dpre = dy ∘ a ∘ g (1 − g), both overwritten (da may alias dy).
template <class Real>
void sigmoid_gate_backward(Real* da, Real* dpre, const Real* dy, const Real* a, const Real* g, int64_t n, int threads);

/// Gated FFN (SwiGLU): y = silu(h) ∘ u, silu(z) = z σ(z).
template <class Real>
void swiglu_forward(Real* y, const Real* h, const Real* u, int64_t n, int threads);
/// dh = dy ∘ u ∘ silu'(h) and du = dy ∘ silu(h), both overwritten (dh may alias dy).
template <class Real>
void swiglu_backward(Real* dh, Real* du, const Real* dy, const Real* h, const Real* u, int64_t n, int threads);

/// LayerScale on a residual branch: r (N, C) = x + γ ∘ f, γ (C) per channel.
template <class Real>
void scaled_residual_forward(Real* r, const Real* x, const Real* gamma, const Real* f, int64_t N, int64_t C,
                             int threads);
/// df = γ ∘ dr and dγ = Σ_n dr ∘ f (a fixed serial order over rows), both overwritten.
template <class Real>
void scaled_residual_backward(Real* df, Real* dgamma, const Real* dr, const Real* f, const Real* gamma, int64_t N,
                              int64_t C, int threads);

/// Value residual learning (ResFormer): rows of N tokens, H heads of dh
/// channels side by side; per token and head, m = σ(z[n·H + h]) and
/// v = m · vl + (1 − m) · v1 (vl this layer's values, v1 the first layer's).
template <class Real>
void value_mix_forward(Real* v, const Real* vl, const Real* v1, const Real* z, int64_t N, int64_t H, int64_t dh,
                       int threads);
/// dvl = m · dv (overwritten; may alias dv), dv1 += (1 − m) · dv, and
/// dz = m (1 − m) · Σ over the head's channels of dv ∘ (vl − v1) (overwritten).
template <class Real>
void value_mix_backward(Real* dvl, Real* dv1, Real* dz, const Real* dv, const Real* vl, const Real* v1, const Real* z,
                        int64_t N, int64_t H, int64_t dh, int threads);

/// y (N, C) = rows tokens[n] of wte (V, C).
template <class Real>
void embedding_forward(Real* y, const int32_t* tokens, const Real* wte, int64_t N, int64_t C, int threads);
/// dwte (V, C) (overwritten) = Σ over rows n with tokens[n] = v of dy[n].
template <class Real>
void embedding_backward(Real* dwte, const Real* dy, const int32_t* tokens, int64_t N, int64_t V, int64_t C);

struct CrossEntropyStats {
  double loss_sum = 0;  // Σ over counted rows of −log softmax(logits)[target]
  int64_t count = 0;    // rows with a target ≥ 0
  int64_t correct = 0;  // of those, rows whose argmax (first maximum) is the target
};

/// Softmax cross-entropy over rows of logits (N, V); targets < 0 are not
/// counted (no loss, zero gradient). When dlogits is set it receives
/// (softmax − onehot) · grad_scale per counted row, 0 elsewhere (must not alias
/// logits). row_loss (N) is scratch.
template <class Real>
CrossEntropyStats cross_entropy(Real* dlogits, Real* row_loss, const Real* logits, const int32_t* targets,
                                int64_t N, int64_t V, Real grad_scale, int threads);

struct AdamParams {
  double lr = 1e-4, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int64_t step = 1;  // 1-based, for the bias corrections
};

/// PyTorch's Adam (no weight decay): m = β1 m + (1 − β1) g, v = β2 v + (1 − β2) g²,
/// p −= lr · m̂ / (sqrt(v̂) + eps).
template <class Real>
void adam_update(Real* p, const Real* g, Real* m, Real* v, int64_t n, const AdamParams& a, int threads);

}  // namespace attnbench::gpt
