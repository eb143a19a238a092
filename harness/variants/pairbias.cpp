// Attention with pair bias on the single representation (Boltz `AttentionPairBias`, AF3 Alg. 24
// without conditioning, Boltz state_dict names): the `attention_pair_bias` variant, the
// Pairformer's s-track attention. Reference: reference/pairbias.hpp; CPU kernel:
// impls/cpu/pairbias.cpp; math, FLOP and memory models: docs/pairbias.md.
//
// Parameters: N, c_s, c_z, H (head width c_s / H), mask_fraction. Inputs: s (N, c_s) and z
// (N, N, c_z) normal, the key mask (N) with round(mask_fraction·N) zeros; weights with PyTorch's
// nn.Linear scale 1/√fan_in, proj_q.bias 0.1·normal, layer-norm weights 1 + 0.1·normal and
// biases 0.1·normal (both scaled by std). Output: output (N, c_s). Gradients: s, z and every weight.
#include "impls/cpu/pairbias.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>

#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "reference/pairbias.hpp"

namespace attnbench {
namespace {

ref::PairBiasDims dims_of(const Params& p) {
  ref::PairBiasDims d;
  d.N = p.at("N").get<int64_t>();
  d.c_s = p.at("c_s").get<int64_t>();
  d.c_z = p.at("c_z").get<int64_t>();
  d.H = p.at("H").get<int64_t>();
  return d;
}

PairBiasShape shape_of(const ref::PairBiasDims& d) { return {d.N, d.c_s, d.c_z, d.H}; }

template <class T>
Tensor to_tensor(const ref::Matrix<T>& m, DType dtype, const Shape& shape) {
  Tensor t(dtype, shape);
  if (t.numel() != m.size()) throw std::logic_error("attention_pair_bias: tensor size mismatch");
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, double(m.data()[i]));
  return t;
}

/// The kernel's weight (or gradient) pointers in its order, `at(name)` giving a tensor's data.
template <class Set, class At>
Set weight_pointers(const At& at) {
  return {at("norm_s.weight"), at("norm_s.bias"),     at("proj_q.weight"), at("proj_q.bias"),
          at("proj_k.weight"), at("proj_v.weight"),   at("proj_g.weight"), at("proj_z.0.weight"),
          at("proj_z.0.bias"), at("proj_z.1.weight"), at("proj_o.weight")};
}

/// The CPU kernel, every pass: the forward keeps what the backward reads in the scratch, so bwd
/// runs the forward at setup and times the backward alone.
class PairBiasCpuInstance final : public Instance {
 public:
  explicit PairBiasCpuInstance(const ImplArgs& a) : pass_(a.pass), shape_(shape_of(dims_of(a.params))) {
    const std::string who = "attention_pair_bias cpu";
    w_ = weight_pointers<PairBiasWeightsF32>([&](const char* name) { return require_f32(a.inputs, name, who); });
    const Tensor& s = require(a.inputs, "s", who);
    const Tensor& z = require(a.inputs, "z", who);
    if (s.dtype() != z.dtype() || (s.dtype() != DType::f32 && !is_16bit(s.dtype())))
      throw std::invalid_argument(who + ": s and z must both be f32, bf16 or f16");
    x_.s = s.raw();
    x_.z = z.raw();
    x_.dtype = s.dtype();
    x_.mask = require_f32(a.inputs, "mask", who);
    x_.out = a.outputs.at("output").data<float>();
    threads_ = omp_get_max_threads();
    if (runs_backward(pass_)) {
      const Tensor& dout = require(a.inputs, "doutput", who);
      if (dout.dtype() != s.dtype()) throw std::invalid_argument(who + ": doutput must have s's dtype");
      x_.dout = dout.raw();
      x_.ds = a.outputs.at("ds").data<float>();
      x_.dz = a.outputs.at("dz").data<float>();
      g_ = weight_pointers<PairBiasGradsF32>(
          [&](const char* name) { return a.outputs.at(std::string("d") + name).data<float>(); });
    }
    scratch_ = a.workspace.allocate(runs_backward(pass_) ? pair_bias_backward_scratch_bytes(shape_, threads_)
                                                         : pair_bias_forward_scratch_bytes(shape_, threads_));
    if (pass_ == Pass::bwd) pair_bias_forward(shape_, w_, x_, scratch_, threads_);
  }
  void run() override {
    if (runs_forward(pass_)) pair_bias_forward(shape_, w_, x_, scratch_, threads_);
    if (runs_backward(pass_)) pair_bias_backward(shape_, w_, x_, g_, scratch_, threads_);
  }

