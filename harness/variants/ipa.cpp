// Invariant Point Attention (AlphaFold2 Alg. 22, OpenFold monomer): the `ipa` variant, and
// `ipa_factorized` (FlashIPA-style rank-r pair factors, a different model with its own
// reference). Math, dims, FLOP and memory models, case-file layout: docs/ipa.md.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "harness/check.hpp"
#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "impls/cpu/ipa.hpp"
#include "reference/common.hpp"
#include "reference/ipa.hpp"
#if ATTNBENCH_HAVE_CUDA
#include "harness/cuda_support.hpp"
#include "impls/cuda/ipa.hpp"
#endif

namespace attnbench {
namespace {

// ---------------------------------------------------------------------------------------
// Shared by `ipa` and `ipa_factorized`: shape parameters, generators, casts, models.
namespace ipa_variant {

std::vector<ParamSpec> param_specs(int64_t c_z_default) {
  return {
      {"N", int64_t(64), "residues"},
      {"c_s", int64_t(384), "single representation channels"},
      {"c_z", c_z_default, "pair representation channels"},
      {"c", int64_t(16), "hidden channels per head (OpenFold c_hidden)"},
      {"H", int64_t(12), "heads"},
      {"P", int64_t(4), "query/key points per head"},
      {"P_v", int64_t(8), "value points per head"},
      {"mask_fraction", 0.0, "fraction of residues with mask 0 (chosen at random)"},
      input_std_param("s and z"),
  };
}

ref::IpaDims dims_of(const Params& p) {
  ref::IpaDims d;
  d.N = p.at("N").get<int64_t>();
  d.c_s = p.at("c_s").get<int64_t>();
  d.c_z = p.at("c_z").get<int64_t>();
  d.c = p.at("c").get<int64_t>();
  d.H = p.at("H").get<int64_t>();
  d.P = p.at("P").get<int64_t>();
  d.Pv = p.at("P_v").get<int64_t>();
  return d;
}

ipa::IpaShape shape_of(const ref::IpaDims& d) { return {d.N, d.c_s, d.c_z, d.c, d.H, d.P, d.Pv}; }
ipa::IpaShape shape_of(const Params& p) { return shape_of(dims_of(p)); }

Params params_of(const ref::IpaDims& d, double mask_fraction) {
  return {{"N", d.N}, {"c_s", d.c_s}, {"c_z", d.c_z}, {"c", d.c}, {"H", d.H}, {"P", d.P}, {"P_v", d.Pv},
          {"mask_fraction", mask_fraction}};
}

void validate(const Params& p) {
  for (const char* k : {"N", "c_s", "c_z", "c", "H", "P", "P_v"})
    if (p.at(k).get<int64_t>() < 1) throw InputError(std::string(k) + ": expected an integer >= 1");
  if (p.at("N").get<int64_t>() > 65536) throw InputError("N: expected at most 65536 residues");
  const double f = p.at("mask_fraction").get<double>();
  if (!(f >= 0.0 && f <= 1.0)) throw InputError("mask_fraction: expected a number in [0, 1]");
}

/// One tensor of normals · std drawn from the stream (seed, key, name), stored in `storage`.
Tensor random_tensor(const Shape& shape, double std, uint64_t seed, const std::string& key, const std::string& name,
                     DType storage) {
  Tensor t(storage, shape);
  Rng rng(seed, key, name);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, std * rng.normal());
  return t;
}

/// A big (rows, cols, ch) tensor, uniform with standard deviation `std`, one stream per row
/// ("z/<row>") so it fills in parallel and directly in `storage` (no f64 copy at N = 4096).
Tensor random_rows(int64_t rows, int64_t cols, int64_t ch, double std, uint64_t seed, const std::string& key,
                   const std::string& name, DType storage) {
  Tensor t(storage, {rows, cols, ch});
  const int64_t row = cols * ch;
  const double half_width = std * std::sqrt(3.0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r = 0; r < rows; ++r) {
    Rng rng(seed, key, name + "/" + std::to_string(r));
    const int64_t o = r * row;
    switch (storage) {
      case DType::f64:
        for (int64_t i = 0; i < row; ++i) t.data<double>()[o + i] = rng.uniform(-half_width, half_width);
        break;
      case DType::f32:
        for (int64_t i = 0; i < row; ++i) t.data<float>()[o + i] = float(rng.uniform(-half_width, half_width));
        break;
      default:
        for (int64_t i = 0; i < row; ++i) t.set(o + i, rng.uniform(-half_width, half_width));
        break;
    }
  }
  return t;
}

/// Weights (PyTorch nn.Linear-like scale 1/sqrt(fan_in), biases 0.1), s, frames and mask.
/// Frames are f32 values (OpenFold's Rigid keeps them in f32): rotations Haar-uniform,
/// translations normal with 3 Å per coordinate.
TensorMap make_common_inputs(const ref::IpaDims& d, const Params& p, uint64_t seed, const std::string& key,
                             DType storage) {
  TensorMap m;
  auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    m.emplace(name + ".weight", random_tensor({out, in}, 1.0 / std::sqrt(double(in)), seed, key, name + ".weight", storage));
    m.emplace(name + ".bias", random_tensor({out}, 0.1, seed, key, name + ".bias", storage));
  };
  linear("linear_q", d.H * d.c, d.c_s);
  linear("linear_kv", 2 * d.H * d.c, d.c_s);
  linear("linear_q_points.linear", 3 * d.H * d.P, d.c_s);
  linear("linear_kv_points.linear", 3 * d.H * (d.P + d.Pv), d.c_s);
  linear("linear_b", d.H, d.c_z);
  linear("linear_out", d.c_s, d.concat_dim());
  Tensor hw = random_tensor({d.H}, 0.1, seed, key, "head_weights", storage);
  for (int64_t h = 0; h < d.H; ++h) hw.set(h, ref::kIpaHeadWeightInit + hw.get(h));
  m.emplace("head_weights", std::move(hw));
  m.emplace("s", random_tensor({d.N, d.c_s}, input_std(p), seed, key, "s", storage));

