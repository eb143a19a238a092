// attnbench run SUITE.json: check and time every case of a suite.
#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <sstream>

#include <fmt/format.h>

#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/results.hpp"
#include "harness/roofline.hpp"
#include "harness/suite.hpp"

namespace attnbench::cli {

namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void on_sigint(int) {
  if (g_interrupted.exchange(true)) std::_Exit(130);  // second Ctrl-C: leave now (JSONL is complete)
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string shape_label(const Params& p) {
  std::string s;
  for (const auto& [k, v] : p.items()) {
    if (v.is_boolean() && !v.get<bool>()) continue;  // keep rows short: only flags that are on
    s += (s.empty() ? "" : ",") + k;
    if (!v.is_boolean()) s += "=" + (v.is_string() ? v.get<std::string>() : v.dump());
  }
  return s;
}

std::string duration(double s) {
  if (s < 60) return fmt::format("{:.0f}s", s);
  if (s < 3600) return fmt::format("{:.0f}m{:02.0f}s", std::floor(s / 60), std::fmod(s, 60));
  return fmt::format("{:.0f}h{:02.0f}m", std::floor(s / 3600), std::fmod(s / 60, 60));
}

std::string time_str(double s) {
  if (s < 1e-3) return fmt::format("{:.1f}us", s * 1e6);
  if (s < 1) return fmt::format("{:.2f}ms", s * 1e3);
  return fmt::format("{:.2f}s", s);
}

/// One table row: what a person scanning the run wants to see.
std::string row(const nlohmann::json& r) {
  std::string check = "-";
  if (r.contains("checks") && !r["checks"].empty()) {
    double worst = 0;
    bool passed = true;
    for (const auto& [name, c] : r["checks"].items()) {
      passed = passed && c["passed"].get<bool>();
      if (c["max_rel"].is_number()) worst = std::max(worst, c["max_rel"].get<double>());
    }
    check = fmt::format("{} {:.1e}", passed ? "pass" : "FAIL", worst);
  }
  std::string bench = "";
  if (r.contains("bench")) {
    const auto& b = r["bench"];
    bench = fmt::format("{:>9} {:>8.1f} GF/s", time_str(b["median_s"].get<double>()), b["gflops"].get<double>());
    if (b["pct_peak"].is_number()) bench += fmt::format(" {:>5.1f}%pk", b["pct_peak"].get<double>());
    if (b.contains("suspect")) bench += "  SUSPECT: " + b["suspect"].get<std::string>();
  }
  std::string status = r["status"].get<std::string>();
  std::string line = fmt::format("{:<8} {:<10} {:<5} {:<7} {:<14} {}", status, r["impl"].get<std::string>(),
                                 r["dtype"].get<std::string>(), r["pass"].get<std::string>(), check, bench);
  if (status != "ok") line += "  " + r["reason"].get<std::string>();
  return line;
}

struct RunArgs {
  std::string suite, impls, dtypes, passes, filter, out, shard;
  bool quick = false, no_bench = false, no_check = false;
  int threads = 0;
  int64_t seed = -1;
};

int run(const RunArgs& a) {
  int shard_k = 1, shard_n = 1;
  if (!a.shard.empty()) {
    if (std::sscanf(a.shard.c_str(), "%d/%d", &shard_k, &shard_n) != 2 || shard_n < 1 || shard_k < 1 || shard_k > shard_n)
      throw InputError("--shard: expected K/N with 1 <= K <= N, got '" + a.shard + "'");
  }
  Suite suite = load_suite(a.suite, a.quick);
  if (a.no_bench) suite.options.bench = false;
  if (a.no_check) suite.options.check = false;
  if (a.seed >= 0) suite.options.seed = uint64_t(a.seed);
  const int threads = a.threads > 0 ? a.threads : omp_get_max_threads();
  omp_set_num_threads(threads);

  const auto impls = split_list(a.impls);
  std::vector<DType> dtypes;
  for (const auto& d : split_list(a.dtypes)) dtypes.push_back(parse_dtype(d, "--dtype"));
  // --pass replaces every group's passes (a forward-only suite can be run as fwd_bwd).
  std::vector<Pass> passes;
  for (const auto& p : split_list(a.passes)) passes.push_back(parse_pass(p, "--pass"));
  if (!passes.empty())
    for (auto& g : suite.groups) g.passes = passes;
  const CaseFilter filter(a.filter);

  std::vector<SuiteCase> cases;
  int index = 0;
  for (auto& c : expand(suite)) {
    if (!impls.empty() && std::find(impls.begin(), impls.end(), c.spec.impl) == impls.end()) continue;
    if (!dtypes.empty() && std::find(dtypes.begin(), dtypes.end(), c.spec.dtype) == dtypes.end()) continue;
    if (!filter.matches(c.spec)) continue;
    if (index++ % shard_n != shard_k - 1) continue;
    cases.push_back(std::move(c));
  }

  std::string out = a.out;
  if (out.empty()) {
    out = "results/" + suite.name + (a.quick ? "-quick" : "");
    if (shard_n > 1) out += fmt::format(".shard-{}-of-{}", shard_k, shard_n);
    out += ".json";
  }
  if (std::filesystem::path(out).extension() != ".json") throw InputError("--out: expected a path ending in .json, got '" + out + "'");
  const std::string jsonl = std::filesystem::path(out).replace_extension(".jsonl").string();

  std::printf("attnbench run %s: %zu cases (%s), %d threads%s\n", suite.file.c_str(), cases.size(),
              suite.name.c_str(), threads, a.quick ? ", quick" : "");
  nlohmann::json doc = {{"schema", kResultsSchema},
                        {"suite", {{"name", suite.name}, {"file", suite.file}, {"quick", a.quick},
                                   {"shard", fmt::format("{}/{}", shard_k, shard_n)}, {"filter", a.filter},
                                   {"complete", false}}},
                        {"context", run_context(threads)},
                        {"records", nlohmann::json::array()}};
  suite.options.peak_gflops = doc["context"]["peak_gflops"].get<double>();
  std::printf("machine: %s, measured FMA peak %.0f GFLOP/s, triad %.1f GB/s; results -> %s\n",
              doc["context"]["cpu_model"].get<std::string>().c_str(), suite.options.peak_gflops,
              doc["context"]["mem_bandwidth_gbs"].get<double>(), out.c_str());

  JsonlWriter stream(jsonl);
  CaseRunner runner(suite.options);
  const bool tty = isatty(fileno(stderr));
  g_interrupted = false;
  auto previous = std::signal(SIGINT, on_sigint);
  const auto t0 = std::chrono::steady_clock::now();
  std::string last_shape;
  size_t done = 0;
  for (const auto& c : cases) {
    if (g_interrupted) break;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string eta = done ? duration(elapsed / double(done) * double(cases.size() - done)) : "?";
    if (tty)
      std::fprintf(stderr, "\r[%zu/%zu] elapsed %s, ETA %s: %s %s %s %s ...\033[K", done + 1, cases.size(),
                   duration(elapsed).c_str(), eta.c_str(), c.spec.variant->name().c_str(), c.spec.impl.c_str(),
                   std::string(dtype_name(c.spec.dtype)).c_str(), std::string(pass_name(c.spec.pass)).c_str());

    nlohmann::json rec;
    if (!c.skip_reason.empty()) {
      rec = {{"variant", c.spec.variant->name()}, {"impl", c.spec.impl}, {"dtype", dtype_name(c.spec.dtype)},
             {"pass", pass_name(c.spec.pass)}, {"shape", c.spec.params}, {"status", "skipped"}, {"reason", c.skip_reason},
             {"info", c.spec.variant->case_info(c.spec.params)}};
    } else {
      rec = runner.run(c.spec);
    }
    ++done;
    stream.append(rec);
    doc["records"].push_back(rec);
    if (tty) std::fprintf(stderr, "\r\033[K");
    const std::string shape = c.spec.variant->name() + " " + shape_label(c.spec.params);
    if (shape != last_shape) std::printf("%s\n", shape.c_str());
    last_shape = shape;
    std::printf("  [%zu/%zu] %s\n", done, cases.size(), row(rec).c_str());
    std::fflush(stdout);
  }
  std::signal(SIGINT, previous);

  doc["suite"]["complete"] = done == cases.size();
  doc["summary"] = summarize(doc["records"]);
  write_json_atomic(out, doc);
  const auto& s = doc["summary"];
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: %d ok, %d failed, %d skipped, %d failed checks in %s -> %s\n",
              g_interrupted ? "interrupted" : "done", s["ok"].get<int>(), s["failed"].get<int>(),
              s["skipped"].get<int>(), s["checks_failed"].get<int>(), duration(total).c_str(), out.c_str());
  if (g_interrupted) return 130;
  return s["failed"].get<int>() > 0 ? 1 : 0;
}

}  // namespace

