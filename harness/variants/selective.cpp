// The "selective" variant: selective attention, per-query keys and values
// k_ij = W_k [q_i ; x_j], v_ij = W_v [q_i ; x_j] (DESIGN §5; math in
// reference/selective.hpp, kernels in impls/cpu/selective.cpp, derivation and
// FLOP model in docs/selective.md). Causal always; no output projection.
//
// Parameters: B, T, d (model width), H (heads, d_head = d / H), rope (bool).
// Inputs: x (B, T, d) standard normal; wq (d, d) with std 1/√d, wk and wv
// (d, 2d) with std 1/√(2d) (PyTorch's [out, in] layout; the fan-in scaling
// keeps scores O(1), as a trained layer's are, so the checks are not
// dominated by a saturated softmax). All four are differentiable.
// Output: o (B, T, d), f32 (f64 for the oracle). Gradients dx, dwq, dwk, dwv.
//
// Implementations: reference (materializes (T, T, d) keys and values per batch
// element, query by query), cpu_materialized (the seed's algorithm, OpenMP),
// cpu (the fused exact form on the SDPA kernel), cuda (the same form on the CUDA SDPA kernels).
#include "impls/cpu/selective.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "harness/cuda_support.hpp"
#include "harness/errors.hpp"
#include "harness/variant.hpp"
#include "impls/cuda/selective.hpp"
#include "reference/selective.hpp"

namespace attnbench {
namespace {

int64_t get_int(const Params& p, const char* name) { return p.at(name).get<int64_t>(); }

ref::SelectiveDims dims_of(const Params& p) {
  ref::SelectiveDims d;
  d.B = get_int(p, "B");
  d.T = get_int(p, "T");
  d.d = get_int(p, "d");
  d.H = get_int(p, "H");
  d.rope = p.at("rope").get<bool>();
  return d;
}

Shape x_shape(const ref::SelectiveDims& d) { return {d.B, d.T, d.d}; }

double causal_pairs(const ref::SelectiveDims& d) { return double(d.T) * double(d.T + 1) / 2.0; }

/// Kernel parameters over the variant's dense tensors (pointers set by the
/// caller).
SelectiveParams kernel_params(const ref::SelectiveDims& d, DType dtype) {
  SelectiveParams p;
  p.B = d.B, p.T = d.T, p.d = d.d, p.H = d.H, p.rope = d.rope, p.dtype = dtype;
  p.o_strides = p.x_strides = p.dout_strides = p.dx_strides = selective_dense_strides(d.T, d.d);
  return p;
}

enum class Algo { fused, materialized };

/// One instance for both CPU algorithms and every pass: fwd runs the forward,
/// bwd the backward alone (the fused form's forward runs in setup and saves
/// what its backward reads; the materialized form saves nothing and recomputes),
/// fwd_bwd both.
class SelectiveCpuInstance final : public Instance {
 public:
  SelectiveCpuInstance(const ImplArgs& a, Algo algo) : algo_(algo), pass_(a.pass) {
    p_ = kernel_params(dims_of(a.params), a.dtype);
    const auto& in = a.inputs;
    const char* who = algo == Algo::fused ? "selective cpu" : "selective cpu_materialized";
    p_.x = require(in, "x", who).raw();
    p_.wq = require(in, "wq", who).raw();
    p_.wk = require(in, "wk", who).raw();
    p_.wv = require(in, "wv", who).raw();
    p_.o = a.outputs.at("o").data<float>();
    threads_ = omp_get_max_threads();
    if (runs_backward(pass_)) {
      p_.dout = require(in, "do", who).raw();
      p_.dx = a.outputs.at("dx").data<float>();
      p_.dwq = a.outputs.at("dwq").data<float>();
      p_.dwk = a.outputs.at("dwk").data<float>();
      p_.dwv = a.outputs.at("dwv").data<float>();
      if (algo == Algo::fused)
        saved_ = cpu::selective_saved_at(p_, a.workspace.allocate(cpu::selective_saved_bytes(p_)));
    }
    // A pass that runs the backward has room for both entry points (bwd runs
    // the forward in setup).
    const bool bwd = runs_backward(pass_);
    size_t bytes = 0;
    if (algo == Algo::fused)
      bytes = std::max(cpu::selective_forward_fused_scratch_bytes(p_, threads_, bwd),
                       bwd ? cpu::selective_backward_fused_scratch_bytes(p_, threads_) : 0);
    else
      bytes = std::max(cpu::selective_forward_materialized_scratch_bytes(p_, threads_),
                       bwd ? cpu::selective_backward_materialized_scratch_bytes(p_, threads_) : 0);
    scratch_ = a.workspace.allocate(bytes);
    // bwd: the forward output is the harness's to fill (it is not checked in
    // bwd).
    if (pass_ == Pass::bwd) forward();
  }
  void run() override {
    if (runs_forward(pass_)) forward();
    if (runs_backward(pass_)) {
      if (algo_ == Algo::fused)
        cpu::selective_backward_fused(p_, saved_, scratch_, threads_);
      else
        cpu::selective_backward_materialized(p_, scratch_, threads_);
    }
  }