  Tensor rot(storage, {d.N, 3, 3}), trans(storage, {d.N, 3});
  Rng rr(seed, key, "rotations"), rt(seed, key, "translations");
  for (int64_t i = 0; i < d.N; ++i) {
    const Eigen::Matrix3d R = ref::haar_rotation(rr);
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) rot.set(i * 9 + a * 3 + b, double(float(R(a, b))));
      trans.set(i * 3 + a, double(float(3.0 * rt.normal())));
    }
  }
  m.emplace("rotations", std::move(rot));
  m.emplace("translations", std::move(trans));

  // Mask: exactly round(fraction · N) residues set to 0, chosen by a seeded shuffle.
  Tensor mask(storage, {d.N});
  std::vector<int64_t> order(size_t(d.N));
  std::iota(order.begin(), order.end(), 0);
  Rng rm(seed, key, "mask");
  for (int64_t i = d.N - 1; i > 0; --i) std::swap(order[size_t(i)], order[size_t(rm.integer(0, i))]);
  const auto masked = int64_t(std::llround(p.at("mask_fraction").get<double>() * double(d.N)));
  for (int64_t i = 0; i < d.N; ++i) mask.set(order[size_t(i)], i < masked ? 0.0 : 1.0);
  m.emplace("mask", std::move(mask));
  return m;
}

/// f64 → everything f64; f32 → everything f32; bf16 / f16 → the pair tensors in that dtype, the rest f32
/// (for IPA "bf16" means a bf16 pair representation; all arithmetic is f32).
TensorMap cast_inputs(TensorMap in, DType dtype, const std::vector<std::string>& pair_names) {
  for (auto& [name, t] : in) {
    DType want = dtype;
    if (is_16bit(dtype) &&
        std::find(pair_names.begin(), pair_names.end(), name) == pair_names.end())
      want = DType::f32;
    if (t.dtype() != want) t = t.to(want);  // tensors already in `want` are moved, not copied
  }
  return in;
}

