// The "sdpa" variant: scaled-dot-product attention with GQA, causal (bottom-right
// aligned), key padding, RoPE and optional attention weights (DESIGN §5 "SDPA";
// math in reference/sdpa.hpp, kernels in impls/cpu/sdpa.cpp and impls/cuda/sdpa.cu).
//
// Parameters: B, H, Hkv (0 = H), N, Nq (0 = N), Nkv (0 = N), D, Dv (0 = D),
// causal, padding (draw kv_len[b] uniformly in [0, Nkv], 0 included, instead
// of Nkv), rope ("none" | "half" | "interleaved"), need_weights.
// Inputs: q (B, H, Nq, D), k (B, Hkv, Nkv, D), v (B, Hkv, Nkv, Dv), standard normal; kv_len (B,) int32.
// Outputs: o (B, H, Nq, Dv) and, with need_weights, weights (B, H, Nq, Nkv): f32
// for every input dtype (all kernels accumulate in f32 and store f32; the bf16/f16
// reference rounds its stages to the dtype and stores the rounded values), f64
// for the f64 oracle.
#include "impls/cpu/cpu_features.hpp"
#include "impls/cpu/sdpa.hpp"

#include <omp.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "reference/sdpa.hpp"

#if ATTNBENCH_HAVE_CUDA
#include "harness/cuda_support.hpp"
#include "impls/cuda/sdpa.hpp"
#endif

