// The tiny GPT: harness/train/gpt.hpp has the model and the arena.
#include "harness/train/gpt.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>

#include "harness/errors.hpp"
#include "harness/rng.hpp"
#include "impls/block_map.hpp"
#include "impls/cpu/masked.hpp"
#include "impls/cpu/sdpa.hpp"
#include "impls/cpu/selective.hpp"
#include "reference/masked.hpp"
#include "reference/sdpa.hpp"
#include "reference/selective.hpp"

namespace attnbench::train {

AttentionKind parse_attention_kind(const std::string& s, const std::string& where) {
  if (s == "standard") return AttentionKind::standard;
  if (s == "selective") return AttentionKind::selective;
  if (s == "selective_materialized") return AttentionKind::selective_materialized;
  if (s == "window") return AttentionKind::window;
  throw InputError(where + ": unknown attention kind '" + s + "', expected one of standard, selective, " +
                   "selective_materialized, window" + did_you_mean(s, attention_kind_names()));
}

std::string attention_kind_name(AttentionKind k) {
  switch (k) {
    case AttentionKind::standard: return "standard";
    case AttentionKind::selective: return "selective";
    case AttentionKind::selective_materialized: return "selective_materialized";
    case AttentionKind::window: return "window";
  }
  return "?";
}

std::vector<std::string> attention_kind_names() {
  return {"standard", "selective", "selective_materialized", "window"};
}

ValueResidual parse_value_residual(const std::string& s, const std::string& where) {
  if (s == "none") return ValueResidual::none;
  if (s == "learned") return ValueResidual::learned;
  if (s == "token") return ValueResidual::token;
  throw InputError(where + ": unknown value residual '" + s + "', expected one of none, learned, token" +
                   did_you_mean(s, {"none", "learned", "token"}));
}

std::string value_residual_name(ValueResidual v) {
  switch (v) {
    case ValueResidual::none: return "none";
    case ValueResidual::learned: return "learned";
    case ValueResidual::token: return "token";
  }
  return "?";
}

std::vector<ParamInfo> gpt_param_layout(const GptConfig& c) {
  std::vector<ParamInfo> out;
  int64_t off = 0;
  int64_t layer = -1;
  auto add = [&](const std::string& weight, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    const std::string name = layer < 0 ? weight : "l" + std::to_string(layer) + "." + weight;
    out.push_back({name, std::move(shape), off, n, layer, weight});
    off += n;
  };
  const bool selective =
      c.attention == AttentionKind::selective || c.attention == AttentionKind::selective_materialized;
  const int64_t d = c.d, kv_in = selective ? 2 * d : d;
  add("wte", {c.vocab, d});
  for (int64_t l = 0; l < c.layers; ++l) {
    layer = l;
    add("wq", {d, d});
    add("wk", {d, kv_in});
    add("wv", {d, kv_in});
    add("wo", {d, d});
    add("ln1", {d});
    add("w1", {4 * d, d});
    add("w2", {d, 4 * d});
    add("ln2", {d});
    // Block options, after the block's own weights (a config without them has the layout above).
    const BlockOptions& o = c.block;
    if (o.gate) add("wg", {d, d});
    if (l > 0 && o.value_residual == ValueResidual::learned) add("vres", {c.heads});
    if (l > 0 && o.value_residual == ValueResidual::token) add("wvres", {c.heads, d});
    if (o.layer_scale > 0) {
      add("ls1", {d});
      add("ls2", {d});
    }
    if (o.glu) add("w3", {4 * d, d});
  }
  layer = -1;
  add("wout", {c.vocab, d});
  return out;
}

int64_t gpt_param_count(const GptConfig& c) {
  const auto l = gpt_param_layout(c);
  return l.back().offset + l.back().numel;
}

template <class Real>
struct Gpt<Real>::Layer {
  // Parameters and their gradients (views into the arena; a block option's are null when it is off).
  Real *wq, *wk, *wv, *wo, *ln1, *w1, *w2, *ln2;
  Real *dwq, *dwk, *dwv, *dwo, *dln1, *dw1, *dw2, *dln2;
  Real *wg = nullptr, *vres = nullptr, *wvres = nullptr, *ls1 = nullptr, *ls2 = nullptr, *w3 = nullptr;
  Real *dwg = nullptr, *dvres = nullptr, *dwvres = nullptr, *dls1 = nullptr, *dls2 = nullptr, *dw3 = nullptr;
  // Activations of the batch.
  Real *q, *k, *v, *att, *lse, *ao, *r1, *mean1, *rstd1, *x1, *h, *hr, *f, *r2, *mean2, *rstd2, *x2;
  // Block options' activations: the gate σ(x W_g) and the gated output (gate),
  // this block's own values and the mix logits (value residual, blocks after
  // the first: v holds the mixed values), the up projection (glu).
  Real *g = nullptr, *ag = nullptr, *vl = nullptr, *z = nullptr, *u = nullptr;
  // Fused selective attention (f32): what its forward keeps for the backward
  // (projections, augmented queries/keys, attention output, lse), in `keep`.
  Real* keep = nullptr;
  SelectiveSaved saved{};
};

/// `window` attention: the sliding_window mask over a sequence's T positions and its
/// block map (64 × 64 tiles, one map for every batch entry and head), the RoPE
/// positions, and the same mask by definition for the f64 oracle.
template <class Real>
struct Gpt<Real>::Window {
  mask::MaskData mask;
  mask::BlockMap map;
  std::vector<int32_t> pos;
  ref::MaskDefinition def;

