// Triangle multiplicative update (AF2 Alg. 11/12, AF3 Alg. 12/13): the `trimul` variant
// (AF2 / OpenFold TriangleMultiplicationOutgoing/Incoming, with biases, OpenFold state_dict
// names) and the `trimul_af3` variant (AF3 / Boltz, no biases, Boltz names). One set of
// equations (reference/trimul.hpp), one CPU kernel (impls/cpu/trimul.cpp); math, names, FLOP
// and memory models: docs/trimul.md.
//
// Parameters: N, c_z, c_hidden, direction ("outgoing" | "incoming"), mask_fraction.
// Inputs: z (N, N, c_z) normal, mask (N, N) with round(mask_fraction·N²) zeros; weights with
// PyTorch's nn.Linear scale 1/√fan_in, biases 0.1·normal, layer-norm weights 1 + 0.1·normal.
// Output: output (N, N, c_z). Gradients: z and every weight and bias (the mask is not
// differentiable).
#include "impls/cpu/trimul.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>

#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "reference/trimul.hpp"

namespace attnbench {
namespace {

using ref::TrimulForm;

ref::TrimulDims dims_of(const Params& p, TrimulForm form) {
  ref::TrimulDims d;
  d.N = p.at("N").get<int64_t>();
  d.c_z = p.at("c_z").get<int64_t>();
  d.c_h = p.at("c_hidden").get<int64_t>();
  d.outgoing = p.at("direction").get<std::string>() == "outgoing";
  d.form = form;
  return d;
}

TrimulShape shape_of(const ref::TrimulDims& d) { return {d.N, d.c_z, d.c_h, d.outgoing}; }

Tensor random_tensor(const Shape& shape, double std, uint64_t seed, const std::string& key, const std::string& name) {
  Tensor t(DType::f64, shape);
  Rng rng(seed, key, name);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, std * rng.normal());
  return t;
}

template <class T>
Tensor to_tensor(const ref::Matrix<T>& m, DType dtype, const Shape& shape) {
  Tensor t(dtype, shape);
  if (t.numel() != m.size()) throw std::logic_error("trimul: gradient size mismatch");
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, double(m.data()[i]));
  return t;
}

/// The kernel's weight (or weight-gradient) pointers in its order, `at(name)` giving a
/// tensor's data; AF3's b projections are the second halves (`off`) of the fused weights.
template <class Set, class At>
Set weight_pointers(const ref::TrimulNames& n, int64_t off, const At& at) {
  using Ptr = decltype(at(std::string()));
  auto bias = [&](const std::string& name) { return n.biases ? at(name + ".bias") : Ptr(nullptr); };
  return {at(n.ln_in_w),
          at(n.ln_in_b),
          at(n.ap + ".weight"),
          bias(n.ap),
          at(n.ag + ".weight"),
          bias(n.ag),
          at(n.bp + ".weight") + off,
          bias(n.bp),
          at(n.bg + ".weight") + off,
          bias(n.bg),
          at(n.g + ".weight"),
          bias(n.g),
          at(n.ln_out_w),
          at(n.ln_out_b),
          at(n.o + ".weight"),
          bias(n.o)};
}

