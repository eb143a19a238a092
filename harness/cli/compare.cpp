// attnbench compare BASE.json NEW.json: noise-aware per-case verdicts.
//
// Each case's repetition samples are compared with an exact two-sided
// Mann–Whitney U test (normal approximation above 400 sample pairs). A case is
// SLOWER/FASTER when the test rejects at 5% and the median ratio is beyond the
// threshold, AMBIGUOUS when the ratio is beyond it but the test does not
// reject, SAME otherwise. Exit 1 only for confirmed SLOWER or pass → fail.
#include <cmath>
#include <map>

#include <fmt/format.h>

#include "harness/bench.hpp"
#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/results.hpp"

namespace attnbench::cli {

namespace {

using nlohmann::json;

bool all_passed(const json& r) {
  if (!r.contains("checks")) return true;
  for (const auto& [n, c] : r["checks"].items())
    if (!c["passed"].get<bool>()) return false;
  return true;
}

struct CompareArgs {
  std::string base, next;
  double max_slowdown = 1.10;
  bool force = false;
};

int compare(const CompareArgs& a) {
  const json base = load_results(a.base), next = load_results(a.next);
  // Timings compare only on one machine, at one thread count, for one suite.
  const std::pair<const char*, const char*> comparable[] = {
      {"context", "cpu_model"}, {"context", "host"}, {"context", "threads"}, {"suite", "name"}, {"suite", "quick"}};
  for (const auto& [section, k] : comparable) {
    const json x = base[section].value(k, json()), y = next[section].value(k, json());
    if (x != y && !a.force)
      throw InputError(fmt::format("{} vs {}: {}.{} differs ({} vs {}); the timings are not comparable (use --force "
                                   "to compare anyway)",
                                   a.base, a.next, section, k, x.dump(), y.dump()));
  }
  std::map<std::string, const json*> old;
  for (const auto& r : base["records"]) old[record_key(r)] = &r;

  int slower = 0, faster = 0, same = 0, ambiguous = 0, broken = 0, missing = 0;
  fmt::print("{:<9} {:>8} {:>7}  case\n", "verdict", "ratio", "p");
  for (const auto& r : next["records"]) {
    auto it = old.find(record_key(r));
    if (it == old.end()) {
      ++missing;
      continue;
    }
    const json& o = *it->second;
    std::string verdict;
    double ratio = NAN, p = NAN;
    if (all_passed(o) && !all_passed(r)) {
      verdict = "BROKEN";
      ++broken;
    } else if (o.contains("bench") && r.contains("bench")) {
      const auto xs = r["bench"]["samples_s"].get<std::vector<double>>();
      const auto ys = o["bench"]["samples_s"].get<std::vector<double>>();
      ratio = r["bench"]["median_s"].get<double>() / o["bench"]["median_s"].get<double>();
      p = mann_whitney_p(xs, ys);
      const bool beyond = ratio > a.max_slowdown || ratio < 1.0 / a.max_slowdown;
      if (!beyond) verdict = "SAME", ++same;
      else if (p >= 0.05) verdict = "AMBIGUOUS", ++ambiguous;
      else if (ratio > 1) verdict = "SLOWER", ++slower;
      else verdict = "FASTER", ++faster;
    } else {
      continue;
    }
    if (verdict != "SAME")
      fmt::print("{:<9} {:>8.3f} {:>7.3f}  {}\n", verdict, ratio, p, record_key(r));
  }
  fmt::print("{} same, {} faster, {} slower, {} ambiguous, {} broken checks, {} cases only in {} "
             "(threshold {:.2f}x, Mann-Whitney p < 0.05)\n",
             same, faster, slower, ambiguous, broken, missing, a.next, a.max_slowdown);
  if (ambiguous) fmt::print("warning: {} ambiguous cases: more repetitions would decide them\n", ambiguous);
  return slower || broken ? 1 : 0;
}

}  // namespace

void add_compare(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<CompareArgs>();
  auto* c = app.add_subcommand("compare", "Compare two results files: per-case time ratios and check changes");
  c->add_option("base", args->base, "Baseline results JSON")->required();
  c->add_option("new", args->next, "New results JSON")->required();
  c->add_option("--max-slowdown", args->max_slowdown, "Ratio above which a confirmed slowdown fails (default 1.10)")
      ->check(CLI::Range(1.0, 100.0));
  c->add_flag("--force", args->force, "Compare results from different machines");
  c->callback([args, &exit_code] { exit_code = compare(*args); });
}

}  // namespace attnbench::cli
