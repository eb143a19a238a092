// attnbench export / verify: case files (docs/case-files.md).
//
// export writes a case's inputs, weights and f64 reference outputs as
// safetensors; verify reads such a file — ours, or one dumped from another
// framework (OpenFold's state_dict names for IPA) — and checks (1) the outputs
// stored in the file against our f64 reference on the file's inputs and
// (2) our implementations against that reference, with the correctness rule.
#include <cmath>
#include <map>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "harness/check.hpp"
#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/json_file.hpp"
#include "harness/version.hpp"
#include "harness/safetensors.hpp"
#include "harness/system.hpp"
#include "harness/variant.hpp"

namespace attnbench::cli {

namespace {

/// "N=17,causal=true,rope=half" → a JSON object (not yet completed by the variant).
Params parse_shape_items(const std::string& text) {
  Params p = nlohmann::json::object();
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) throw InputError("--shape: '" + item + "': expected key=value");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    nlohmann::json parsed;
    try {
      parsed = parse_json_text(value, "--shape");
    } catch (const InputError&) {
      parsed = value;  // bare words (and anything else that is not JSON) are strings
    }
    p[key] = parsed;
  }
  return p;
}

/// The same, typed by the variant's ParamSpecs (defaults for the rest).
Params parse_shape(const Variant& v, const std::string& text) { return v.complete(parse_shape_items(text), "--shape"); }

std::string describe(const CheckResult& r) {
  return fmt::format("{}  max_abs {:.3e}  max_rel {:.3e}  rms_rel {:.3e}  bound {:.3e}{}", r.passed ? "PASS" : "FAIL",
                     r.max_abs, r.max_rel, r.rms_rel, r.bound, r.passed ? "" : "  " + r.detail);
}

struct ExportArgs {
  std::string variant, shape, out;
  uint64_t seed = 0;
};

void export_case(const ExportArgs& a) {
  const Variant& v = find_variant(a.variant, "export");
  // Stored self-contained (a DAG inline, not its path), so the file verifies anywhere.
  const Params p = v.self_contained(parse_shape(v, a.shape));
  TensorMap tensors = v.make_inputs(p, a.seed, "export");
  TensorMap outputs = v.reference(p, tensors, DType::f64);
  for (auto& [name, t] : outputs) {
    if (tensors.count(name)) throw std::logic_error("output name '" + name + "' collides with an input");
    tensors.emplace(name, std::move(t));
  }
  write_safetensors(a.out, tensors,
                    {{"variant", v.name()}, {"params", p.dump()}, {"producer", std::string("attnbench ") + version()}});
  fmt::print("wrote {} ({} tensors) for {} {}\n", a.out, tensors.size(), v.name(), p.dump());
}

struct VerifyArgs {
  std::string variant, file, impls = "all", dtype = "f32", shape, cpu_path;
  double file_floor_ulps = 1024;
};

TensorMap widen(const TensorMap& m) {
  TensorMap out;
  for (const auto& [name, t] : m) out.emplace(name, is_floating(t.dtype()) ? t.to(DType::f64) : t);
  return out;
}

/// The case's parameters: every dim inferred from the tensors where the variant
/// can (params_from_tensors), then __metadata__.params, then --shape on top, so
/// partial params (`{"starting": false}`) only say what the tensors cannot.
Params file_params(const Variant& v, const SafetensorsFile& f, const std::string& file, const std::string& shape) {
  Params given = nlohmann::json::object();
  if (auto it = f.metadata.find("params"); it != f.metadata.end()) {
    given = parse_json_text(it->second, file + ": __metadata__.params");
    if (!given.is_object()) throw InputError(file + ": __metadata__.params: expected a JSON object of shape parameters");
  }
  const Params flags = parse_shape_items(shape);  // items() of a temporary would dangle
  for (const auto& [k, x] : flags.items()) given[k] = x;
  Params p = nlohmann::json::object();
  try {
    p = v.params_from_tensors(widen(f.tensors));
  } catch (const InputError& e) {
    // Without given params the tensors are all there is: their error is the answer.
    // With them, the tensor check below names whatever disagrees.
    if (given.empty()) throw InputError(file + ": " + e.what());
  }
  for (const auto& [k, x] : given.items()) p[k] = x;
  return v.complete(p, file + ": params");
}