 private:
  Pass pass_;
  PairBiasShape shape_;
  PairBiasWeightsF32 w_{};
  PairBiasGradsF32 g_{};
  PairBiasActivations x_{};
  int threads_ = 1;
  void* scratch_ = nullptr;
};

class PairBiasVariant final : public Variant {
 public:
  std::string name() const override { return "attention_pair_bias"; }
  std::string summary() const override {
    return "attention with pair bias on the single track (Boltz AttentionPairBias, AF3 Alg. 24 unconditioned: "
           "LayerNorm, gated heads, bias from LayerNorm(z), key mask); CPU forward and backward";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"N", int64_t(64), "tokens (s is N × c_s, z is N × N × c_z)"},
        {"c_s", int64_t(384), "single representation channels (heads of c_s / H)"},
        {"c_z", int64_t(128), "pair representation channels"},
        {"H", int64_t(16), "heads (Boltz: 16 of 24)"},
        {"mask_fraction", 0.0, "fraction of tokens masked as keys (chosen at random)"},
        input_std_param("layer norms' outputs (their weights and biases: the norms cancel any scale of s and z)"),
    };
  }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32, DType::bf16, DType::f16}));
    Impl cpu{"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16}, [](const ImplArgs& a) {
               return std::make_unique<PairBiasCpuInstance>(a);
             }};
    cpu.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    v.push_back(std::move(cpu));
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* k : {"N", "c_s", "c_z", "H"})
      if (p.at(k).get<int64_t>() < 1) throw InputError(std::string(k) + ": expected an integer >= 1");
    if (p.at("N").get<int64_t>() > 4096) throw InputError("N: expected at most 4096 tokens");
    const int64_t cs = p.at("c_s").get<int64_t>(), H = p.at("H").get<int64_t>();
    if (cs % H != 0)
      throw InputError("H: expected a divisor of c_s = " + std::to_string(cs) + " (heads of c_s / H channels), got " +
                       std::to_string(H));
    const double f = p.at("mask_fraction").get<double>();
    if (!(f >= 0.0 && f <= 1.0)) throw InputError("mask_fraction: expected a number in [0, 1]");
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const ref::PairBiasDims d = dims_of(p);
    const double sd = input_std(p);
    auto normal = [&](const std::string& name, const Shape& shape, double scale, double offset) {
      Tensor t(DType::f64, shape);
      Rng rng(seed, key, name);
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, offset + scale * rng.normal());
      return t;
    };
    TensorMap m;
    m.emplace("s", normal("s", {d.N, d.c_s}, 1.0, 0.0));
    m.emplace("z", normal("z", {d.N, d.N, d.c_z}, 1.0, 0.0));
    for (const auto& [name, shape] : ref::pair_bias_weight_shapes(d)) {
      const bool ln =
          name == "norm_s.weight" || name == "norm_s.bias" || name == "proj_z.0.weight" || name == "proj_z.0.bias";
      const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
      if (ln)
        m.emplace(name, normal(name, shape, 0.1 * sd, bias ? 0.0 : sd));
      else if (bias)
        m.emplace(name, normal(name, shape, 0.1, 0.0));
      else
        m.emplace(name, normal(name, shape, 1.0 / std::sqrt(double(shape[1])), 0.0));
    }
    Tensor mask(DType::f64, {d.N});
    std::vector<int64_t> order(static_cast<size_t>(d.N));
    std::iota(order.begin(), order.end(), 0);
    Rng rm(seed, key, "mask");
    for (int64_t i = d.N - 1; i > 0; --i) std::swap(order[size_t(i)], order[size_t(rm.integer(0, i))]);
    const auto masked = int64_t(std::llround(p.at("mask_fraction").get<double>() * double(d.N)));
    for (int64_t i = 0; i < d.N; ++i) mask.set(order[size_t(i)], i < masked ? 0.0 : 1.0);
    m.emplace("mask", std::move(mask));
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    const ref::PairBiasDims d = dims_of(p);
    return {{"output", dtype == DType::f64 ? DType::f64 : DType::f32, {d.N, d.c_s}}};
  }

  /// f64 → everything f64; f32 → f32; bf16 / f16 → s, z and the cotangent in that dtype, the
  /// weights and the mask f32 (all arithmetic f32).
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const bool activation = name == "s" || name == "z" || name == "doutput";
      const DType want = is_16bit(dtype) && !activation ? DType::f32 : dtype;
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::PairBiasDims d = dims_of(p);
    const Shape shape{d.N, d.c_s};
    TensorMap out;
    if (dtype == DType::f64)
      out.emplace("output", to_tensor(ref::pair_bias_forward_reference<double>(d, in, DType::f64), DType::f64, shape));
    else
      out.emplace("output", to_tensor(ref::pair_bias_forward_reference<float>(d, in, dtype), DType::f32, shape));
    return out;
  }

  std::vector<std::string> differentiable() const override {
    std::vector<std::string> v = {"s", "z"};
    for (const auto& [name, shape] : ref::pair_bias_weight_shapes({})) v.push_back(name);
    return v;
  }

  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::PairBiasDims d = dims_of(p);
    std::map<std::string, Shape> shape;
    for (const auto& [name, s] : ref::pair_bias_input_shapes(d)) shape[name] = s;
    for (const auto& [name, s] : ref::pair_bias_weight_shapes(d)) shape[name] = s;
    TensorMap r;
    if (dtype == DType::f64) {
      for (auto& [name, g] : ref::pair_bias_backward_reference<double>(d, in, DType::f64))
        r.emplace("d" + name, to_tensor(g, DType::f64, shape.at(name)));
    } else {
      for (auto& [name, g] : ref::pair_bias_backward_reference<float>(d, in, dtype))
        r.emplace("d" + name, to_tensor(g, DType::f32, shape.at(name)));
    }
    return r;
  }

  /// Forward FLOPs (docs/pairbias.md): the projections 8·N·c_s², the output 2·N·c_s², the pair
  /// bias 2·N²·c_z·H, the attention 4·N²·c_s (S and P·V over all heads), the layer norms
  /// 8·N·c_s + 8·N²·c_z, the softmax 4·N²·H (a exp counted as 1), the gate 2·N·c_s.
  double flops(const Params& p) const override {
    const ref::PairBiasDims d = dims_of(p);
    const double N = double(d.N), NN = N * N, cs = double(d.c_s), cz = double(d.c_z), H = double(d.H);
    return 10.0 * N * cs * cs + 2.0 * NN * cz * H + 4.0 * NN * cs + 8.0 * N * cs + 8.0 * NN * cz + 4.0 * NN * H +
           2.0 * N * cs;
  }
  /// Backward: the linear layers' GEMMs twice (input and weight gradients), the attention 2.5 ×
  /// its forward (FlashAttention's convention), the row-wise stages twice.
  double backward_flops(const Params& p) const override {
    const ref::PairBiasDims d = dims_of(p);
    const double N = double(d.N), NN = N * N, cs = double(d.c_s), cz = double(d.c_z), H = double(d.H);
    return 20.0 * N * cs * cs + 4.0 * NN * cz * H + 10.0 * NN * cs + 16.0 * N * cs + 16.0 * NN * cz + 8.0 * NN * H +
           4.0 * N * cs;
  }

  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::PairBiasDims d = dims_of(p);
    const double NN = double(d.N) * double(d.N), act = double(d.N) * double(d.c_s) + NN * double(d.c_z);
    const double weights = 5.0 * double(d.c_s) * double(d.c_s) + double(d.H) * double(d.c_z);
    const double out = double(d.N) * double(d.c_s);
    const double master = (act + weights + double(d.N)) * 8.0;
    const double io = act * double(dtype_size(dtype)) + out * (dtype == DType::f64 ? 8.0 : 4.0) * 2.0;
    const double scratch = impl == "cpu" ? double(pair_bias_forward_scratch_bytes(shape_of(d), omp_get_max_threads()))
                                         : ref::pair_bias_reference_scratch_bytes(d, dtype == DType::f64 ? 8.0 : 4.0);
    return master + io + scratch;
  }
  /// Beyond the forward: ds, dz (and the oracle's), the f64 cotangent, the weights' gradients,
  /// the kernel's backward scratch (or the reference's recomputed forward and its gradients).
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::PairBiasDims d = dims_of(p);
    const double NN = double(d.N) * double(d.N), act = double(d.N) * double(d.c_s) + NN * double(d.c_z);
    const double weights = 5.0 * double(d.c_s) * double(d.c_s) + double(d.H) * double(d.c_z);
    const double es = dtype == DType::f64 ? 8.0 : 4.0;
    const double grads = act * es * 2.0 + double(d.N) * double(d.c_s) * 8.0 + weights * 12.0;
    if (impl == "cpu")
      return grads + double(pair_bias_backward_scratch_bytes(shape_of(d), omp_get_max_threads()) -
                            pair_bias_forward_scratch_bytes(shape_of(d), omp_get_max_threads()));
    return grads + 2.0 * ref::pair_bias_reference_scratch_bytes(d, es);
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 1}, {"c_s", 8}, {"c_z", 4}, {"H", 2}, {"mask_fraction", 0.0}},
        {{"N", 7}, {"c_s", 12}, {"c_z", 5}, {"H", 3}, {"mask_fraction", 0.3}},
        {{"N", 33}, {"c_s", 16}, {"c_z", 8}, {"H", 4}, {"mask_fraction", 0.25}},
        {{"N", 70}, {"c_s", 6}, {"c_z", 3}, {"H", 1}, {"mask_fraction", 1.0}},
    };
  }

  Params params_from_tensors(const TensorMap& t) const override {
    const ref::PairBiasDims d = ref::pair_bias_dims_from_tensors(t);
    return {{"N", d.N}, {"c_s", d.c_s}, {"c_z", d.c_z}, {"H", d.H}, {"mask_fraction", 0.0}};
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(PairBiasVariant);

}  // namespace attnbench
