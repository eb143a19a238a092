// Triangle attention (AlphaFold2 Alg. 13/14, OpenFold `TriangleAttention`): the
// `triangle_attention` variant. Math, dims, FLOP and memory models, case files: docs/triangle.md.
#include "impls/cpu/triangle.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>

#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "reference/common.hpp"
#include "reference/triangle.hpp"
#if ATTNBENCH_HAVE_CUDA
#include "harness/cuda_support.hpp"
#include "impls/cuda/triangle.hpp"
#endif

namespace attnbench {
namespace {

ref::TriangleDims dims_of(const Params& p) {
  ref::TriangleDims d;
  d.N = p.at("N").get<int64_t>();
  d.c_z = p.at("c_z").get<int64_t>();
  d.c = p.at("c").get<int64_t>();
  d.H = p.at("H").get<int64_t>();
  d.starting = p.at("starting").get<bool>();
  return d;
}

triangle::TriangleShape shape_of(const Params& p) {
  const ref::TriangleDims d = dims_of(p);
  return {d.N, d.c_z, d.c, d.H, d.starting};
}

/// One tensor of normals · std drawn from the stream (seed, key, name), stored in `storage`.
Tensor random_tensor(const Shape& shape, double std, uint64_t seed, const std::string& key, const std::string& name,
                     DType storage) {
  Tensor t(storage, shape);
  Rng rng(seed, key, name);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, std * rng.normal());
  return t;
}

const float* f32(const TensorMap& in, const std::string& name) { return require_f32(in, name, "triangle_attention"); }

/// The weights as f32 pointers; `ptr(name)` maps a tensor name to its (host or device) data.
template <class Ptr>
TriangleWeightsF32 weights_f32(const Ptr& ptr) {
  return {ptr("layer_norm.weight"),   ptr("layer_norm.bias"),     ptr("linear.weight"),
          ptr("mha.linear_q.weight"), ptr("mha.linear_k.weight"), ptr("mha.linear_v.weight"),
          ptr("mha.linear_g.weight"), ptr("mha.linear_g.bias"),   ptr("mha.linear_o.weight"),
          ptr("mha.linear_o.bias")};
}

DType z_dtype(const TensorMap& in) {
  const Tensor& z = require(in, "z", "triangle_attention");
  if (z.dtype() != DType::f32 && !is_16bit(z.dtype()))
    throw std::invalid_argument("triangle_attention: z must be f32, bf16 or f16");
  return z.dtype();
}

/// Elements of the weights.
double weight_count(const ref::TriangleDims& d) {
  const double Hc = double(d.H * d.c);
  return double(d.c_z) * (2.0 + double(d.H) + 5.0 * Hc + 1.0) + Hc;
}

/// The fused CPU kernels, every pass: weights and z read in place; scratch taken once at setup.
/// With a backward the forward saves its output and log-sum-exp (bwd runs it at setup, so
/// run() times the backward alone).
class TriangleCpuInstance final : public Instance {
 public:
  explicit TriangleCpuInstance(const ImplArgs& a)
      : pass_(a.pass),
        shape_(shape_of(a.params)),
        w_(weights_f32([&](const char* n) { return f32(a.inputs, n); })),
        x_{require(a.inputs, "z", "triangle_attention").raw(), z_dtype(a.inputs), f32(a.inputs, "mask")},
        out_(a.outputs.at("output").data<float>()),
        threads_(omp_get_max_threads()),
        scratch_(a.workspace.allocate(triangle_attention_forward_fused_scratch_bytes(shape_, threads_))) {
    if (!runs_backward(pass_)) return;
    const Tensor& dout = require(a.inputs, "doutput", "triangle_attention");
    if (dout.dtype() != x_.z_dtype) throw std::invalid_argument("triangle_attention: doutput must have z's dtype");
    dout_ = dout.raw();
    auto grad = [&](const char* n) { return a.outputs.at(std::string("d") + n).data<float>(); };
    g_ = {grad("z"),
          grad("layer_norm.weight"),
          grad("layer_norm.bias"),
          grad("linear.weight"),
          grad("mha.linear_q.weight"),
          grad("mha.linear_k.weight"),
          grad("mha.linear_v.weight"),
          grad("mha.linear_g.weight"),
          grad("mha.linear_g.bias"),
          grad("mha.linear_o.weight"),
          grad("mha.linear_o.bias")};
    const int64_t NN = shape_.N * shape_.N;
    saved_.lse = static_cast<float*>(a.workspace.allocate(size_t(NN * shape_.H) * sizeof(float)));
    saved_.o = static_cast<float*>(a.workspace.allocate(size_t(NN * shape_.hidden()) * sizeof(float)));
    bwd_scratch_ = a.workspace.allocate(triangle_attention_backward_fused_scratch_bytes(shape_, threads_));
    if (pass_ == Pass::bwd) forward();
  }
  void run() override {
    if (runs_forward(pass_)) forward();
    if (runs_backward(pass_))
      triangle_attention_backward_fused(g_, shape_, w_, x_, dout_, saved_, bwd_scratch_, threads_);
  }

