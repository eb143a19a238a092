// The Pairformer's transition (AF3 Alg. 11; Boltz `Transition`, Boltz state_dict names): the
// `transition` variant, a SwiGLU MLP applied to every row of the pair representation z
// (track "pair", x (N, N, c)) or of the single representation s (track "single", x (N, c)).
// Reference: reference/transition.hpp; CPU kernel: impls/cpu/transition.cpp; math, FLOP and
// memory models: docs/transition.md.
//
// Parameters: N, c, hidden (Boltz: 4·c), track. Inputs: x normal; fc weights with PyTorch's
// nn.Linear scale 1/√fan_in; norm.weight 1 + 0.1·normal, norm.bias 0.1·normal (both scaled by
// std: the norm cancels any scale of x). Output: output, x's shape. Gradients: x and every weight.
#include "impls/cpu/transition.hpp"

#include <omp.h>

#include <cmath>
#include <map>
#include <stdexcept>
#include <string>

#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "reference/transition.hpp"

namespace attnbench {
namespace {

ref::TransitionDims dims_of(const Params& p) {
  ref::TransitionDims d;
  d.N = p.at("N").get<int64_t>();
  d.c = p.at("c").get<int64_t>();
  d.hidden = p.at("hidden").get<int64_t>();
  d.pair = p.at("track").get<std::string>() == "pair";
  return d;
}

TransitionShape shape_of(const ref::TransitionDims& d) { return {d.rows(), d.c, d.hidden}; }

template <class T>
Tensor to_tensor(const ref::Matrix<T>& m, DType dtype, const Shape& shape) {
  Tensor t(dtype, shape);
  if (t.numel() != m.size()) throw std::logic_error("transition: tensor size mismatch");
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, double(m.data()[i]));
  return t;
}

/// The CPU kernel, every pass: the forward keeps its activations in the scratch, so bwd runs
/// the forward at setup and times the backward alone.
class TransitionCpuInstance final : public Instance {
 public:
  explicit TransitionCpuInstance(const ImplArgs& a) : pass_(a.pass), shape_(shape_of(dims_of(a.params))) {
    const std::string who = "transition cpu";
    auto f = [&](const char* name) { return require_f32(a.inputs, name, who); };
    w_ = {f("norm.weight"), f("norm.bias"), f("fc1.weight"), f("fc2.weight"), f("fc3.weight")};
    const Tensor& x = require(a.inputs, "x", who);
    if (x.dtype() != DType::f32 && !is_16bit(x.dtype()))
      throw std::invalid_argument(who + ": x must be f32, bf16 or f16");
    x_.x = x.raw();
    x_.x_dtype = x.dtype();
    x_.out = a.outputs.at("output").data<float>();
    threads_ = omp_get_max_threads();
    if (runs_backward(pass_)) {
      const Tensor& dout = require(a.inputs, "doutput", who);
      if (dout.dtype() != x.dtype()) throw std::invalid_argument(who + ": doutput must have x's dtype");
      x_.dout = dout.raw();
      x_.dx = a.outputs.at("dx").data<float>();
      auto g = [&](const char* name) { return a.outputs.at(std::string("d") + name).data<float>(); };
      g_ = {g("norm.weight"), g("norm.bias"), g("fc1.weight"), g("fc2.weight"), g("fc3.weight")};
    }
    scratch_ = a.workspace.allocate(runs_backward(pass_) ? transition_backward_scratch_bytes(shape_, threads_)
                                                         : transition_forward_scratch_bytes(shape_, threads_));
    if (pass_ == Pass::bwd) transition_forward(shape_, w_, x_, scratch_, threads_);
  }
  void run() override {
    if (runs_forward(pass_)) transition_forward(shape_, w_, x_, scratch_, threads_);
    if (runs_backward(pass_)) transition_backward(shape_, w_, x_, g_, scratch_, threads_);
  }

