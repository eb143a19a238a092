// attnbench run SUITE.json: check and time every case of a suite.
#include <omp.h>
#include <unistd.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/results.hpp"
#include "harness/roofline.hpp"
#include "harness/system.hpp"
#include "harness/suite.hpp"

namespace attnbench::cli {

namespace {

std::atomic<bool> g_interrupted{false};

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
  std::string suite, impls, dtypes, passes, filter, out, shard, resume, cpu_path;
  bool quick = false, no_bench = false, no_check = false;
  int threads = 0;
  int64_t seed = -1;
  double timeout_per_case = 0;  // seconds; 0: none
  int64_t max_memory = 0;       // bytes; 0: what the machine has
};

/// The results of a run in progress: what a signal or a timeout must save. The
/// main thread appends under the mutex; the watcher writes under it.
struct Progress {
  std::mutex m;
  nlohmann::json doc;
  std::string out;
  JsonlWriter* stream = nullptr;
  const SuiteCase* current = nullptr;  // the case running now
  std::chrono::steady_clock::time_point started;
};

void save(Progress& p) {
  p.doc["summary"] = summarize(p.doc["records"]);
  write_json_atomic(p.out, p.doc);
}

nlohmann::json failed_record(const SuiteCase& c, const std::string& why) {
  nlohmann::json info = nlohmann::json::object();
  try {
    info = c.spec.variant->case_info(c.spec.params);
  } catch (const std::exception&) {  // the case's own problem may be why it failed
  }
  return {{"variant", c.spec.variant->name()}, {"impl", c.spec.impl}, {"dtype", dtype_name(c.spec.dtype)},
          {"pass", pass_name(c.spec.pass)}, {"shape", c.spec.params}, {"status", "failed"}, {"reason", why},
          {"info", info}};
}

/// Runs this program again with `--resume OUT` added: the way to abandon a case
/// that ran past --timeout-per-case (a kernel cannot be cancelled from outside).
[[noreturn]] void resume_in_new_process(const std::string& out) {
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> args;
  for (std::string a; std::getline(f, a, '\0');) args.push_back(a);
  if (std::none_of(args.begin(), args.end(), [](const std::string& a) { return a.rfind("--resume", 0) == 0; }))
    args.insert(args.end(), {"--resume", out});
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(nullptr);
  ::execv("/proc/self/exe", argv.data());
  std::fprintf(stderr, "attnbench: error: cannot restart after a timeout (%s)\n", std::strerror(errno));
  std::_Exit(3);
}

/// Waits for SIGINT/SIGTERM (blocked in every other thread) and watches the
/// running case's clock. First signal: stop after the current case. Second:
/// save every finished record and leave now. Timeout: record the case as
/// failed, save, and continue in a fresh process.
class Watcher {
 public:
  Watcher(Progress& p, double timeout_s) : p_(p), timeout_s_(timeout_s) {
    thread_ = std::thread([this] { loop(); });
  }
  ~Watcher() {
    stop_ = true;
    pthread_kill(thread_.native_handle(), SIGUSR1);
    thread_.join();
  }

 private:
  void loop() {
    sigset_t set;
    sigemptyset(&set);
    for (int sig : {SIGINT, SIGTERM, SIGUSR1}) sigaddset(&set, sig);
    while (!stop_) {
      const timespec tick{0, 200'000'000};
      const int sig = sigtimedwait(&set, nullptr, &tick);
      if (stop_) return;
      if (sig == SIGINT || sig == SIGTERM) {
        if (!g_interrupted.exchange(true)) {
          std::fprintf(stderr, "\nattnbench: %s: stopping after the current case (again to stop now, keeping the "
                               "finished cases)\n", sig == SIGINT ? "interrupted" : "terminated");
          continue;
        }
        std::lock_guard lock(p_.m);
        p_.doc["suite"]["complete"] = false;
        try {
          save(p_);
          std::fprintf(stderr, "attnbench: stopped; %zu finished cases kept in %s\n", p_.doc["records"].size(),
                       p_.out.c_str());
        } catch (const std::exception& e) {
          std::fprintf(stderr, "attnbench: error: %s (the JSONL keeps the finished cases)\n", e.what());
        }
        std::_Exit(130);
      }
      if (timeout_s_ > 0) {
        std::lock_guard lock(p_.m);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - p_.started).count();
        if (p_.current && s > timeout_s_) {
          const auto rec = failed_record(*p_.current, fmt::format("timed out after {:.0f} s (--timeout-per-case)", s));
          try {
            p_.stream->append(rec);
            p_.doc["records"].push_back(rec);
            p_.doc["suite"]["complete"] = false;
            save(p_);
          } catch (const std::exception& e) {
            std::fprintf(stderr, "attnbench: error: %s\n", e.what());
            std::_Exit(2);
          }
          std::fprintf(stderr, "\nattnbench: case timed out after %.0f s; continuing in a new process\n", s);
          resume_in_new_process(p_.out);
        }
      }
    }
  }