template <class T>
Tensor to_tensor(const ref::Matrix<T>& m, DType dtype) {
  Tensor t(dtype, {int64_t(m.rows()), int64_t(m.cols())});
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, double(m.data()[i]));
  return t;
}

const float* f32(const TensorMap& in, const std::string& name) { return require_f32(in, name, "ipa"); }

/// The weights as f32 pointers; `ptr(name)` maps a (checked f32) tensor name to its data
/// (host or device copy).
template <class Ptr>
IpaWeightsF32 weights_f32(const Ptr& ptr) {
  return {ptr("linear_q.weight"), ptr("linear_q.bias"), ptr("linear_kv.weight"), ptr("linear_kv.bias"),
          ptr("linear_q_points.linear.weight"), ptr("linear_q_points.linear.bias"),
          ptr("linear_kv_points.linear.weight"), ptr("linear_kv_points.linear.bias"),
          ptr("linear_b.weight"), ptr("linear_b.bias"), ptr("head_weights"),
          ptr("linear_out.weight"), ptr("linear_out.bias")};
}

/// s, frames and mask as f32 pointers, z (f32, bf16 or f16) from `raw(name)`.
template <class Ptr, class Raw>
IpaActivations activations(const TensorMap& in, const Ptr& ptr, const Raw& raw) {
  const Tensor& z = require(in, "z", "ipa");
  if (z.dtype() != DType::f32 && !is_16bit(z.dtype())) throw std::invalid_argument("ipa: z must be f32, bf16 or f16");
  return {ptr("s"), raw("z"), z.dtype(), ptr("rotations"), ptr("translations"), ptr("mask")};
}

/// Elements of every input but z.
double small_input_count(const ref::IpaDims& d) {
  const double HcP = double(d.H) * double(3 * d.c + 3 * d.P + 3 * (d.P + d.Pv));
  return double(d.c_s) * (HcP + 1.0) + double(d.H) * double(d.c_z + 2) + double(d.c_s) * double(d.concat_dim() + 1) +
         double(d.N) * double(d.c_s + 13);
}

/// Dense FLOPs of one forward (docs/ipa.md): per (i, j, h) 2c (q·k) + 9P (point distances:
/// subtract, multiply, add per coordinate) + 2 c_z (pair bias from z) + 5 (logit sum, softmax)
/// + 2c + 6 P_v (values) + 2 c_pair (pair output); plus the linear layers 2 N·in·out.
double flops(const ref::IpaDims& d, int64_t c_pair) {
  const double pairs = double(d.N) * double(d.N) * double(d.H);
  const double per = 4.0 * double(d.c) + 9.0 * double(d.P) + 2.0 * double(d.c_z) + 5.0 + 6.0 * double(d.Pv) +
                     2.0 * double(c_pair);
  const double proj = 2.0 * double(d.N) * double(d.c_s) * double(d.H) * double(3 * d.c + 6 * d.P + 3 * d.Pv);
  const double out = 2.0 * double(d.N) * double(d.concat_dim()) * double(d.c_s);
  return pairs * per + proj + out;
}

/// SE(3) invariance: one random global rigid transform g (Haar rotation, translation of norm
/// S Å) applied to every frame, T_i ↦ g ∘ T_i; the output must not change. Bound (frames are
/// f32 in every mode, like OpenFold's Rigid): kSe3Ulps · eps(f32) · max|out| · (1 + S / 10 Å).
/// Rounding the transformed frames to f32 perturbs each frame by ~eps · |t| ≈ eps · S, which
/// moves points relative to each other by that much; the 10 Å is the scale of the distances
/// that the point term compares.
constexpr double kSe3Ulps = 64.0;