 private:
  void forward() {
    triangle_attention_forward_fused(out_, shape_, w_, x_, scratch_, threads_, runs_backward(pass_) ? &saved_ : nullptr);
  }
  Pass pass_;
  triangle::TriangleShape shape_;
  TriangleWeightsF32 w_;
  TriangleActivations x_;
  float* out_;
  int threads_;
  void* scratch_;
  const void* dout_ = nullptr;
  TriangleGradsF32 g_{};
  TriangleSaved saved_{};
  void* bwd_scratch_ = nullptr;
};

#if ATTNBENCH_HAVE_CUDA
/// The CUDA forward: inputs uploaded by CudaInstance, scratch allocated once.
class TriangleCudaInstance final : public CudaInstance {
 public:
  explicit TriangleCudaInstance(const ImplArgs& a) : CudaInstance(a), shape_(shape_of(a.params)) {
    auto dev = [&](const char* n) {
      f32(a.inputs, n);  // dtype check on the host copy
      return static_cast<const float*>(in_.get(n));
    };
    w_ = weights_f32(dev);
    x_ = TriangleActivations{in_.get("z"), z_dtype(a.inputs), dev("mask")};
    scratch_ = scratch(cuda::triangle_attention_forward_cuda_scratch_bytes(shape_));
  }

 protected:
  void launch(cudaStream_t stream) override {
    cuda::triangle_attention_forward_cuda(out_.ptr<float>("output"), shape_, w_, x_, scratch_, stream);
  }

 private:
  triangle::TriangleShape shape_;
  TriangleWeightsF32 w_{};
  TriangleActivations x_{};
  void* scratch_ = nullptr;
};
#endif

template <class T>
Tensor to_tensor(const ref::Matrix<T>& m, DType dtype, const Shape& shape) {
  Tensor t(dtype, shape);
  if (t.numel() != m.size()) throw std::logic_error("triangle_attention: result size mismatch");
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, double(m.data()[i]));
  return t;
}

