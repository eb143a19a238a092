#include "harness/runner.hpp"
#include "impls/cpu/cpu_features.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include <fmt/format.h>

#include "harness/bench.hpp"
#include "harness/check.hpp"
#include "harness/errors.hpp"
#include "harness/system.hpp"

namespace attnbench {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// The outputs an implementation writes in `pass`: the forward outputs, and for
/// backward passes a gradient per differentiable input (f32; f64 for f64).
TensorMap allocate_outputs(const Variant& v, const Params& p, DType dtype, Pass pass, const TensorMap& inputs) {
  TensorMap out;
  for (auto& spec : v.outputs(p, dtype)) out.emplace(spec.name, Tensor(spec.dtype, spec.shape));
  if (runs_backward(pass))
    for (const auto& x : v.differentiable())
      out.emplace(grad_name(x), Tensor(dtype == DType::f64 ? DType::f64 : DType::f32,
                                       require(inputs, x, "inputs of " + v.name()).shape()));
  return out;
}

/// Adds the cotangent "d"+y of every output y the backward receives, drawn
/// like an input from its own stream, stored in `storage`.
void add_cotangents(const Variant& v, const Params& p, uint64_t seed, const std::string& key, DType storage,
                    TensorMap& inputs) {
  const auto specs = v.outputs(p, DType::f64);
  for (const auto& y : v.cotangents(p)) {
    auto spec = std::find_if(specs.begin(), specs.end(), [&](const OutputSpec& o) { return o.name == y; });
    if (spec == specs.end()) throw std::logic_error(v.name() + ": cotangent of unknown output '" + y + "'");
    Tensor t(DType::f64, spec->shape);
    Rng rng(seed, key, grad_name(y));
    for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = rng.normal();
    inputs.emplace(grad_name(y), storage == DType::f64 ? std::move(t) : t.to(storage));
  }
}

/// The names an implementation's record checks in `pass`: forward outputs for
/// fwd and fwd_bwd, gradients for bwd and fwd_bwd.
double max_abs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.get(i)));
  return m;
}

bool is_gradient(const Variant& v, const std::string& output) {
  const auto diff = v.differentiable();
  return std::any_of(diff.begin(), diff.end(), [&](const std::string& x) { return grad_name(x) == output; });
}
bool checked_in(const Variant& v, const std::string& output, Pass pass) {
  return is_gradient(v, output) ? runs_backward(pass) : runs_forward(pass);
}

TensorMap to_f64(const TensorMap& m) {
  TensorMap out;
  for (const auto& [name, t] : m) out.emplace(name, is_floating(t.dtype()) ? t.to(DType::f64) : t);
  return out;
}

nlohmann::json to_json(const CheckResult& r) {
  nlohmann::json j = {{"passed", r.passed}, {"max_abs", r.max_abs}, {"max_rel", r.max_rel},
                      {"rms_rel", r.rms_rel}, {"bound", r.bound}};
  if (r.naive_max_abs >= 0) j["naive_max_abs"] = r.naive_max_abs;
  if (!r.detail.empty()) j["detail"] = r.detail;
  for (const auto& [k, v] : r.extra.items()) j[k] = v;
  // JSON has no infinity: a non-finite error is recorded as null.
  for (auto& [k, v] : j.items())
    if (v.is_number_float() && !std::isfinite(v.get<double>())) v = nullptr;
  return j;
}

/// Seeds per checked case are spread so that seed s of one suite never equals
/// seed s+1 of a suite with the next base seed.
uint64_t check_seed(uint64_t base, int index) { return base * 1000003ull + uint64_t(index); }

}  // namespace

std::string case_key(const Variant& v, const Params& p) {
  std::string key = v.name();
  // `std` scales the same streams (std = s gives s times the std = 1 inputs): not part of the key.
  for (const auto& [k, val] : p.items())
    if (k != "std") key += "," + k + "=" + (val.is_string() ? val.get<std::string>() : val.dump());
  return key;
}

