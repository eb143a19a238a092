// The pass axis (fwd, bwd, fwd_bwd): parsing with did-you-mean, suites and
// filters, records keyed by pass, and `compare` never pairing a fwd_bwd time
// with a fwd time.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "harness/errors.hpp"
#include "harness/results.hpp"
#include "harness/suite.hpp"
#include "support.hpp"

using namespace attnbench;
namespace fs = std::filesystem;

namespace {

using attnbench::test::write;

fs::path temp_dir(const std::string& name) { return attnbench::test::temp_dir("pass_test_" + name); }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

/// A results file with one sdpa record of the given pass and time.
nlohmann::json results_with(const char* pass, double seconds) {
  nlohmann::json rec = {{"variant", "sdpa"},
                        {"impl", "cpu"},
                        {"dtype", "f32"},
                        {"shape", {{"N", 64}}},
                        {"status", "ok"},
                        {"reason", ""},
                        {"bench",
                         {{"median_s", seconds},
                          {"min_s", seconds},
                          {"gflops", 1.0},
                          {"flops", 1e9},
                          {"samples_s", {seconds, seconds, seconds, seconds, seconds}}}}};
  if (pass) rec["pass"] = pass;
  return {{"schema", kResultsSchema},
          {"context", {{"host", "h"}, {"cpu_model", "c"}, {"git_sha", "g"}, {"peak_gflops", 100.0}}},
          {"suite", {{"name", "s"}}},
          {"records", {rec}}};
}

}  // namespace

TEST_CASE("pass names parse, with did-you-mean for typos", "[pass]") {
  CHECK(parse_pass("fwd", "x") == Pass::fwd);
  CHECK(parse_pass("bwd", "x") == Pass::bwd);
  CHECK(parse_pass("fwd_bwd", "x") == Pass::fwd_bwd);
  CHECK(pass_name(Pass::fwd_bwd) == "fwd_bwd");
  CHECK_THAT(error_of([] { parse_pass("fwdbwd", "--pass"); }),
             Catch::Contains("--pass: unknown pass 'fwdbwd'") && Catch::Contains("did you mean 'fwd_bwd'"));
  CHECK((runs_forward(Pass::fwd_bwd) && runs_backward(Pass::fwd_bwd)));
  CHECK((!runs_forward(Pass::bwd) && !runs_backward(Pass::fwd)));
}

TEST_CASE("suites name passes per group, cases expand over them, filters and skips see them", "[pass][suite]") {
  const auto dir = temp_dir("suite");
  const auto path = (dir / "s.json").string();
  write(path, R"({"name":"p","groups":[{"variant":"sdpa","impls":["cpu"],"dtypes":["f32"],
    "passes":["fwd","fwd_bwd"],"cases":[{"N":17}],"skip":[{"when":{"pass":"fwd_bwd"},"reason":"r"}]}]})");
  const auto cases = expand(load_suite(path, false));
  REQUIRE(cases.size() == 2);
  CHECK(cases[0].spec.pass == Pass::fwd);
  CHECK(cases[0].skip_reason.empty());
  CHECK(cases[1].spec.pass == Pass::fwd_bwd);
  CHECK(cases[1].skip_reason == "r");
  CHECK(CaseFilter("pass=fwd_bwd").matches(cases[1].spec));
  CHECK_FALSE(CaseFilter("pass=fwd_bwd").matches(cases[0].spec));

  // Without "passes" a group is forward only (existing suites keep their meaning).
  write(path, R"({"name":"p","groups":[{"variant":"sdpa","impls":["cpu"],"dtypes":["f32"],"cases":[{"N":17}]}]})");
  const auto fwd = expand(load_suite(path, false));
  REQUIRE(fwd.size() == 1);
  CHECK(fwd[0].spec.pass == Pass::fwd);

  write(path, R"({"name":"p","groups":[{"variant":"sdpa","impls":["cpu"],"dtypes":["f32"],"passes":["bwdd"],
    "cases":[{"N":17}]}]})");
  CHECK_THAT(error_of([&] { load_suite(path, false); }),
             Catch::Contains("groups[0].passes: unknown pass 'bwdd'") && Catch::Contains("did you mean 'bwd'"));
  fs::remove_all(dir);
}

TEST_CASE("pass flag: an unknown value is a one-line error with did-you-mean, exit 2", "[pass][cli]") {
  const auto o = test::run_attnbench("run " + std::string(ATTNBENCH_SOURCE_DIR) + "/suites/ci.json --pass bwdd");
  INFO(o.text);
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("--pass: unknown pass 'bwdd'") && Catch::Contains("did you mean 'bwd'"));
}

TEST_CASE("results: records are keyed by pass, old records read as fwd", "[pass][results]") {
  const auto dir = temp_dir("results");
  write(dir / "old.json", results_with(nullptr, 1.0).dump());
  const auto old = load_results((dir / "old.json").string());
  CHECK(old["records"][0]["pass"] == "fwd");
  CHECK(record_key(old["records"][0]) == record_key(results_with("fwd", 1.0)["records"][0]));
  CHECK(record_key(old["records"][0]) != record_key(results_with("fwd_bwd", 1.0)["records"][0]));
  write(dir / "bad.json", results_with("backward", 1.0).dump());
  CHECK_THAT(error_of([&] { load_results((dir / "bad.json").string()); }),
             Catch::Contains("records[0].pass: expected \"fwd\", \"bwd\" or \"fwd_bwd\""));
  fs::remove_all(dir);
}

TEST_CASE("compare never pairs different passes", "[pass][cli]") {
  const auto dir = temp_dir("compare");
  const auto base = (dir / "base.json").string(), next = (dir / "next.json").string();
  // The same case, 3.5x the time, but as fwd_bwd: not a slowdown, a different case.
  write(base, results_with("fwd", 1.0).dump());
  write(next, results_with("fwd_bwd", 3.5).dump());
  auto o = test::run_attnbench("compare " + base + " " + next);
  INFO(o.text);
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("0 slower") && Catch::Contains("1 cases only in"));
  // The same pass 3.5x slower is a confirmed slowdown.
  write(next, results_with("fwd", 3.5).dump());
  o = test::run_attnbench("compare " + base + " " + next);
  CHECK(o.code == 1);
  CHECK_THAT(o.text, Catch::Contains("SLOWER"));
  fs::remove_all(dir);
}