 private:
  void forward() {
    if (algo_ == Algo::fused)
      cpu::selective_forward_fused(p_, scratch_, threads_, runs_backward(pass_) ? &saved_ : nullptr);
    else
      cpu::selective_forward_materialized(p_, scratch_, threads_);
  }
  Algo algo_;
  Pass pass_;
  SelectiveParams p_;
  int threads_ = 1;
  void* scratch_ = nullptr;
  SelectiveSaved saved_{};
};

#if ATTNBENCH_HAVE_CUDA
/// The fused form on the device, every pass (bwd: the forward in setup fills o).
class SelectiveCudaInstance final : public CudaInstance {
 public:
  explicit SelectiveCudaInstance(const ImplArgs& a) : CudaInstance(a), pass_(a.pass) {
    p_ = kernel_params(dims_of(a.params), a.dtype);
    p_.x = in_.get("x"), p_.wq = in_.get("wq"), p_.wk = in_.get("wk"), p_.wv = in_.get("wv");
    p_.o = out_.ptr<float>("o");
    size_t bytes = cuda::selective_forward_fused_cuda_scratch_bytes(p_);
    if (runs_backward(pass_)) {
      p_.dout = in_.get(grad_name("o"));
      p_.dx = out_.ptr<float>("dx");
      p_.dwq = out_.ptr<float>("dwq");
      p_.dwk = out_.ptr<float>("dwk");
      p_.dwv = out_.ptr<float>("dwv");
      bytes = std::max(bytes, cuda::selective_backward_fused_cuda_scratch_bytes(p_));
    }
    scratch_ = scratch(bytes);
    if (pass_ == Pass::bwd) {
      cuda::selective_forward_fused_cuda(p_, scratch_, nullptr);
      ATTNBENCH_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }

 protected:
  void launch(cudaStream_t stream) override {
    if (runs_forward(pass_)) cuda::selective_forward_fused_cuda(p_, scratch_, stream);
    if (runs_backward(pass_)) cuda::selective_backward_fused_cuda(p_, scratch_, stream);
  }

 private:
  Pass pass_;
  SelectiveParams p_;
  void* scratch_ = nullptr;
};
#endif

std::unique_ptr<Instance> make_cuda(const ImplArgs& a) {
#if ATTNBENCH_HAVE_CUDA
  return std::make_unique<SelectiveCudaInstance>(a);
#else
  (void)a;
  throw std::runtime_error("selective cuda: " + cuda_unusable_reason());
#endif
}

class SelectiveVariant final : public Variant {
 public:
  std::string name() const override { return "selective"; }
  std::string summary() const override {
    return "selective attention (per-query keys/values k_ij, v_ij = W[q_i; "
           "x_j]), causal, RoPE optional: "
           "materialized reference and CPU, and the fused exact form at the "
           "cost of ordinary attention";
  }
  std::vector<ParamSpec> params() const override {
    return {
        {"B", 1, "batch size"},
        {"T", 256, "sequence length"},
        {"d", 64, "model width (W_q: d x d, W_k and W_v: d x 2d)"},
        {"H", 2, "heads (d_head = d / H)"},
        {"rope", true, "half-split RoPE on q_i (position i) and k_ij (position j)"},
        input_std_param("x"),
    };
  }

  std::vector<Impl> impls() const override {
    std::vector<Impl> v;
    v.push_back(reference_impl({DType::f32, DType::bf16, DType::f16}));
    for (auto [name, algo] : {std::pair{"cpu_materialized", Algo::materialized}, std::pair{"cpu", Algo::fused}}) {
      Impl impl{name, Device::cpu, {DType::f32, DType::bf16, DType::f16}, [algo = algo](const ImplArgs& a) {
                  return std::make_unique<SelectiveCpuInstance>(a, algo);
                }};
      impl.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
      v.push_back(std::move(impl));
    }
    Impl cuda{"cuda", Device::cuda, {DType::f32, DType::bf16}, make_cuda};
    cuda.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
    v.push_back(std::move(cuda));
    return v;
  }