namespace attnbench {
namespace {

/// The parameters with the conveniences resolved (N → Nq/Nkv, Hkv 0 → H).
struct SdpaCase {
  ref::SdpaDims d;
  bool padding = false, need_weights = false;
};

int64_t get_int(const Params& p, const char* name) { return p.at(name).get<int64_t>(); }

SdpaCase case_of(const Params& p) {
  SdpaCase c;
  const int64_t N = get_int(p, "N");
  c.d.B = get_int(p, "B");
  c.d.H = get_int(p, "H");
  c.d.Hkv = get_int(p, "Hkv") > 0 ? get_int(p, "Hkv") : c.d.H;
  c.d.Nq = get_int(p, "Nq") > 0 ? get_int(p, "Nq") : N;
  c.d.Nkv = get_int(p, "Nkv") > 0 ? get_int(p, "Nkv") : N;
  c.d.D = get_int(p, "D");
  c.d.Dv = get_int(p, "Dv") > 0 ? get_int(p, "Dv") : c.d.D;
  c.d.causal = p.at("causal").get<bool>();
  c.d.rope = ref::parse_rope_mode(p.at("rope").get<std::string>());
  c.padding = p.at("padding").get<bool>();
  c.need_weights = p.at("need_weights").get<bool>();
  return c;
}

Shape q_shape(const ref::SdpaDims& d) { return {d.B, d.H, d.Nq, d.D}; }
Shape kv_shape(const ref::SdpaDims& d) { return {d.B, d.Hkv, d.Nkv, d.D}; }
Shape v_shape(const ref::SdpaDims& d) { return {d.B, d.Hkv, d.Nkv, d.dv()}; }
Shape o_shape(const ref::SdpaDims& d) { return {d.B, d.H, d.Nq, d.dv()}; }
Shape w_shape(const ref::SdpaDims& d) { return {d.B, d.H, d.Nq, d.Nkv}; }

/// Query-key pairs the causal mask allows (all pairs without it); padding is
/// data-dependent and not counted.
double allowed_pairs(const ref::SdpaDims& d) {
  if (!d.causal) return double(d.Nq) * double(d.Nkv);
  double n = 0;
  for (int64_t i = 0; i < d.Nq; ++i) n += double(std::clamp<int64_t>(i + d.Nkv - d.Nq + 1, 0, d.Nkv));
  return n;
}

SdpaRope rope_of(ref::RopeMode m) {
  switch (m) {
    case ref::RopeMode::half:
      return SdpaRope::half;
    case ref::RopeMode::interleaved:
      return SdpaRope::interleaved;
    default:
      return SdpaRope::none;
  }
}

/// Kernel parameters over tensors laid out as make_inputs/outputs describe
/// (pointers filled in by the caller: host or device).
SdpaParams kernel_params(const SdpaCase& c, DType dtype) {
  const ref::SdpaDims& d = c.d;
  SdpaParams p;
  p.B = d.B, p.H = d.H, p.Hkv = d.Hkv, p.Nq = d.Nq, p.Nkv = d.Nkv, p.D = d.D, p.Dv = d.dv();
  p.causal = d.causal;
  p.rope = rope_of(d.rope);
  p.dtype = dtype;
  p.q_strides = sdpa_dense_strides(d.H, d.Nq, d.D);
  p.o_strides = sdpa_dense_strides(d.H, d.Nq, d.dv());
  p.k_strides = sdpa_dense_strides(d.Hkv, d.Nkv, d.D);
  p.v_strides = sdpa_dense_strides(d.Hkv, d.Nkv, d.dv());
  p.w_strides = sdpa_dense_strides(d.H, d.Nq, d.Nkv);
  return p;
}

/// fwd: the forward. bwd: the forward in the constructor (setup) saving o and the
/// log-sum-exp in the workspace, run() the backward alone. fwd_bwd: both in run().
class SdpaCpuInstance final : public Instance {
 public:
  explicit SdpaCpuInstance(const ImplArgs& a) : pass_(a.pass), p_(kernel_params(case_of(a.params), a.dtype)) {
    const auto& in = a.inputs;
    p_.q = require(in, "q", "sdpa cpu").raw();
    p_.k = require(in, "k", "sdpa cpu").raw();
    p_.v = require(in, "v", "sdpa cpu").raw();
    p_.kv_len = require(in, "kv_len", "sdpa cpu").data<int32_t>();
    p_.o = a.outputs.at("o").data<float>();
    if (a.outputs.count("weights")) p_.weights = a.outputs.at("weights").data<float>();
    threads_ = omp_get_max_threads();
    size_t bytes = cpu::sdpa_forward_fused_scratch_bytes(p_, threads_);
    if (runs_backward(pass_)) {
      b_ = backward_params(p_, a);
      b_.fwd = p_;
      bytes = std::max(bytes, cpu::sdpa_backward_fused_scratch_bytes(b_, threads_));
      p_.lse = a.workspace.alloc<float>(size_t(p_.B * p_.H * p_.Nq));
      if (pass_ == Pass::bwd) {
        // The backward reads o: keep the forward's copy where the harness cannot NaN-fill it.
        float* o_out = p_.o;
        const size_t n_o = size_t(p_.B * p_.H * p_.Nq * p_.Dv);
        p_.o = a.workspace.alloc<float>(n_o);
        scratch_ = a.workspace.allocate(bytes);
        cpu::sdpa_forward_fused(p_, scratch_, threads_);
        std::copy_n(p_.o, n_o, o_out);
      }
      b_.fwd = p_;
    }
    if (!scratch_) scratch_ = a.workspace.allocate(bytes);
  }
  void run() override {
    if (runs_forward(pass_)) cpu::sdpa_forward_fused(p_, scratch_, threads_);
    if (runs_backward(pass_)) cpu::sdpa_backward_fused(b_, scratch_, threads_);
  }
  /// bench.kernel_path: the forward's path; the backward runs the f32 path
  /// (fwd_bwd: "forward+backward" when they differ).
  nlohmann::json info() const override {
    const std::string f32 = cpu::f32_kernel_path(), fwd = cpu::sdpa_forward_path(p_);
    if (pass_ == Pass::fwd) return {{"kernel_path", fwd}};
    if (pass_ == Pass::bwd || fwd == f32) return {{"kernel_path", f32}};
    return {{"kernel_path", fwd + "+" + f32}};
  }

