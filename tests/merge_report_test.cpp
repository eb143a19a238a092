// `attnbench merge` and `attnbench report` on the committed fixtures: shards
// of one real run merge into one file; shards of different runs, a shard
// given twice and a duplicated case are refused with one line (exit 2); the
// report has its tables with or without python + matplotlib.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = fs::path(ATTNBENCH_SOURCE_DIR) / "tests" / "fixtures";
const fs::path kMain = kFixtures / "run_quick.json";
const fs::path kShard1 = kFixtures / "shards" / "run_quick.shard-1-of-2.json";
const fs::path kShard2 = kFixtures / "shards" / "run_quick.shard-2-of-2.json";

fs::path scratch(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("attnbench_merge_test_" + std::to_string(::getpid())) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string quote(const fs::path& p) { return "'" + p.string() + "'"; }

std::string read(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json read_json(const fs::path& p) { return json::parse(read(p)); }

fs::path write_json(const fs::path& p, const json& doc) {
  std::ofstream(p) << doc.dump(1);
  return p;
}

struct Run {
  int rc;
  std::string out, err;
};

Run attnbench(const std::string& args, const fs::path& dir) {
  const std::string cmd = std::string("'") + ATTNBENCH_BINARY + "' " + args + " >" + quote(dir / "stdout.txt") + " 2>" +
                          quote(dir / "stderr.txt");
  const int rc = std::system(cmd.c_str());
  return {rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, read(dir / "stdout.txt"), read(dir / "stderr.txt")};
}

std::set<std::string> case_keys(const json& doc) {
  std::set<std::string> keys;
  for (const auto& r : doc["records"])
    keys.insert(r["variant"].dump() + r["impl"].dump() + r["dtype"].dump() + r["shape"].dump());
  return keys;
}

bool one_line(const std::string& s) { return std::count(s.begin(), s.end(), '\n') == 1; }

}  // namespace

TEST_CASE("merge combines the shards of one run", "[merge]") {
  const fs::path dir = scratch("ok");
  const Run r = attnbench("merge " + quote(kShard2) + " " + quote(kShard1) + " --out " + quote(dir / "all.json"), dir);
  INFO(r.err);
  REQUIRE(r.rc == 0);
  const json a = read_json(kShard1), b = read_json(kShard2), m = read_json(dir / "all.json");
  CHECK(m["schema"] == "attnbench.results/1");
  CHECK(m["records"].size() == a["records"].size() + b["records"].size());
  CHECK(m["suite"]["shard"] == "1/1");
  CHECK(m["suite"]["complete"] == true);
  CHECK(m["suite"]["name"] == a["suite"]["name"]);
  CHECK(m["context"] == a["context"]);
  // Shard order, whatever the argument order; the fixtures predate the pass
  // axis, so their records come out as "pass": "fwd".
  json first = m["records"][0];
  CHECK(first["pass"] == "fwd");
  first.erase("pass");
  CHECK(first == a["records"][0]);
  auto keys = case_keys(a);
  keys.merge(case_keys(b));
  CHECK(case_keys(m) == keys);
  CHECK(m["summary"]["ok"].get<int>() + m["summary"]["failed"].get<int>() + m["summary"]["skipped"].get<int>() ==
        int(m["records"].size()));
  // The merged run covers the same cases as the unsharded run of the suite.
  CHECK(case_keys(m) == case_keys(read_json(kMain)));
  for (const auto& e : fs::directory_iterator(dir)) CHECK(e.path().string().find(".tmp") == std::string::npos);
}

TEST_CASE("merge of a partial set of shards is marked incomplete", "[merge]") {
  const fs::path dir = scratch("partial");
  const Run r = attnbench("merge " + quote(kShard2) + " --out " + quote(dir / "part.json"), dir);
  REQUIRE(r.rc == 0);
  const json m = read_json(dir / "part.json");
  CHECK(m["suite"]["shard"] == "2/2");
  CHECK(m["suite"]["complete"] == false);
  CHECK(r.err.find("only shards 2 of 2") != std::string::npos);
}

TEST_CASE("merge refuses shards that do not belong together", "[merge]") {
  const fs::path dir = scratch("bad");
  const json b = read_json(kShard2);
  struct Case {
    std::string name;
    json doc;
    std::string expect;
  };
  std::vector<Case> cases;
  auto with = [&](const std::string& name, auto edit, const std::string& expect) {
    json d = b;
    edit(d);
    cases.push_back({name, d, expect});
  };
  with(
      "sha.json", [](json& d) { d["context"]["git_sha"] = "0000000"; }, "context.git_sha");
  with(
      "host.json", [](json& d) { d["context"]["host"] = "elsewhere"; }, "context.host");
  with(
      "suite.json", [](json& d) { d["suite"]["name"] = "other"; }, "suite.name");
  with(
      "quick.json", [](json& d) { d["suite"]["quick"] = !d["suite"]["quick"].get<bool>(); }, "suite.quick");
  with(
      "filter.json", [](json& d) { d["suite"]["filter"] = "N<=64"; }, "suite.filter");
  with(
      "count.json", [](json& d) { d["suite"]["shard"] = "2/3"; }, "suite.shard");
  with(
      "dup.json", [&](json& d) { d["records"][0] = read_json(kShard1)["records"][0]; }, "records[0]: case");
  for (const auto& c : cases) {
    const fs::path file = write_json(dir / c.name, c.doc);
    const Run r = attnbench("merge " + quote(kShard1) + " " + quote(file) + " --out " + quote(dir / "m.json"), dir);
    INFO(c.name << ": " << r.err);
    CHECK(r.rc == 2);
    CHECK(one_line(r.err));
    CHECK(r.err.find(c.expect) != std::string::npos);
    CHECK(r.err.find(c.name) != std::string::npos);
    CHECK(!fs::exists(dir / "m.json"));
  }
  const Run twice =
      attnbench("merge " + quote(kShard1) + " " + quote(kShard1) + " --out " + quote(dir / "m.json"), dir);
  CHECK(twice.rc == 2);
  CHECK(twice.err.find("shard 1/2 is also") != std::string::npos);

  const fs::path broken = dir / "broken.json";
  std::ofstream(broken) << R"({"schema": "attnbench.results/1", "records": 3})";
  const Run bad = attnbench("merge " + quote(kShard1) + " " + quote(broken) + " --out " + quote(dir / "m.json"), dir);
  CHECK(bad.rc == 2);
  CHECK(one_line(bad.err));
  CHECK(bad.err.find("broken.json") != std::string::npos);
}

TEST_CASE("report writes the tables, with figures when python and matplotlib exist", "[report]") {
  const fs::path dir = scratch("report");
  const fs::path out = dir / "out";
  const Run r = attnbench(
      "report " + quote(kMain) + " " + quote(kFixtures / "run_masked.json") + " --out " + quote(out), dir);
  INFO(r.err);
  REQUIRE(r.rc == 0);
  const std::string md = read(out / "report.md");
  const json main = read_json(kMain);
  CHECK(md.find("# attnbench report") != std::string::npos);
  CHECK(md.find("## Suite `" + main["suite"]["name"].get<std::string>() + "`") != std::string::npos);
  CHECK(md.find("## Suite `local`") != std::string::npos);
  CHECK(md.find("| impl | dtype |") != std::string::npos);
  CHECK(md.find("median time | GFLOP/s | % peak | memory |") != std::string::npos);
  for (const auto& rec : main["records"])
    CHECK(md.find("### " + rec["variant"].get<std::string>()) != std::string::npos);
  if (md.find("![") == std::string::npos) {
    WARN("report without figures (no python3 + matplotlib?): " << md.substr(md.find("## Figures")));
    CHECK(md.find("**Note:**") != std::string::npos);
    return;
  }
  // Every embedded figure exists beside the report.
  size_t pos = 0;
  int figures = 0;
  while ((pos = md.find("](", pos)) != std::string::npos) {
    const size_t end = md.find(')', pos);
    const std::string file = md.substr(pos + 2, end - pos - 2);
    INFO(file);
    CHECK(fs::exists(out / file));
    figures += file.size() > 4 && file.substr(file.size() - 4) == ".png";
    pos = end;
  }
  CHECK(figures >= 5);
}

TEST_CASE("report without a usable python still writes every table", "[report]") {
  const fs::path dir = scratch("nopython");
  ::setenv("ATTNBENCH_PYTHON", (dir / "no-such-python3").c_str(), 1);
  const Run r = attnbench("report " + quote(kMain) + " --out " + quote(dir / "out"), dir);
  ::unsetenv("ATTNBENCH_PYTHON");
  INFO(r.err);
  REQUIRE(r.rc == 0);
  const std::string md = read(dir / "out" / "report.md");
  CHECK(md.find("no Python interpreter found") != std::string::npos);
  CHECK(md.find("| impl | dtype |") != std::string::npos);
  CHECK(r.err.find("no figures") != std::string::npos);

  const Run tables = attnbench("report " + quote(kMain) + " --no-plots --out " + quote(dir / "t"), dir);
  CHECK(tables.rc == 0);
  CHECK(read(dir / "t" / "report.md").find("Figures not drawn") != std::string::npos);
}

TEST_CASE("report refuses a malformed results file", "[report]") {
  const fs::path dir = scratch("badreport");
  json doc = read_json(kMain);
  doc["records"][0]["status"] = "great";
  const fs::path bad = write_json(dir / "bad.json", doc);
  const Run r = attnbench("report " + quote(bad) + " --out " + quote(dir / "out"), dir);
  CHECK(r.rc == 2);
  CHECK(one_line(r.err));
  CHECK(r.err.find("bad.json") != std::string::npos);
  CHECK(r.err.find("records[0].status") != std::string::npos);
  CHECK(!fs::exists(dir / "out" / "report.md"));
}

TEST_CASE("report --budget tabulates how many calls of each fit a step, per N", "[report]") {
  const fs::path dir = scratch("budget");
  const Run r = attnbench("report " + quote(kMain) + " --no-plots --budget 2 --out " + quote(dir / "out"), dir);
  INFO(r.err);
  REQUIRE(r.rc == 0);
  const std::string md = read(dir / "out" / "report.md");
  REQUIRE(md.find("### Blocks per 2 s step") != std::string::npos);
  // Every benchmarked record's cell is floor(2 s / its median), in its row.
  const nlohmann::json doc = nlohmann::json::parse(read(kMain));
  int checked = 0;
  for (const auto& rec : doc["records"]) {
    if (!rec.contains("bench") || !rec["bench"].is_object() || !rec["bench"].contains("median_s")) continue;
    const double m = rec["bench"]["median_s"].get<double>();
    std::string others;
    for (const auto& [k, v] : rec["shape"].items())
      if (k != "N") others += (others.empty() ? "" : ", ") + k + " " + (v.is_string() ? v.get<std::string>() : v.dump());
    const std::string row = "| " + rec["variant"].get<std::string>() + " | " + rec["impl"].get<std::string>() + " | " +
                            rec["dtype"].get<std::string>() + " | " + rec.value("pass", std::string("fwd")) + " | " +
                            others + " |";
    const size_t at = md.find(row, md.find("### Blocks per"));
    REQUIRE(at != std::string::npos);
    const std::string line = md.substr(at, md.find('\n', at) - at);
    INFO(line);
    CHECK(line.find(" " + std::to_string(int64_t(std::floor(2.0 / m))) + " (") != std::string::npos);
    if (++checked == 3) break;
  }
  CHECK(checked == 3);
  // No budget, no table; a budget that is not a positive number is refused.
  const Run none = attnbench("report " + quote(kMain) + " --no-plots --out " + quote(dir / "plain"), dir);
  CHECK(none.rc == 0);
  CHECK(read(dir / "plain" / "report.md").find("Blocks per") == std::string::npos);
  const Run bad = attnbench("report " + quote(kMain) + " --no-plots --budget 0 --out " + quote(dir / "bad"), dir);
  CHECK(bad.rc != 0);
}
