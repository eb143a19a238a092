// attnbench export / verify: case files (docs/case-files.md).
//
// export writes a case's inputs, weights and f64 reference outputs as
// safetensors; verify reads such a file — ours, or one dumped from another
// framework (OpenFold's state_dict names for IPA) — and checks (1) the outputs
// stored in the file against our f64 reference on the file's inputs and
// (2) our implementations against that reference, with the correctness rule.
#include <sstream>

#include <fmt/format.h>

#include "harness/check.hpp"
#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/json_file.hpp"
#include "harness/version.hpp"
#include "harness/safetensors.hpp"
#include "harness/variant.hpp"

namespace attnbench::cli {

namespace {

/// "N=17,causal=true,rope=half" → params typed by the variant's ParamSpecs.
Params parse_shape(const Variant& v, const std::string& text) {
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
  return v.complete(p, "--shape");
}

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
  const Params p = parse_shape(v, a.shape);
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
  std::string variant, file, impls = "all", dtype = "f32";
  double file_floor_ulps = 1024;
};

int verify(const VerifyArgs& a) {
  const Variant& v = find_variant(a.variant, "verify");
  SafetensorsFile f = read_safetensors(a.file);
  Params p;
  if (f.metadata.count("params")) {
    const nlohmann::json given = parse_json_text(f.metadata["params"], a.file + ": __metadata__.params");
    p = v.complete(given, a.file + ": __metadata__.params");
  } else {
    TensorMap wide;
    for (const auto& [name, t] : f.tensors) wide.emplace(name, is_floating(t.dtype()) ? t.to(DType::f64) : t);
    try {
      p = v.complete(v.params_from_tensors(wide), a.file + ": shapes");
    } catch (const InputError& e) {
      throw InputError(a.file + ": " + e.what());
    }
  }
  fmt::print("{}: {} {}\n", a.file, v.name(), p.dump());

  // Split the file into inputs and expected outputs by the variant's output names.
  TensorMap inputs64, expected;
  std::vector<std::string> out_names;
  for (const auto& spec : v.outputs(p, DType::f64)) out_names.push_back(spec.name);
  for (auto& [name, t] : f.tensors) {
    const bool is_out = std::find(out_names.begin(), out_names.end(), name) != out_names.end();
    Tensor wide = is_floating(t.dtype()) ? t.to(DType::f64) : t;
    (is_out ? expected : inputs64).emplace(name, std::move(wide));
  }
  const auto shape_error = [&](const std::string& name, const Tensor& got, const Shape& want) {
    return InputError(fmt::format("{}: tensor '{}': expected shape {}, got {}", a.file, name, shape_str(want),
                                  shape_str(got.shape())));
  };

  bool ok = true;
  const TensorMap oracle = v.reference(p, inputs64, DType::f64);
  for (const auto& [name, t] : expected) {
    const Tensor& want = oracle.at(name);
    if (t.shape() != want.shape()) throw shape_error(name, t, want.shape());
    const DType stored = f.tensors.at(name).dtype();
    // Another framework's f64 result differs from ours by summation order only:
    // the floor allows that (file_floor_ulps of the stored dtype), nothing more.
    CheckResult r = check_equivalence(t, want, want, stored, a.file_floor_ulps);
    fmt::print("  stored '{}' ({}) vs attnbench reference (f64): {}\n", name, dtype_name(stored), describe(r));
    ok = ok && r.passed;
  }

  const DType dtype = parse_dtype(a.dtype, "--dtype");
  const TensorMap cast = v.cast_inputs(p, inputs64, dtype);
  TensorMap wide;
  for (const auto& [name, t] : cast) wide.emplace(name, is_floating(t.dtype()) ? t.to(DType::f64) : t);
  const TensorMap oracle_t = v.reference(p, wide, DType::f64);
  const TensorMap naive_t = v.reference(p, wide, dtype);
  for (const auto& impl : v.impls()) {
    if (a.impls != "all" && a.impls != impl.name) continue;
    if (std::find(impl.dtypes.begin(), impl.dtypes.end(), dtype) == impl.dtypes.end()) continue;
    if (impl.device == Device::cuda && !cuda_usable()) {
      fmt::print("  {} ({}): skipped, {}\n", impl.name, dtype_name(dtype), cuda_unusable_reason());
      continue;
    }
    TensorMap outs;
    for (const auto& spec : v.outputs(p, dtype)) outs.emplace(spec.name, Tensor(spec.dtype, spec.shape));
    Workspace ws;
    const ImplArgs args{p, dtype, cast, outs, ws};
    auto inst = impl.make(args);
    inst->run();
    inst->finish();
    for (const auto& [name, t] : outs) {
      CheckResult r = check_equivalence(t, oracle_t.at(name), naive_t.at(name), dtype);
      fmt::print("  {} ({}) '{}' vs reference: {}\n", impl.name, dtype_name(dtype), name, describe(r));
      ok = ok && r.passed;
    }
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
  c->add_option("--file-floor-ulps", args->file_floor_ulps,
                "Ulps of the stored dtype (at the output's magnitude) allowed between the file's outputs and ours");
  c->callback([args, &exit_code] { exit_code = verify(*args); });
}

}  // namespace attnbench::cli