 private:
  /// The backward's cotangent and gradients over the tensors (o, lse from the forward's parameters).
  static SdpaBackwardParams backward_params(const SdpaParams& p, const ImplArgs& a) {
    SdpaBackwardParams b;
    b.dout = require(a.inputs, grad_name("o"), "sdpa cpu").raw();
    b.dq_strides = p.q_strides, b.do_strides = p.o_strides;
    b.dk_strides = p.k_strides, b.dv_strides = p.v_strides;
    b.dq = a.outputs.at(grad_name("q")).data<float>();
    b.dk = a.outputs.at(grad_name("k")).data<float>();
    b.dv = a.outputs.at(grad_name("v")).data<float>();
    return b;
  }

  Pass pass_;
  SdpaParams p_;
  SdpaBackwardParams b_;
  int threads_ = 1;
  void* scratch_ = nullptr;
};

#if ATTNBENCH_HAVE_CUDA
/// fwd: the forward. bwd: the forward in the constructor (setup) saving o and the
/// log-sum-exp on the device, run() the backward alone. fwd_bwd: both in run().
class SdpaCudaInstance final : public CudaInstance {
 public:
  explicit SdpaCudaInstance(const ImplArgs& a)
      : CudaInstance(a), pass_(a.pass), p_(kernel_params(case_of(a.params), a.dtype)) {
    p_.q = in_.get("q");
    p_.k = in_.get("k");
    p_.v = in_.get("v");
    p_.kv_len = in_.ptr<int32_t>("kv_len");
    p_.o = out_.ptr<float>("o");
    if (a.outputs.count("weights")) p_.weights = out_.ptr<float>("weights");
    if (!runs_backward(pass_)) {
      scratch_ = scratch(cuda::sdpa_forward_flash_scratch_bytes(p_));
      return;
    }
    if (a.inputs.count(grad_name("weights")))
      throw std::runtime_error("sdpa cuda: the backward takes no cotangent of the weights");
    bp_.dout = in_.get(grad_name("o"));
    bp_.dq_strides = p_.q_strides, bp_.do_strides = p_.o_strides;
    bp_.dk_strides = p_.k_strides, bp_.dv_strides = p_.v_strides;
    bp_.dq = out_.ptr<float>(grad_name("q"));
    bp_.dk = out_.ptr<float>(grad_name("k"));
    bp_.dv = out_.ptr<float>(grad_name("v"));
    // One scratch buffer: the lse (kept from the forward to the backward), then the work
    // space of whichever of the two runs (they run one after the other on one stream).
    const size_t lse_bytes = (sizeof(float) * size_t(p_.B * p_.H * p_.Nq) + 255) / 256 * 256;
    bp_.fwd = p_;
    const size_t work =
        std::max(cuda::sdpa_forward_flash_scratch_bytes(p_), cuda::sdpa_backward_flash_scratch_bytes(bp_));
    char* base = static_cast<char*>(scratch(lse_bytes + work));
    p_.lse = reinterpret_cast<float*>(base);
    bp_.fwd = p_;
    scratch_ = base + lse_bytes;
    if (pass_ == Pass::bwd) {
      cuda::sdpa_forward_flash(p_, scratch_, nullptr);
      ATTNBENCH_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }

 protected:
  void launch(cudaStream_t stream) override {
    if (runs_forward(pass_)) cuda::sdpa_forward_flash(p_, scratch_, stream);
    if (runs_backward(pass_)) cuda::sdpa_backward_flash(bp_, scratch_, stream);
  }

 private:
  Pass pass_;
  SdpaParams p_;
  SdpaBackwardParams bp_;
  void* scratch_ = nullptr;
};
#endif

class SdpaVariant final : public Variant {
 public:
  std::string name() const override { return "sdpa"; }
  std::string summary() const override {
    return "scaled-dot-product attention: GQA, causal (bottom-right), key padding, RoPE, optional weights; "
           "fused online-softmax CPU (Highway) and flash-style CUDA forward";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"B", 1, "batch size"},
        {"H", 8, "query heads"},
        {"Hkv", 0, "key/value heads (GQA: H must be a multiple); 0 = H"},
        {"N", 1024, "sequence length used for Nq and Nkv when those are 0"},
        {"Nq", 0, "query length; 0 = N"},
        {"Nkv", 0, "key/value length; 0 = N"},
        {"D", 64, "head dimension of q and k (even with RoPE)"},
        {"Dv", 0,
         "head dimension of v and o (MLA-style heads; the fused selective attention's values); 0 = D. "
         "CPU only: cuda records it as skipped"},
        {"causal", false, "causal mask, bottom-right aligned: query i sees keys j <= i + Nkv - Nq"},
        {"padding", false, "draw key lengths kv_len[b] uniformly in [0, Nkv] (0 gives empty rows) instead of Nkv"},
        {"rope", "none", "rotary embedding: \"none\", \"half\" (pairs i, i+D/2) or \"interleaved\" (2i, 2i+1)"},
        {"need_weights", false, "also return the attention probabilities weights (B, H, Nq, Nkv)"},
        input_std_param("q, k, v"),
    };
  }

  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f32, DType::bf16, DType::f16}));
    v.push_back({"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16}, [](const ImplArgs& a) {
                   return std::make_unique<SdpaCpuInstance>(a);
                 }});
    v.back().passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    // Registered in every build so that suites naming it run everywhere: the runner records
    // it as skipped (cuda_unusable_reason) where no device is usable or CUDA is not built.
    v.push_back({"cuda", Device::cuda, {DType::f32, DType::bf16, DType::f16},
                 [](const ImplArgs& a) -> std::unique_ptr<Instance> {
#if ATTNBENCH_HAVE_CUDA
                   return std::make_unique<SdpaCudaInstance>(a);
#else
                   throw std::runtime_error("sdpa cuda: " + cuda_unusable_reason());
#endif
                 }});
    v.back().passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    v.back().unsupported = [](const Params& p) {
      const SdpaCase c = case_of(p);
      return c.d.dv() == c.d.D ? std::string() : "cuda has one head dimension for q, k and v (Dv != D is CPU only)";
    };
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* name : {"B", "H", "N", "D"})
      if (get_int(p, name) < 1) throw InputError(std::string(name) + ": expected >= 1, got " + p.at(name).dump());
    for (const char* name : {"Hkv", "Nq", "Nkv", "Dv"})
      if (get_int(p, name) < 0)
        throw InputError(std::string(name) + ": expected >= 0 (0 = default), got " + p.at(name).dump());
    const std::string rope = p.at("rope").get<std::string>();
    if (rope != "none" && rope != "half" && rope != "interleaved")
      throw InputError("rope: expected \"none\", \"half\" or \"interleaved\", got \"" + rope + "\"" +
                       did_you_mean(rope, {"none", "half", "interleaved"}));
    const SdpaCase c = case_of(p);
    if (c.d.H % c.d.Hkv != 0)
      throw InputError("Hkv: H = " + std::to_string(c.d.H) + " is not a multiple of Hkv = " + std::to_string(c.d.Hkv));
    if (c.d.rope != ref::RopeMode::none && c.d.D % 2 != 0)
      throw InputError("D: RoPE needs an even head dimension, got D = " + std::to_string(c.d.D));
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const SdpaCase c = case_of(p);
    const double sd = input_std(p);
    TensorMap m;
    auto normal = [&](const char* name, Shape shape) {
      Tensor t(DType::f64, std::move(shape));
      Rng rng(seed, key, name);
      for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = sd * rng.normal();
      m.emplace(name, std::move(t));
    };
    normal("q", q_shape(c.d));
    normal("k", kv_shape(c.d));
    normal("v", v_shape(c.d));
    Tensor len(DType::i32, {c.d.B});
    Rng rng(seed, key, "kv_len");
    for (int64_t b = 0; b < c.d.B; ++b) len.data<int32_t>()[b] = int32_t(c.padding ? rng.integer(0, c.d.Nkv) : c.d.Nkv);
    m.emplace("kv_len", std::move(len));
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    const SdpaCase c = case_of(p);
    const DType out = dtype == DType::f64 ? DType::f64 : DType::f32;
    std::vector<OutputSpec> o{{"o", out, o_shape(c.d)}};
    if (c.need_weights) o.push_back({"weights", out, w_shape(c.d)});
    return o;
  }

  /// kv_len indexes the keys: every value an integer in [0, Nkv].
  void validate_inputs(const Params& p, const TensorMap& in) const override {
    const SdpaCase c = case_of(p);
    const Tensor& len = require(in, "kv_len", "sdpa case file");
    for (int64_t b = 0; b < len.numel(); ++b) {
      const double x = len.get(b);
      if (!(x >= 0 && x <= double(c.d.Nkv) && x == std::floor(x)))
        throw InputError(fmt::format("tensor 'kv_len': [{}] = {}: expected an integer in [0, Nkv = {}]", b, x, c.d.Nkv));
    }
  }

  /// Floating inputs to the dtype; kv_len to int32 whatever a case file stored.
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const DType want = name == "kv_len" ? DType::i32 : is_floating(t.dtype()) ? dtype : t.dtype();
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const SdpaCase c = case_of(p);
    const auto q = require(in, "q", "sdpa reference").to_f64_vector();
    const auto k = require(in, "k", "sdpa reference").to_f64_vector();
    const auto v = require(in, "v", "sdpa reference").to_f64_vector();
    const Tensor& len_t = require(in, "kv_len", "sdpa reference");
    std::vector<int32_t> kv_len(size_t(c.d.B));
    for (int64_t b = 0; b < c.d.B; ++b) kv_len[size_t(b)] = int32_t(len_t.get(b));
    std::vector<double> o(size_t(numel(o_shape(c.d))));
    std::vector<double> w(c.need_weights ? size_t(numel(w_shape(c.d))) : 0);
    double* wp = c.need_weights ? w.data() : nullptr;
    if (dtype == DType::f64)
      ref::sdpa_forward_reference<double>(c.d, DType::f64, o.data(), wp, q.data(), k.data(), v.data(), kv_len.data());
    else
      ref::sdpa_forward_reference<float>(c.d, dtype, o.data(), wp, q.data(), k.data(), v.data(), kv_len.data());
    const DType out = dtype == DType::f64 ? DType::f64 : DType::f32;
    TensorMap r;
    r.emplace("o", Tensor::from_f64(o, out, o_shape(c.d)));
    if (c.need_weights) r.emplace("weights", Tensor::from_f64(w, out, w_shape(c.d)));
    return r;
  }

  std::vector<std::string> differentiable() const override { return {"q", "k", "v"}; }
  /// Only o gets a cotangent: the attention weights (need_weights) are an output to inspect, not to train.
  std::vector<std::string> cotangents(const Params&) const override { return {"o"}; }

  /// Inputs q, k, v, kv_len and the cotangent "do"; gradients dq, dk, dv (f32, f64 for the oracle).
  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const SdpaCase c = case_of(p);
    const auto q = require(in, "q", "sdpa reference backward").to_f64_vector();
    const auto k = require(in, "k", "sdpa reference backward").to_f64_vector();
    const auto v = require(in, "v", "sdpa reference backward").to_f64_vector();
    const auto dout = require_shape(in, grad_name("o"), o_shape(c.d), "sdpa reference backward").to_f64_vector();
    const Tensor& len_t = require(in, "kv_len", "sdpa reference backward");
    std::vector<int32_t> kv_len(size_t(c.d.B));
    for (int64_t b = 0; b < c.d.B; ++b) kv_len[size_t(b)] = int32_t(len_t.get(b));
    std::vector<double> dq(q.size()), dk(k.size()), dv(v.size());
    if (dtype == DType::f64)
      ref::sdpa_backward_reference<double>(c.d, DType::f64, dq.data(), dk.data(), dv.data(), q.data(), k.data(),
                                           v.data(), kv_len.data(), dout.data());
    else
      ref::sdpa_backward_reference<float>(c.d, dtype, dq.data(), dk.data(), dv.data(), q.data(), k.data(), v.data(),
                                          kv_len.data(), dout.data());
    const DType out = dtype == DType::f64 ? DType::f64 : DType::f32;
    TensorMap r;
    r.emplace(grad_name("q"), Tensor::from_f64(dq, out, q_shape(c.d)));
    r.emplace(grad_name("k"), Tensor::from_f64(dk, out, kv_shape(c.d)));
    r.emplace(grad_name("v"), Tensor::from_f64(dv, out, v_shape(c.d)));
    return r;
  }

  /// 2·B·H·(D + Dv)·pairs (4·B·H·D·pairs for Dv = D): QKᵀ and PV, 2 FLOPs per
  /// multiply-add each, over the pairs the causal mask allows (exactly: Nq·Nkv
  /// without it, N(N+1)/2 for Nq = Nkv). Padding (data-dependent) and the
  /// need_weights recomputation are not counted.
  double flops(const Params& p) const override {
    const SdpaCase c = case_of(p);
    return 2.0 * double(c.d.B) * double(c.d.H) * double(c.d.D + c.d.dv()) * allowed_pairs(c.d);
  }

  /// Inputs, outputs and scratch of one call: the reference materializes one
  /// (Nq, Nkv) score matrix per head (twice, for the product temporary) in its
  /// compute precision plus f64 copies of inputs and outputs; the CPU kernel
  /// packs K and V per kv head and one tile per thread; CUDA counts device memory.
  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const SdpaCase c = case_of(p);
    const ref::SdpaDims& d = c.d;
    const double es = double(dtype_size(dtype)), os = dtype == DType::f64 ? 8.0 : 4.0;
    const double n_in = double(numel(q_shape(d)) + numel(kv_shape(d)) + numel(v_shape(d)));
    const double n_out = double(numel(o_shape(d))) + (c.need_weights ? double(numel(w_shape(d))) : 0.0);
    const double io = n_in * es + n_out * os + 4.0 * double(d.B);
    if (impl == "reference") {
      const double cs = dtype == DType::f64 ? 8.0 : 4.0;
      return io + 8.0 * (n_in + n_out) + 2.0 * cs * double(d.Nq) * double(d.Nkv) +
             3.0 * cs * double(d.Nq + d.Nkv) * double(d.D);
    }
    if (impl == "cpu") {
      const SdpaParams kp = kernel_params(c, dtype);
      return io + double(cpu::sdpa_forward_fused_scratch_bytes(kp, omp_get_max_threads()));
    }