  Window(int64_t T, int64_t w) {
    mask.kind = mask::Kind::sliding_window;
    mask.Nq = mask.Nkv = T;
    mask.lookback = w - 1;
    map = mask::build_block_map(mask, 1, 64, 64);
    pos.resize(size_t(T));
    for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = int32_t(t);
    def.kind = "sliding_window", def.Nq = def.Nkv = T, def.window = w;
  }

  /// The masked kernel's forward parameters for a batch of B (pointers unset).
  MaskedParams params(const GptConfig& c, int64_t B) const {
    MaskedParams p;
    p.B = B, p.H = c.heads, p.Nq = p.Nkv = c.context, p.D = c.d_head();
    p.dtype = DType::f32;
    p.mask = mask;
    if (c.rope) p.q_pos = p.k_pos = pos.data();
    p.tile_q = map.tile_q, p.tile_k = map.tile_k, p.n_qt = map.n_qt, p.n_kt = map.n_kt, p.map_batches = map.batches;
    p.tiles = map.tiles.data(), p.kv_count = map.kv_count.data(), p.kv_index = map.kv_index.data();
    return p;
  }
};

namespace {

/// x (B, T, H·dh), the heads side by side, to y (B, H, T, dh), or back with `back`.
template <class Real>
void heads_layout(Real* x, Real* y, int64_t B, int64_t T, int64_t H, int64_t dh, bool back) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        Real* tok = x + ((b * T + t) * H + h) * dh;
        Real* head = y + ((b * H + h) * T + t) * dh;
        if (back)
          std::copy_n(head, dh, tok);
        else
          std::copy_n(tok, dh, head);
      }
}

constexpr size_t kAlign = 64;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

SdpaParams sdpa_params(const GptConfig& c, int64_t B) {
  SdpaParams p;
  p.B = B;
  p.H = p.Hkv = c.heads;
  p.Nq = p.Nkv = c.context;
  p.D = c.d_head();
  p.causal = true;
  p.rope = c.rope ? SdpaRope::half : SdpaRope::none;
  p.dtype = DType::f32;
  // (B, T, d) rows with the heads side by side: head h of token t at t·d + h·dh.
  const SdpaStrides s{c.context * c.d, c.d_head(), c.d};
  p.o_strides = p.q_strides = p.k_strides = p.v_strides = s;
  return p;
}

/// The selective kernels' parameters for a batch of B; with `x` and a layer, its input and weights.
SelectiveParams selective_params(const GptConfig& c, int64_t B, const float* x = nullptr, const float* wq = nullptr,
                                 const float* wk = nullptr, const float* wv = nullptr) {
  SelectiveParams p;
  p.x = x, p.wq = wq, p.wk = wk, p.wv = wv;
  p.B = B;
  p.T = c.context;
  p.d = c.d;
  p.H = c.heads;
  p.rope = c.rope;
  p.dtype = DType::f32;
  p.o_strides = p.x_strides = p.dout_strides = p.dx_strides = selective_dense_strides(c.context, c.d);
  return p;
}

}  // namespace