  Progress& p_;
  double timeout_s_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

/// Blocks SIGINT/SIGTERM/SIGUSR1 in this thread and every thread it starts
/// (OpenMP's pool included) so that only the Watcher receives them.
class BlockSignals {
 public:
  BlockSignals() {
    sigset_t set;
    sigemptyset(&set);
    for (int sig : {SIGINT, SIGTERM, SIGUSR1}) sigaddset(&set, sig);
    pthread_sigmask(SIG_BLOCK, &set, &old_);
  }
  ~BlockSignals() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

int run(const RunArgs& a) {
  // Before any thread exists: the OpenMP threads inherit the mask.
  const BlockSignals blocked;
  int shard_k = 1, shard_n = 1;
  if (!a.shard.empty()) {
    char tail = 0;
    if (std::sscanf(a.shard.c_str(), "%d/%d%c", &shard_k, &shard_n, &tail) != 2 || shard_n < 1 || shard_k < 1 ||
        shard_k > shard_n)
      throw InputError("--shard: expected K/N with 1 <= K <= N, got '" + a.shard + "'");
  }
  if (a.timeout_per_case < 0) throw InputError("--timeout-per-case: expected seconds > 0");
  Suite suite = load_suite(a.suite, a.quick);
  if (a.no_bench) suite.options.bench = false;
  if (a.no_check) suite.options.check = false;
  if (a.seed >= 0) suite.options.seed = uint64_t(a.seed);
  const int threads = resolve_threads(a.threads, "--threads");
  apply_cpu_path(a.cpu_path);
  set_memory_limit(a.max_memory);
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
  filter.check_keys(suite);
  // --impl names must exist in some group's variant: a typo would select nothing.
  std::vector<std::string> known_impls;
  for (const auto& g : suite.groups)
    for (const auto& impl : g.variant->impls())
      if (std::find(known_impls.begin(), known_impls.end(), impl.name) == known_impls.end())
        known_impls.push_back(impl.name);
  for (const auto& name : impls)
    if (std::find(known_impls.begin(), known_impls.end(), name) == known_impls.end())
      throw InputError("--impl: no variant in " + suite.file + " has an implementation '" + name + "'" +
                       did_you_mean(name, known_impls));

  std::vector<SuiteCase> cases;
  int index = 0;
  for (auto& c : expand(suite)) {
    if (!impls.empty() && std::find(impls.begin(), impls.end(), c.spec.impl) == impls.end()) continue;
    if (!dtypes.empty() && std::find(dtypes.begin(), dtypes.end(), c.spec.dtype) == dtypes.end()) continue;
    if (!filter.matches(c.spec)) continue;
    if (index++ % shard_n != shard_k - 1) continue;
    cases.push_back(std::move(c));
  }

  if (cases.empty()) {
    // Nothing selected is nothing checked: not a pass.
    std::printf("attnbench run %s: no case selected (suite, --impl, --dtype, --filter and --shard leave none): "
                "nothing was checked\n", suite.file.c_str());
    return 1;
  }

  std::string out = a.out;
  if (!a.resume.empty()) {
    const std::string resume_json = std::filesystem::path(a.resume).replace_extension(".json").string();
    if (!out.empty() && out != resume_json)
      throw InputError("--resume: continues " + resume_json + ", but --out is " + out);
    out = resume_json;
  }
  if (out.empty()) {
    out = "results/" + suite.name + (a.quick ? "-quick" : "");
    if (shard_n > 1) out += fmt::format(".shard-{}-of-{}", shard_k, shard_n);
    out += ".json";
  }
  if (std::filesystem::path(out).extension() != ".json") throw InputError("--out: expected a path ending in .json, got '" + out + "'");
  const std::string jsonl = std::filesystem::path(out).replace_extension(".jsonl").string();
  // Every output problem is reported before the first case runs.
  check_output_path(out, "--out");

  // Locked before it is read or changed: a second run to this --out stops here.
  JsonlWriter stream(jsonl);
  // --resume: the finished records of the stream are kept and their cases not run again.
  JsonlRecords earlier;
  if (!a.resume.empty()) {
    earlier = read_jsonl(jsonl);
    if (earlier.dropped_partial_line)
      std::fprintf(stderr, "attnbench: note: %s: dropping a last line cut short (the run was killed mid-write)\n",
                   jsonl.c_str());
  } else if (std::error_code ec; std::filesystem::file_size(jsonl, ec) > 0 && !ec) {
    // A rerun starts a new stream; an earlier one that no complete results
    // JSON holds (a killed run) is moved aside rather than lost.
    bool held = false;
    try {
      held = load_results(out)["suite"].value("complete", false);
    } catch (const InputError&) {
    }
    if (!held) {
      std::filesystem::copy_file(jsonl, jsonl + ".prev", std::filesystem::copy_options::overwrite_existing, ec);
      if (ec) throw InputError(jsonl + ": cannot keep the earlier stream as " + jsonl + ".prev (" + ec.message() + ")");
      std::fprintf(stderr, "attnbench: note: %s held an unfinished run; kept as %s.prev\n", jsonl.c_str(),
                   jsonl.c_str());
    }
  }
  stream.start(earlier.kept_bytes);
  std::set<std::string> recorded;
  for (const auto& r : earlier.records) recorded.insert(record_key(r));

  std::printf("attnbench run %s: %zu cases (%s), %d threads%s\n", suite.file.c_str(), cases.size(),
              suite.name.c_str(), threads, a.quick ? ", quick" : "");
  if (!earlier.records.empty())
    std::printf("resuming %s: %zu records kept, their cases are not run again\n", jsonl.c_str(), earlier.records.size());
  Progress progress;
  progress.out = out;
  progress.stream = &stream;
  progress.doc = {{"schema", kResultsSchema},
                  {"suite", {{"name", suite.name}, {"file", suite.file}, {"quick", a.quick},
                             {"shard", fmt::format("{}/{}", shard_k, shard_n)}, {"filter", a.filter},
                             {"seed", suite.options.seed}, {"complete", false}}},
                  {"context", run_context(threads)},
                  {"records", nlohmann::json::array()}};
  nlohmann::json& doc = progress.doc;
  for (auto& r : earlier.records) doc["records"].push_back(std::move(r));
  suite.options.peak_gflops = doc["context"]["peak_gflops"].get<double>();
  suite.options.bf16_dot_gflops = doc["context"]["bf16_dot_gflops"].get<double>();
  suite.options.amx_bf16_gflops = doc["context"]["amx_bf16_gflops"].get<double>();
  bool remeasured = false;  // at most once per run
  std::printf("machine: %s, measured FMA peak %.0f GFLOP/s, triad %.1f GB/s; results -> %s\n",
              doc["context"]["cpu_model"].get<std::string>().c_str(), suite.options.peak_gflops,
              doc["context"]["mem_bandwidth_gbs"].get<double>(), out.c_str());

  CaseRunner runner(suite.options);
  const bool tty = isatty(fileno(stderr));
  g_interrupted = false;
  const auto t0 = std::chrono::steady_clock::now();
  std::string last_shape;
  size_t done = 0;
  {
    Watcher watcher(progress, a.timeout_per_case);
    for (const auto& c : cases) {
      if (g_interrupted) break;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const std::string eta = done ? duration(elapsed / double(done) * double(cases.size() - done)) : "?";
      if (tty)
        std::fprintf(stderr, "\r[%zu/%zu] elapsed %s, ETA %s: %s %s %s %s ...\033[K", done + 1, cases.size(),
                     duration(elapsed).c_str(), eta.c_str(), c.spec.variant->name().c_str(), c.spec.impl.c_str(),
                     std::string(dtype_name(c.spec.dtype)).c_str(), std::string(pass_name(c.spec.pass)).c_str());

      nlohmann::json rec;
      const nlohmann::json key_rec = {{"variant", c.spec.variant->name()}, {"impl", c.spec.impl},
                                      {"dtype", dtype_name(c.spec.dtype)}, {"pass", pass_name(c.spec.pass)},
                                      {"shape", c.spec.params}};
      if (recorded.count(record_key(key_rec))) {
        ++done;
        continue;
      }
      if (!c.skip_reason.empty()) {
        rec = {{"variant", c.spec.variant->name()}, {"impl", c.spec.impl}, {"dtype", dtype_name(c.spec.dtype)},
               {"pass", pass_name(c.spec.pass)}, {"shape", c.spec.params}, {"status", "skipped"},
               {"reason", c.skip_reason}, {"info", c.spec.variant->case_info(c.spec.params)}};
      } else {
        {
          std::lock_guard lock(progress.m);
          progress.current = &c;
          progress.started = std::chrono::steady_clock::now();
        }
        try {
          rec = runner.run(c.spec);
        } catch (const std::exception& e) {
          // One case that cannot run (bad shape, out of memory) is a failed
          // record with its message; the run goes on.
          rec = failed_record(c, e.what());
        }
        // A record faster than its path's cached peak: the peak was measured on a
        // busy machine (or the path's is missing). Re-measure once, warn, and put
        // this record and the rest against the new peak.
        if (!remeasured && rec.contains("bench") && rec["bench"].contains("kernel_path") &&
            rec["bench"]["pct_peak"].is_number() && rec["bench"]["pct_peak"].get<double>() > 102.0) {
          remeasured = true;
          const std::string path = rec["bench"]["kernel_path"].get<std::string>();
          const double achieved = rec["bench"]["gflops"].get<double>();
          const Roofline r = remeasure_after(threads, path, achieved);
          suite.options.peak_gflops = r.peak_gflops;
          suite.options.bf16_dot_gflops = r.bf16_dot_gflops;
          suite.options.amx_bf16_gflops = r.amx_bf16_gflops;
          runner.set_peaks(r.peak_gflops, r.bf16_dot_gflops, r.amx_bf16_gflops);
          std::lock_guard lock(progress.m);
          auto& ctx = doc["context"];
          ctx["peak_gflops"] = r.peak_gflops, ctx["bf16_dot_gflops"] = r.bf16_dot_gflops;
          ctx["amx_bf16_gflops"] = r.amx_bf16_gflops, ctx["mem_bandwidth_gbs"] = r.bandwidth_gbs;
          ctx["roofline_load_average"] = r.load_average, ctx["roofline_measured_at"] = r.measured_at;
          for (const auto& w : r.warnings) ctx["roofline_warnings"].push_back(w);
          const double peak = suite.options.peak_for(path);
          rec["bench"]["pct_peak"] = 100.0 * achieved / peak;
          if (achieved <= 1.02 * peak) rec["bench"].erase("suspect");
          for (auto& earlier_rec : doc["records"])  // the records so far, against the new peaks
            if (earlier_rec.contains("bench") && earlier_rec["bench"].contains("kernel_path") &&
                earlier_rec["bench"]["pct_peak"].is_number())
              earlier_rec["bench"]["pct_peak"] = 100.0 * earlier_rec["bench"]["gflops"].get<double>() /
                                                 suite.options.peak_for(earlier_rec["bench"]["kernel_path"]);
        }
      }
      ++done;
      {
        std::lock_guard lock(progress.m);
        progress.current = nullptr;
        stream.append(rec);
        doc["records"].push_back(rec);
      }
      if (tty) std::fprintf(stderr, "\r\033[K");
      const std::string shape = c.spec.variant->name() + " " + shape_label(c.spec.params);
      if (shape != last_shape) std::printf("%s\n", shape.c_str());
      last_shape = shape;
      std::printf("  [%zu/%zu] %s\n", done, cases.size(), row(rec).c_str());
      std::fflush(stdout);
    }
  }

  std::lock_guard lock(progress.m);
  doc["suite"]["complete"] = done == cases.size();
  save(progress);
  const auto& s = doc["summary"];
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: %d ok, %d failed, %d skipped, %d failed checks in %s -> %s\n",
              g_interrupted ? "interrupted" : "done", s["ok"].get<int>(), s["failed"].get<int>(),
              s["skipped"].get<int>(), s["checks_failed"].get<int>(), duration(total).c_str(), out.c_str());
  if (g_interrupted) return 130;
  if (s["failed"].get<int>() > 0) return 1;
  if (s["ok"].get<int>() == 0) {
    std::printf("not a pass: every selected case was skipped, nothing was checked\n");
    return 1;
  }
  return 0;
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
  c->add_option("--resume", args->resume,
                "Continue the run whose results are PATH (.json or .jsonl): keep its finished records, run the rest");
  c->add_option("--timeout-per-case", args->timeout_per_case,
                "Seconds a case may take; one that runs longer is recorded as failed and the run goes on")
      ->check(CLI::Range(1.0, 1e6));
  c->add_option("--max-memory", args->max_memory,
                "Most memory a case may use (e.g. 4GB): cases whose memory model needs more are skipped, "
                "an allocation past it fails the case")
      ->transform(CLI::AsSizeValue(false))
      ->check(CLI::PositiveNumber);
  c->add_option("--cpu-path", args->cpu_path,
                "Limit CPU kernels to this path and below (amx-bf16, avx512bf16, avx512-f32, AVX2, ...; "
                "default: $ATTNBENCH_CPU_PATH, else the best the machine has)");
  c->callback([args, &exit_code] { exit_code = run(*args); });
}

}  // namespace attnbench::cli