Property se3_property() {
  Property prop;
  prop.name = "se3_invariance";
  prop.help = "output unchanged when one random rigid transform (Haar rotation, |t| = scale Å) is applied to "
              "every frame; options: {\"scales\": [1, 10, 100, 1000]}";
  prop.check = [](const Params&, DType, const TensorMap& inputs, const RunOn& run, Rng& rng,
                  const nlohmann::json& options) {
    std::vector<double> scales = {1, 10, 100, 1000};
    if (options.is_object() && options.contains("scales")) scales = options.at("scales").get<std::vector<double>>();
    const TensorMap base = run(inputs);
    const Tensor& want = base.at("output");
    double max_out = 0;
    for (int64_t i = 0; i < want.numel(); ++i) max_out = std::max(max_out, std::abs(want.get(i)));
    std::vector<std::pair<std::string, CheckResult>> results;
    for (double S : scales) {
      const ref::Rigid g = ref::random_rigid(rng, S);
      TensorMap moved = inputs;
      Tensor& rot = moved.at("rotations");
      Tensor& trans = moved.at("translations");
      const int64_t N = rot.dim(0);
      for (int64_t i = 0; i < N; ++i) {
        Eigen::Matrix3d R;
        Eigen::Vector3d t;
        for (int a = 0; a < 3; ++a) {
          t(a) = trans.get(i * 3 + a);
          for (int b = 0; b < 3; ++b) R(a, b) = rot.get(i * 9 + a * 3 + b);
        }
        const Eigen::Matrix3d R2 = g.R * R;
        const Eigen::Vector3d t2 = g.R * t + g.t;
        for (int a = 0; a < 3; ++a) {
          trans.set(i * 3 + a, double(float(t2(a))));
          for (int b = 0; b < 3; ++b) rot.set(i * 9 + a * 3 + b, double(float(R2(a, b))));
        }
      }
      const TensorMap got = run(moved);
      const double bound = kSe3Ulps * dtype_eps(DType::f32) * max_out * (1.0 + S / 10.0);
      CheckResult r = check_within(got.at("output"), want, bound);
      r.extra = {{"property", "se3_invariance"}, {"scale", S}};
      const auto label = S == std::floor(S) ? std::to_string(int64_t(S)) : std::to_string(S);
      results.emplace_back("se3_t" + label, r);
    }
    return results;
  };
  return prop;
}

}  // namespace ipa_variant

using ipa_variant::dims_of;

/// The fused CPU forward: weights and activations read in place; scratch taken once at setup.
class IpaCpuInstance final : public Instance {
 public:
  explicit IpaCpuInstance(const ImplArgs& a)
      : shape_(ipa_variant::shape_of(a.params)),
        w_(ipa_variant::weights_f32([&](const char* n) { return ipa_variant::f32(a.inputs, n); })),
        x_(ipa_variant::activations(
            a.inputs, [&](const char* n) { return ipa_variant::f32(a.inputs, n); },
            [&](const char* n) { return require(a.inputs, n, "ipa").raw(); })),
        out_(a.outputs.at("output").data<float>()),
        threads_(omp_get_max_threads()),
        scratch_(a.workspace.allocate(ipa_forward_fused_scratch_bytes(shape_, threads_))) {}
  void run() override { ipa_forward_fused(out_, shape_, w_, x_, scratch_, threads_); }

 private:
  ipa::IpaShape shape_;
  IpaWeightsF32 w_;
  IpaActivations x_;
  float* out_;
  int threads_;
  void* scratch_;
};

#if ATTNBENCH_HAVE_CUDA
/// The fused CUDA forward: inputs uploaded by CudaInstance, scratch allocated once.
class IpaCudaInstance final : public CudaInstance {
 public:
  explicit IpaCudaInstance(const ImplArgs& a) : CudaInstance(a), shape_(ipa_variant::shape_of(a.params)) {
    auto dev = [&](const char* n) {
      ipa_variant::f32(a.inputs, n);  // dtype check on the host copy
      return static_cast<const float*>(in_.get(n));
    };
    w_ = ipa_variant::weights_f32(dev);
    x_ = ipa_variant::activations(a.inputs, dev, [&](const char* n) { return static_cast<const void*>(in_.get(n)); });
    scratch_ = scratch(cuda::ipa_forward_fused_cuda_scratch_bytes(shape_));
  }

 protected:
  void launch(cudaStream_t stream) override {
    cuda::ipa_forward_fused_cuda(out_.ptr<float>("output"), shape_, w_, x_, scratch_, stream);
  }