template <class Real>
Gpt<Real>::Gpt(const GptConfig& c, int64_t B, int threads)
    : cfg_(c), B_(B), N_(B * c.context), threads_(std::max(1, threads)) {
  if (c.d % c.heads != 0) throw InputError("model: d must be a multiple of heads");
  if (c.rope && c.d_head() % 2 != 0) throw InputError("model: d / heads must be even with rope");
  if (c.block.value_residual != ValueResidual::none && !has_shared_values(c.attention))
    throw InputError("model: value_residual needs standard or window attention (" + attention_kind_name(c.attention) +
                     " attention makes its values per query)");
  if (!(c.block.layer_scale >= 0)) throw InputError("model: layer_scale must be >= 0");
  layout_ = gpt_param_layout(c);
  nparams_ = layout_.back().offset + layout_.back().numel;
  const int64_t N = N_, d = c.d, V = c.vocab, L = c.layers;

  if (c.attention == AttentionKind::window) {
    if (c.window < 1) throw InputError("model: window attention needs window >= 1, got " + std::to_string(c.window));
    window_ = std::make_unique<Window>(c.context, c.window);
  }
  // Kernel scratch: the largest any entry point of this attention needs.
  if constexpr (std::is_same_v<Real, float>) {
    if (c.attention == AttentionKind::standard) {
      SdpaBackwardParams bp;
      bp.fwd = sdpa_params(c, B);
      scratch_bytes_ = std::max(cpu::sdpa_forward_fused_scratch_bytes(bp.fwd, threads_),
                                cpu::sdpa_backward_fused_scratch_bytes(bp, threads_));
    } else if (c.attention == AttentionKind::selective) {
      const SelectiveParams sp = selective_params(c, B);
      scratch_bytes_ = std::max(cpu::selective_forward_fused_scratch_bytes(sp, threads_, true),
                                cpu::selective_backward_fused_scratch_bytes(sp, threads_));
    } else if (c.attention == AttentionKind::window) {
      MaskedBackwardParams bp;
      bp.fwd = window_->params(c, B);
      scratch_bytes_ = std::max(cpu::masked_forward_block_sparse_scratch_bytes(bp.fwd, threads_),
                                cpu::masked_backward_block_sparse_scratch_bytes(bp, threads_));
    } else {
      const SelectiveParams sp = selective_params(c, B);
      scratch_bytes_ = std::max(cpu::selective_forward_materialized_scratch_bytes(sp, threads_),
                                cpu::selective_backward_materialized_scratch_bytes(sp, threads_));
    }
  }

  // Two passes over the same list: sizes, then pointers into the one arena.
  struct Slot {
    Real** p;
    int64_t n;
  };
  std::vector<Slot> slots;
  slots.push_back({&params_, nparams_});
  slots.push_back({&grads_, nparams_});
  slots.push_back({&m_, nparams_});
  slots.push_back({&v_, nparams_});
  slots.push_back({&emb_, N * d});
  layers_.resize(size_t(L));
  const BlockOptions& o = c.block;
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& ly = layers_[l];
    for (Real** p : {&ly.q, &ly.k, &ly.v, &ly.att, &ly.ao, &ly.r1, &ly.x1, &ly.f, &ly.r2, &ly.x2})
      slots.push_back({p, N * d});
    for (Real** p : {&ly.mean1, &ly.rstd1, &ly.mean2, &ly.rstd2}) slots.push_back({p, N});
    slots.push_back({&ly.lse, N * c.heads});
    slots.push_back({&ly.h, N * 4 * d});
    slots.push_back({&ly.hr, N * 4 * d});
    if (o.gate)
      for (Real** p : {&ly.g, &ly.ag}) slots.push_back({p, N * d});
    if (mixes_values(l)) {
      slots.push_back({&ly.vl, N * d});
      slots.push_back({&ly.z, N * c.heads});
    }
    if (o.glu) slots.push_back({&ly.u, N * 4 * d});
    if (std::is_same_v<Real, float> && c.attention == AttentionKind::selective)
      slots.push_back({&ly.keep, int64_t(cpu::selective_saved_bytes(selective_params(c, B)) / sizeof(float))});
  }
  slots.push_back({&logits_, N * V});
  slots.push_back({&dH_, std::max(N * 4 * d, N * V)});  // also the logits' gradient
  slots.push_back({&row_loss_, N});
  for (Real** p : {&dA_, &dB_, &dC_, &dq_, &dk_, &dv_}) slots.push_back({p, N * d});
  if (window_) slots.push_back({&heads_, 8 * N * d});
  if (o.layer_scale > 0) slots.push_back({&dR_, N * d});
  if (o.glu) slots.push_back({&dU_, N * 4 * d});
  if (o.value_residual != ValueResidual::none) {
    slots.push_back({&dZ_, N * c.heads});
    slots.push_back({&dV1_, N * d});
  }
  size_t bytes = 0;
  for (const Slot& s : slots) bytes += align_up(size_t(s.n) * sizeof(Real));
  bytes += align_up(scratch_bytes_);
  arena_bytes_ = bytes;
  arena_ = std::aligned_alloc(kAlign, bytes);
  if (!arena_) throw std::bad_alloc();
  std::memset(arena_, 0, bytes);
  char* at = static_cast<char*>(arena_);
  for (const Slot& s : slots) {
    *s.p = reinterpret_cast<Real*>(at);
    at += align_up(size_t(s.n) * sizeof(Real));
  }
  scratch_ = at;
  for (Layer& ly : layers_)
    if (ly.keep) ly.saved = cpu::selective_saved_at(selective_params(c, B), ly.keep);

  // Each layout entry to its parameter and gradient views; what the config lacks stays null.
  for (const ParamInfo& pi : layout_) {
    Real* p = params_ + pi.offset;
    Real* g = grads_ + pi.offset;
    if (pi.layer < 0) {
      (pi.weight == "wte" ? wte_ : wout_) = p;
      (pi.weight == "wte" ? dwte_ : dwout_) = g;
      continue;
    }
    Layer& ly = layers_[size_t(pi.layer)];
    struct View {
      const char* name;
      Real* Layer::*p;
      Real* Layer::*g;
    };
    static constexpr View views[] = {{"wq", &Layer::wq, &Layer::dwq},          {"wk", &Layer::wk, &Layer::dwk},
                                     {"wv", &Layer::wv, &Layer::dwv},          {"wo", &Layer::wo, &Layer::dwo},
                                     {"ln1", &Layer::ln1, &Layer::dln1},       {"w1", &Layer::w1, &Layer::dw1},
                                     {"w2", &Layer::w2, &Layer::dw2},          {"ln2", &Layer::ln2, &Layer::dln2},
                                     {"wg", &Layer::wg, &Layer::dwg},          {"vres", &Layer::vres, &Layer::dvres},
                                     {"wvres", &Layer::wvres, &Layer::dwvres}, {"ls1", &Layer::ls1, &Layer::dls1},
                                     {"ls2", &Layer::ls2, &Layer::dls2},       {"w3", &Layer::w3, &Layer::dw3}};
    for (const View& v : views)
      if (pi.weight == v.name) ly.*v.p = p, ly.*v.g = g;
  }
}

