// The tiny character-level GPT (DESIGN §5 "Tiny GPT"): token embedding, L
// post-LN decoder blocks x = LN(x + MHA(x)); x = LN(x + FFN(x)), FFN =
// Linear(d, 4d) → ReLU → Linear(4d, d), no biases (LayerNorm has a gain only),
// RoPE optional, a final linear to the vocabulary and cross-entropy.
//
// llm.c style: the parameters, their gradients, Adam's two moments, the
// activations of one (B, T) batch and every kernel's scratch live in one
// 64-byte aligned arena allocated once; forward, backward and the update are
// hand-written calls into the kernel library (impls/cpu/gpt_layers.hpp,
// sdpa.hpp, selective.hpp). Real = float trains; Real = double is the f64
// oracle of the tests (its attention runs the Eigen references).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "impls/cpu/gpt_layers.hpp"

namespace attnbench::train {

/// Attention of every block: `standard` (causal SDPA, fused kernels),
/// `selective` (per-query keys and values, fused exact kernel),
/// `selective_materialized` (the seed's algorithm, for the speed comparison) or
/// `window` (causal sliding window of GptConfig::window keys, the block-sparse
/// masked kernel with the `sliding_window` mask).
enum class AttentionKind { standard, selective, selective_materialized, window };

AttentionKind parse_attention_kind(const std::string& s, const std::string& where);
/// Whether value residual learning applies: the kind computes one value per key from W_v x.
inline bool has_shared_values(AttentionKind k) { return k == AttentionKind::standard || k == AttentionKind::window; }
std::string attention_kind_name(AttentionKind k);
std::vector<std::string> attention_kind_names();

/// Value residual learning (ResFormer, hepattn): every block after the first
/// mixes the first block's values into its own, v = m · v_l + (1 − m) · v_1,
/// with m = σ(λ_h) one learnable logit per head (`learned`) or m = σ(x W_m)
/// per token and head (`token`, W_m (heads, d)).
enum class ValueResidual { none, learned, token };

ValueResidual parse_value_residual(const std::string& s, const std::string& where);
std::string value_residual_name(ValueResidual v);

/// The particle-physics seed's block options (docs/train.md "Block options"), each off by default.
struct BlockOptions {
  bool gate = false;  // attention output gating (AlphaFold 2): att ∘ σ(x W_g) before the output projection
  ValueResidual value_residual = ValueResidual::none;  // standard and window attention only
  double layer_scale = 0;  // > 0: LayerScale γ ∘ branch on both residual branches, γ initialised to this
  bool glu = false;        // gated FFN (SwiGLU): (silu(x W_1) ∘ x W_3) W_2, hidden width 4d
  bool any() const { return gate || value_residual != ValueResidual::none || layer_scale > 0 || glu; }
};

struct GptConfig {
  int64_t vocab = 65, d = 64, heads = 2, layers = 4, context = 300;
  bool rope = true;
  AttentionKind attention = AttentionKind::standard;
  int64_t window = 0;  // `window` attention: keys each query sees (the most recent, itself included)
  BlockOptions block;
  int64_t d_head() const { return d / heads; }
};

/// One named parameter tensor (PyTorch [out, in] layout) inside the arena.
struct ParamInfo {
  std::string name;  // "l<layer>.<weight>" inside a block, else the weight ("wte", "wout")
  std::vector<int64_t> shape;
  int64_t offset = 0, numel = 0;  // in elements from the start of the parameters
  int64_t layer = -1;             // the block, −1 outside the blocks
  std::string weight;             // the name without its block prefix ("wq", "ln1", …)
};

/// The parameter names and shapes of a config, in arena order.
std::vector<ParamInfo> gpt_param_layout(const GptConfig& c);
int64_t gpt_param_count(const GptConfig& c);

template <class Real>
class Gpt {
 public:
  /// Allocates the arena for batches of B sequences of c.context tokens.
  Gpt(const GptConfig& c, int64_t B, int threads);
  ~Gpt();
  Gpt(const Gpt&) = delete;
  Gpt& operator=(const Gpt&) = delete;

  const GptConfig& config() const { return cfg_; }
  int64_t batch() const { return B_; }
  const std::vector<ParamInfo>& layout() const { return layout_; }
  int64_t num_params() const { return nparams_; }
  Real* params() { return params_; }
  Real* grads() { return grads_; }
  Real* adam_m() { return m_; }
  Real* adam_v() { return v_; }
  size_t arena_bytes() const { return arena_bytes_; }

  /// PyTorch's default initialisation from `seed`: embedding N(0, 1), linear
  /// U(±1/sqrt(in)), LayerNorm gains 1; the block options' gate weights and
  /// value-residual logits 0 (gate and mix start at σ(0) = 1/2), LayerScale
  /// gains block.layer_scale; Adam moments zero.
  void init(uint64_t seed);

  /// Forward on tokens (B·T) with targets (B·T, −1 = not counted); returns the
  /// loss statistics. With `backward`, also fills grads() with the gradient of
  /// the mean loss over counted targets.
  gpt::CrossEntropyStats step(const int32_t* tokens, const int32_t* targets, bool backward);
  /// Logits (B·T, V) of the last forward.
  const Real* logits() const { return logits_; }
  /// One Adam step with the current grads (step is 1-based).
  void update(const gpt::AdamParams& a);

 private:
  struct Layer;
  struct Window;
  void attention_forward(size_t l, const Real* x);
  void attention_backward(size_t l, const Real* x, Real* dx);
  bool mixes_values(size_t l) const { return l > 0 && cfg_.block.value_residual != ValueResidual::none; }
  void window_forward(Layer& L);   // ly.att from ly.q, ly.k, ly.v
  void window_backward(Layer& L);  // dq_, dk_, dv_ from dA_

  GptConfig cfg_;
  int64_t B_, N_;
  int threads_;
  std::vector<ParamInfo> layout_;
  int64_t nparams_ = 0;
  void* arena_ = nullptr;
  size_t arena_bytes_ = 0;
  Real *params_ = nullptr, *grads_ = nullptr, *m_ = nullptr, *v_ = nullptr;
  Real *emb_ = nullptr, *logits_ = nullptr, *row_loss_ = nullptr;
  Real *dA_ = nullptr, *dB_ = nullptr, *dC_ = nullptr, *dq_ = nullptr, *dk_ = nullptr, *dv_ = nullptr,
       *dH_ = nullptr;
  // Block options' gradient buffers (null when the option is off): a scaled
  // branch's gradient, the SwiGLU up projection's, the value mix logits' and
  // the first block's values' (summed over the later blocks).
  Real *dR_ = nullptr, *dU_ = nullptr, *dZ_ = nullptr, *dV1_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  std::unique_ptr<Window> window_;  // `window` attention: its mask and block map
  Real* heads_ = nullptr;           // `window` attention: 8 (B, H, T, dh) head-major copies
  std::vector<Layer> layers_;
  Real *wte_ = nullptr, *wout_ = nullptr, *dwte_ = nullptr, *dwout_ = nullptr;
};

extern template class Gpt<float>;
extern template class Gpt<double>;

}  // namespace attnbench::train