#if ATTNBENCH_HAVE_CUDA
    if (impl == "cuda") {
      SdpaParams kp = kernel_params(c, dtype);
      static float dummy;
      if (c.need_weights) kp.weights = &dummy;  // the scratch holds row statistics only with weights
      return io + double(cuda::sdpa_forward_flash_scratch_bytes(kp));
    }
#endif
    return io;
  }

  /// Beyond the forward's model: the gradients (shaped like q, k, v; f32, f64
  /// for the oracle), the cotangent (like o, in the dtype) and, per
  /// implementation, what the backward keeps: the reference recomputes the
  /// forward and materializes P, dP and dS per head; the CPU kernel keeps the
  /// lse and (bwd) its copy of o, and its scratch is the larger of the two passes';
  /// CUDA counts device memory likewise.
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const SdpaCase c = case_of(p);
    const ref::SdpaDims& d = c.d;
    const double os = dtype == DType::f64 ? 8.0 : 4.0;
    const double nq = double(numel(q_shape(d))), nkv = double(numel(kv_shape(d)) + numel(v_shape(d))) / 2.0;
    const double no = double(numel(o_shape(d)));
    const double grads = (nq + 2.0 * nkv) * os, cot = no * double(dtype_size(dtype)),
                 lse = 4.0 * double(d.B * d.H * d.Nq);
    if (impl == "reference") {
      const double cs = dtype == DType::f64 ? 8.0 : 4.0;
      return grads + cot + 8.0 * (nq + 2.0 * nkv + no) + 4.0 * cs * double(d.Nq) * double(d.Nkv) +
             6.0 * cs * double(d.Nq + d.Nkv) * double(std::max(d.D, d.dv()));
    }
    if (impl == "cpu") {
      SdpaBackwardParams bp;
      bp.fwd = kernel_params(c, dtype);
      const int threads = omp_get_max_threads();
      const double fwd = double(cpu::sdpa_forward_fused_scratch_bytes(bp.fwd, threads));
      const double bwd = double(cpu::sdpa_backward_fused_scratch_bytes(bp, threads));
      return grads + cot + lse + 4.0 * no + std::max(0.0, bwd - fwd);
    }
    return grads + cot + lse + 4.0 * no;
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"B", 1}, {"H", 2}, {"N", 1}, {"D", 64}},
        {{"B", 2}, {"H", 4}, {"Hkv", 2}, {"N", 17}, {"D", 40}, {"causal", true}, {"padding", true}},
        {{"B", 1}, {"H", 2}, {"N", 129}, {"D", 80}, {"causal", true}, {"rope", "half"}},
        {{"B", 1}, {"H", 2}, {"Hkv", 1}, {"N", 1000}, {"D", 128}, {"padding", true}},
        {{"B", 1},
         {"H", 2},
         {"Nq", 17},
         {"Nkv", 129},
         {"D", 64},
         {"causal", true},
         {"rope", "interleaved"},
         {"need_weights", true}},
        {{"B", 3},
         {"H", 2},
         {"Nq", 129},
         {"Nkv", 17},
         {"D", 64},
         {"causal", true},
         {"padding", true},
         {"need_weights", true}},
        {{"B", 1}, {"H", 1}, {"N", 1000}, {"D", 40}, {"causal", true}, {"rope", "half"}},
        // Dv != D: the fused selective attention's shape (q, k of 2·dh, values of dh) and the reverse.
        {{"B", 2},
         {"H", 4},
         {"Hkv", 2},
         {"Nq", 33},
         {"Nkv", 47},
         {"D", 64},
         {"Dv", 24},
         {"causal", true},
         {"padding", true},
         {"rope", "half"}},
        {{"B", 1}, {"H", 2}, {"N", 129}, {"D", 40}, {"Dv", 72}, {"need_weights", true}},
    };
  }

  nlohmann::json case_info(const Params& p) const override {
    const SdpaCase c = case_of(p);
    return {{"Nq", c.d.Nq},
            {"Nkv", c.d.Nkv},
            {"Hkv", c.d.Hkv},
            {"Dv", c.d.dv()},
            {"density", allowed_pairs(c.d) / (double(c.d.Nq) * double(c.d.Nkv))}};
  }

  /// Shapes from q (B, H, Nq, D), k (B, Hkv, Nkv, D) and v (Dv); need_weights when the
  /// file holds weights, padding when some kv_len is below Nkv. causal and rope
  /// are not visible in tensors: they come from the case file's metadata.
  Params params_from_tensors(const TensorMap& t) const override {
    const Tensor& q = require(t, "q", "sdpa case file");
    const Tensor& k = require(t, "k", "sdpa case file");
    if (q.rank() != 4 || k.rank() != 4) throw InputError("sdpa case file: q and k must have rank 4 (B, heads, N, D)");
    Params p = {{"B", q.dim(0)},  {"H", q.dim(1)},   {"Hkv", k.dim(1)}, {"N", q.dim(2)},
                {"Nq", q.dim(2)}, {"Nkv", k.dim(2)}, {"D", q.dim(3)},   {"need_weights", t.count("weights") > 0}};
    bool padded = false;
    if (auto it = t.find("kv_len"); it != t.end())
      for (int64_t b = 0; b < it->second.numel(); ++b) padded = padded || it->second.get(b) < double(k.dim(2));
    p["padding"] = padded;
    if (auto it = t.find("v"); it != t.end() && it->second.rank() == 4) p["Dv"] = it->second.dim(3);
    return p;
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(SdpaVariant);

}  // namespace attnbench
