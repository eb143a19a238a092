// The variant contract and registry.
//
// A variant is one self-contained unit: its shape parameters (names, defaults,
// validation), its input generator, its reference (the same code computes the
// f64 oracle and the "naive in dtype T" baseline of the correctness rule), its
// implementations, its FLOP and memory models and the properties to check.
// Each variant lives in harness/variants/<family>.cpp and registers itself with
// ATTNBENCH_REGISTER_VARIANT; nothing else in the harness names it.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/dtype.hpp"
#include "harness/pass.hpp"
#include "harness/rng.hpp"
#include "harness/tensor.hpp"
#include "harness/workspace.hpp"

namespace attnbench {

/// Shape parameters of one case, e.g. {"B":1,"H":8,"N":4096,"D":64,"causal":true}.
/// After Variant::complete() every parameter of the variant is present.
using Params = nlohmann::json;

/// One shape parameter. Its type (integer, boolean, number or string) is the
/// type of `default_value`; suites must give values of that type.
struct ParamSpec {
  std::string name;
  nlohmann::json default_value;
  std::string help;
};

enum class Device { cpu, cuda };

/// What an implementation instance is built from. `inputs` are already in the
/// dtype under test (as cast by Variant::cast_inputs); `outputs` are allocated
/// with Variant::outputs() and NaN-filled before every checked call. The
/// harness keeps the ImplArgs (and everything it refers to) alive for as long
/// as the Instance made from it, so instances may keep a reference to it.
///
/// Backward passes (harness/pass.hpp): `inputs` also hold the cotangent "d"+y
/// of every output y in Variant::cotangents() (same shape as y, in the case's
/// dtype), and `outputs` hold the forward outputs plus the gradient "d"+x of
/// every input x in Variant::differentiable() (shaped like x; f32, f64 for the
/// f64 oracle). For `bwd` the constructor (setup, untimed) runs the forward and
/// saves what the backward reads; run() computes the gradients only. For
/// `fwd_bwd` run() computes the forward outputs and the gradients.
struct ImplArgs {
  const Params& params;
  DType dtype;
  const TensorMap& inputs;
  TensorMap& outputs;
  Workspace& workspace;
  Pass pass = Pass::fwd;
};

/// A prepared implementation. Construction is setup (weight packing, uploads,
/// block maps), timed separately; run() is the timed call.
class Instance {
 public:
  virtual ~Instance() = default;
  /// Computes the outputs (synchronously: when it returns the work is done).
  virtual void run() = 0;
  /// Makes the outputs of the last run() visible in ImplArgs::outputs (downloads).
  virtual void finish() {}
  /// Device-timed duration of the last run() in seconds, or < 0 for wall time.
  virtual double device_seconds() const { return -1.0; }
  /// Bytes of device memory held (CUDA), 0 on the host.
  virtual size_t device_bytes() const { return 0; }
  /// Numbers about this instance's setup recorded with its timing (block-map
  /// build time, tiles computed, ...): merged into the results' "bench" object.
  virtual nlohmann::json info() const { return nlohmann::json::object(); }
};

struct Impl {
  std::string name;           // "reference", "cpu", "cuda", ...
  Device device = Device::cpu;
  std::vector<DType> dtypes;  // dtypes it accepts
  std::function<std::unique_ptr<Instance>(const ImplArgs&)> make;
  std::vector<Pass> passes = {Pass::fwd};  // passes it implements; others are recorded as skipped
  /// Why it cannot run a case's parameters (recorded as the skip reason), or "" when it can;
  /// unset: every valid case.
  std::function<std::string(const Params&)> unsupported = nullptr;
  /// The precision it computes and stores in when its inputs are bf16/f16
  /// (DESIGN §3): f32 arithmetic and output are held to the f32 rule on the
  /// rounded inputs. nullopt: the input dtype itself (the reference, which
  /// rounds its stages to the dtype, is held to that dtype's rule).
  std::optional<DType> precision = DType::f32;
};

/// The `std` shape parameter every variant has (default 1): the standard
/// deviation of its generated activations (trifast's tests use 1 and 2). `what`
/// names the tensors it scales. Weights keep their initialization scale. The
/// scale is not part of an input stream's key: std = s gives exactly s times
/// the std = 1 activations.
ParamSpec input_std_param(const std::string& what);
/// The case's `std` (1 when absent).
double input_std(const Params& p);

/// An Instance whose run() calls a function (most CPU implementations).
class FunctionInstance final : public Instance {
 public:
  explicit FunctionInstance(std::function<void()> f) : f_(std::move(f)) {}
  void run() override { f_(); }