class TriangleAttentionVariant final : public Variant {
 public:
  std::string name() const override { return "triangle_attention"; }
  std::string summary() const override {
    return "Triangle attention (AF2 Alg. 13/14, OpenFold TriangleAttention): gated attention along rows of the pair "
           "representation with a pair bias; starting or ending node; fused CPU streams over keys";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"N", int64_t(64), "residues (z is N × N × c_z)"},
        {"c_z", int64_t(128), "pair representation channels (OpenFold c_in)"},
        {"c", int64_t(32), "hidden channels per head (OpenFold c_hidden)"},
        {"H", int64_t(4), "heads"},
        {"starting", true, "starting node (Alg. 13); false: ending node (Alg. 14, attention over columns)"},
        {"mask_fraction", 0.0, "fraction of pair mask entries set to 0 (chosen at random)"},
        input_std_param("layer-norm output (its weight and bias; q, k, v and the bias scale with it)"),
    };
  }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32, DType::bf16, DType::f16}));
    Impl cpu{"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16},
             [](const ImplArgs& a) { return std::make_unique<TriangleCpuInstance>(a); }};
    cpu.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    v.push_back(std::move(cpu));
    // Registered in every build so that suites naming it run everywhere: the runner records
    // it as skipped (cuda_unusable_reason) where no device is usable or CUDA is not built.
    v.push_back({"cuda", Device::cuda, {DType::f32, DType::bf16}, [](const ImplArgs& a) -> std::unique_ptr<Instance> {
#if ATTNBENCH_HAVE_CUDA
                   return std::make_unique<TriangleCudaInstance>(a);
#else
                   throw std::runtime_error("triangle_attention cuda: " + cuda_unusable_reason());
#endif
                 }});
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* k : {"N", "c_z", "c", "H"})
      if (p.at(k).get<int64_t>() < 1) throw InputError(std::string(k) + ": expected an integer >= 1");
    if (p.at("N").get<int64_t>() > 8192) throw InputError("N: expected at most 8192 residues");
    const double f = p.at("mask_fraction").get<double>();
    if (!(f >= 0.0 && f <= 1.0)) throw InputError("mask_fraction: expected a number in [0, 1]");
  }

  /// Weights like PyTorch's nn.Linear scale (1/sqrt(fan_in)), biases 0.1, layer-norm weight
  /// 1 + 0.1·normal; z normal; mask: exactly round(fraction · N²) entries 0 (seeded shuffle).
  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const ref::TriangleDims d = dims_of(p);
    const int64_t Hc = d.H * d.c;
    TensorMap m;
    auto weight = [&](const std::string& name, int64_t out, int64_t in) {
      m.emplace(name, random_tensor({out, in}, 1.0 / std::sqrt(double(in)), seed, key, name, DType::f64));
    };
    auto bias = [&](const std::string& name, int64_t n) {
      m.emplace(name, random_tensor({n}, 0.1, seed, key, name, DType::f64));
    };
    // std scales the layer norm's output (its weight and bias), so that q, k, v, the gate
    // and the triangle bias scale with it as trifast's inputs do (the norm removes z's scale).
    const double sd = input_std(p);
    Tensor ln_w = random_tensor({d.c_z}, 0.1, seed, key, "layer_norm.weight", DType::f64);
    for (int64_t k = 0; k < d.c_z; ++k) ln_w.set(k, sd * (1.0 + ln_w.get(k)));
    m.emplace("layer_norm.weight", std::move(ln_w));
    m.emplace("layer_norm.bias", random_tensor({d.c_z}, 0.1 * sd, seed, key, "layer_norm.bias", DType::f64));
    weight("linear.weight", d.H, d.c_z);
    weight("mha.linear_q.weight", Hc, d.c_z);
    weight("mha.linear_k.weight", Hc, d.c_z);
    weight("mha.linear_v.weight", Hc, d.c_z);
    weight("mha.linear_g.weight", Hc, d.c_z);
    bias("mha.linear_g.bias", Hc);
    weight("mha.linear_o.weight", d.c_z, Hc);
    bias("mha.linear_o.bias", d.c_z);
    m.emplace("z", random_tensor({d.N, d.N, d.c_z}, 1.0, seed, key, "z", DType::f64));

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
    const int64_t N = p.at("N").get<int64_t>();
    return {{"output", dtype == DType::f64 ? DType::f64 : DType::f32, {N, N, p.at("c_z").get<int64_t>()}}};
  }

  /// f64 → everything f64; f32 → everything f32; bf16 / f16 → z and its cotangent in that dtype, the rest f32
  /// ("bf16" means a bf16 pair representation; all arithmetic is f32).
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    for (auto& [name, t] : in) {
      const bool pair = name == "z" || name == "doutput";
      const DType want = is_16bit(dtype) && !pair ? DType::f32 : dtype;
      if (t.dtype() != want) t = t.to(want);
    }
    return in;
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::TriangleDims d = dims_of(p);
    TensorMap out;
    if (dtype == DType::f64)
      out.emplace("output", to_tensor(ref::triangle_forward_reference<double>(d, in, DType::f64), DType::f64, {d.N, d.N, d.c_z}));
    else
      out.emplace("output", to_tensor(ref::triangle_forward_reference<float>(d, in, dtype), DType::f32, {d.N, d.N, d.c_z}));
    return out;
  }
  std::vector<std::string> differentiable() const override {
    std::vector<std::string> v = {"z"};
    for (const std::string& n : ref::triangle_weight_names()) v.push_back(n);
    return v;
  }

  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::TriangleDims d = dims_of(p);
    std::map<std::string, Shape> shape;
    for (const auto& [name, t] : in) shape[name] = t.shape();
    TensorMap r;
    auto put = [&](const auto& grads, DType out) {
      for (const auto& [name, g] : grads) r.emplace("d" + name, to_tensor(g, out, shape.at(name)));
    };
    if (dtype == DType::f64)
      put(ref::triangle_backward_reference<double>(d, in, DType::f64), DType::f64);
    else
      put(ref::triangle_backward_reference<float>(d, in, dtype), DType::f32);
    return r;
  }

  /// OpenFold's TriangleAttention adds 1e9 · (m_ik − 1): reproduce it for its dumps (docs/case-files.md).
  TensorMap file_reference(const Params& p, const TensorMap& in) const override {
    const ref::TriangleDims d = dims_of(p);
    return {{"output", to_tensor(ref::triangle_forward_reference<double>(d, in, DType::f64, true), DType::f64, {d.N, d.N, d.c_z})}};
  }

  /// Dense FLOPs of one forward (docs/triangle.md): the attention 4·H·c·N³ (q·k and a·v) plus
  /// 5·H·N³ (bias and mask adds, exp, sum); the projections 2·N²·c_z·(4·H·c + H) (q, k, v, g,
  /// pair bias) and 2·N²·H·c·c_z (output); layer norm and gate 10·N²·c_z + 4·N²·H·c.
  double flops(const Params& p) const override {
    const ref::TriangleDims d = dims_of(p);
    const double N = double(d.N), NN = N * N, Hc = double(d.H * d.c), cz = double(d.c_z);
    return 4.0 * Hc * NN * N + 5.0 * double(d.H) * NN * N + 2.0 * NN * cz * (4.0 * Hc + double(d.H)) +
           2.0 * NN * Hc * cz + 10.0 * NN * cz + 4.0 * NN * Hc;
  }

  /// Backward FLOPs: the attention's 2.5 × its forward (FlashAttention's convention: dS, dQ,
  /// dK, dV and the recomputed S), every projection GEMM twice (the input's and the weight's
  /// gradient), the element-wise stages (layer norm, gate, bias) twice.
  double backward_flops(const Params& p) const override {
    const ref::TriangleDims d = dims_of(p);
    const double N = double(d.N), NN = N * N, Hc = double(d.H * d.c), cz = double(d.c_z);
    const double attention = 4.0 * Hc * NN * N + 5.0 * double(d.H) * NN * N;
    const double gemms = 2.0 * NN * cz * (4.0 * Hc + double(d.H)) + 2.0 * NN * Hc * cz;
    return 2.5 * attention + 2.0 * gemms + 2.0 * (10.0 * NN * cz + 4.0 * NN * Hc);
  }

  /// Beyond the forward: the gradients (z's f32 and the oracle's f64, the weights'), the
  /// cotangent (f64 master and in the case's dtype), what the forward saves (output and
  /// log-sum-exp) and the backward's scratch — or, for the reference, its recomputed forward and
  /// the materialized gradients of every stage.
  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::TriangleDims d = dims_of(p);
    const double NN = double(d.N) * double(d.N), pair = NN * double(d.c_z);
    const double grads = pair * (dtype == DType::f64 ? 16.0 : 12.0) + weight_count(d) * 12.0;
    const double cot = pair * (8.0 + double(dtype_size(dtype)));
    if (impl == "cpu")
      return grads + cot + 4.0 * NN * double(d.H + d.H * d.c) +
             double(triangle_attention_backward_fused_scratch_bytes(shape_of(p), omp_get_max_threads()));
    return grads + cot + 2.0 * ref::triangle_reference_scratch_bytes(d, dtype == DType::f64 ? 8.0 : 4.0);
  }

  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::TriangleDims d = dims_of(p);
    const double NN = double(d.N) * double(d.N);
    const double pair = NN * double(d.c_z);
    const double z_in = pair * double(dtype_size(dtype));
    const double master = (pair + NN) * 8.0;                            // f64 inputs (z, mask)
    const double out = pair * (dtype == DType::f64 ? 8.0 : 4.0) * 2.0;  // output + the oracle's
    const double small = weight_count(d) * 8.0 * 2.0 + NN * 8.0;
    double scratch = 0;  // host scratch; the CUDA impl's device memory is its own
    if (impl == "reference")
      scratch = ref::triangle_reference_scratch_bytes(d, dtype == DType::f64 ? 8.0 : 4.0);
    else if (impl == "cpu")
      scratch = double(triangle_attention_forward_fused_scratch_bytes(shape_of(p), omp_get_max_threads()));
    return master + z_in + out + small + scratch;
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 1}, {"c_z", 13}, {"c", 5}, {"H", 3}, {"starting", true}, {"mask_fraction", 0.0}},
        {{"N", 7}, {"c_z", 13}, {"c", 5}, {"H", 3}, {"starting", false}, {"mask_fraction", 0.25}},
        {{"N", 17}, {"c_z", 13}, {"c", 5}, {"H", 3}, {"starting", true}, {"mask_fraction", 0.25}},
    };
  }

  nlohmann::json case_info(const Params& p) const override {
    const ref::TriangleDims d = dims_of(p);
    return {{"naive_logit_bytes_f32", 4.0 * double(d.H) * double(d.N) * double(d.N) * double(d.N)}};
  }

  /// c_z and H from linear.weight, c from mha.linear_q.weight, N from z. `starting` cannot be
  /// told from tensors: true (a case file's __metadata__ "params" or `verify --shape starting=false` say otherwise).
  Params params_from_tensors(const TensorMap& t) const override {
    const ref::TriangleDims d = ref::triangle_dims_from_tensors(t);
    return {{"N", d.N}, {"c_z", d.c_z}, {"c", d.c}, {"H", d.H}, {"starting", true}, {"mask_fraction", 0.0}};
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(TriangleAttentionVariant);

}  // namespace attnbench