/// The CPU kernel over the variant's tensors, every pass: the forward keeps its activations in
/// the scratch, so bwd runs the forward at setup and times the backward alone.
class TrimulCpuInstance final : public Instance {
 public:
  TrimulCpuInstance(const ImplArgs& a, TrimulForm form) : pass_(a.pass) {
    const ref::TrimulDims d = dims_of(a.params, form);
    shape_ = shape_of(d);
    const ref::TrimulNames n = ref::trimul_names(form);
    const std::string who = "trimul cpu";
    auto f = [&](const std::string& name) { return require_f32(a.inputs, name, who); };
    const int64_t off = n.split ? d.c_h * d.c_z : 0;
    w_ = weight_pointers<TrimulWeightsF32>(n, off, f);
    const Tensor& z = require(a.inputs, "z", who);
    if (z.dtype() != DType::f32 && !is_16bit(z.dtype()))
      throw std::invalid_argument(who + ": z must be f32, bf16 or f16");
    x_.z = z.raw();
    x_.z_dtype = z.dtype();
    x_.mask = f("mask");
    x_.out = a.outputs.at("output").data<float>();
    threads_ = omp_get_max_threads();
    if (runs_backward(pass_)) {
      const Tensor& dout = require(a.inputs, "doutput", who);
      if (dout.dtype() != z.dtype()) throw std::invalid_argument(who + ": doutput must have z's dtype");
      x_.dout = dout.raw();
      x_.dz = a.outputs.at("dz").data<float>();
      auto g = [&](const std::string& name) { return a.outputs.at("d" + name).data<float>(); };
      g_ = weight_pointers<TrimulGradsF32>(n, off, g);
    }
    const size_t bytes = runs_backward(pass_) ? trimul_backward_scratch_bytes(shape_, threads_)
                                              : trimul_forward_scratch_bytes(shape_, threads_);
    scratch_ = a.workspace.allocate(bytes);
    if (pass_ == Pass::bwd) trimul_forward(shape_, w_, x_, scratch_, threads_);
  }
  void run() override {
    if (runs_forward(pass_)) trimul_forward(shape_, w_, x_, scratch_, threads_);
    if (runs_backward(pass_)) trimul_backward(shape_, w_, x_, g_, scratch_, threads_);
  }

 private:
  Pass pass_;
  TrimulShape shape_;
  TrimulWeightsF32 w_{};
  TrimulGradsF32 g_{};
  TrimulActivations x_{};
  int threads_ = 1;
  void* scratch_ = nullptr;
};

