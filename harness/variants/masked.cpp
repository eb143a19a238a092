// The "masked" variant: structured-mask attention executed block-sparsely
// (DESIGN §5 "Mask family"; docs/masked.md). One variant, the mask a parameter:
// hepattn's sliding and wrapped windows, strided local cross-attention and its
// transpose, documents, shared prefix, register tokens, LE-ATTENTION DAGs
// (parents only or ancestors), MaskFormer mask attention; score mods relative,
// cyclic, ALiBi, tanh softcap; RoPE at the mask's position ids.
// Math: reference/masked.hpp. Mask engine: impls/mask.hpp, impls/block_map.hpp.
// Kernels: impls/cpu/masked.cpp, impls/cuda/masked.cu.
//
// Inputs: q (B, H, Nq, D), k and v (B, H, Nkv, D) standard normal; mask attention
// also mask_logits (B, Nq, Nkv) (kept f32 for every dtype: a mask, not an operand).
// Output: o (B, H, Nq, D), f32 (f64 for the oracle).
// Implementations: reference (Eigen, dense mask), cpu (block-sparse), cpu_dense
// (the same kernel with every tile computed and masked: dense masked attention),
// cuda and cuda_dense likewise.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

#include "harness/dag.hpp"
#include "harness/errors.hpp"
#include "harness/masks.hpp"
#include "harness/variant.hpp"
#include "impls/cpu/cpu_features.hpp"
#include "impls/cpu/masked.hpp"
#include "reference/masked.hpp"

#if ATTNBENCH_HAVE_CUDA
#include "harness/cuda_support.hpp"
#include "impls/cuda/masked.hpp"
#endif

