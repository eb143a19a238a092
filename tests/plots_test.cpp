// plots/plot.py on the committed fixtures: every figure type the fixtures
// have data for is drawn (PDF + PNG, listed in figures.json), and malformed
// inputs stop it with one line naming the file and field (exit 2).
// Drawing needs python3 with matplotlib; without it those tests WARN and pass.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kSource = ATTNBENCH_SOURCE_DIR;
const fs::path kFixtures = kSource / "tests" / "fixtures";
const fs::path kPlot = kSource / "plots" / "plot.py";

fs::path scratch(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("attnbench_plots_test_" + std::to_string(::getpid())) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string quote(const fs::path& p) { return "'" + p.string() + "'"; }

int shell(const std::string& cmd) {
  const int rc = std::system(cmd.c_str());
  return rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string read(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// An interpreter that imports matplotlib, or "" (the test then WARNs).
std::string plotting_python() {
  for (const char* py : {"python3", "/usr/bin/python3"})
    if (shell(std::string(py) + " -c 'import matplotlib, numpy' >/dev/null 2>&1") == 0) return py;
  return "";
}

bool have_python() { return shell("python3 -c 'pass' >/dev/null 2>&1") == 0; }

struct Run {
  int rc;
  std::string err;
};

Run plot(const std::string& python, const std::string& args, const fs::path& dir) {
  const fs::path err = dir / "stderr.txt";
  const int rc = shell(python + " " + quote(kPlot) + " " + args + " >/dev/null 2>" + quote(err));
  return {rc, read(err)};
}

/// A results file like the fixtures' with one field changed by `edit`.
fs::path malformed(const fs::path& dir, const std::string& name, void (*edit)(json&)) {
  json doc = json::parse(read(kFixtures / "synthetic_pairformer.json"));
  edit(doc);
  const fs::path p = dir / name;
  std::ofstream(p) << doc.dump(1);
  return p;
}

}  // namespace

TEST_CASE("plot.py draws every figure type the fixtures have data for", "[plots]") {
  const std::string py = plotting_python();
  if (py.empty()) {
    WARN("python3 with matplotlib not found: plotting not tested (scripts/setup.sh installs it)");
    return;
  }
  const fs::path out = scratch("all");
  const Run r = plot(py, quote(kFixtures) + " --out " + quote(out / "figs"), out);
  INFO(r.err);
  REQUIRE(r.rc == 0);
  // The results stream beside run_quick.json holds the same records: skipped, with a note.
  CHECK(r.err.find("skipping " + (kFixtures / "run_quick.jsonl").string()) != std::string::npos);
  const json manifest = json::parse(read(out / "figs" / "figures.json")).at("figures");
  std::set<std::string> kinds;
  for (const auto& f : manifest) {
    kinds.insert(f.at("kind").get<std::string>());
    for (const char* ext : {"pdf", "png"}) {
      const fs::path file = out / "figs" / f.at(ext).get<std::string>();
      INFO(file);
      CHECK(fs::exists(file));
      CHECK(fs::file_size(file) > 1000);
    }
  }
  // The real run fixtures have time/throughput/memory/speedup/error/se3 and
  // (run_masked.json) sparsity data; the synthetic ones add breakdown and training.
  for (const char* k :
       {"time", "throughput", "memory", "speedup", "error", "se3", "sparsity", "breakdown", "training"}) {
    INFO("figure kind " << k);
    CHECK(kinds.count(k) == 1);
  }
}

TEST_CASE("plot.py reads the fixtures of each figure family on their own", "[plots]") {
  const std::string py = plotting_python();
  if (py.empty()) {
    WARN("python3 with matplotlib not found: plotting not tested");
    return;
  }
  for (const char* name : {"run_masked.json", "synthetic_pairformer.json", "synthetic_training.jsonl"}) {
    const fs::path out = scratch(std::string("one_") + name);
    const Run r = plot(py, quote(kFixtures / name) + " --no-title --out " + quote(out / "figs"), out);
    INFO(name << ": " << r.err);
    CHECK(r.rc == 0);
    CHECK(!json::parse(read(out / "figs" / "figures.json")).at("figures").empty());
  }
}

TEST_CASE("plot.py puts explicit-case suites on a categorical case axis", "[plots]") {
  const std::string py = plotting_python();
  if (py.empty()) {
    WARN("python3 with matplotlib not found: plotting not tested");
    return;
  }
  // A real run of suites/ci.json (checks only, odd shapes, no sweep).
  const fs::path out = scratch("cases");
  const Run r = plot(py, quote(kFixtures / "cases" / "ci_cpu.json") + " --out " + quote(out / "figs"), out);
  INFO(r.err);
  REQUIRE(r.rc == 0);
  std::set<std::string> drawn;
  const json manifest = json::parse(read(out / "figs" / "figures.json")).at("figures");
  for (const auto& f : manifest) {
    drawn.insert(f.at("kind").get<std::string>() + "_" + f.at("variant").get<std::string>());
    if (f.at("variant") == "sdpa")
      CHECK(f.at("title").get<std::string>().find("cases differ from") != std::string::npos);
  }
  CHECK(drawn == std::set<std::string>{"error_sdpa", "error_ipa", "se3_ipa"});
}

TEST_CASE("plot.py rejects malformed inputs with one line naming file and field", "[plots]") {
  if (!have_python()) {
    WARN("python3 not found: plot.py validation not tested");
    return;
  }
  const fs::path dir = scratch("bad");
  struct Case {
    fs::path file;
    std::string field;
  };
  std::vector<Case> cases = {
      {malformed(dir, "schema.json", [](json& d) { d["schema"] = "attnbench.results/0"; }), "schema"},
      {malformed(dir, "median.json", [](json& d) { d["records"][1]["bench"]["median_s"] = "fast"; }),
       "records[1].bench.median_s"},
      {malformed(dir, "status.json", [](json& d) { d["records"][0]["status"] = "done"; }), "records[0].status"},
      {malformed(dir, "shape.json", [](json& d) { d["records"][2].erase("shape"); }), "records[2].shape"},
      {malformed(dir, "samples.json", [](json& d) { d["records"][0]["bench"]["samples_s"][2] = nullptr; }),
       "records[0].bench.samples_s[2]"},
      {malformed(dir, "check.json",
                 [](json& d) {
                   d["records"][0]["checks"] = {{"equivalence", {{"max_rel", 1}}}};
                 }),
       "records[0].checks.equivalence.passed"},
      {malformed(dir, "context.json", [](json& d) { d["context"].erase("host"); }), "context.host"},
  };
  const fs::path not_json = dir / "truncated.json";
  std::ofstream(not_json) << "{\"schema\": \"attnbench.results/1\", ";
  cases.push_back({not_json, "not valid JSON"});
  const fs::path bad_log = dir / "train.jsonl";
  std::ofstream(bad_log) << R"({"variant":"standard","step":0,"wall_s":0,"loss":4.2,"split":"train"})"
                         << "\n"
                         << R"({"variant":"standard","step":"ten","wall_s":1,"loss":4.0,"split":"train"})"
                         << "\n";
  cases.push_back({bad_log, "line 2: step"});

  for (const auto& c : cases) {
    const Run r = plot("python3", quote(c.file) + " --out " + quote(dir / "never"), dir);
    INFO(c.file << ": " << r.err);
    CHECK(r.rc == 2);
    CHECK(r.err.find(c.file.string()) != std::string::npos);
    CHECK(r.err.find(c.field) != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(!fs::exists(dir / "never"));
  }
}

TEST_CASE("plot.py names a missing input", "[plots]") {
  if (!have_python()) {
    WARN("python3 not found: not tested");
    return;
  }
  const fs::path dir = scratch("missing");
  const Run r = plot("python3", quote(dir / "nope.json") + " --out " + quote(dir / "o"), dir);
  CHECK(r.rc == 2);
  CHECK(r.err.find("nope.json") != std::string::npos);
}

TEST_CASE("plot.py draws attnbench train's output: curves over seeds and the final table", "[plots][train]") {
  if (!have_python()) {
    WARN("python3 not found: not tested");
    return;
  }
  const fs::path dir = scratch("train");
  const json suite{{"kind", "train"},
                   {"name", "tiny"},
                   {"data", {{"kind", "mqar"}, {"pairs", 3}, {"keys", 8}, {"values", 8}}},
                   {"model", {{"d", 16}, {"heads", 2}, {"layers", 1}, {"window", 5}}},
                   {"attention", {"standard", "window"}},
                   {"seeds", {1, 2}},
                   {"steps", 6},
                   {"batch", 2},
                   {"context", 16},
                   {"eval_interval", 3},
                   {"eval_batches", 1},
                   {"threads", 1}};
  std::ofstream(dir / "s.json") << suite.dump();
  REQUIRE(shell(std::string(ATTNBENCH_BINARY) + " train " + quote(dir / "s.json") + " --out " + quote(dir / "out") +
                " --quiet >/dev/null 2>&1") == 0);
  // The folder (train.json, the run logs and records beside it) validates; a lone run log does not.
  CHECK(plot("python3", quote(dir / "out") + " --check --out " + quote(dir / "o"), dir).rc == 0);
  const Run lone = plot("python3", quote(dir / "out" / "window-seed2.jsonl") + " --out " + quote(dir / "o"), dir);
  CHECK(lone.rc == 2);
  CHECK(lone.err.find("an attnbench train run log") != std::string::npos);
  json bad = json::parse(read(dir / "out" / "train.json"));
  bad["table"][1]["eval_loss"]["mean"] = "low";
  std::ofstream(dir / "out" / "bad.json") << bad.dump();
  const Run b = plot("python3", quote(dir / "out" / "bad.json") + " --out " + quote(dir / "o"), dir);
  CHECK(b.rc == 2);
  CHECK(b.err.find("table[1].eval_loss.mean") != std::string::npos);
  fs::remove(dir / "out" / "bad.json");

  const std::string py = plotting_python();
  if (py.empty()) {
    WARN("no python3 with matplotlib: figures not drawn");
    return;
  }
  REQUIRE(plot(py, quote(dir / "out") + " --out " + quote(dir / "fig"), dir).rc == 0);
  const json figs = json::parse(read(dir / "fig" / "figures.json"));
  std::set<std::string> kinds;
  for (const json& f : figs["figures"]) {
    kinds.insert(f["kind"].get<std::string>());
    CHECK(fs::file_size(dir / "fig" / f["png"].get<std::string>()) > 1000);
  }
  CHECK(kinds == std::set<std::string>{"train_curves", "train_final"});
}