 private:
  std::function<void()> f_;
};

struct OutputSpec {
  std::string name;
  DType dtype;
  Shape shape;
};

/// Result of one check (equivalence, a property, ...). `passed` follows the
/// rule in check.hpp; the numbers are what the results file records.
struct CheckResult {
  bool passed = true;
  double max_abs = 0, max_rel = 0, rms_rel = 0, bound = 0;
  double naive_max_abs = -1;   // error of naive_T, when the rule uses it
  std::string detail;          // first mismatches on failure
  nlohmann::json extra = nlohmann::json::object();
};

/// Runs an implementation on other inputs (same shapes and dtype) and returns
/// its outputs; given to property checks.
using RunOn = std::function<TensorMap(const TensorMap& inputs)>;

/// A property every implementation must have (e.g. SE(3) invariance). It may
/// produce several named results (one per translation scale, say).
struct Property {
  std::string name;
  std::string help;
  std::function<std::vector<std::pair<std::string, CheckResult>>(
      const Params&, DType, const TensorMap& inputs, const RunOn& run, Rng& rng,
      const nlohmann::json& options)>
      check;
};

class Variant {
 public:
  virtual ~Variant() = default;
  virtual std::string name() const = 0;
  virtual std::string summary() const = 0;
  virtual std::vector<ParamSpec> params() const = 0;
  virtual std::vector<Impl> impls() const = 0;

  /// Throws InputError("<param>: expected ...") on impossible shapes.
  virtual void validate(const Params& p) const = 0;
  /// Input and weight tensors in f64, drawn from per-tensor streams:
  /// use `Rng(seed, key, tensor_name)`.
  virtual TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const = 0;
  /// The same values stored in `storage` (f32 for bench-only runs of large
  /// cases, where an f64 master copy would not fit). Variants with big inputs
  /// override it to generate directly into `storage`; values must equal
  /// make_inputs() rounded to `storage`.
  virtual TensorMap make_inputs_as(const Params& p, uint64_t seed, const std::string& key, DType storage) const;
  virtual std::vector<OutputSpec> outputs(const Params& p, DType dtype) const = 0;
  /// The reference algorithm. `dtype` f64 gives the oracle; f32 the same code in
  /// float; bf16/f16 float arithmetic rounded to the dtype at stage boundaries
  /// (like an eager PyTorch module in that dtype). Inputs are f64 tensors.
  virtual TensorMap reference(const Params& p, const TensorMap& inputs, DType dtype) const = 0;

  /// Floating point operations of one forward call (GFLOP/s and % of peak
  /// are computed from it; variants that skip work count the useful part).
  virtual double flops(const Params& p) const = 0;
  /// What the f64 oracle (the reference) costs, for checks.max_oracle_gflop.
  /// Default flops(); masked attention's dense reference costs more.
  virtual double oracle_flops(const Params& p) const { return flops(p); }
  /// Bytes the implementation needs (inputs, outputs and scratch): cases whose
  /// model exceeds free memory are skipped before anything is allocated.
  virtual double memory_bytes(const Params& p, const std::string& impl, DType dtype) const = 0;

  /// Casts the generated inputs to what implementations in `dtype` read.
  /// Default: every floating tensor to `dtype`, others unchanged. Takes the
  /// inputs by value so tensors already in the right dtype are moved, not
  /// copied (z at N = 4096 is 8.6 GB in f32).
  virtual TensorMap cast_inputs(const Params& p, TensorMap inputs, DType dtype) const;
  /// Extra checks (default none).
  virtual std::vector<Property> properties() const { return {}; }

