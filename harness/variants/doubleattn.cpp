// The double-attention pair block (the protein seed project's DoubleAttentionPairBlock, as
// DESIGN.md §5 states it): the `double_attention` variant, the update O of z + O, computed through
// a D × D global context gathered over all N² edges and distributed back to each. Reference:
// reference/doubleattn.hpp; CPU kernel: impls/cpu/doubleattn.cpp; docs/doubleattn.md.
//
// Parameters: N, c_z, D (reduced channels, DESIGN: c_z / 4). Inputs: z normal (std); weights
// with PyTorch's nn.Linear scale 1/√fan_in, biases 0.1·normal. Output: output (N, N, c_z).
// Gradients: z and every weight.
#include "impls/cpu/doubleattn.hpp"

#include <omp.h>

#include <cmath>
#include <map>
#include <stdexcept>
#include <string>

#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "reference/doubleattn.hpp"

namespace attnbench {
namespace {

ref::DoubleAttnDims dims_of(const Params& p) {
  return {p.at("N").get<int64_t>(), p.at("c_z").get<int64_t>(), p.at("D").get<int64_t>()};
}

DoubleAttnShape shape_of(const ref::DoubleAttnDims& d) { return {d.N, d.c_z, d.D}; }

template <class T>
Tensor to_tensor(const ref::Matrix<T>& m, DType dtype, const Shape& shape) {
  Tensor t(dtype, shape);
  if (t.numel() != m.size()) throw std::logic_error("double_attention: tensor size mismatch");
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, double(m.data()[i]));
  return t;
}

/// The kernel's weight (or gradient) pointers in its order, `at(name)` giving a tensor's data.
template <class Set, class At>
Set weight_pointers(const At& at) {
  return {at("proj_f.weight"), at("proj_g.weight"), at("proj_g.bias"), at("proj_h.weight"),
          at("proj_h.bias"),   at("proj_o.weight"), at("proj_o.bias")};
}

/// The CPU kernel, every pass: the forward keeps what the backward reads in the scratch, so bwd
/// runs the forward at setup and times the backward alone.
class DoubleAttnCpuInstance final : public Instance {
 public:
  explicit DoubleAttnCpuInstance(const ImplArgs& a) : pass_(a.pass), shape_(shape_of(dims_of(a.params))) {
    const std::string who = "double_attention cpu";
    w_ = weight_pointers<DoubleAttnWeightsF32>([&](const char* name) { return require_f32(a.inputs, name, who); });
    const Tensor& z = require(a.inputs, "z", who);
    if (z.dtype() != DType::f32 && !is_16bit(z.dtype()))
      throw std::invalid_argument(who + ": z must be f32, bf16 or f16");
    x_.z = z.raw();
    x_.z_dtype = z.dtype();
    x_.out = a.outputs.at("output").data<float>();
    threads_ = omp_get_max_threads();
    if (runs_backward(pass_)) {
      const Tensor& dout = require(a.inputs, "doutput", who);
      if (dout.dtype() != z.dtype()) throw std::invalid_argument(who + ": doutput must have z's dtype");
      x_.dout = dout.raw();
      x_.dz = a.outputs.at("dz").data<float>();
      g_ = weight_pointers<DoubleAttnGradsF32>(
          [&](const char* name) { return a.outputs.at(std::string("d") + name).data<float>(); });
    }
    scratch_ = a.workspace.allocate(runs_backward(pass_) ? doubleattn_backward_scratch_bytes(shape_, threads_)
                                                         : doubleattn_forward_scratch_bytes(shape_, threads_));
    if (pass_ == Pass::bwd) doubleattn_forward(shape_, w_, x_, scratch_, threads_);
  }
  void run() override {
    if (runs_forward(pass_)) doubleattn_forward(shape_, w_, x_, scratch_, threads_);
    if (runs_backward(pass_)) doubleattn_backward(shape_, w_, x_, g_, scratch_, threads_);
  }