 private:
  ipa::IpaShape shape_;
  IpaWeightsF32 w_{};
  IpaActivations x_{};
  void* scratch_ = nullptr;
};
#endif

class IpaVariant final : public Variant {
 public:
  std::string name() const override { return "ipa"; }
  std::string summary() const override {
    return "Invariant Point Attention (AF2 Alg. 22, OpenFold monomer): scalar + point + pair-bias attention over "
           "frames, pair output; fused CPU/CUDA stream over keys with an online softmax";
  }
  std::vector<ParamSpec> params() const override { return ipa_variant::param_specs(128); }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32, DType::bf16, DType::f16}));
    v.push_back({"cpu", Device::cpu, {DType::f32, DType::bf16, DType::f16},
                 [](const ImplArgs& a) { return std::make_unique<IpaCpuInstance>(a); }});
    // Registered in every build so that suites naming it run everywhere: the runner records
    // it as skipped (cuda_unusable_reason) where no device is usable or CUDA is not built.
    v.push_back({"cuda", Device::cuda, {DType::f32, DType::bf16}, [](const ImplArgs& a) -> std::unique_ptr<Instance> {
#if ATTNBENCH_HAVE_CUDA
                   return std::make_unique<IpaCudaInstance>(a);
#else
                   throw std::runtime_error("ipa cuda: " + cuda_unusable_reason());
#endif
                 }});
    return v;
  }
  void validate(const Params& p) const override { ipa_variant::validate(p); }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    return make_inputs_as(p, seed, key, DType::f64);
  }
  TensorMap make_inputs_as(const Params& p, uint64_t seed, const std::string& key, DType storage) const override {
    const ref::IpaDims d = dims_of(p);
    TensorMap m = ipa_variant::make_common_inputs(d, p, seed, key, storage);
    m.emplace("z", ipa_variant::random_rows(d.N, d.N, d.c_z, input_std(p), seed, key, "z", storage));
    return m;
  }
  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    return {{"output", dtype == DType::f64 ? DType::f64 : DType::f32, {p.at("N").get<int64_t>(), p.at("c_s").get<int64_t>()}}};
  }
  TensorMap cast_inputs(const Params&, TensorMap in, DType dtype) const override {
    return ipa_variant::cast_inputs(std::move(in), dtype, {"z"});
  }
  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::IpaDims d = dims_of(p);
    TensorMap out;
    if (dtype == DType::f64)
      out.emplace("output", ipa_variant::to_tensor(ref::ipa_forward_reference<double>(d, in, DType::f64), DType::f64));
    else
      out.emplace("output", ipa_variant::to_tensor(ref::ipa_forward_reference<float>(d, in, dtype), DType::f32));
    return out;
  }
  /// OpenFold's IPA adds 1e5 · (m_i m_j − 1): reproduce it for its dumps (docs/case-files.md).
  TensorMap file_reference(const Params& p, const TensorMap& in) const override {
    return {{"output", ipa_variant::to_tensor(ref::ipa_forward_reference<double>(dims_of(p), in, DType::f64, true),
                                              DType::f64)}};
  }

  double flops(const Params& p) const override { return ipa_variant::flops(dims_of(p), dims_of(p).c_z); }

  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::IpaDims d = dims_of(p);
    const double pair = double(d.N) * double(d.N) * double(d.c_z);
    const double z_in = pair * double(dtype_size(dtype));
    const double master = pair * (dtype == DType::f64 ? 8.0 : 4.0);  // make_inputs_as(f32) for benches
    const double small = ipa_variant::small_input_count(d) * 8.0 * 2.0;
    double scratch = 0;  // host scratch; the CUDA impl's device memory is its own
    if (impl == "reference")
      scratch = ref::ipa_reference_scratch_bytes(d, dtype == DType::f64 ? 8.0 : 4.0);
    else if (impl == "cpu")
      scratch = double(ipa_forward_fused_scratch_bytes(ipa_variant::shape_of(p), omp_get_max_threads()));
    return master + z_in + small + double(d.N * d.c_s) * 8.0 + scratch;
  }

  std::vector<Property> properties() const override { return {ipa_variant::se3_property()}; }

  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 13}, {"c_s", 13}, {"c_z", 17}, {"c", 19}, {"H", 5}, {"P", 7}, {"P_v", 11}, {"mask_fraction", 0.0}},
        {{"N", 67}, {"c_s", 13}, {"c_z", 17}, {"c", 19}, {"H", 5}, {"P", 7}, {"P_v", 11}, {"mask_fraction", 0.25}},
        {{"N", 1}, {"c_s", 7}, {"c_z", 3}, {"c", 5}, {"H", 2}, {"P", 1}, {"P_v", 1}, {"mask_fraction", 0.0}},
        {{"N", 37}, {"c_s", 64}, {"c_z", 32}, {"c", 16}, {"H", 12}, {"P", 4}, {"P_v", 8}, {"mask_fraction", 0.1}},
    };
  }

  nlohmann::json case_info(const Params& p) const override {
    const ref::IpaDims d = dims_of(p);
    return {{"z_bytes_f32", double(d.N) * double(d.N) * double(d.c_z) * 4.0},
            {"naive_bytes_per_pair_f32", 4.0 * double(d.c_z + d.H * 3 * d.P + d.H * 3 * d.Pv)}};
  }

  Params params_from_tensors(const TensorMap& t) const override {
    const ref::IpaDims d = ref::ipa_dims_from_tensors(t);
    return ipa_variant::params_of(d, 0.0);
  }
};