  // ---- Backward (variants with gradients; harness/pass.hpp) ----
  /// Inputs that get a gradient ("q", "k", "v", weights...). Empty: forward only.
  virtual std::vector<std::string> differentiable() const { return {}; }
  /// Outputs that receive a cotangent "d"+name (default: every output).
  virtual std::vector<std::string> cotangents(const Params& p) const;
  /// Gradients of Σ_y ⟨cotangent_y, y⟩ with respect to each differentiable
  /// input, named "d"+input. `inputs` are f64 tensors holding the inputs and
  /// the cotangents; `dtype` as in reference() (f64 oracle, f32, or stages
  /// rounded to bf16/f16); tensors in f64 for f64, else f32.
  virtual TensorMap reference_backward(const Params& p, const TensorMap& inputs, DType dtype) const;
  /// FLOPs of the backward alone (default 2.5 × flops(p): FlashAttention's convention).
  virtual double backward_flops(const Params& p) const { return 2.5 * flops(p); }
  /// Bytes the backward needs beyond memory_bytes() (gradients, cotangents,
  /// saved statistics, scratch). Default: the forward model once more.
  virtual double backward_memory_bytes(const Params& p, const std::string& impl, DType dtype) const {
    return memory_bytes(p, impl, dtype);
  }
  bool has_backward() const { return !differentiable().empty(); }
  /// FLOPs of one call of `pass`.
  double pass_flops(const Params& p, Pass pass) const;
  /// Memory model of one call of `pass`.
  double pass_memory_bytes(const Params& p, const std::string& impl, DType dtype, Pass pass) const;
  /// Odd shapes every implementation is tested on by the registry-driven
  /// equivalence test (tests/equivalence_test.cpp); keep each case small (< 1 s).
  virtual std::vector<Params> test_shapes() const = 0;
  /// Extra numbers recorded with a case (density, tiles computed, ...).
  virtual nlohmann::json case_info(const Params&) const { return nlohmann::json::object(); }

  /// Case files: shape parameters recovered from the tensors of a case file
  /// (weights, inputs) when its metadata has none. Default: unsupported.
  virtual Params params_from_tensors(const TensorMap& tensors) const;
  /// Case files: throws InputError naming the tensor when input values are
  /// impossible for `p` (sdpa's kv_len outside [0, Nkv]). Shapes and dtypes
  /// are checked by the caller against make_inputs(); this is for values that
  /// index memory. Default: nothing to check.
  virtual void validate_inputs(const Params& p, const TensorMap& inputs) const;
  /// Case files from another framework: the f64 reference computed the way
  /// that framework's module computes it (OpenFold's additive masks, whose
  /// offset does not cancel in floating point), so that its stored outputs can
  /// be held to a few ulps. Default: reference(p, inputs, f64).
  virtual TensorMap file_reference(const Params& p, const TensorMap& inputs) const;

  /// Parameters that others fix, filled in before the defaults (masked: N from
  /// a DAG when neither N, Nq nor Nkv is given). Default: `given` unchanged.
  virtual Params derived(const Params& given) const { return given; }
  /// The parameters as a case file stores them: nothing that refers outside the
  /// file (masked: a DAG file's JSON inline instead of its path). Default: `p`.
  virtual Params self_contained(const Params& p) const { return p; }

  /// Defaults filled in, unknown keys rejected (with did-you-mean), types
  /// checked, validate() called. `where` prefixes errors ("suites/x.json: groups[0].sweep").
  Params complete(const Params& given, const std::string& where) const;
  /// The "reference" implementation: reference() (and reference_backward()
  /// when the variant has one) in the dtype under test, as a timed
  /// implementation (the naive baseline of the speedups). Its bwd pass
  /// recomputes the forward inside the backward, as the Eigen code does.
  Impl reference_impl(std::vector<DType> dtypes) const;
  std::optional<Impl> find_impl(const std::string& name) const;
};

/// All registered variants, by name.
const std::vector<const Variant*>& variants();
/// The variant `name` or an InputError with did-you-mean.
const Variant& find_variant(const std::string& name, const std::string& where);

struct Registrar {
  explicit Registrar(std::unique_ptr<Variant> v);
};

#define ATTNBENCH_REGISTER_VARIANT(Type) \
  static const ::attnbench::Registrar attnbench_registrar_##Type{std::make_unique<Type>()}

/// Is a CUDA device usable in this process (compiled in and a device present)?
bool cuda_usable();
/// Why CUDA is not usable (empty when it is).
std::string cuda_unusable_reason();

}  // namespace attnbench