CaseRunner::Oracle& CaseRunner::oracle(const CaseSpec& c, int seed_index) {
  const bool backward = runs_backward(c.pass);
  const std::string key = case_key(*c.variant, c.params) + "|std=" + std::to_string(input_std(c.params)) + "|" +
                          std::string(dtype_name(c.dtype)) + (backward ? "|bwd" : "");
  if (key != cached_key_) {
    cached_.clear();
    cached_key_ = key;
  }
  while (int(cached_.size()) <= seed_index) {
    const int s = int(cached_.size());
    const Variant& v = *c.variant;
    const std::string ckey = case_key(v, c.params);
    Oracle o;
    // The oracle sees exactly the inputs the implementation sees: cast to the
    // dtype, then widened back to f64.
    TensorMap generated = v.make_inputs(c.params, check_seed(o_.seed, s), ckey);
    if (backward) add_cotangents(v, c.params, check_seed(o_.seed, s), ckey, DType::f64, generated);
    o.inputs = v.cast_inputs(c.params, std::move(generated), c.dtype);
    o.wide = to_f64(o.inputs);
    o.oracle = v.reference(c.params, o.wide, DType::f64);
    if (backward) o.oracle.merge(v.reference_backward(c.params, o.wide, DType::f64));
    cached_.push_back(std::move(o));
  }
  return cached_[size_t(seed_index)];
}

const TensorMap& CaseRunner::naive(const CaseSpec& c, Oracle& o, DType precision) {
  if (precision == DType::f64) return o.oracle;
  auto it = o.naive.find(precision);
  if (it == o.naive.end()) {
    TensorMap n = c.variant->reference(c.params, o.wide, precision);
    if (runs_backward(c.pass)) n.merge(c.variant->reference_backward(c.params, o.wide, precision));
    it = o.naive.emplace(precision, std::move(n)).first;
  }
  return it->second;
}

nlohmann::json CaseRunner::check(const CaseSpec& c, const Impl& impl) {
  const Variant& v = *c.variant;
  std::map<std::string, std::vector<CheckResult>> by_name;
  std::vector<std::string> order;
  auto add = [&](const std::string& name, CheckResult r) {
    if (!by_name.count(name)) order.push_back(name);
    by_name[name].push_back(std::move(r));
  };

  // The rule follows the precision the implementation computes and stores in
  // (DESIGN §3): bf16 inputs with f32 arithmetic and output are held to the
  // f32 rule on the rounded inputs; the reference is held to its own dtype's.
  const DType precision = c.dtype == DType::f64 ? DType::f64 : impl.precision.value_or(c.dtype);
  for (int s = 0; s < std::max(1, o_.check_seeds); ++s) {
    Oracle& o = oracle(c, s);
    const TensorMap& base = naive(c, o, precision);
    if (const std::string bad = nonfinite_inputs(o.inputs); !bad.empty()) {
      CheckResult r;
      r.passed = false;
      r.max_abs = r.max_rel = r.rms_rel = INFINITY;
      r.detail = "non-finite inputs: " + bad;
      add("inputs", r);
    }
    std::map<std::string, uint64_t> hashes;
    for (const auto& [name, t] : o.inputs) hashes[name] = t.hash();

    Workspace ws;
    TensorMap out = allocate_outputs(v, c.params, c.dtype, c.pass, o.inputs);
    for (auto& [name, t] : out) t.fill_nan();
    {
      const ImplArgs args{c.params, c.dtype, o.inputs, out, ws, c.pass};
      auto inst = impl.make(args);
      inst->run();
      inst->finish();
    }
    for (const auto& [name, t] : o.inputs)
      if (t.hash() != hashes[name])
        throw std::runtime_error("implementation modified its input '" + name + "'");

    // Forward outputs are "equivalence[/name]" (one name when a fwd pass has a
    // single output), gradients "gradient/d<input>".
    // A gradient's floor is taken at the largest gradient of the case (check.hpp).
    const bool single = c.pass == Pass::fwd && out.size() == 1;
    double grad_magnitude = 0;
    for (const auto& x : v.differentiable())
      if (runs_backward(c.pass)) grad_magnitude = std::max(grad_magnitude, max_abs(o.oracle.at(grad_name(x))));
    for (const auto& [name, t] : out) {
      if (!checked_in(v, name, c.pass)) continue;
      const Tensor& want = require(o.oracle, name, "reference outputs");
      const bool grad = is_gradient(v, name);
      add(single ? "equivalence" : (grad ? "gradient/" : "equivalence/") + name,
          check_equivalence(t, want, require(base, name, "reference outputs"), precision, o_.floor_ulps,
                            grad ? grad_magnitude : 0.0));
    }

    if (s > 0 || c.pass != Pass::fwd) continue;  // properties draw their own transforms: once per forward case
    for (const auto& prop : v.properties()) {
      const auto opts = o_.property_options.contains(prop.name) ? o_.property_options.at(prop.name)
                                                                 : nlohmann::json::object();
      if (opts.is_boolean() && !opts.get<bool>()) continue;
      RunOn run_on = [&](const TensorMap& inputs) {
        Workspace pws;
        TensorMap pout = allocate_outputs(v, c.params, c.dtype, Pass::fwd, inputs);
        for (auto& [name, t] : pout) t.fill_nan();
        const ImplArgs args{c.params, c.dtype, inputs, pout, pws};
        auto inst = impl.make(args);
        inst->run();
        inst->finish();
        return pout;
      };
      Rng rng(check_seed(o_.seed, 0), case_key(v, c.params), prop.name);
      for (auto& [name, r] : prop.check(c.params, c.dtype, o.inputs, run_on, rng, opts)) add(name, r);
    }
  }

  nlohmann::json checks = nlohmann::json::object();
  for (const auto& name : order) checks[name] = to_json(worst_of(by_name[name]));
  return checks;
}