 private:
  Pass pass_;
  DoubleAttnShape shape_;
  DoubleAttnWeightsF32 w_{};
  DoubleAttnGradsF32 g_{};
  DoubleAttnActivations x_{};
  int threads_ = 1;
  void* scratch_ = nullptr;
};

class DoubleAttnVariant final : public Variant {
 public:
  std::string name() const override { return "double_attention"; }
  std::string summary() const override {
    return "double-attention pair block (the protein seed's cheaper alternative to triangle attention): gather over "
           "all N^2 edges into a D x D context, distribute back, linear (the block adds z); CPU forward and backward "
           "as GEMMs";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"N", int64_t(64), "residues (z is N × N × c_z)"},
        {"c_z", int64_t(128), "pair representation channels"},
        {"D", int64_t(32), "reduced channels of the gather and distribute maps (DESIGN.md: c_z / 4)"},
        input_std_param("z"),
    };
  }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32, DType::bf16, DType::f16}));
    Impl cpu{"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16}, [](const ImplArgs& a) {
               return std::make_unique<DoubleAttnCpuInstance>(a);
             }};
    cpu.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    v.push_back(std::move(cpu));
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* k : {"N", "c_z", "D"})
      if (p.at(k).get<int64_t>() < 1) throw InputError(std::string(k) + ": expected an integer >= 1");
    if (p.at("N").get<int64_t>() > 4096) throw InputError("N: expected at most 4096 residues");
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    auto normal = [&](const std::string& name, const Shape& shape, double scale) {
      Tensor t(DType::f64, shape);
      Rng rng(seed, key, name);
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, scale * rng.normal());
      return t;
    };
    TensorMap m;
    m.emplace("z", normal("z", {d.N, d.N, d.c_z}, input_std(p)));
    for (const auto& [name, shape] : ref::doubleattn_weight_shapes(d))
      m.emplace(name, normal(name, shape, shape.size() == 1 ? 0.1 : 1.0 / std::sqrt(double(shape[1]))));
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    return {{"output", dtype == DType::f64 ? DType::f64 : DType::f32, {d.N, d.N, d.c_z}}};
  }

  /// f64 → everything f64; f32 → f32; bf16 / f16 → z and its cotangent in that dtype, the
  /// weights f32 (all arithmetic f32).
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const DType want = is_16bit(dtype) && name != "z" && name != "doutput" ? DType::f32 : dtype;
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    const Shape shape{d.N, d.N, d.c_z};
    TensorMap out;
    if (dtype == DType::f64)
      out.emplace("output", to_tensor(ref::doubleattn_forward_reference<double>(d, in, DType::f64), DType::f64, shape));
    else
      out.emplace("output", to_tensor(ref::doubleattn_forward_reference<float>(d, in, dtype), DType::f32, shape));
    return out;
  }

  std::vector<std::string> differentiable() const override {
    std::vector<std::string> v = {"z"};
    for (const auto& [name, shape] : ref::doubleattn_weight_shapes({})) v.push_back(name);
    return v;
  }

  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    std::map<std::string, Shape> shape = {{"z", {d.N, d.N, d.c_z}}};
    for (const auto& [name, s] : ref::doubleattn_weight_shapes(d)) shape[name] = s;
    TensorMap r;
    if (dtype == DType::f64) {
      for (auto& [name, g] : ref::doubleattn_backward_reference<double>(d, in, DType::f64))
        r.emplace("d" + name, to_tensor(g, DType::f64, shape.at(name)));
    } else {
      for (auto& [name, g] : ref::doubleattn_backward_reference<float>(d, in, dtype))
        r.emplace("d" + name, to_tensor(g, DType::f32, shape.at(name)));
    }
    return r;
  }

  /// Forward FLOPs per edge (docs/doubleattn.md): the projections 6·c_z·D, V = Aᵀ G and Y = Q V
  /// 4·D², the output 2·D·c_z, the two softmaxes 6·D (an exp counted as 1).
  double flops(const Params& p) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    const double E = double(d.N) * double(d.N), cz = double(d.c_z), D = double(d.D);
    return E * (8.0 * cz * D + 4.0 * D * D + 6.0 * D);
  }
  /// Backward: every GEMM twice, the softmaxes' backwards 8·D per edge.
  double backward_flops(const Params& p) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    const double E = double(d.N) * double(d.N), cz = double(d.c_z), D = double(d.D);
    return E * (16.0 * cz * D + 8.0 * D * D + 8.0 * D);
  }

  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    const double pair = double(d.N) * double(d.N) * double(d.c_z);
    const double master = pair * 8.0;
    const double io = pair * double(dtype_size(dtype)) + pair * (dtype == DType::f64 ? 8.0 : 4.0) * 2.0;
    const double scratch = impl == "cpu" ? double(doubleattn_forward_scratch_bytes(shape_of(d), omp_get_max_threads()))
                                         : ref::doubleattn_reference_scratch_bytes(d, dtype == DType::f64 ? 8.0 : 4.0);
    return master + io + scratch;
  }
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::DoubleAttnDims d = dims_of(p);
    const double pair = double(d.N) * double(d.N) * double(d.c_z);
    const double es = dtype == DType::f64 ? 8.0 : 4.0;
    const double grads = pair * es * 2.0 + pair * 8.0;
    if (impl == "cpu")
      return grads + double(doubleattn_backward_scratch_bytes(shape_of(d), omp_get_max_threads()) -
                            doubleattn_forward_scratch_bytes(shape_of(d), omp_get_max_threads()));
    return grads + 2.0 * ref::doubleattn_reference_scratch_bytes(d, es);
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 1}, {"c_z", 8}, {"D", 3}},
        {{"N", 7}, {"c_z", 12}, {"D", 5}},
        {{"N", 33}, {"c_z", 16}, {"D", 4}},
        {{"N", 20}, {"c_z", 9}, {"D", 13}},
    };
  }

  Params params_from_tensors(const TensorMap& t) const override {
    const ref::DoubleAttnDims d = ref::doubleattn_dims_from_tensors(t);
    return {{"N", d.N}, {"c_z", d.c_z}, {"D", d.D}};
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(DoubleAttnVariant);

}  // namespace attnbench