template <class Real>
Gpt<Real>::~Gpt() {
  std::free(arena_);
}

template <class Real>
void Gpt<Real>::init(uint64_t seed) {
  for (const ParamInfo& pi : layout_) {
    Rng rng(seed, "gpt-init", pi.name);
    Real* p = params_ + pi.offset;
    const std::string& w = pi.weight;
    if (w == "ln1" || w == "ln2") {
      std::fill(p, p + pi.numel, Real(1));
    } else if (w == "ls1" || w == "ls2") {
      std::fill(p, p + pi.numel, Real(cfg_.block.layer_scale));
    } else if (w == "wg" || w == "vres") {
      std::fill(p, p + pi.numel, Real(0));
    } else if (w == "wte") {
      for (int64_t j = 0; j < pi.numel; ++j) p[j] = Real(rng.normal());
    } else {
      const double bound = 1.0 / std::sqrt(double(pi.shape[1]));
      for (int64_t j = 0; j < pi.numel; ++j) p[j] = Real(rng.uniform(-bound, bound));
    }
  }
  std::fill(m_, m_ + nparams_, Real(0));
  std::fill(v_, v_ + nparams_, Real(0));
}

template <class Real>
void Gpt<Real>::window_forward(Layer& ly) {
  const GptConfig& c = cfg_;
  const int64_t n = N_ * c.d, T = c.context, H = c.heads, dh = c.d_head();
  Real *q = heads_, *k = q + n, *v = k + n, *o = v + n;
  heads_layout(ly.q, q, B_, T, H, dh, false);
  heads_layout(ly.k, k, B_, T, H, dh, false);
  heads_layout(ly.v, v, B_, T, H, dh, false);
  if constexpr (std::is_same_v<Real, float>) {
    MaskedParams p = window_->params(c, B_);
    p.q = q, p.k = k, p.v = v, p.o = o;
    p.lse = ly.lse;  // (B, H, T): what the backward reads
    cpu::masked_forward_block_sparse(p, scratch_, threads_);
  } else {
    const std::vector<int32_t> pos = c.rope ? window_->pos : std::vector<int32_t>{};
    ref::masked_forward_reference<double>(B_, H, dh, window_->def, ref::ScoreModDefinition{}, pos, pos, DType::f64, o,
                                          q, k, v);
  }
  heads_layout(ly.att, o, B_, T, H, dh, true);
}