nlohmann::json CaseRunner::bench(const CaseSpec& c, const Impl& impl) {
  const Variant& v = *c.variant;
  const std::string key = case_key(v, c.params);
  // Bench-only inputs need no f64 master copy.
  TensorMap generated = v.make_inputs_as(c.params, check_seed(o_.seed, 0), key, DType::f32);
  if (runs_backward(c.pass)) add_cotangents(v, c.params, check_seed(o_.seed, 0), key, DType::f32, generated);
  TensorMap inputs = v.cast_inputs(c.params, std::move(generated), c.dtype);
  TensorMap out = allocate_outputs(v, c.params, c.dtype, c.pass, inputs);
  Workspace ws;
  const auto t0 = Clock::now();
  const ImplArgs args{c.params, c.dtype, inputs, out, ws, c.pass};
  auto inst = impl.make(args);
  const double setup_s = seconds_since(t0);
  ws.reset_peak();

  const std::string name = fmt::format("{}/{}/{}/{}", key, impl.name, dtype_name(c.dtype), pass_name(c.pass));
  Timing t = time_instance(name, *inst, o_.bench_settings);

  const double flops = v.pass_flops(c.params, c.pass);
  const double gflops = flops / t.median_s / 1e9;
  nlohmann::json b = {{"median_s", t.median_s}, {"min_s", t.min_s}, {"mean_s", t.mean_s}, {"cv", t.cv},
                      {"repetitions", t.repetitions}, {"iterations", t.iterations}, {"samples_s", t.samples_s},
                      {"setup_s", setup_s}, {"flops", flops}, {"gflops", gflops},
                      {"pct_peak", nullptr}, {"peak_bytes", ws.peak_bytes()},
                      {"heap_peak_bytes", t.heap_peak_bytes}, {"allocs", t.allocs_per_call}};
  if (t.rss_peak_bytes >= 0) b["rss_peak_bytes"] = t.rss_peak_bytes;
  if (impl.device == Device::cuda) b["device_bytes"] = inst->device_bytes();
  const nlohmann::json info = inst->info();  // items() of a temporary would dangle
  for (const auto& [k, x] : info.items()) b[k] = x;
  // The CPU path the record ran on: the kernel's own word (bf16 kernels), else
  // the path the f32 kernels take now; pct_peak against that path's peak.
  if (impl.device == Device::cpu && !b.contains("kernel_path")) b["kernel_path"] = cpu::f32_kernel_path();
  const double peak = impl.device == Device::cpu ? o_.peak_for(b["kernel_path"].get<std::string>()) : 0.0;
  if (peak > 0) {
    b["pct_peak"] = 100.0 * gflops / peak;
    // Faster than the machine can multiply: skipped work, a wrong FLOP count or a stale peak.
    if (gflops > 1.02 * peak)
      b["suspect"] = fmt::format("{:.0f} GFLOP/s exceeds the measured peak {:.0f} of path {}", gflops, peak,
                                 b["kernel_path"].get<std::string>());
  }
  return b;
}