/// z (N, N, c_z) in f64 from the factors: z_ij = Σ_r f1[i, r] ⊙ f2[j, r].
Tensor materialize_pair(const Tensor& f1, const Tensor& f2) {
  const int64_t N = f1.dim(0), R = f1.dim(1), cz = f1.dim(2);
  const std::vector<double> a = f1.to_f64_vector(), b = f2.to_f64_vector();
  Tensor z(DType::f64, {N, N, cz});
  double* out = z.data<double>();
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < cz; ++k) {
        double acc = 0;
        for (int64_t r = 0; r < R; ++r) acc += a[size_t((i * R + r) * cz + k)] * b[size_t((j * R + r) * cz + k)];
        out[(i * N + j) * cz + k] = acc;
      }
  return z;
}

/// The fused CPU forward on the factorized pair representation (one materialized row of z
/// per thread, O(N) memory).
class IpaFactorizedCpuInstance final : public Instance {
 public:
  explicit IpaFactorizedCpuInstance(const ImplArgs& a)
      : shape_(ipa_variant::shape_of(a.params)),
        w_(ipa_variant::weights_f32([&](const char* n) { return ipa_variant::f32(a.inputs, n); })),
        out_(a.outputs.at("output").data<float>()),
        threads_(omp_get_max_threads()) {
    auto ptr = [&](const char* n) { return ipa_variant::f32(a.inputs, n); };
    x_ = IpaActivations{ptr("s"), nullptr, DType::f32, ptr("rotations"), ptr("translations"), ptr("mask"),
                        ptr("z_factor_1"), ptr("z_factor_2"), a.params.at("rank").get<int64_t>()};
    scratch_ = a.workspace.allocate(ipa_forward_fused_scratch_bytes(shape_, threads_, x_.rank));
  }
  void run() override { ipa_forward_fused(out_, shape_, w_, x_, scratch_, threads_); }

 private:
  ipa::IpaShape shape_;
  IpaWeightsF32 w_;
  IpaActivations x_{};
  float* out_;
  int threads_;
  void* scratch_ = nullptr;
};