void add_run(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<RunArgs>();
  auto* c = app.add_subcommand("run", "Check and benchmark every case of a suite; stream JSONL, write results JSON");
  c->add_option("suite", args->suite, "Suite file (suites/*.json)")->required();
  c->add_option("--impl", args->impls, "Only these implementations (comma-separated)");
  c->add_option("--dtype", args->dtypes, "Only these dtypes (comma-separated: f64,f32,bf16,f16)");
  c->add_option("--pass", args->passes,
                "Run these passes instead of the suite's (comma-separated: fwd,bwd,fwd_bwd; bwd times the backward alone)");
  c->add_option("--filter", args->filter, "Conditions, e.g. 'N<=1024,causal=true,impl!=reference,pass=fwd_bwd'");
  c->add_flag("--quick", args->quick, "Use each group's quick axes and shorter timing");
  c->add_flag("--no-bench", args->no_bench, "Checks only");
  c->add_flag("--no-check", args->no_check, "Timing only");
  c->add_option("--threads", args->threads, "OpenMP threads (default: all)")->check(CLI::PositiveNumber);
  c->add_option("--seed", args->seed, "Override the suite's seed")->check(CLI::NonNegativeNumber);
  c->add_option("--out", args->out, "Results JSON (default results/<suite>[-quick].json; JSONL beside it)");
  c->add_option("--shard", args->shard, "K/N: run every N-th case starting at the K-th (job arrays)");
  c->callback([args, &exit_code] { exit_code = run(*args); });
}

}  // namespace attnbench::cli
