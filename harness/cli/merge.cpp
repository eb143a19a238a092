// attnbench merge SHARDS... --out FILE: one results file from the outputs of
// `attnbench run --shard K/N` of one suite (docs/plots.md).
//
// Refuses shards of different suites (name, file, quick, filter), machines or
// builds (host, cpu model, git sha), different shard counts, a shard given
// twice and a case (variant, impl, dtype, shape) present twice.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <tuple>
#include <vector>

#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/results.hpp"

namespace attnbench::cli {

namespace {

using nlohmann::json;

struct MergeArgs {
  std::vector<std::string> inputs;
  std::string out;
};

struct Shard {
  std::string path;
  json doc;
  int k = 1, n = 1;
};

/// "K/N" from suite.shard; a file without one is the whole suite (1/1).
std::pair<int, int> parse_shard(const Shard& s) {
  const json& suite = s.doc["suite"];
  if (!suite.contains("shard")) return {1, 1};
  if (!suite["shard"].is_string()) throw InputError(s.path + ": suite.shard: expected a string \"K/N\"");
  const auto text = suite["shard"].get<std::string>();
  int k = 0, n = 0;
  char tail = 0;
  if (std::sscanf(text.c_str(), "%d/%d%c", &k, &n, &tail) != 2 || n < 1 || k < 1 || k > n)
    throw InputError(fmt::format("{}: suite.shard: expected \"K/N\" with 1 <= K <= N, got \"{}\"", s.path, text));
  return {k, n};
}

json field_or_null(const json& obj, const char* key) { return obj.contains(key) ? obj[key] : json(nullptr); }

void require_same(const Shard& first, const Shard& s, const char* section, const char* key) {
  const json a = field_or_null(first.doc[section], key), b = field_or_null(s.doc[section], key);
  if (a != b)
    throw InputError(fmt::format("{}: {}.{}: {} differs from {} in {}; only shards of one run can be merged", s.path,
                                 section, key, b.dump(), a.dump(), first.path));
}

json merge(const MergeArgs& a) {
  std::vector<Shard> shards;
  for (const auto& path : a.inputs) {
    Shard s{path, load_results(path)};
    std::tie(s.k, s.n) = parse_shard(s);
    shards.push_back(std::move(s));
  }
  const Shard& first = shards.front();
  for (const Shard& s : shards) {
    for (const char* k : {"name", "file", "quick", "filter", "seed"}) require_same(first, s, "suite", k);
    for (const char* k : {"host", "cpu_model", "git_sha"}) require_same(first, s, "context", k);
    if (s.n != first.n)
      throw InputError(
          fmt::format("{}: suite.shard: {} of {} shards, but {} has {} shards", s.path, s.k, s.n, first.path, first.n));
  }
  std::stable_sort(shards.begin(), shards.end(), [](const Shard& x, const Shard& y) { return x.k < y.k; });
  std::map<int, std::string> seen_shards;
  std::map<std::string, std::string> seen_cases;
  json records = json::array();
  bool complete = true;
  for (const Shard& s : shards) {
    if (auto [it, fresh] = seen_shards.emplace(s.k, s.path); !fresh)
      throw InputError(fmt::format("{}: suite.shard: shard {}/{} is also {}", s.path, s.k, s.n, it->second));
    complete = complete && s.doc["suite"].value("complete", true);
    const json& recs = s.doc["records"];
    for (size_t i = 0; i < recs.size(); ++i) {
      const auto key = record_key(recs[i]);
      if (auto [it, fresh] = seen_cases.emplace(key, s.path); !fresh)
        throw InputError(fmt::format("{}: records[{}]: case {} is also in {}", s.path, i, key, it->second));
      records.push_back(recs[i]);
    }
  }
  const int n = first.n;
  std::string present;
  for (const auto& [k, path] : seen_shards) present += (present.empty() ? "" : ",") + std::to_string(k);
  const bool all_shards = int(seen_shards.size()) == n;

  json doc = first.doc;
  doc["suite"]["shard"] = all_shards ? std::string("1/1") : fmt::format("{}/{}", present, n);
  doc["suite"]["complete"] = complete && all_shards;
  doc["records"] = std::move(records);
  doc["summary"] = summarize(doc["records"]);
  if (!all_shards)
    std::fprintf(stderr, "attnbench merge: warning: only shards %s of %d; the result is marked incomplete\n",
                 present.c_str(), n);
  return doc;
}

}  // namespace

void add_merge(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<MergeArgs>();
  auto* c = app.add_subcommand("merge", "Combine the results of `run --shard K/N` of one suite into one file");
  c->add_option("shards", args->inputs, "Results JSON files, one per shard")->required();
  c->add_option("--out", args->out, "Merged results JSON (written atomically)")->required();
  c->callback([args, &exit_code] {
    const json doc = merge(*args);
    write_json_atomic(args->out, doc);
    const auto& s = doc["summary"];
    fmt::print("merged {} files, {} records ({} ok, {} failed, {} skipped) -> {}\n", args->inputs.size(),
               doc["records"].size(), s["ok"].get<int>(), s["failed"].get<int>(), s["skipped"].get<int>(), args->out);
    exit_code = 0;
  });
}

}  // namespace attnbench::cli