namespace attnbench {
namespace {

Shape q_shape(const MaskedCase& c) { return {c.B, c.H, c.Nq, c.D}; }
Shape kv_shape(const MaskedCase& c) { return {c.B, c.H, c.Nkv, c.D}; }
Shape logits_shape(const MaskedCase& c) { return {c.B, c.Nq, c.Nkv}; }

/// Mask attention's logits: 90 % of the queries are particles owning a run of
/// hits around a centre (cyclic in the hit index, as hits sorted by φ), 10 % own
/// none. logit = 4·(1 − d/hw) + U(−½, ½) with d the cyclic distance to the
/// centre and hw ≈ density·Nkv/1.8, so sigmoid ≥ ½ keeps ≈ density of the pairs.
/// Values are rounded to bf16 so that every dtype stores them exactly. Drawn
/// from a stream keyed by the shape only (not the seed): the mask structure,
/// and so the FLOP count and the block map, are properties of the case.
template <class Store>
void generate_mask_logits(const MaskedCase& c, Store&& store) {
  const std::string key = "maskattn/" + std::to_string(c.Nq) + "/" + std::to_string(c.Nkv) + "/" +
                          std::to_string(c.density) + "/" + (c.sort_queries ? "sorted" : "random");
  for (int64_t b = 0; b < c.B; ++b) {
    Rng rng(0x6d61736b, key, std::to_string(b));
    struct Query {
      bool particle;
      double centre, hw;
    };
    std::vector<Query> qs(size_t(c.Nq));
    for (auto& q : qs) {
      q.particle = rng.uniform() < 0.9;
      q.centre = rng.uniform() * double(c.Nkv);
      q.hw = std::max(0.5, c.density * double(c.Nkv) / 1.8 * rng.uniform(0.5, 1.5));
    }
    if (c.sort_queries)  // particles ordered by centre, then the empty queries
      std::stable_sort(qs.begin(), qs.end(), [](const Query& a, const Query& z) {
        return a.particle != z.particle ? a.particle : a.particle && a.centre < z.centre;
      });
    for (int64_t i = 0; i < c.Nq; ++i)
      for (int64_t j = 0; j < c.Nkv; ++j) {
        const Query& q = qs[size_t(i)];
        double x = -4.0;
        if (q.particle) {
          const double d = std::fabs(double(j) - q.centre);
          x = 4.0 * (1.0 - std::min(d, double(c.Nkv) - d) / q.hw);
        }
        store((b * c.Nq + i) * c.Nkv + j, round_to(DType::bf16, x + rng.uniform(-0.5, 0.5)));
      }
  }
}

/// The block map and density of a case (mask attention: of its generated
/// logits), cached: flops() and case_info() both ask, several times per case.
struct MaskSummary {
  double allowed_pairs = 0;  // over all B batch entries
  int64_t full = 0, partial = 0, empty = 0;
};

MaskSummary summarize(const Params& p, const MaskedCase& c) {
  static std::mutex mu;
  static std::map<std::string, MaskSummary> cache;
  const std::string key = p.dump();
  {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  std::vector<float> logits;
  if (c.mask == "maskattn") {
    logits.resize(size_t(c.B * c.Nq * c.Nkv));
    generate_mask_logits(c, [&](int64_t i, double x) { logits[size_t(i)] = float(x); });
  }
  const MaskStorage s = make_mask(c, logits.empty() ? nullptr : logits.data());
  const mask::BlockMap map = mask::build_block_map(s.data, c.B, c.tile_q, c.tile_k);
  MaskSummary r;
  r.allowed_pairs = map.allowed_pairs * double(c.B / map.batches);
  r.full = map.full, r.partial = map.partial, r.empty = map.empty;
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() > 256) cache.clear();
  cache[key] = r;
  return r;
}

/// The setup every implementation shares: the mask's data and its block map
/// (block-sparse, or every tile partial for the dense baselines), timed.
struct PreparedMask {
  MaskedCase c;
  MaskStorage storage;
  mask::BlockMap map;
  double build_s = 0;
  /// tile_q, tile_k: the kernel's tile sizes, or 0 for the case's.
  PreparedMask(const ImplArgs& a, bool dense, int64_t tile_q, int64_t tile_k) : c(masked_case(a.params)) {
    if (tile_q == 0) tile_q = c.tile_q, tile_k = c.tile_k;
    const auto t0 = std::chrono::steady_clock::now();
    const float* logits = c.mask == "maskattn" ? require_f32(a.inputs, "mask_logits", "masked") : nullptr;
    storage = make_mask(c, logits);
    map = mask::build_block_map(storage.data, c.B, tile_q, tile_k);
    if (dense) map = mask::dense_block_map(map);
    build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  /// Kernel parameters with host pointers into the storage, the block map and the tensors.
  MaskedParams params(const ImplArgs& a) const {
    MaskedParams p;
    p.B = c.B, p.H = c.H, p.Nq = c.Nq, p.Nkv = c.Nkv, p.D = c.D, p.dtype = a.dtype;
    p.mask = storage.data;
    p.mod = storage.mod;
    if (c.rope) p.q_pos = storage.pos_q.data(), p.k_pos = storage.pos_k.data();
    p.tile_q = map.tile_q, p.tile_k = map.tile_k, p.n_qt = map.n_qt, p.n_kt = map.n_kt;
    p.map_batches = map.batches;
    p.tiles = map.tiles.data(), p.kv_count = map.kv_count.data(), p.kv_index = map.kv_index.data();
    p.q = require(a.inputs, "q", "masked").raw();
    p.k = require(a.inputs, "k", "masked").raw();
    p.v = require(a.inputs, "v", "masked").raw();
    p.o = a.outputs.at("o").data<float>();
    return p;
  }
  nlohmann::json info() const {
    return {{"block_map_s", build_s}, {"tiles_computed", map.full + map.partial}, {"tiles_total", map.total()},
            {"tiles_full", map.full}, {"tiles_partial", map.partial}, {"tile_q", map.tile_q}, {"tile_k", map.tile_k}};
  }
};

/// fwd: the forward. bwd: the forward in the constructor (setup) saving o and the
/// log-sum-exp in the workspace, run() the backward alone. fwd_bwd: both in run().
class MaskedCpuInstance final : public Instance {
 public:
  MaskedCpuInstance(const ImplArgs& a, bool dense) : pass_(a.pass), m_(a, dense, 0, 0) {
    p_ = m_.params(a);
    threads_ = omp_get_max_threads();
    size_t bytes = cpu::masked_forward_block_sparse_scratch_bytes(p_, threads_);
    if (runs_backward(pass_)) {
      b_.dout = require(a.inputs, grad_name("o"), "masked cpu").raw();
      b_.dq = a.outputs.at(grad_name("q")).data<float>();
      b_.dk = a.outputs.at(grad_name("k")).data<float>();
      b_.dv = a.outputs.at(grad_name("v")).data<float>();
      b_.fwd = p_;
      bytes = std::max(bytes, cpu::masked_backward_block_sparse_scratch_bytes(b_, threads_));
      const size_t n_o = size_t(p_.B * p_.H * p_.Nq);
      p_.lse = a.workspace.alloc<float>(n_o);
      if (pass_ == Pass::bwd) {
        // The backward reads o: keep the forward's copy where the harness cannot NaN-fill it.
        float* o_out = p_.o;
        p_.o = a.workspace.alloc<float>(n_o * size_t(p_.D));
        scratch_ = a.workspace.allocate(bytes);
        cpu::masked_forward_block_sparse(p_, scratch_, threads_);
        std::copy_n(p_.o, n_o * size_t(p_.D), o_out);
      }
      b_.fwd = p_;
    }
    if (!scratch_) scratch_ = a.workspace.allocate(bytes);
  }
  void run() override {
    if (runs_forward(pass_)) cpu::masked_forward_block_sparse(p_, scratch_, threads_);
    if (runs_backward(pass_)) cpu::masked_backward_block_sparse(b_, scratch_, threads_);
  }
  /// The block map's counts and bench.kernel_path: the forward's path, the
  /// backward's f32 ("forward+backward" for fwd_bwd when they differ).
  nlohmann::json info() const override {
    nlohmann::json j = m_.info();
    const std::string f32 = cpu::f32_kernel_path(), fwd = cpu::masked_forward_path(p_);
    j["kernel_path"] = pass_ == Pass::fwd ? fwd : (pass_ == Pass::bwd || fwd == f32) ? f32 : fwd + "+" + f32;
    return j;
  }