template <class Real>
void Gpt<Real>::window_backward(Layer& ly) {
  const GptConfig& c = cfg_;
  const int64_t n = N_ * c.d, T = c.context, H = c.heads, dh = c.d_head();
  Real *q = heads_, *k = q + n, *v = k + n, *o = v + n, *dout = o + n, *dq = dout + n, *dk = dq + n, *dv = dk + n;
  heads_layout(ly.q, q, B_, T, H, dh, false);
  heads_layout(ly.k, k, B_, T, H, dh, false);
  heads_layout(ly.v, v, B_, T, H, dh, false);
  heads_layout(dA_, dout, B_, T, H, dh, false);
  if constexpr (std::is_same_v<Real, float>) {
    heads_layout(ly.att, o, B_, T, H, dh, false);
    MaskedBackwardParams bp;
    bp.fwd = window_->params(c, B_);
    bp.fwd.q = q, bp.fwd.k = k, bp.fwd.v = v, bp.fwd.o = o, bp.fwd.lse = ly.lse;
    bp.dout = dout, bp.dq = dq, bp.dk = dk, bp.dv = dv;
    cpu::masked_backward_block_sparse(bp, scratch_, threads_);
  } else {
    const std::vector<int32_t> pos = c.rope ? window_->pos : std::vector<int32_t>{};
    ref::masked_backward_reference<double>(B_, H, dh, window_->def, ref::ScoreModDefinition{}, pos, pos, DType::f64,
                                           dq, dk, dv, q, k, v, dout);
  }
  heads_layout(dq_, dq, B_, T, H, dh, true);
  heads_layout(dk_, dk, B_, T, H, dh, true);
  heads_layout(dv_, dv, B_, T, H, dh, true);
}