  void validate(const Params& p) const override {
    for (const char* name : {"B", "T", "d", "H"})
      if (get_int(p, name) < 1) throw InputError(std::string(name) + ": expected >= 1, got " + p.at(name).dump());
    const ref::SelectiveDims d = dims_of(p);
    if (d.d % d.H != 0)
      throw InputError("H: d = " + std::to_string(d.d) + " is not a multiple of H = " + std::to_string(d.H));
    if (d.rope && d.dh() % 2 != 0)
      throw InputError("d: RoPE needs an even d_head = d / H, got " + std::to_string(d.dh()));
  }

  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    const ref::SelectiveDims d = dims_of(p);
    TensorMap m;
    auto normal = [&](const char* name, Shape shape, double stddev) {
      Tensor t(DType::f64, std::move(shape));
      Rng rng(seed, key, name);
      for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = stddev * rng.normal();
      m.emplace(name, std::move(t));
    };
    normal("x", x_shape(d), input_std(p));
    normal("wq", {d.d, d.d}, 1.0 / std::sqrt(double(d.d)));
    normal("wk", {d.d, 2 * d.d}, 1.0 / std::sqrt(2.0 * double(d.d)));
    normal("wv", {d.d, 2 * d.d}, 1.0 / std::sqrt(2.0 * double(d.d)));
    return m;
  }

  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    return {{"o", dtype == DType::f64 ? DType::f64 : DType::f32, x_shape(dims_of(p))}};
  }

  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::SelectiveDims d = dims_of(p);
    const auto x = require(in, "x", "selective reference").to_f64_vector();
    const auto wq = require(in, "wq", "selective reference").to_f64_vector();
    const auto wk = require(in, "wk", "selective reference").to_f64_vector();
    const auto wv = require(in, "wv", "selective reference").to_f64_vector();
    std::vector<double> o(size_t(numel(x_shape(d))));
    if (dtype == DType::f64)
      ref::selective_forward_reference<double>(d, DType::f64, o.data(), x.data(), wq.data(), wk.data(), wv.data());
    else
      ref::selective_forward_reference<float>(d, dtype, o.data(), x.data(), wq.data(), wk.data(), wv.data());
    TensorMap r;
    r.emplace("o", Tensor::from_f64(o, dtype == DType::f64 ? DType::f64 : DType::f32, x_shape(d)));
    return r;
  }

  std::vector<std::string> differentiable() const override { return {"x", "wq", "wk", "wv"}; }

  TensorMap reference_backward(const Params& p, const TensorMap& in, DType dtype) const override {
    const ref::SelectiveDims d = dims_of(p);
    const auto x = require(in, "x", "selective reference").to_f64_vector();
    const auto wq = require(in, "wq", "selective reference").to_f64_vector();
    const auto wk = require(in, "wk", "selective reference").to_f64_vector();
    const auto wv = require(in, "wv", "selective reference").to_f64_vector();
    const auto dout = require(in, "do", "selective reference").to_f64_vector();
    std::vector<double> dx(x.size()), dwq(wq.size()), dwk(wk.size()), dwv(wv.size());
    if (dtype == DType::f64)
      ref::selective_backward_reference<double>(d, DType::f64, dx.data(), dwq.data(), dwk.data(), dwv.data(), x.data(),
                                                wq.data(), wk.data(), wv.data(), dout.data());
    else
      ref::selective_backward_reference<float>(d, dtype, dx.data(), dwq.data(), dwk.data(), dwv.data(), x.data(),
                                               wq.data(), wk.data(), wv.data(), dout.data());
    const DType out = dtype == DType::f64 ? DType::f64 : DType::f32;
    TensorMap r;
    r.emplace("dx", Tensor::from_f64(dx, out, x_shape(d)));
    r.emplace("dwq", Tensor::from_f64(dwq, out, {d.d, d.d}));
    r.emplace("dwk", Tensor::from_f64(dwk, out, {d.d, 2 * d.d}));
    r.emplace("dwv", Tensor::from_f64(dwv, out, {d.d, 2 * d.d}));
    return r;
  }

  /// The fused form's work (the useful FLOPs; docs/selective.md): five d×d
  /// projections per token (q, A q, B x, C q, D x: 10·B·T·d²) plus attention
  /// over the causal pairs with score dim 2·dh under RoPE (dh without) and
  /// value dim dh: 2·B·H·pairs·(Dk + dh). The materialized algorithm does
  /// 8·d² FLOPs per pair more (materialized_flops in case_info).
  double flops(const Params& p) const override {
    const ref::SelectiveDims d = dims_of(p);
    const double Dk = d.rope ? 2.0 * double(d.dh()) : double(d.dh());
    return 10.0 * double(d.B * d.T) * double(d.d) * double(d.d) +
           2.0 * double(d.B * d.H) * causal_pairs(d) * (Dk + double(d.dh()));
  }
  /// The reference materializes: 8·d² per pair for the keys and values, 4·d for
  /// scores and p·v.
  double oracle_flops(const Params& p) const override { return materialized_flops(dims_of(p)); }