/// Every input the params imply must be in the file with that shape and kind
/// (floating or integer/bool), before any reference or kernel reads it: params
/// that disagree with the tensors would otherwise read out of bounds.
void check_tensors(const Variant& v, const Params& p, const TensorMap& inputs, const TensorMap& expected,
                   const std::string& file) {
  const double need = v.memory_bytes(p, "reference", DType::f64), avail = double(available_memory_bytes());
  if (need > 0.9 * avail)
    throw InputError(fmt::format("{}: params {} need {} ({} available): do they match the tensors?", file, p.dump(),
                                 gib(need), gib(avail)));
  const auto kind = [](DType d) { return is_floating(d) ? "a floating dtype" : "an integer or bool dtype"; };
  for (const auto& [name, want] : v.make_inputs(p, 0, "verify")) {
    auto it = inputs.find(name);
    if (it == inputs.end())
      throw InputError(fmt::format("{}: tensor '{}': missing (expected shape {}, {})", file, name,
                                   shape_str(want.shape()), kind(want.dtype())));
    const Tensor& got = it->second;
    if (got.shape() != want.shape())
      throw InputError(fmt::format("{}: tensor '{}': expected shape {} (from params {}), got {}", file, name,
                                   shape_str(want.shape()), p.dump(), shape_str(got.shape())));
    if (is_floating(got.dtype()) != is_floating(want.dtype()))
      throw InputError(fmt::format("{}: tensor '{}': expected {}, got {}", file, name, kind(want.dtype()),
                                   dtype_name(got.dtype())));
  }
  for (const auto& spec : v.outputs(p, DType::f64))
    if (auto it = expected.find(spec.name); it != expected.end() && it->second.shape() != spec.shape)
      throw InputError(fmt::format("{}: tensor '{}': expected shape {} (from params {}), got {}", file, spec.name,
                                   shape_str(spec.shape), p.dump(), shape_str(it->second.shape())));
  try {
    v.validate_inputs(p, inputs);
  } catch (const InputError& e) {
    throw InputError(file + ": " + e.what());
  }
}