template <class Real>
void Gpt<Real>::attention_forward(size_t l, const Real* x) {
  Layer& ly = layers_[l];
  const GptConfig& c = cfg_;
  const int64_t N = N_, d = c.d, T = c.context, H = c.heads, dh = c.d_head();
  if (c.attention == AttentionKind::standard || c.attention == AttentionKind::window) {
    gpt::linear_forward(ly.q, x, ly.wq, N, d, d, threads_);
    gpt::linear_forward(ly.k, x, ly.wk, N, d, d, threads_);
    gpt::linear_forward(mixes_values(l) ? ly.vl : ly.v, x, ly.wv, N, d, d, threads_);
    if (mixes_values(l)) {
      if (c.block.value_residual == ValueResidual::token) {
        gpt::linear_forward(ly.z, x, ly.wvres, N, d, H, threads_);
      } else {
        for (int64_t n = 0; n < N; ++n) std::copy_n(ly.vres, H, ly.z + n * H);
      }
      gpt::value_mix_forward(ly.v, ly.vl, layers_[0].v, ly.z, N, H, dh, threads_);
    }
    if (c.attention == AttentionKind::window) {
      window_forward(ly);
    } else if constexpr (std::is_same_v<Real, float>) {
      SdpaParams p = sdpa_params(c, B_);
      p.q = ly.q;
      p.k = ly.k;
      p.v = ly.v;
      p.o = ly.att;
      p.lse = ly.lse;
      cpu::sdpa_forward_fused(p, scratch_, threads_);
    } else {
      // f64 oracle: the Eigen reference on (B, H, T, dh) copies.
      ref::SdpaDims dims{B_, H, H, T, T, dh, true, c.rope ? ref::RopeMode::half : ref::RopeMode::none};
      std::vector<double> q(size_t(N * d)), k(q.size()), v(q.size()), o(q.size());
      std::vector<int32_t> len(static_cast<size_t>(B_), int32_t(T));
      heads_layout(ly.q, q.data(), B_, T, H, dh, false);
      heads_layout(ly.k, k.data(), B_, T, H, dh, false);
      heads_layout(ly.v, v.data(), B_, T, H, dh, false);
      ref::sdpa_forward_reference<double>(dims, DType::f64, o.data(), nullptr, q.data(), k.data(), v.data(),
                                          len.data());
      heads_layout(ly.att, o.data(), B_, T, H, dh, true);
    }
    return;
  }
  if constexpr (std::is_same_v<Real, float>) {
    SelectiveParams p = selective_params(c, B_, x, ly.wq, ly.wk, ly.wv);
    p.o = ly.att;
    if (c.attention == AttentionKind::selective)
      cpu::selective_forward_fused(p, scratch_, threads_, &ly.saved);
    else
      cpu::selective_forward_materialized(p, scratch_, threads_);
  } else {
    ref::SelectiveDims dims{B_, T, d, H, c.rope};
    ref::selective_forward_reference<double>(dims, DType::f64, ly.att, x, ly.wq, ly.wk, ly.wv);
  }
}