 private:
  Pass pass_;
  PreparedMask m_;
  MaskedParams p_;
  MaskedBackwardParams b_;
  int threads_ = 1;
  void* scratch_ = nullptr;
};

#if ATTNBENCH_HAVE_CUDA
/// Uploads the mask's arrays and the block map (built at the kernel's tile
/// sizes) next to the inputs, then points the parameters at the device copies.
class MaskedCudaInstance final : public CudaInstance {
 public:
  MaskedCudaInstance(const ImplArgs& a, bool dense)
      : CudaInstance(a), pass_(a.pass), m_(a, dense, cuda::kMaskedTileQ, cuda::kMaskedTileK) {
    p_ = m_.params(a);
    TensorMap host;
    auto add = [&](const char* name, DType dt, const void* data, int64_t n) {
      if (n == 0) return;
      Tensor t(dt, {n});
      std::memcpy(t.raw(), data, t.nbytes());
      host.emplace(name, std::move(t));
    };
    const MaskStorage& s = m_.storage;
    add("group", DType::i32, s.group.data(), int64_t(s.group.size()));
    add("group_start", DType::i32, s.group_start.data(), int64_t(s.group_start.size()));
    add("reach", DType::i32, s.reach.data(), int64_t(s.reach.size()));
    add("row_all", DType::u8, s.row_all.data(), int64_t(s.row_all.size()));
    add("keys", DType::u8, s.keys.data(), int64_t(s.keys.size()));
    add("pos_q", DType::i32, s.pos_q.data(), int64_t(s.pos_q.size()));
    add("pos_k", DType::i32, s.pos_k.data(), int64_t(s.pos_k.size()));
    add("tiles", DType::u8, m_.map.tiles.data(), int64_t(m_.map.tiles.size()));
    add("kv_count", DType::i32, m_.map.kv_count.data(), int64_t(m_.map.kv_count.size()));
    add("kv_index", DType::i32, m_.map.kv_index.data(), int64_t(m_.map.kv_index.size()));
    mask_.upload(host);
    auto dev = [&](const char* name) { return host.count(name) ? mask_.get(name) : nullptr; };
    p_.mask.group = static_cast<const int32_t*>(dev("group"));
    p_.mask.group_start = static_cast<const int32_t*>(dev("group_start"));
    p_.mask.reach = static_cast<const uint32_t*>(dev("reach"));
    p_.mask.row_all = static_cast<const uint8_t*>(dev("row_all"));
    p_.mask.keys = static_cast<const uint8_t*>(dev("keys"));
    if (m_.c.mask == "maskattn") p_.mask.logits = in_.ptr<float>("mask_logits");
    if (m_.c.rope) p_.q_pos = static_cast<const int32_t*>(dev("pos_q")), p_.k_pos = static_cast<const int32_t*>(dev("pos_k"));
    p_.tiles = static_cast<const uint8_t*>(dev("tiles"));
    p_.kv_count = static_cast<const int32_t*>(dev("kv_count"));
    p_.kv_index = static_cast<const int32_t*>(dev("kv_index"));
    p_.q = in_.get("q"), p_.k = in_.get("k"), p_.v = in_.get("v");
    p_.o = out_.ptr<float>("o");
    if (!runs_backward(pass_)) {
      scratch_ = scratch(cuda::masked_forward_block_sparse_scratch_bytes(p_));
      return;
    }
    // bwd: the forward here (setup) saves o and the lse on the device; run() is the backward.
    bp_.dout = in_.get(grad_name("o"));
    bp_.dq = out_.ptr<float>(grad_name("q"));
    bp_.dk = out_.ptr<float>(grad_name("k"));
    bp_.dv = out_.ptr<float>(grad_name("v"));
    // One scratch buffer: the lse (kept from the forward to the backward), then the work
    // space of whichever of the two runs (one after the other on one stream).
    const size_t lse_bytes = (sizeof(float) * size_t(p_.B * p_.H * p_.Nq) + 255) / 256 * 256;
    bp_.fwd = p_;
    const size_t work = std::max(cuda::masked_forward_block_sparse_scratch_bytes(p_),
                                 cuda::masked_backward_block_sparse_scratch_bytes(bp_));
    char* base = static_cast<char*>(scratch(lse_bytes + work));
    p_.lse = reinterpret_cast<float*>(base);
    bp_.fwd = p_;
    scratch_ = base + lse_bytes;
    if (pass_ == Pass::bwd) {
      cuda::masked_forward_block_sparse(p_, scratch_, nullptr);
      ATTNBENCH_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }
  size_t device_bytes() const override { return CudaInstance::device_bytes() + mask_.bytes(); }
  nlohmann::json info() const override { return m_.info(); }

 protected:
  void launch(cudaStream_t stream) override {
    if (runs_forward(pass_)) cuda::masked_forward_block_sparse(p_, scratch_, stream);
    if (runs_backward(pass_)) cuda::masked_backward_block_sparse(bp_, scratch_, stream);
  }

 private:
  Pass pass_;
  PreparedMask m_;
  DeviceTensors mask_;
  MaskedParams p_;
  MaskedBackwardParams bp_;
  void* scratch_ = nullptr;
};
#endif

std::unique_ptr<Instance> make_cuda(const ImplArgs& a, bool dense) {
#if ATTNBENCH_HAVE_CUDA
  return std::make_unique<MaskedCudaInstance>(a, dense);
#else
  (void)a, (void)dense;
  throw std::runtime_error("masked cuda: " + cuda_unusable_reason());
#endif
}

class MaskedVariant final : public Variant {
 public:
  std::string name() const override { return "masked"; }
  std::string summary() const override {
    return "structured-mask attention (windows, strided, documents, prefix, registers, DAGs, mask attention; "
           "score mods) executed block-sparsely on CPU (Highway) and CUDA";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"B", 1, "batch size"},
        {"H", 8, "heads"},
        {"N", 1024, "tokens (Nq = Nkv = N unless given)"},
        {"Nq", 0, "queries; 0 = N (strided, strided_t, maskattn, none, causal may differ from Nkv)"},
        {"Nkv", 0, "keys; 0 = N"},
        {"D", 64, "head dimension"},
        {"mask", "window", "none, causal, window, wrapped_window, strided, strided_t, document, prefix, registers, dag, "
                           "dag_ancestors, maskattn, key_mask or sliding_window"},
        {"window", 256, "window width w (half-width h = w / 2): window, wrapped_window, strided(_t), registers; "
                   "sliding_window: the w most recent keys"},
        {"cyclic", false, "strided(_t): distances cyclic in the sequence"},
        {"causal", false, "document: also j <= i"},
        {"doc_len", 128, "document, prefix: mean document length (lengths uniform in [1, 2 doc_len - 1])"},
        {"prefix", 0, "prefix: shared prefix length P"},
        {"registers", 0, "registers: register tokens R (with a sliding window of width `window`)"},
        {"dag", "", "dag, dag_ancestors: a DAG file (JSON) or \"chain:K:L\" / \"le_attention:K\"; N must be its tokens"},
        {"threshold", 0.5, "maskattn: a pair is allowed iff sigmoid(logit) >= threshold"},
        {"attend_all", false, "maskattn: a query without allowed keys attends to every key (hepattn) instead of 0"},
        {"density", 0.02, "maskattn: target fraction of allowed pairs of the generated logits; key_mask: probability "
                          "that each key of a batch entry is kept"},
        {"sort_queries", true, "maskattn: queries ordered by the centre of their hits (else random order)"},
        {"score_mod", "none", "none, relative (-|i-j|), cyclic (-min(d, N-d)), alibi (m_h (j-i)) or softcap"},
        {"softcap", 0.0, "softcap: c in c tanh(s / c)"},
        {"rope", "none", "none or half: RoPE at the mask's position ids (DAG: per node), else token index"},
        {"tile_q", 64, "query rows per block-map tile (CPU; CUDA uses its compiled tile)"},
        {"tile_k", 64, "keys per block-map tile (CPU; CUDA uses its compiled tile)"},
        input_std_param("q, k, v"),
    };
  }

  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f32, DType::bf16, DType::f16}));
    for (bool dense : {false, true}) {
      v.push_back({dense ? "cpu_dense" : "cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16},
                   [dense](const ImplArgs& a) { return std::make_unique<MaskedCpuInstance>(a, dense); }});
      v.back().passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    }
    // Registered in every build; skipped with the reason where CUDA is not usable.
    for (bool dense : {false, true}) {
      v.push_back({dense ? "cuda_dense" : "cuda", Device::cuda, {DType::f32, DType::bf16, DType::f16},
                   [dense](const ImplArgs& a) { return make_cuda(a, dense); }});
      v.back().passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    }
    return v;
  }

  void validate(const Params& p) const override { masked_case(p); }

  /// A DAG fixes the token count: N from it unless N, Nq or Nkv is given.
  Params derived(const Params& given) const override {
    Params p = given;
    const std::string mask = given.value("mask", std::string());
    if ((mask == "dag" || mask == "dag_ancestors") && given.contains("dag") && !given.contains("N") &&
        !given.contains("Nq") && !given.contains("Nkv")) {
      const std::string spec = given.at("dag").get<std::string>();
      if (!spec.empty()) {
        try {
          p["N"] = layout_dag(load_dag(spec, "dag"), mask == "dag_ancestors").tokens;
        } catch (const InputError& e) {  // as masked_case(): name the parameter first
          const std::string msg = e.what();
          throw InputError(msg.rfind("dag:", 0) == 0 ? msg : "dag: " + msg);
        }
      }
    }
    return p;
  }

  Params self_contained(const Params& p) const override {
    Params q = p;
    if (q.contains("dag")) q["dag"] = dag_inline(q.at("dag").get<std::string>(), "dag");
    return q;
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    return make_inputs_as(p, seed, key, DType::f64);
  }

  /// Generated straight into `storage` (mask attention's logits are Nq·Nkv values).
  TensorMap make_inputs_as(const Params& p, uint64_t seed, const std::string& key, DType storage) const override {
    const MaskedCase c = masked_case(p);
    const double sd = input_std(p);
    TensorMap m;
    auto normal = [&](const char* name, Shape shape) {
      Tensor t(storage, std::move(shape));
      Rng rng(seed, key, name);
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, sd * rng.normal());
      m.emplace(name, std::move(t));
    };
    normal("q", q_shape(c));
    normal("k", kv_shape(c));
    normal("v", kv_shape(c));
    if (c.mask == "maskattn") {
      Tensor t(storage == DType::f64 ? DType::f64 : DType::f32, logits_shape(c));
      generate_mask_logits(c, [&](int64_t i, double x) { t.set(i, x); });
      m.emplace("mask_logits", std::move(t));
    }
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    return {{"o", dtype == DType::f64 ? DType::f64 : DType::f32, q_shape(masked_case(p))}};
  }

  /// q, k, v to the dtype; mask_logits stay f32 (f64 for the oracle).
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const DType want = name == "mask_logits" ? (dtype == DType::f64 ? DType::f64 : DType::f32) : dtype;
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const MaskedCase c = masked_case(p);
    const MaskStorage s = make_mask(c, nullptr);
    const ref::MaskDefinition def = mask_definition(c, in);
    ref::ScoreModDefinition mod{c.score_mod, c.softcap, c.H};
    std::vector<int32_t> pos_q, pos_k;
    if (c.rope) pos_q = s.pos_q, pos_k = s.pos_k;
    const auto q = require(in, "q", "masked reference").to_f64_vector();
    const auto k = require(in, "k", "masked reference").to_f64_vector();
    const auto v = require(in, "v", "masked reference").to_f64_vector();
    std::vector<double> o(size_t(numel(q_shape(c))));
    if (dtype == DType::f64)
      ref::masked_forward_reference<double>(c.B, c.H, c.D, def, mod, pos_q, pos_k, dtype, o.data(), q.data(), k.data(),
                                            v.data());
    else
      ref::masked_forward_reference<float>(c.B, c.H, c.D, def, mod, pos_q, pos_k, dtype, o.data(), q.data(), k.data(),
                                           v.data());
    TensorMap r;
    r.emplace("o", Tensor::from_f64(o, dtype == DType::f64 ? DType::f64 : DType::f32, q_shape(c)));
    return r;
  }

  std::vector<std::string> differentiable() const override { return {"q", "k", "v"}; }
  /// o gets the cotangent; mask_logits decide the mask and get no gradient.
  std::vector<std::string> cotangents(const Params&) const override { return {"o"}; }

  /// Inputs q, k, v (mask_logits) and the cotangent "do"; gradients dq, dk, dv (f32, f64 for the oracle).
  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const MaskedCase c = masked_case(p);
    const MaskStorage s = make_mask(c, nullptr);
    const ref::MaskDefinition def = mask_definition(c, in);
    ref::ScoreModDefinition mod{c.score_mod, c.softcap, c.H};
    std::vector<int32_t> pos_q, pos_k;
    if (c.rope) pos_q = s.pos_q, pos_k = s.pos_k;
    const auto q = require(in, "q", "masked reference backward").to_f64_vector();
    const auto k = require(in, "k", "masked reference backward").to_f64_vector();
    const auto v = require(in, "v", "masked reference backward").to_f64_vector();
    const auto dout = require_shape(in, grad_name("o"), q_shape(c), "masked reference backward").to_f64_vector();
    std::vector<double> dq(q.size()), dk(k.size()), dv(v.size());
    if (dtype == DType::f64)
      ref::masked_backward_reference<double>(c.B, c.H, c.D, def, mod, pos_q, pos_k, dtype, dq.data(), dk.data(),
                                             dv.data(), q.data(), k.data(), v.data(), dout.data());
    else
      ref::masked_backward_reference<float>(c.B, c.H, c.D, def, mod, pos_q, pos_k, dtype, dq.data(), dk.data(),
                                            dv.data(), q.data(), k.data(), v.data(), dout.data());
    const DType out = dtype == DType::f64 ? DType::f64 : DType::f32;
    TensorMap r;
    r.emplace(grad_name("q"), Tensor::from_f64(dq, out, q_shape(c)));
    r.emplace(grad_name("k"), Tensor::from_f64(dk, out, kv_shape(c)));
    r.emplace(grad_name("v"), Tensor::from_f64(dv, out, kv_shape(c)));
    return r;
  }

  /// Useful FLOPs: 4·H·D per allowed (b, i, j) pair (QKᵀ and PV, 2 per
  /// multiply-add), so GFLOP/s compares sparse and dense execution on the work
  /// the mask keeps. case_info() also records the dense-equivalent count.
  double flops(const Params& p) const override {
    const MaskedCase c = masked_case(p);
    return 4.0 * double(c.H) * double(c.D) * summarize(p, c).allowed_pairs;
  }

  /// The reference computes every (i, j) pair.
  double oracle_flops(const Params& p) const override {
    const MaskedCase c = masked_case(p);
    return 4.0 * double(c.B) * double(c.H) * double(c.D) * double(c.Nq) * double(c.Nkv);
  }

  /// Inputs, outputs and scratch: the reference materializes a dense mask
  /// (bits) and two (Nq, Nkv) score matrices per head in its compute precision
  /// plus f64 copies; the CPU kernel packs K and V and holds one tile per thread
  /// and the block map; CUDA counts device memory.
  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const MaskedCase c = masked_case(p);
    const double es = double(dtype_size(dtype)), os = dtype == DType::f64 ? 8.0 : 4.0;
    const double n_in = double(numel(q_shape(c)) + 2 * numel(kv_shape(c)));
    const double n_logits = c.mask == "maskattn" ? double(numel(logits_shape(c))) : 0.0;
    const double io = n_in * es + double(numel(q_shape(c))) * os + n_logits * (dtype == DType::f64 ? 8.0 : 4.0);
    const double pairs = double(c.Nq) * double(c.Nkv);
    if (impl == "reference") {
      const double cs = dtype == DType::f64 ? 8.0 : 4.0;
      return io + 8.0 * (n_in + n_logits + double(numel(q_shape(c)))) + pairs / 8.0 + 2.0 * cs * pairs +
             3.0 * cs * double(c.Nq + c.Nkv) * double(c.D);
    }
    const double n_tiles = std::ceil(double(c.Nq) / double(c.tile_q)) * std::ceil(double(c.Nkv) / double(c.tile_k));
    const double map = 5.0 * n_tiles * (c.mask == "maskattn" ? double(c.B) : 1.0);
    if (impl == "cpu" || impl == "cpu_dense") {
      MaskedParams kp;
      kp.B = c.B, kp.H = c.H, kp.Nq = c.Nq, kp.Nkv = c.Nkv, kp.D = c.D, kp.dtype = dtype;
      kp.tile_q = c.tile_q, kp.tile_k = c.tile_k;
      kp.n_qt = (c.Nq + c.tile_q - 1) / c.tile_q, kp.n_kt = (c.Nkv + c.tile_k - 1) / c.tile_k;
      return io + map + double(cpu::masked_forward_block_sparse_scratch_bytes(kp, omp_get_max_threads()));
    }
    return io + map;
  }

  /// Beyond the forward's model: the gradients (f32, f64 for the oracle), the
  /// cotangent and what each implementation's backward keeps: the reference
  /// recomputes the forward and materializes P, dP and dS per head; the CPU
  /// kernels keep the lse and (bwd) their copy of o, their scratch is the
  /// larger of the two passes' (the query side, the dq accumulators, the
  /// transposed block map); CUDA counts device memory likewise.
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const MaskedCase c = masked_case(p);
    const double os = dtype == DType::f64 ? 8.0 : 4.0;
    const double nq = double(numel(q_shape(c))), nkv = double(numel(kv_shape(c)));
    const double grads = (nq + 2.0 * nkv) * os, cot = nq * double(dtype_size(dtype));
    const double lse = 4.0 * double(c.B * c.H * c.Nq);
    if (impl == "reference") {
      const double cs = dtype == DType::f64 ? 8.0 : 4.0;
      return grads + cot + 8.0 * (2.0 * nq + 2.0 * nkv) + 4.0 * cs * double(c.Nq) * double(c.Nkv) +
             6.0 * cs * double(c.Nq + c.Nkv) * double(c.D);
    }
    if (impl == "cpu" || impl == "cpu_dense") {
      MaskedBackwardParams bp;
      MaskedParams& kp = bp.fwd;
      kp.B = c.B, kp.H = c.H, kp.Nq = c.Nq, kp.Nkv = c.Nkv, kp.D = c.D, kp.dtype = dtype;
      kp.tile_q = c.tile_q, kp.tile_k = c.tile_k;
      kp.n_qt = (c.Nq + c.tile_q - 1) / c.tile_q, kp.n_kt = (c.Nkv + c.tile_k - 1) / c.tile_k;
      kp.map_batches = c.mask == "maskattn" ? c.B : 1;
      const int threads = omp_get_max_threads();
      const double fwd = double(cpu::masked_forward_block_sparse_scratch_bytes(kp, threads));
      const double bwd = double(cpu::masked_backward_block_sparse_scratch_bytes(bp, threads));
      return grads + cot + lse + 4.0 * nq + std::max(0.0, bwd - fwd);
    }
    return grads + cot + lse + 4.0 * nq;
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"B", 1}, {"H", 2}, {"N", 77}, {"D", 24}, {"mask", "window"}, {"window", 16}, {"tile_q", 16}, {"tile_k", 16}},
        {{"B", 1}, {"H", 2}, {"N", 100}, {"D", 16}, {"mask", "wrapped_window"}, {"window", 30}, {"tile_q", 7},
         {"tile_k", 33}, {"rope", "half"}},
        {{"B", 1}, {"H", 2}, {"N", 93}, {"D", 16}, {"mask", "sliding_window"}, {"window", 20}, {"tile_q", 16},
         {"tile_k", 24}, {"rope", "half"}},
        {{"B", 1}, {"H", 2}, {"Nq", 37}, {"Nkv", 101}, {"D", 32}, {"mask", "strided"}, {"window", 9},
         {"cyclic", true}, {"tile_q", 13}, {"tile_k", 50}},
        {{"B", 1}, {"H", 3}, {"Nq", 101}, {"Nkv", 37}, {"D", 32}, {"mask", "strided_t"}, {"window", 5},
         {"score_mod", "alibi"}, {"tile_q", 16}, {"tile_k", 16}},
        {{"B", 2}, {"H", 1}, {"N", 150}, {"D", 40}, {"mask", "document"}, {"doc_len", 20}, {"causal", true},
         {"score_mod", "softcap"}, {"softcap", 5.0}, {"tile_q", 32}, {"tile_k", 64}},
        {{"B", 1}, {"H", 2}, {"N", 90}, {"D", 16}, {"mask", "prefix"}, {"prefix", 10}, {"doc_len", 15},
         {"score_mod", "relative"}, {"tile_q", 8}, {"tile_k", 24}},
        {{"B", 1}, {"H", 2}, {"N", 130}, {"D", 64}, {"mask", "registers"}, {"registers", 3}, {"window", 20},
         {"score_mod", "cyclic"}, {"tile_q", 200}, {"tile_k", 256}},
        {{"B", 2}, {"H", 2}, {"N", 15}, {"D", 16}, {"mask", "dag"}, {"dag", "chain:3:5"}, {"tile_q", 4},
         {"tile_k", 4}},
        {{"B", 1}, {"H", 2}, {"N", 224}, {"D", 32}, {"mask", "dag_ancestors"}, {"dag", "le_attention:20"},
         {"rope", "half"}, {"tile_q", 32}, {"tile_k", 32}},
        {{"B", 2}, {"H", 2}, {"Nq", 33}, {"Nkv", 300}, {"D", 32}, {"mask", "maskattn"}, {"density", 0.05},
         {"tile_q", 16}, {"tile_k", 64}},
        {{"B", 1}, {"H", 2}, {"Nq", 40}, {"Nkv", 200}, {"D", 32}, {"mask", "maskattn"}, {"density", 0.03},
         {"threshold", 0.3}, {"attend_all", true}, {"sort_queries", false}, {"tile_q", 16}, {"tile_k", 32}},
        {{"B", 1}, {"H", 2}, {"Nq", 40}, {"Nkv", 70}, {"D", 48}, {"mask", "causal"}, {"tile_q", 16}, {"tile_k", 16}},
        {{"B", 1}, {"H", 1}, {"N", 65}, {"D", 8}, {"mask", "none"}},
        {{"B", 3}, {"H", 2}, {"Nq", 45}, {"Nkv", 83}, {"D", 16}, {"mask", "key_mask"}, {"density", 0.5},
         {"tile_q", 16}, {"tile_k", 8}},
        {{"B", 2}, {"H", 2}, {"N", 70}, {"D", 24}, {"mask", "key_mask"}, {"density", 0.1}, {"score_mod", "alibi"},
         {"rope", "half"}, {"std", 2.0}, {"tile_q", 32}, {"tile_k", 16}},
    };
  }

  nlohmann::json case_info(const Params& p) const override {
    const MaskedCase c = masked_case(p);
    const MaskSummary s = summarize(p, c);
    const double dense = double(c.B) * double(c.Nq) * double(c.Nkv);
    const int64_t tiles = s.full + s.partial + s.empty;
    return {{"Nq", c.Nq},
            {"Nkv", c.Nkv},
            {"density", s.allowed_pairs / dense},
            {"useful_flops", 4.0 * double(c.H) * double(c.D) * s.allowed_pairs},
            {"dense_flops", 4.0 * double(c.H) * double(c.D) * dense},
            {"tiles_computed", s.full + s.partial},
            {"tiles_full", s.full},
            {"tiles_total", tiles},
            {"tiles_fraction", tiles ? double(s.full + s.partial) / double(tiles) : 0.0}};
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(MaskedVariant);

}  // namespace attnbench