 private:
  Pass pass_;
  TransitionShape shape_;
  TransitionWeightsF32 w_{};
  TransitionGradsF32 g_{};
  TransitionActivations x_{};
  int threads_ = 1;
  void* scratch_ = nullptr;
};

class TransitionVariant final : public Variant {
 public:
  std::string name() const override { return "transition"; }
  std::string summary() const override {
    return "Pairformer transition (AF3 Alg. 11, Boltz Transition: LayerNorm, SwiGLU, no biases) on the pair or "
           "the single track; CPU as GEMMs, forward and backward";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"N", int64_t(64), "residues (x is N × N × c on the pair track, N × c on the single track)"},
        {"c", int64_t(128), "channels (Boltz: c_z 128 on the pair track, c_s 384 on the single track)"},
        {"hidden", int64_t(512), "hidden channels of fc1 and fc2 (Boltz: 4·c)"},
        {"track", std::string("pair"), "\"pair\" (x = z, N² rows) or \"single\" (x = s, N rows)"},
        input_std_param("layer norm's output (its weight and bias: the norm cancels any scale of x)"),
    };
  }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32, DType::bf16, DType::f16}));
    Impl cpu{"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16}, [](const ImplArgs& a) {
               return std::make_unique<TransitionCpuInstance>(a);
             }};
    cpu.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    v.push_back(std::move(cpu));
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* k : {"N", "c", "hidden"})
      if (p.at(k).get<int64_t>() < 1) throw InputError(std::string(k) + ": expected an integer >= 1");
    const std::string track = p.at("track").get<std::string>();
    if (track != "pair" && track != "single")
      throw InputError("track: expected \"pair\" or \"single\", got \"" + track + "\"");
    const int64_t N = p.at("N").get<int64_t>();
    if (N > (track == "pair" ? 4096 : int64_t(1) << 24))
      throw InputError(track == "pair" ? "N: expected at most 4096 residues on the pair track"
                                       : "N: expected at most 16777216 rows on the single track");
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const ref::TransitionDims d = dims_of(p);
    const double sd = input_std(p);
    auto normal = [&](const std::string& name, const Shape& shape, double scale, double offset) {
      Tensor t(DType::f64, shape);
      Rng rng(seed, key, name);
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, offset + scale * rng.normal());
      return t;
    };
    TensorMap m;
    m.emplace("x", normal("x", d.x_shape(), 1.0, 0.0));
    m.emplace("norm.weight", normal("norm.weight", {d.c}, 0.1 * sd, sd));
    m.emplace("norm.bias", normal("norm.bias", {d.c}, 0.1 * sd, 0.0));
    for (const char* fc : {"fc1.weight", "fc2.weight", "fc3.weight"}) {
      const Shape s = std::string(fc) == "fc3.weight" ? Shape{d.c, d.hidden} : Shape{d.hidden, d.c};
      m.emplace(fc, normal(fc, s, 1.0 / std::sqrt(double(s[1])), 0.0));
    }
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    return {{"output", dtype == DType::f64 ? DType::f64 : DType::f32, dims_of(p).x_shape()}};
  }

  /// f64 → everything f64; f32 → f32; bf16 / f16 → x and its cotangent in that dtype, the
  /// weights f32 (a bf16 activation; all arithmetic f32).
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const bool activation = name == "x" || name == "doutput";
      const DType want = is_16bit(dtype) && !activation ? DType::f32 : dtype;
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::TransitionDims d = dims_of(p);
    TensorMap out;
    if (dtype == DType::f64)
      out.emplace("output",
                  to_tensor(ref::transition_forward_reference<double>(d, in, DType::f64), DType::f64, d.x_shape()));
    else
      out.emplace("output", to_tensor(ref::transition_forward_reference<float>(d, in, dtype), DType::f32, d.x_shape()));
    return out;
  }

  std::vector<std::string> differentiable() const override {
    std::vector<std::string> v = {"x"};
    for (const auto& [name, shape] : ref::transition_weight_shapes({})) v.push_back(name);
    return v;
  }

  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::TransitionDims d = dims_of(p);
    std::map<std::string, Shape> shape = {{"x", d.x_shape()}};
    for (const auto& [name, s] : ref::transition_weight_shapes(d)) shape[name] = s;
    TensorMap r;
    if (dtype == DType::f64) {
      for (auto& [name, g] : ref::transition_backward_reference<double>(d, in, DType::f64))
        r.emplace("d" + name, to_tensor(g, DType::f64, shape.at(name)));
    } else {
      for (auto& [name, g] : ref::transition_backward_reference<float>(d, in, dtype))
        r.emplace("d" + name, to_tensor(g, DType::f32, shape.at(name)));
    }
    return r;
  }

  /// Forward FLOPs per row (docs/transition.md): the three GEMMs 6·c·hidden, the layer norm
  /// 8·c, the SwiGLU 4·hidden (a sigmoid counted as 1).
  double flops(const Params& p) const override {
    const ref::TransitionDims d = dims_of(p);
    const double c = double(d.c), h = double(d.hidden);
    return double(d.rows()) * (6.0 * c * h + 8.0 * c + 4.0 * h);
  }
  /// Backward: every GEMM twice (input and weight gradients), the row-wise stages twice.
  double backward_flops(const Params& p) const override {
    const ref::TransitionDims d = dims_of(p);
    const double c = double(d.c), h = double(d.hidden);
    return double(d.rows()) * (12.0 * c * h + 16.0 * c + 8.0 * h);
  }

  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::TransitionDims d = dims_of(p);
    const double act = double(d.rows()) * double(d.c), weights = 3.0 * double(d.c) * double(d.hidden);
    const double master = (act + weights) * 8.0;  // f64 inputs
    const double io =
        act * double(dtype_size(dtype)) + act * (dtype == DType::f64 ? 8.0 : 4.0) * 2.0;  // x, out, oracle's
    const double scratch = impl == "cpu" ? double(transition_forward_scratch_bytes(shape_of(d), omp_get_max_threads()))
                                         : ref::transition_reference_scratch_bytes(d, dtype == DType::f64 ? 8.0 : 4.0);
    return master + io + scratch;
  }
  /// Beyond the forward: dx (and the oracle's), the f64 cotangent, the weights' gradients, the
  /// kernel's backward scratch (or the reference's recomputed forward and its gradients).
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::TransitionDims d = dims_of(p);
    const double act = double(d.rows()) * double(d.c), weights = 3.0 * double(d.c) * double(d.hidden);
    const double es = dtype == DType::f64 ? 8.0 : 4.0;
    const double grads = act * es * 2.0 + act * 8.0 + weights * 12.0;
    if (impl == "cpu")
      return grads + double(transition_backward_scratch_bytes(shape_of(d), omp_get_max_threads()) -
                            transition_forward_scratch_bytes(shape_of(d), omp_get_max_threads()));
    return grads + 2.0 * ref::transition_reference_scratch_bytes(d, es);
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 1}, {"c", 8}, {"hidden", 5}, {"track", "pair"}},
        {{"N", 7}, {"c", 12}, {"hidden", 48}, {"track", "pair"}},
        {{"N", 33}, {"c", 9}, {"hidden", 13}, {"track", "single"}},
        {{"N", 13}, {"c", 16}, {"hidden", 37}, {"track", "pair"}},
    };
  }

  Params params_from_tensors(const TensorMap& t) const override {
    const ref::TransitionDims d = ref::transition_dims_from_tensors(t);
    return {{"N", d.N}, {"c", d.c}, {"hidden", d.hidden}, {"track", d.pair ? "pair" : "single"}};
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(TransitionVariant);

}  // namespace attnbench