template <class Real>
void Gpt<Real>::attention_backward(size_t l, const Real* x, Real* dx) {
  // dA_ holds the cotangent of ly.att; the gradient of x is added to dx.
  Layer& ly = layers_[l];
  const GptConfig& c = cfg_;
  const int64_t N = N_, d = c.d, T = c.context, H = c.heads, dh = c.d_head();
  if (c.attention == AttentionKind::standard || c.attention == AttentionKind::window) {
    if (c.attention == AttentionKind::window) {
      window_backward(ly);
    } else if constexpr (std::is_same_v<Real, float>) {
      SdpaBackwardParams bp;
      bp.fwd = sdpa_params(c, B_);
      bp.fwd.q = ly.q;
      bp.fwd.k = ly.k;
      bp.fwd.v = ly.v;
      bp.fwd.o = ly.att;
      bp.fwd.lse = ly.lse;
      bp.dout = dA_;
      bp.do_strides = bp.dq_strides = bp.dk_strides = bp.dv_strides = bp.fwd.q_strides;
      bp.dq = dq_;
      bp.dk = dk_;
      bp.dv = dv_;
      cpu::sdpa_backward_fused(bp, scratch_, threads_);
    } else {
      ref::SdpaDims dims{B_, H, H, T, T, dh, true, c.rope ? ref::RopeMode::half : ref::RopeMode::none};
      const size_t n = size_t(N * d);
      std::vector<double> q(n), k(n), v(n), dout(n), dq(n), dk(n), dv(n);
      std::vector<int32_t> len(static_cast<size_t>(B_), int32_t(T));
      heads_layout(ly.q, q.data(), B_, T, H, dh, false);
      heads_layout(ly.k, k.data(), B_, T, H, dh, false);
      heads_layout(ly.v, v.data(), B_, T, H, dh, false);
      heads_layout(dA_, dout.data(), B_, T, H, dh, false);
      ref::sdpa_backward_reference<double>(dims, DType::f64, dq.data(), dk.data(), dv.data(), q.data(), k.data(),
                                           v.data(), len.data(), dout.data());
      heads_layout(dq_, dq.data(), B_, T, H, dh, true);
      heads_layout(dk_, dk.data(), B_, T, H, dh, true);
      heads_layout(dv_, dv.data(), B_, T, H, dh, true);
    }
    if (mixes_values(l)) {
      // dv_: the mixed values' gradient, to this block's own values' (in place) and the first block's (dV1_).
      gpt::value_mix_backward(dv_, dV1_, dZ_, dv_, ly.vl, layers_[0].v, ly.z, N, H, dh, threads_);
      if (c.block.value_residual == ValueResidual::token) {
        gpt::linear_backward(dx, ly.dwvres, dZ_, x, ly.wvres, N, d, H, true, threads_);
      } else {
        std::fill(ly.dvres, ly.dvres + H, Real(0));
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = 0; h < H; ++h) ly.dvres[h] += dZ_[n * H + h];
      }
    } else if (c.block.value_residual != ValueResidual::none) {  // the first block: its values feed every later mix
      for (int64_t i = 0; i < N * d; ++i) dv_[i] += dV1_[i];
    }
    gpt::linear_backward(dx, ly.dwq, dq_, x, ly.wq, N, d, d, true, threads_);
    gpt::linear_backward(dx, ly.dwk, dk_, x, ly.wk, N, d, d, true, threads_);
    gpt::linear_backward(dx, ly.dwv, dv_, x, ly.wv, N, d, d, true, threads_);
    return;
  }
  if constexpr (std::is_same_v<Real, float>) {
    SelectiveParams p = selective_params(c, B_, x, ly.wq, ly.wk, ly.wv);
    p.dout = dA_;
    p.dx = dq_;
    p.dwq = ly.dwq;
    p.dwk = ly.dwk;
    p.dwv = ly.dwv;
    if (c.attention == AttentionKind::selective)
      cpu::selective_backward_fused(p, ly.saved, scratch_, threads_);
    else
      cpu::selective_backward_materialized(p, scratch_, threads_);
  } else {
    ref::SelectiveDims dims{B_, T, d, H, c.rope};
    ref::selective_backward_reference<double>(dims, DType::f64, dq_, ly.dwq, ly.dwk, ly.dwv, x, ly.wq, ly.wk,
                                              ly.wv, dA_);
  }
  for (int64_t i = 0; i < N * d; ++i) dx[i] += dq_[i];
}