  /// Projections backward 2× forward (dW and dX); attention backward: scores
  /// recomputed (Dk) + dp (dh) + dq' (Dk) + dk (dh) + dv (dh), 2 FLOPs each,
  /// per pair and head.
  double backward_flops(const Params& p) const override {
    const ref::SelectiveDims d = dims_of(p);
    const double Dk = d.rope ? 2.0 * double(d.dh()) : double(d.dh());
    return 20.0 * double(d.B * d.T) * double(d.d) * double(d.d) +
           2.0 * double(d.B * d.H) * causal_pairs(d) * (2.0 * Dk + 3.0 * double(d.dh()));
  }

  double memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::SelectiveDims d = dims_of(p);
    const double es = double(dtype_size(dtype)), os = dtype == DType::f64 ? 8.0 : 4.0;
    const double n_x = double(numel(x_shape(d))), n_w = 5.0 * double(d.d) * double(d.d);
    const double io = (n_x + n_w) * es + n_x * os;
    const SelectiveParams kp = kernel_params(d, dtype == DType::f64 ? DType::f32 : dtype);
    if (impl != "reference") return io + scratch_bytes(impl, kp, false);
    // reference: f64 copies, Q, and one query's Z (T, 2d), K, V, Kr (T, d) at a
    // time.
    const double cs = dtype == DType::f64 ? 8.0 : 4.0;
    return io + 8.0 * (2.0 * n_x + n_w) + cs * (double(d.T) * double(d.d) * 6.0 + n_x);
  }

  double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const override {
    const ref::SelectiveDims d = dims_of(p);
    const double n_x = double(numel(x_shape(d))), n_w = 5.0 * double(d.d) * double(d.d);
    const double grads = (n_x + n_w) * (dtype == DType::f64 ? 8.0 : 4.0) + n_x * double(dtype_size(dtype));
    const SelectiveParams kp = kernel_params(d, dtype == DType::f64 ? DType::f32 : dtype);
    if (impl != "reference") return grads + scratch_bytes(impl, kp, true);
    return grads + memory_bytes(p, impl, dtype);
  }

  std::vector<Params> test_shapes() const override {
    return {
        {{"B", 1}, {"T", 1}, {"d", 16}, {"H", 2}, {"rope", true}},
        {{"B", 2}, {"T", 7}, {"d", 40}, {"H", 1}, {"rope", true}},
        {{"B", 1}, {"T", 33}, {"d", 32}, {"H", 2}, {"rope", false}},
        {{"B", 1}, {"T", 33}, {"d", 80}, {"H", 2}, {"rope", true}},
        {{"B", 1}, {"T", 130}, {"d", 16}, {"H", 2}, {"rope", true}},
        {{"B", 2}, {"T", 130}, {"d", 16}, {"H", 1}, {"rope", false}},
    };
  }

  nlohmann::json case_info(const Params& p) const override {
    const ref::SelectiveDims d = dims_of(p);
    return {{"d_head", d.dh()}, {"materialized_flops", materialized_flops(d)}};
  }

 private:
  /// Scratch of an implementation's entry point (forward or backward; the
  /// fused CPU backward's with the forward's saved state).
  static double scratch_bytes(const std::string& impl, const SelectiveParams& kp, bool backward) {
    const int t = omp_get_max_threads();
    if (impl == "cpu")
      return double(backward ? cpu::selective_backward_fused_scratch_bytes(kp, t) + cpu::selective_saved_bytes(kp)
                             : cpu::selective_forward_fused_scratch_bytes(kp, t));
    if (impl == "cpu_materialized")
      return double(backward ? cpu::selective_backward_materialized_scratch_bytes(kp, t)
                             : cpu::selective_forward_materialized_scratch_bytes(kp, t));
#if ATTNBENCH_HAVE_CUDA
    return double(backward ? cuda::selective_backward_fused_cuda_scratch_bytes(kp)
                           : cuda::selective_forward_fused_cuda_scratch_bytes(kp));
#else
    return 0.0;  // no CUDA build: cuda cases are skipped before they are sized
#endif
  }
  static double materialized_flops(const ref::SelectiveDims& d) {
    return 2.0 * double(d.B * d.T) * double(d.d) * double(d.d) +
           double(d.B) * causal_pairs(d) * (8.0 * double(d.d) * double(d.d) + 4.0 * double(d.d));
  }
};

}  // namespace

ATTNBENCH_REGISTER_VARIANT(SelectiveVariant);

}  // namespace attnbench
