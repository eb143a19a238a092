#include "harness/variant.hpp"

#include <algorithm>
#include <cmath>

#include "harness/errors.hpp"

#if ATTNBENCH_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace attnbench {

namespace {
/// Owns the registered variants; `view` lists them sorted by name.
struct Registry {
  std::vector<std::unique_ptr<Variant>> owned;
  std::vector<const Variant*> view;
};
Registry& registry_storage() {
  static Registry r;
  return r;
}
std::vector<const Variant*>& registry() { return registry_storage().view; }

const char* json_type_name(const nlohmann::json& j) {
  if (j.is_boolean()) return "a boolean";
  if (j.is_number_integer()) return "an integer";
  if (j.is_number()) return "a number";
  if (j.is_string()) return "a string";
  return j.type_name();
}

bool same_kind(const nlohmann::json& want, const nlohmann::json& got) {
  if (want.is_boolean()) return got.is_boolean();
  if (want.is_number_integer()) return got.is_number_integer();
  if (want.is_number()) return got.is_number();
  if (want.is_string()) return got.is_string();
  return want.type() == got.type();
}
}  // namespace

Registrar::Registrar(std::unique_ptr<Variant> v) {
  auto& r = registry();
  r.push_back(v.get());
  registry_storage().owned.push_back(std::move(v));
  std::sort(r.begin(), r.end(), [](const Variant* a, const Variant* b) { return a->name() < b->name(); });
}

const std::vector<const Variant*>& variants() { return registry(); }

const Variant& find_variant(const std::string& name, const std::string& where) {
  std::vector<std::string> names;
  for (const Variant* v : registry()) {
    if (v->name() == name) return *v;
    names.push_back(v->name());
  }
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw InputError(where + ": unknown variant '" + name + "', expected one of " + list + did_you_mean(name, names));
}

TensorMap Variant::cast_inputs(const Params&, TensorMap inputs, DType dtype) const {
  for (auto& [name, t] : inputs)
    if (is_floating(t.dtype()) && t.dtype() != dtype) t = t.to(dtype);
  return inputs;
}

TensorMap Variant::make_inputs_as(const Params& p, uint64_t seed, const std::string& key, DType storage) const {
  TensorMap m = make_inputs(p, seed, key);
  if (storage == DType::f64) return m;
  for (auto& [name, t] : m)
    if (t.dtype() == DType::f64) t = t.to(storage);
  return m;
}

Impl Variant::reference_impl(std::vector<DType> dtypes) const {
  // ImplArgs is a temporary: capture what it refers to, not the struct.
  Impl impl{"reference", Device::cpu, std::move(dtypes), [this](const ImplArgs& a) {
              return std::make_unique<FunctionInstance>([this, params = a.params, dtype = a.dtype, pass = a.pass,
                                                         &inputs = a.inputs, &outputs = a.outputs] {
                TensorMap r;
                if (runs_forward(pass)) r = reference(params, inputs, dtype);
                if (runs_backward(pass)) r.merge(reference_backward(params, inputs, dtype));
                for (auto& [name, t] : r)
                  if (auto it = outputs.find(name); it != outputs.end()) it->second = std::move(t);
              });
            }};
  impl.precision = std::nullopt;
  if (has_backward()) impl.passes = {Pass::fwd, Pass::bwd, Pass::fwd_bwd};
  return impl;
}

std::vector<std::string> Variant::cotangents(const Params& p) const {
  std::vector<std::string> names;
  for (const auto& spec : outputs(p, DType::f64)) names.push_back(spec.name);
  return names;
}

TensorMap Variant::reference_backward(const Params&, const TensorMap&, DType) const {
  throw std::logic_error("variant '" + name() + "' has no backward");
}

double Variant::pass_flops(const Params& p, Pass pass) const {
  switch (pass) {
    case Pass::fwd:
      return flops(p);
    case Pass::bwd:
      return backward_flops(p);
    case Pass::fwd_bwd:
      return flops(p) + backward_flops(p);
  }
  return flops(p);
}

double Variant::pass_memory_bytes(const Params& p, const std::string& impl, DType dtype, Pass pass) const {
  const double fwd = memory_bytes(p, impl, dtype);
  return runs_backward(pass) ? fwd + backward_memory_bytes(p, impl, dtype) : fwd;
}

Params Variant::params_from_tensors(const TensorMap&) const {
  throw InputError("variant '" + name() + "' does not read case files without shape metadata");
}

void Variant::validate_inputs(const Params&, const TensorMap&) const {}

TensorMap Variant::file_reference(const Params& p, const TensorMap& inputs) const {
  return reference(p, inputs, DType::f64);
}

ParamSpec input_std_param(const std::string& what) {
  return {"std", 1.0, "standard deviation of the generated " + what + " (weights keep their scale)"};
}

double input_std(const Params& p) { return p.contains("std") ? p.at("std").get<double>() : 1.0; }

Params Variant::complete(const Params& given, const std::string& where) const {
  if (!given.is_object()) throw InputError(where + ": expected an object of shape parameters");
  const auto specs = params();
  std::vector<std::string> names;
  for (const auto& s : specs) names.push_back(s.name);
  for (const auto& item : given.items()) {
    // Named copies, not a structured binding: clang 14 cannot capture a binding in a lambda.
    const std::string& key = item.key();
    const auto& value = item.value();
    auto it = std::find_if(specs.begin(), specs.end(), [&](const ParamSpec& s) { return s.name == key; });
    if (it == specs.end())
      throw InputError(where + "." + key + ": unknown parameter of variant '" + name() + "'" +
                       did_you_mean(key, names));
    if (!same_kind(it->default_value, value))
      throw InputError(where + "." + key + ": expected " + json_type_name(it->default_value) + ", got " +
                       value.dump());
  }
  Params p = nlohmann::json::object();
  try {
    const Params fixed = derived(given);
    for (const auto& s : specs) p[s.name] = fixed.contains(s.name) ? fixed.at(s.name) : s.default_value;
    if (p.contains("std")) {
      const double sd = p.at("std").get<double>();
      if (!(std::isfinite(sd) && sd > 0)) throw InputError("std: expected a finite number > 0, got " + p.at("std").dump());
    }
    validate(p);
  } catch (const InputError& e) {
    throw InputError(where + "." + e.what());
  }
  return p;
}

std::optional<Impl> Variant::find_impl(const std::string& impl_name) const {
  for (auto& i : impls())
    if (i.name == impl_name) return i;
  return std::nullopt;
}

bool cuda_usable() { return cuda_unusable_reason().empty(); }

std::string cuda_unusable_reason() {
#if ATTNBENCH_HAVE_CUDA
  static const std::string reason = [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(e);
    if (n == 0) return std::string("no CUDA device found");
    return std::string();
  }();
  return reason;
#else
  return "built without CUDA (ATTNBENCH_CUDA=OFF)";
#endif
}

}  // namespace attnbench