template <class Real>
gpt::CrossEntropyStats Gpt<Real>::step(const int32_t* tokens, const int32_t* targets, bool backward) {
  const GptConfig& c = cfg_;
  const int64_t N = N_, d = c.d, V = c.vocab;
  const int th = threads_;
  const Real eps = Real(1e-5);
  const BlockOptions& o = c.block;
  gpt::embedding_forward(emb_, tokens, wte_, N, d, th);
  const Real* x = emb_;
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& ly = layers_[l];
    attention_forward(l, x);
    if (o.gate) {
      gpt::linear_forward(ly.g, x, ly.wg, N, d, d, th);
      gpt::sigmoid_gate_forward(ly.ag, ly.g, ly.att, N * d, th);
    }
    gpt::linear_forward(ly.ao, o.gate ? ly.ag : ly.att, ly.wo, N, d, d, th);
    if (o.layer_scale > 0)
      gpt::scaled_residual_forward(ly.r1, x, ly.ls1, ly.ao, N, d, th);
    else
      for (int64_t i = 0; i < N * d; ++i) ly.r1[i] = x[i] + ly.ao[i];
    gpt::layernorm_forward(ly.x1, ly.mean1, ly.rstd1, ly.r1, ly.ln1, N, d, eps, th);
    gpt::linear_forward(ly.h, ly.x1, ly.w1, N, d, 4 * d, th);
    if (o.glu) {
      gpt::linear_forward(ly.u, ly.x1, ly.w3, N, d, 4 * d, th);
      gpt::swiglu_forward(ly.hr, ly.h, ly.u, N * 4 * d, th);
    } else {
      gpt::relu_forward(ly.hr, ly.h, N * 4 * d, th);
    }
    gpt::linear_forward(ly.f, ly.hr, ly.w2, N, 4 * d, d, th);
    if (o.layer_scale > 0)
      gpt::scaled_residual_forward(ly.r2, ly.x1, ly.ls2, ly.f, N, d, th);
    else
      for (int64_t i = 0; i < N * d; ++i) ly.r2[i] = ly.x1[i] + ly.f[i];
    gpt::layernorm_forward(ly.x2, ly.mean2, ly.rstd2, ly.r2, ly.ln2, N, d, eps, th);
    x = ly.x2;
  }
  gpt::linear_forward(logits_, x, wout_, N, d, V, th);
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) count += targets[n] >= 0;
  const Real scale = count > 0 ? Real(1) / Real(count) : Real(0);
  Real* dlogits = backward ? dH_ : nullptr;
  const gpt::CrossEntropyStats st = gpt::cross_entropy(dlogits, row_loss_, logits_, targets, N, V, scale, th);
  if (!backward) return st;

  Real* dx = dA_;  // the gradient of the current block's output
  Real* dnext = dC_;
  gpt::linear_backward(dx, dwout_, dlogits, x, wout_, N, d, V, false, th);
  if (dV1_) std::fill(dV1_, dV1_ + N * d, Real(0));
  for (int64_t l = c.layers - 1; l >= 0; --l) {
    Layer& ly = layers_[size_t(l)];
    const Real* xin = l == 0 ? emb_ : layers_[size_t(l - 1)].x2;
    // x2 = LN2(r2), r2 = x1 + γ2 ∘ f: dB_ = dr2 = dx1 (so far), df = γ2 ∘ dr2 (dR_) or dr2.
    gpt::layernorm_backward(dB_, ly.dln2, dx, ly.r2, ly.mean2, ly.rstd2, ly.ln2, N, d, th);
    const Real* df = dB_;
    if (o.layer_scale > 0) {
      gpt::scaled_residual_backward(dR_, ly.dls2, dB_, ly.f, ly.ls2, N, d, th);
      df = dR_;
    }
    gpt::linear_backward(dH_, ly.dw2, df, ly.hr, ly.w2, N, 4 * d, d, false, th);
    if (o.glu) {
      gpt::swiglu_backward(dH_, dU_, dH_, ly.h, ly.u, N * 4 * d, th);
      gpt::linear_backward(dB_, ly.dw3, dU_, ly.x1, ly.w3, N, d, 4 * d, true, th);
    } else {
      gpt::relu_backward(dH_, dH_, ly.h, N * 4 * d, th);
    }
    gpt::linear_backward(dB_, ly.dw1, dH_, ly.x1, ly.w1, N, d, 4 * d, true, th);
    // x1 = LN1(r1), r1 = x + γ1 ∘ ao: dnext = dr1 = dx (so far), dao = γ1 ∘ dr1 (dR_) or dr1.
    gpt::layernorm_backward(dnext, ly.dln1, dB_, ly.r1, ly.mean1, ly.rstd1, ly.ln1, N, d, th);
    const Real* dao = dnext;
    if (o.layer_scale > 0) {
      gpt::scaled_residual_backward(dR_, ly.dls1, dnext, ly.ao, ly.ls1, N, d, th);
      dao = dR_;
    }
    // dx is consumed: dA_ may now hold the (gated) attention output's cotangent.
    gpt::linear_backward(dA_, ly.dwo, dao, o.gate ? ly.ag : ly.att, ly.wo, N, d, d, false, th);
    if (o.gate) {  // ag = σ(x W_g) ∘ att: dA_ to att's cotangent, the gate's pre-activation's in dB_ (free now)
      gpt::sigmoid_gate_backward(dA_, dB_, dA_, ly.att, ly.g, N * d, th);
      gpt::linear_backward(dnext, ly.dwg, dB_, xin, ly.wg, N, d, d, true, th);
    }
    attention_backward(size_t(l), xin, dnext);
    // dnext is the gradient of this block's input: swap it into dA_'s role.
    std::swap(dA_, dC_);
    dx = dA_;
    dnext = dC_;
  }
  gpt::embedding_backward(dwte_, dx, tokens, N, V, d);
  return st;
}

template <class Real>
void Gpt<Real>::update(const gpt::AdamParams& a) {
  gpt::adam_update(params_, grads_, m_, v_, nparams_, a, threads_);
}

template class Gpt<float>;
template class Gpt<double>;

}  // namespace attnbench::train