int verify(const VerifyArgs& a) {
  const Variant& v = find_variant(a.variant, "verify");
  apply_cpu_path(a.cpu_path);
  // What was asked for must exist: an unknown name is bad input, not an empty pass.
  const DType dtype = parse_dtype(a.dtype, "--dtype");
  const std::vector<Impl> impls = v.impls();
  std::vector<std::string> impl_names;
  for (const auto& impl : impls) impl_names.push_back(impl.name);
  if (a.impls != "all" && std::find(impl_names.begin(), impl_names.end(), a.impls) == impl_names.end())
    throw InputError(fmt::format("--impl: variant '{}' has no implementation '{}'{} (has: all, {})", v.name(), a.impls,
                                 did_you_mean(a.impls, impl_names), fmt::join(impl_names, ", ")));

  SafetensorsFile f = read_safetensors(a.file);
  const Params p = file_params(v, f, a.file, a.shape);

  // Split the file into inputs and expected outputs by the variant's output names.
  TensorMap inputs64, expected;
  std::vector<std::string> out_names;
  for (const auto& spec : v.outputs(p, DType::f64)) out_names.push_back(spec.name);
  for (auto& [name, t] : f.tensors) {
    const bool is_out = std::find(out_names.begin(), out_names.end(), name) != out_names.end();
    Tensor wide = is_floating(t.dtype()) ? t.to(DType::f64) : t;
    (is_out ? expected : inputs64).emplace(name, std::move(wide));
  }
  check_tensors(v, p, inputs64, expected, a.file);
  fmt::print("{}: {} {}\n", a.file, v.name(), p.dump());

  bool ok = true;
  if (const std::string bad = nonfinite_inputs(inputs64); !bad.empty()) {
    fmt::print("  FAIL  non-finite inputs: {}\n", bad);
    ok = false;
  }
  // A file from another framework is checked against the reference computed the
  // way that framework computes it (OpenFold's additive masks, see
  // docs/case-files.md); one of ours against our reference.
  const auto producer = f.metadata.find("producer");
  const bool ours = producer != f.metadata.end() && producer->second.rfind("attnbench", 0) == 0;
  const TensorMap oracle = ours ? v.reference(p, inputs64, DType::f64) : v.file_reference(p, inputs64);
  for (const auto& [name, t] : expected) {
    const Tensor& want = oracle.at(name);
    const DType stored = f.tensors.at(name).dtype();
    // Another framework's f64 result differs from ours by summation order only:
    // the floor allows that (file_floor_ulps of the stored dtype), nothing more.
    CheckResult r = check_equivalence(t, want, want, stored, a.file_floor_ulps);
    fmt::print("  stored '{}' ({}) vs attnbench reference (f64{}): {}\n", name, dtype_name(stored),
               ours ? "" : ", the producer's mask arithmetic", describe(r));
    ok = ok && r.passed;
  }

  const TensorMap cast = v.cast_inputs(p, inputs64, dtype);
  const TensorMap wide = widen(cast);
  const TensorMap oracle_t = v.reference(p, wide, DType::f64);
  // naive_T in the precision each implementation computes and stores in
  // (Impl::precision, DESIGN §3): f32 arithmetic on bf16 inputs is held to the
  // f32 rule on the rounded inputs, not to the loose bf16 one.
  std::map<DType, TensorMap> naive_by_precision;
  const auto naive_t = [&](DType prec) -> const TensorMap& {
    auto it = naive_by_precision.find(prec);
    if (it == naive_by_precision.end()) it = naive_by_precision.emplace(prec, v.reference(p, wide, prec)).first;
    return it->second;
  };
  int ran = 0;
  std::vector<std::string> not_run;
  for (const auto& impl : impls) {
    if (a.impls != "all" && a.impls != impl.name) continue;
    if (std::find(impl.dtypes.begin(), impl.dtypes.end(), dtype) == impl.dtypes.end()) {
      std::vector<std::string> has;
      for (DType d : impl.dtypes) has.emplace_back(dtype_name(d));
      not_run.push_back(fmt::format("{} does not support {} (supports {})", impl.name, dtype_name(dtype),
                                    fmt::join(has, ", ")));
      continue;
    }
    if (impl.device == Device::cuda && !cuda_usable()) {
      fmt::print("  {} ({}): skipped, {}\n", impl.name, dtype_name(dtype), cuda_unusable_reason());
      not_run.push_back(impl.name + ": " + cuda_unusable_reason());
      continue;
    }
    TensorMap outs;
    for (const auto& spec : v.outputs(p, dtype)) outs.emplace(spec.name, Tensor(spec.dtype, spec.shape));
    for (auto& [name, t] : outs) t.fill_nan();  // a kernel that skips work cannot pass on stale data
    Workspace ws;
    const ImplArgs args{p, dtype, cast, outs, ws};
    auto inst = impl.make(args);
    inst->run();
    inst->finish();
    ++ran;
    const DType prec = dtype == DType::f64 ? dtype : impl.precision.value_or(dtype);
    for (const auto& [name, t] : outs) {
      CheckResult r = check_equivalence(t, oracle_t.at(name), naive_t(prec).at(name), prec);
      fmt::print("  {} ({}{}) '{}' vs reference: {}\n", impl.name, dtype_name(dtype),
                 prec == dtype ? "" : fmt::format(", held to the {} rule", dtype_name(prec)), name, describe(r));
      ok = ok && r.passed;
    }
  }
  if (ran == 0) {
    // Nothing that was asked for could run: that is not a pass.
    fmt::print("verify: FAILED, no implementation was checked ({})\n", fmt::join(not_run, "; "));
    return 1;
  }
  fmt::print("{}\n", ok ? "verify: all checks passed" : "verify: FAILED");
  return ok ? 0 : 1;
}

}  // namespace

void add_export(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<ExportArgs>();
  auto* c = app.add_subcommand("export", "Write a case (inputs, weights, f64 reference outputs) as safetensors");
  c->add_option("variant", args->variant, "Variant name (attnbench list)")->required();
  c->add_option("--shape", args->shape, "Shape parameters, e.g. N=23,H=4 (defaults for the rest)");
  c->add_option("--out", args->out, "Output .safetensors file")->required();
  c->add_option("--seed", args->seed, "Input seed");
  c->callback([args, &exit_code] {
    export_case(*args);
    exit_code = 0;
  });
}

void add_verify(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<VerifyArgs>();
  auto* c = app.add_subcommand("verify", "Check a case file's stored outputs and our implementations against the reference");
  c->add_option("variant", args->variant, "Variant name (attnbench list)")->required();
  c->add_option("file", args->file, "Case file (.safetensors)")->required();
  c->add_option("--impl", args->impls, "Implementation to check (default: all usable)");
  c->add_option("--dtype", args->dtype, "Dtype the implementations run in (default f32)");
  c->add_option("--shape", args->shape,
                "Shape parameters the tensors cannot tell, e.g. starting=false (over __metadata__.params)");
  c->add_option("--file-floor-ulps", args->file_floor_ulps,
                "Ulps of the stored dtype (at the output's magnitude) allowed between the file's outputs and ours");
  c->add_option("--cpu-path", args->cpu_path,
                "Limit CPU kernels to this path and below (default: $ATTNBENCH_CPU_PATH, else the best there is)");
  c->callback([args, &exit_code] { exit_code = verify(*args); });
}

}  // namespace attnbench::cli