class TrimulVariant : public Variant {
 public:
  explicit TrimulVariant(TrimulForm form) : form_(form) {}
  std::string name() const override { return form_ == TrimulForm::af2 ? "trimul" : "trimul_af3"; }
  std::string summary() const override {
    return form_ == TrimulForm::af2
               ? "triangle multiplicative update, AF2 / OpenFold TriangleMultiplicationOutgoing/Incoming (biases, "
                 "OpenFold names): outgoing or incoming; CPU as GEMMs, forward and backward"
               : "triangle multiplicative update, AF3 / Boltz form (no biases, p_in/g_in/p_out/g_out): outgoing or "
                 "incoming; CPU as GEMMs, forward and backward";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"N", int64_t(64), "residues (z is N × N × c_z)"},
        {"c_z", int64_t(128), "pair representation channels"},
        {"c_hidden", int64_t(128), "hidden channels of a and b (OpenFold c_hidden; Boltz uses c_z)"},
        {"direction", std::string("outgoing"),
         "\"outgoing\" (t_ij = Σ_k a_ik b_jk, Alg. 11) or \"incoming\" (t_ij = Σ_k a_ki b_kj, Alg. 12)"},
        {"mask_fraction", 0.0, "fraction of pair mask entries set to 0 (chosen at random)"},
        input_std_param("input layer norm's output (its weight and bias: the norm cancels any scale of z)"),
    };
  }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32, DType::bf16, DType::f16}));
    Impl cpu{"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16}, [form = form_](const ImplArgs& a) {
               return std::make_unique<TrimulCpuInstance>(a, form);
             }};
    cpu.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    v.push_back(std::move(cpu));
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* k : {"N", "c_z", "c_hidden"})
      if (p.at(k).get<int64_t>() < 1) throw InputError(std::string(k) + ": expected an integer >= 1");
    if (p.at("N").get<int64_t>() > 4096) throw InputError("N: expected at most 4096 residues");
    const std::string dir = p.at("direction").get<std::string>();
    if (dir != "outgoing" && dir != "incoming")
      throw InputError("direction: expected \"outgoing\" or \"incoming\", got \"" + dir + "\"" +
                       (dir.empty() ? " (a case file's tensors cannot tell: give --shape direction=outgoing or "
                                      "direction=incoming, or __metadata__.params)"
                                    : ""));
    const double f = p.at("mask_fraction").get<double>();
    if (!(f >= 0.0 && f <= 1.0)) throw InputError("mask_fraction: expected a number in [0, 1]");
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    TensorMap m;
    // std scales the activations the projections see: z is layer-normed first, so the
    // input norm's affine parameters carry the scale (as in the triangle variant).
    const double sd = input_std(p);
    for (const auto& [name, shape] : ref::trimul_tensor_shapes(d)) {
      if (name == "mask") continue;
      const bool ln = name.find("norm") != std::string::npos;
      const double scale = name.find("norm_in") != std::string::npos ? sd : 1.0;
      const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
      if (name == "z") {
        m.emplace(name, random_tensor(shape, 1.0, seed, key, name));
      } else if (ln && !is_bias) {  // layer-norm weight
        Tensor t = random_tensor(shape, 0.1, seed, key, name);
        for (int64_t k = 0; k < t.numel(); ++k) t.set(k, scale * (1.0 + t.get(k)));
        m.emplace(name, std::move(t));
      } else if (is_bias) {
        m.emplace(name, random_tensor(shape, 0.1 * scale, seed, key, name));
      } else {
        m.emplace(name, random_tensor(shape, 1.0 / std::sqrt(double(shape[1])), seed, key, name));
      }
    }
    const int64_t NN = d.N * d.N;
    Tensor mask(DType::f64, {d.N, d.N});
    std::vector<int64_t> order(static_cast<size_t>(NN));
    std::iota(order.begin(), order.end(), 0);
    Rng rm(seed, key, "mask");
    for (int64_t i = NN - 1; i > 0; --i) std::swap(order[size_t(i)], order[size_t(rm.integer(0, i))]);
    const auto masked = int64_t(std::llround(p.at("mask_fraction").get<double>() * double(NN)));
    for (int64_t i = 0; i < NN; ++i) mask.set(order[size_t(i)], i < masked ? 0.0 : 1.0);
    m.emplace("mask", std::move(mask));
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    return {{"output", dtype == DType::f64 ? DType::f64 : DType::f32, {d.N, d.N, d.c_z}}};
  }

  /// f64 → everything f64; f32 → f32; bf16 / f16 → z and its cotangent in that dtype, the rest f32 ("bf16"
  /// means a bf16 pair representation; all arithmetic is f32).
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const bool pair = name == "z" || name == "doutput";
      const DType want = is_16bit(dtype) && !pair ? DType::f32 : dtype;
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    const Shape shape{d.N, d.N, d.c_z};
    TensorMap out;
    if (dtype == DType::f64)
      out.emplace("output", to_tensor(ref::trimul_forward_reference<double>(d, in, DType::f64), DType::f64, shape));
    else
      out.emplace("output", to_tensor(ref::trimul_forward_reference<float>(d, in, dtype), DType::f32, shape));
    return out;
  }

  std::vector<std::string> differentiable() const override {
    std::vector<std::string> v = {"z"};
    for (const auto& n : ref::trimul_weight_names(form_)) v.push_back(n);
    return v;
  }

  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    std::map<std::string, Shape> shape;
    for (const auto& [name, s] : ref::trimul_tensor_shapes(d)) shape[name] = s;
    TensorMap r;
    if (dtype == DType::f64) {
      for (auto& [name, g] : ref::trimul_backward_reference<double>(d, in, DType::f64))
        r.emplace("d" + name, to_tensor(g, DType::f64, shape.at(name)));
    } else {
      for (auto& [name, g] : ref::trimul_backward_reference<float>(d, in, dtype))
        r.emplace("d" + name, to_tensor(g, DType::f32, shape.at(name)));
    }
    return r;
  }

  /// Forward FLOPs (docs/trimul.md): the triangle product 2·N³·c_h; the projections
  /// 2·N²·c_z·(4·c_h + c_z) and the output 2·N²·c_h·c_z; layer norms, gates and products
  /// 8·N²·c_z + 8·N²·c_h + 6·N²·c_h + 4·N²·c_z (counting a sigmoid as 1).
  double flops(const Params& p) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    const double N = double(d.N), NN = N * N, h = double(d.c_h), cz = double(d.c_z);
    return 2.0 * NN * N * h + 2.0 * NN * cz * (4.0 * h + cz) + 2.0 * NN * h * cz + 12.0 * NN * cz + 14.0 * NN * h;
  }
  /// Backward: every GEMM twice (the input gradient and the weight gradient; the triangle
  /// product's dA and dB), the element-wise stages about twice the forward's.
  double backward_flops(const Params& p) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    const double N = double(d.N), NN = N * N, h = double(d.c_h), cz = double(d.c_z);
    return 4.0 * NN * N * h + 4.0 * NN * cz * (4.0 * h + cz) + 4.0 * NN * h * cz + 24.0 * NN * cz + 28.0 * NN * h;
  }

  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    const double NN = double(d.N) * double(d.N), pair = NN * double(d.c_z);
    const double es = double(dtype_size(dtype));
    const double master = (pair + NN) * 8.0;                            // f64 inputs
    const double io = pair * es + pair * (dtype == DType::f64 ? 8.0 : 4.0) * 2.0;  // z, output, oracle's
    double scratch = 0;
    if (impl == "cpu")
      scratch = double(trimul_forward_scratch_bytes(shape_of(d), omp_get_max_threads()));
    else
      scratch = ref::trimul_reference_scratch_bytes(d, dtype == DType::f64 ? 8.0 : 4.0);
    return master + io + scratch;
  }
  /// Beyond the forward: gradients (f32), the cotangent, the kernel's backward scratch (or the
  /// reference's recomputed forward and its gradients).
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    const double NN = double(d.N) * double(d.N), pair = NN * double(d.c_z);
    const double es = dtype == DType::f64 ? 8.0 : 4.0;
    const double grads = pair * es * 2.0 + pair * 8.0;  // dz and the oracle's, the f64 cotangent
    if (impl == "cpu")
      return grads + double(trimul_backward_scratch_bytes(shape_of(d), omp_get_max_threads()) -
                            trimul_forward_scratch_bytes(shape_of(d), omp_get_max_threads()));
    return grads + 2.0 * ref::trimul_reference_scratch_bytes(d, es);
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 1}, {"c_z", 8}, {"c_hidden", 5}, {"direction", "outgoing"}, {"mask_fraction", 0.0}},
        {{"N", 7}, {"c_z", 12}, {"c_hidden", 5}, {"direction", "incoming"}, {"mask_fraction", 0.25}},
        {{"N", 33}, {"c_z", 12}, {"c_hidden", 7}, {"direction", "outgoing"}, {"mask_fraction", 0.3}},
        {{"N", 33}, {"c_z", 9}, {"c_hidden", 13}, {"direction", "incoming"}, {"mask_fraction", 0.0}},
    };
  }

  nlohmann::json case_info(const Params& p) const override {
    const ref::TrimulDims d = dims_of(p, form_);
    const double N = double(d.N);
    return {{"triangle_product_flops", 2.0 * N * N * N * double(d.c_h)}};
  }

  /// N, c_z, c_hidden from the tensors; the direction cannot be told from them: it is left
  /// empty, and validate() asks for it (`--shape direction=...` or __metadata__.params).
  Params params_from_tensors(const TensorMap& t) const override {
    const ref::TrimulDims d = ref::trimul_dims_from_tensors(t, form_);
    return {{"N", d.N}, {"c_z", d.c_z}, {"c_hidden", d.c_h}, {"direction", ""}, {"mask_fraction", 0.0}};
  }

 private:
  TrimulForm form_;
};

class TrimulAf2Variant final : public TrimulVariant {
 public:
  TrimulAf2Variant() : TrimulVariant(TrimulForm::af2) {}
};
class TrimulAf3Variant final : public TrimulVariant {
 public:
  TrimulAf3Variant() : TrimulVariant(TrimulForm::af3) {}
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(TrimulAf2Variant);
ATTNBENCH_REGISTER_VARIANT(TrimulAf3Variant);

}  // namespace attnbench
