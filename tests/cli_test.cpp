// End-to-end tests of the attnbench binary: help, bad input, results files,
// memory-model skips and Ctrl-C.
#include <catch2/catch.hpp>

#include <signal.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "harness/results.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;

namespace {

using attnbench::test::CommandOutput;
using attnbench::test::count_lines;
using attnbench::test::run;
using attnbench::test::temp_dir;
using attnbench::test::write;

}  // namespace

TEST_CASE("every subcommand has --help", "[cli]") {
  for (const char* sub : {"", "run", "list", "compare", "roofline", "export", "verify", "merge", "report"}) {
    auto o = run(std::string(sub) + " --help");
    INFO(sub << ": " << o.text);
    CHECK(o.code == 0);
    CHECK(o.text.find("Usage") != std::string::npos);
  }
}

TEST_CASE("bad input: one line, exit 2, no output file", "[cli]") {
  const auto dir = temp_dir("cli_bad");
  const auto out = (dir / "r.json").string();
  write(dir / "s.json", R"({"name":"x","groups":[{"variant":"ipa","impls":["cpu"],"dtypes":["f32"],"sweep":{"N":[0]}}]})");
  auto o = run("run " + (dir / "s.json").string() + " --out " + out);
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("groups[0].sweep.N"));
  CHECK(std::count(o.text.begin(), o.text.end(), '\n') == 1);
  CHECK_FALSE(fs::exists(out));

  write(dir / "s.json", R"({"name":"x","groups":[{"variant":"ipa","impls":["gpu"],"dtypes":["f32"],"sweep":{"N":[8]}}]})");
  o = run("run " + (dir / "s.json").string() + " --out " + out);
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("no implementation 'gpu'"));

  o = run("run " + (dir / "missing.json").string());
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("cannot open"));

  o = run("run " + (dir / "s.json").string() + " --shard 3/2");
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("--shard"));
  fs::remove_all(dir);
}

TEST_CASE("run writes valid results, and too-large cases are skipped before allocating", "[cli]") {
  const auto dir = temp_dir("cli_run");
  const auto out = (dir / "r.json").string();
  // N = 60000: z alone would be 1.8 TB; the memory model must skip it.
  write(dir / "s.json", R"({"name":"small","checks":{"seeds":1},"bench":{"min_time_s":0.01,"repetitions":2},
    "groups":[{"variant":"ipa","impls":["reference","cpu"],"dtypes":["f32"],
               "cases":[{"N":9,"c_s":8,"c_z":4,"c":4,"H":2,"P":2,"P_v":2},{"N":60000}]}]})");
  auto o = run("run " + (dir / "s.json").string() + " --out " + out);
  INFO(o.text);
  CHECK(o.code == 0);
  const auto doc = attnbench::load_results(out);
  REQUIRE(doc["records"].size() == 4);
  CHECK(doc["suite"]["complete"] == true);
  CHECK(doc["records"][0]["status"] == "ok");
  CHECK(doc["records"][0]["bench"]["repetitions"] == 2);
  CHECK(doc["records"][3]["status"] == "skipped");
  CHECK_THAT(doc["records"][3]["reason"].get<std::string>(), Catch::Contains("memory model needs"));
  CHECK(count_lines(dir / "r.jsonl") == 4);

  // Shards partition the cases.
  run("run " + (dir / "s.json").string() + " --no-bench --shard 1/2 --out " + (dir / "a.json").string());
  run("run " + (dir / "s.json").string() + " --no-bench --shard 2/2 --out " + (dir / "b.json").string());
  CHECK(attnbench::load_results((dir / "a.json").string())["records"].size() == 2);
  CHECK(attnbench::load_results((dir / "b.json").string())["records"].size() == 2);

  // compare: the same file against itself is not a regression.
  o = run("compare " + out + " " + out);
  CHECK(o.code == 0);
  fs::remove_all(dir);
}

TEST_CASE("Ctrl-C during run keeps every finished record", "[cli]") {
  const auto dir = temp_dir("cli_sigint");
  const auto out = dir / "r.json";
  write(dir / "s.json", R"({"name":"long","checks":{"enabled":false},"bench":{"min_time_s":0.1,"repetitions":2},
    "groups":[{"variant":"ipa","impls":["cpu"],"dtypes":["f32"],"sweep":{"N":[7,8,9,10,11,12,13,14,15,16],"c_s":[8],"c_z":[4]}}]})");
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int devnull = ::open("/dev/null", 1);
    dup2(devnull, 1);
    dup2(devnull, 2);
    execl(ATTNBENCH_BINARY, ATTNBENCH_BINARY, "run", (dir / "s.json").c_str(), "--out", out.c_str(), (char*)nullptr);
    _exit(127);
  }
  // Wait for the first finished record, then interrupt.
  const auto jsonl = dir / "r.jsonl";
  for (int i = 0; i < 600 && (!fs::exists(jsonl) || count_lines(jsonl) < 1); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  kill(pid, SIGINT);
  int status = 0;
  waitpid(pid, &status, 0);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 130);
  const auto doc = attnbench::load_results(out.string());
  CHECK(doc["suite"]["complete"] == false);
  CHECK(doc["records"].size() >= 1);
  CHECK(doc["records"].size() < 10);
  CHECK(int(doc["records"].size()) == count_lines(jsonl));
  fs::remove_all(dir);
}