/// FlashIPA-style factorized IPA (a different model from `ipa`, never compared with it): the
/// pair representation is given by rank-r factors, z_ij = Σ_r z_factor_1[i, r] ⊙ z_factor_2[j, r]
/// with c_z = 32 pair channels (AF2's 128 / 4); the pair bias linear_b(z_ij) and the pair
/// output Σ_j a_ij z_ij are those of IPA on that z. No O(N²) input exists.
class IpaFactorizedVariant final : public Variant {
 public:
  std::string name() const override { return "ipa_factorized"; }
  std::string summary() const override {
    return "IPA on a rank-r factorized pair representation (FlashIPA-style: z_ij = sum_r f1_ir * f2_jr, c_z/4 "
           "pair channels); O(N) inputs and memory";
  }
  std::vector<ParamSpec> params() const override {
    auto p = ipa_variant::param_specs(32);
    p.push_back({"rank", int64_t(2), "rank r of the pair factorization"});
    return p;
  }
  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f64, DType::f32}));
    v.push_back({"cpu", Device::cpu, {DType::f32},
                 [](const ImplArgs& a) { return std::make_unique<IpaFactorizedCpuInstance>(a); }});
    return v;
  }
  void validate(const Params& p) const override {
    ipa_variant::validate(p);
    if (p.at("rank").get<int64_t>() < 1) throw InputError("rank: expected an integer >= 1");
  }
  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const ref::IpaDims d = dims_of(p);
    const int64_t R = p.at("rank").get<int64_t>();
    TensorMap m = ipa_variant::make_common_inputs(d, p, seed, key, DType::f64);
    const double std = std::pow(double(R), -0.25) * std::sqrt(input_std(p));  // z_ij has variance std²
    m.emplace("z_factor_1", ipa_variant::random_tensor({d.N, R, d.c_z}, std, seed, key, "z_factor_1", DType::f64));
    m.emplace("z_factor_2", ipa_variant::random_tensor({d.N, R, d.c_z}, std, seed, key, "z_factor_2", DType::f64));
    return m;
  }
  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    return {{"output", dtype == DType::f64 ? DType::f64 : DType::f32,
             {p.at("N").get<int64_t>(), p.at("c_s").get<int64_t>()}}};
  }
  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    TensorMap full;
    for (const auto& [name, t] : in)
      if (name != "z_factor_1" && name != "z_factor_2") full.emplace(name, t);
    full.emplace("z", materialize_pair(require(in, "z_factor_1", "ipa_factorized"),
                                       require(in, "z_factor_2", "ipa_factorized")));
    const ref::IpaDims d = dims_of(p);
    TensorMap out;
    if (dtype == DType::f64)
      out.emplace("output", ipa_variant::to_tensor(ref::ipa_forward_reference<double>(d, full, DType::f64), DType::f64));
    else
      out.emplace("output", ipa_variant::to_tensor(ref::ipa_forward_reference<float>(d, full, DType::f32), DType::f32));
    return out;
  }
  double flops(const Params& p) const override {
    const ref::IpaDims d = dims_of(p);
    return ipa_variant::flops(d, d.c_z) + 2.0 * double(d.N) * double(d.N) * double(p.at("rank").get<int64_t>() * d.c_z);
  }
  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::IpaDims d = dims_of(p);
    const double elem = dtype == DType::f64 ? 8.0 : 4.0;
    const double inputs = (ipa_variant::small_input_count(d) + 2.0 * double(d.N * p.at("rank").get<int64_t>() * d.c_z)) * 8.0 * 2.0;
    const double scratch =
        impl == "reference"
            ? double(d.N) * double(d.N) * double(d.c_z) * 16.0 + ref::ipa_reference_scratch_bytes(d, elem)
            : double(ipa_forward_fused_scratch_bytes(ipa_variant::shape_of(p), omp_get_max_threads(),
                                                     p.at("rank").get<int64_t>()));
    return inputs + scratch + double(d.N * d.c_s) * 8.0;
  }
  std::vector<Property> properties() const override { return {ipa_variant::se3_property()}; }
  std::vector<Params> test_shapes() const override {
    return {
        {{"N", 13}, {"c_s", 13}, {"c_z", 17}, {"c", 19}, {"H", 5}, {"P", 7}, {"P_v", 11}, {"rank", 3},
         {"mask_fraction", 0.0}},
        {{"N", 67}, {"c_s", 24}, {"c_z", 32}, {"c", 16}, {"H", 12}, {"P", 4}, {"P_v", 8}, {"rank", 2},
         {"mask_fraction", 0.2}},
    };
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(IpaVariant);
ATTNBENCH_REGISTER_VARIANT(IpaFactorizedVariant);

}  // namespace attnbench