nlohmann::json CaseRunner::run(const CaseSpec& c) {
  const Variant& v = *c.variant;
  nlohmann::json rec = {{"variant", v.name()}, {"impl", c.impl},   {"dtype", dtype_name(c.dtype)},
                        {"pass", pass_name(c.pass)}, {"shape", c.params}, {"status", "ok"}, {"reason", ""}};
  rec["info"] = v.case_info(c.params);
  auto skip = [&](const std::string& why) {
    rec["status"] = "skipped";
    rec["reason"] = why;
    return rec;
  };

  const auto impl = v.find_impl(c.impl);
  if (!impl) throw InputError("variant '" + v.name() + "' has no implementation '" + c.impl + "'");
  if (std::find(impl->dtypes.begin(), impl->dtypes.end(), c.dtype) == impl->dtypes.end())
    return skip(fmt::format("{} does not support {}", c.impl, dtype_name(c.dtype)));
  if (runs_backward(c.pass) && !v.has_backward())
    return skip(fmt::format("variant '{}' has no backward (forward only)", v.name()));
  if (std::find(impl->passes.begin(), impl->passes.end(), c.pass) == impl->passes.end())
    return skip(fmt::format("{} has no {} pass", c.impl, pass_name(c.pass)));
  if (impl->unsupported)
    if (std::string why = impl->unsupported(c.params); !why.empty()) return skip(why);
  if (impl->device == Device::cuda && !cuda_usable()) return skip(cuda_unusable_reason());

  bool do_check = o_.check;
  std::string check_note;
  // The oracle's backward costs what the pass adds to the forward, in proportion.
  const double oracle_flops = v.oracle_flops(c.params) * v.pass_flops(c.params, c.pass) / v.flops(c.params);
  if (do_check && o_.max_oracle_gflop > 0 && oracle_flops > o_.max_oracle_gflop * 1e9) {
    do_check = false;
    check_note = fmt::format("checks skipped: the oracle costs {:.1f} GFLOP, above the suite's max_oracle_gflop {}",
                             oracle_flops / 1e9, o_.max_oracle_gflop);
  }
  const double need = v.pass_memory_bytes(c.params, c.impl, c.dtype, c.pass);
  const double avail = double(available_memory_bytes());
  rec["info"]["memory_model_bytes"] = need;
  if (need > 0.9 * avail)
    return skip(fmt::format("memory model needs {}, {} available", gib(need), gib(avail)));
  if (do_check) {
    // The oracle runs the reference in f64 next to the implementation.
    const double oracle_need = need + v.pass_memory_bytes(c.params, "reference", DType::f64, c.pass);
    if (oracle_need > 0.9 * avail) {
      do_check = false;
      check_note = fmt::format("checks skipped: the f64 oracle needs {}, {} available", gib(oracle_need), gib(avail));
    }
  }
  if (!check_note.empty()) rec["info"]["checks_skipped"] = check_note;
  // A case that is neither checked nor timed ran nothing: it is not an "ok".
  if (!do_check && !o_.bench)
    return skip(check_note.empty() ? "checks and benchmark both disabled: nothing ran" : check_note + "; the benchmark is off");

  try {
    // --max-memory, enforced: an allocation past it throws MemoryLimitExceeded (the case fails).
    const MemoryLimitScope limit(memory_limit());
    if (do_check) {
      rec["checks"] = check(c, *impl);
      for (const auto& [name, r] : rec["checks"].items()) {
        if (!r["passed"].get<bool>()) {
          rec["status"] = "failed";
          rec["reason"] = fmt::format("check {} failed: max_abs {} > bound {:.3g}{}", name, r["max_abs"].dump(),
                                      r["bound"].get<double>(), r.contains("detail") ? "; " + r["detail"].get<std::string>() : "");
          break;
        }
      }
    }
    if (o_.bench && rec["status"] == "ok") rec["bench"] = bench(c, *impl);
  } catch (const InputError&) {
    throw;
  } catch (const MemoryLimitExceeded& e) {
    rec["status"] = "failed";
    rec["reason"] = e.what();
  } catch (const std::exception& e) {
    rec["status"] = "failed";
    rec["reason"] = std::string("implementation error: ") + e.what();
  }
  return rec;
}

nlohmann::json run_case(const CaseSpec& c, const RunOptions& o) { return CaseRunner(o).run(c); }

}  // namespace attnbench
