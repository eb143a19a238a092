// Hostile input, interruption and resource limits (issue 10, items 11-15): every
// input a user controls gets a one-line error (exit 2) or a bounded run, never a
// crash, a hang or an "internal error" (exit 3); a run that is stopped keeps its
// finished records and can be resumed. docs/bad-input.md lists these cases.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include "harness/dag.hpp"
#include "harness/errors.hpp"
#include "harness/json_file.hpp"
#include "harness/results.hpp"
#include "harness/safetensors.hpp"
#include "harness/suite.hpp"
#include "harness/tensor.hpp"
#include "harness/train/trainer.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;

namespace {

using attnbench::test::CommandOutput;
using attnbench::test::count_lines;
using attnbench::test::run;
using attnbench::test::temp_dir;
using attnbench::test::write;

/// An input error: exit 2 with one line naming the problem.
void expect_input_error(const CommandOutput& o, const std::string& needle) {
  INFO(o.text);
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains(needle));
  CHECK_THAT(o.text, !Catch::Contains("internal error"));
  CHECK(std::count(o.text.begin(), o.text.end(), '\n') == 1);
}

// A cheap suite: IPA on the CPU, N cases of a few milliseconds each.
std::string small_suite(const std::string& name, int cases,
                        const std::string& bench = R"({"min_time_s":0.05,"repetitions":2})") {
  std::string ns;
  for (int i = 0; i < cases; ++i) ns += (i ? "," : "") + std::to_string(7 + i);
  // Checked (cheap at these sizes): with --no-bench an unchecked case would run nothing,
  // which is a skip, and a run of skips is not a pass.
  return R"({"name":")" + name + R"(","checks":{"seeds":1},"bench":)" + bench +
         R"(,"groups":[{"variant":"ipa","impls":["cpu"],"dtypes":["f32"],"sweep":{"N":[)" + ns +
         R"(],"c_s":[8],"c_z":[4]}}]})";
}

pid_t spawn_run(const std::vector<std::string>& args) {
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    std::vector<char*> argv{const_cast<char*>(ATTNBENCH_BINARY), const_cast<char*>("run")};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(ATTNBENCH_BINARY, argv.data());
    _exit(127);
  }
  return pid;
}

/// Waits (up to 5 min: a loaded machine — ctest -j, a first run measuring the roofline — once
/// took over the old 60 s) until `jsonl` has n lines.
void wait_for_lines(const fs::path& jsonl, int n) {
  for (int i = 0; i < 6000 && (!fs::exists(jsonl) || count_lines(jsonl) < n); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

int exit_status(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const attnbench::InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("JSON inputs: deep nesting, huge numbers and non-regular files are one-line errors", "[hostile]") {
  const auto dir = temp_dir("hostile_json");
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  write(dir / "deep.json", deep);
  const auto d = (dir / "deep.json").string();
  expect_input_error(run("run " + d), "nested deeper than 64 levels");
  expect_input_error(run("compare " + d + " " + d), "nested deeper");
  expect_input_error(run("merge " + d + " --out " + (dir / "m.json").string()), "nested deeper");
  expect_input_error(run("report " + d + " --out " + (dir / "rep").string()), "nested deeper");
  expect_input_error(run("mask " + d + " --svg " + (dir / "m.svg").string()), "nested deeper");

  write(dir / "big.json", R"({"name":"x","seed":1e400,"groups":[]})");
  expect_input_error(run("run " + (dir / "big.json").string()), "number overflow");

  expect_input_error(run("run /dev/zero"), "/dev/zero: not a regular file");
  expect_input_error(run("run " + dir.string()), "is a directory");
  // A DAG named /dev/stdin would block reading the terminal.
  write(dir / "stdin.json", R"({"name":"x","groups":[{"variant":"masked","impls":["reference"],"dtypes":["f32"],
    "cases":[{"mask":"dag","dag":"/dev/stdin","N":8}]}]})");
  expect_input_error(run("run " + (dir / "stdin.json").string() + " </dev/null"), "not a regular file");

  CHECK_THAT(error_of([&] { attnbench::parse_json_text("[1e400]", "t"); }), Catch::Contains("t: invalid JSON"));
  CHECK(attnbench::parse_json_text(std::string(63, '[') + std::string(63, ']'), "t").is_array());
  fs::remove_all(dir);
}

TEST_CASE("suite numbers are bounded: seeds, repetitions, min_time_s, sweep sizes, skip rules", "[hostile]") {
  const auto dir = temp_dir("hostile_bounds");
  const auto s = (dir / "s.json").string();
  auto suite = [&](const std::string& top, const std::string& group) {
    write(s,
          R"({"name":"x")" + top + R"(,"groups":[{"variant":"ipa","impls":["cpu"],"dtypes":["f32"])" + group + "}]}");
  };
  suite(R"(,"checks":{"seeds":2147483648})", R"(,"sweep":{"N":[8]})");
  expect_input_error(run("run " + s), "checks.seeds: expected an integer in [1, 1000], got 2147483648");
  suite(R"(,"bench":{"repetitions":2147483648})", R"(,"sweep":{"N":[8]})");
  expect_input_error(run("run " + s), "bench.repetitions: expected an integer in [1, 1000]");
  suite(R"(,"bench":{"min_time_s":1e300})", R"(,"sweep":{"N":[8]})");
  expect_input_error(run("run " + s), "bench.min_time_s: expected a number in [0, 60]");
  // 40^6 shapes: refused before they are built.
  std::string forty;
  for (int i = 0; i < 40; ++i) forty += (i ? "," : "") + std::to_string(8 + i);
  suite("", R"(,"sweep":{"N":[)" + forty + "],\"c_s\":[" + forty + "],\"c_z\":[" + forty + "],\"c\":[" + forty +
                "],\"H\":[" + forty + "],\"P\":[" + forty + "]}");
  expect_input_error(run("run " + s), "more than 100000 shapes");
  suite("", R"(,"sweep":{"N":[8]},"skip":[{"when":{"min":5},"reason":"r"}])");
  expect_input_error(run("run " + s), "skip[0].when.min: expected an object of lower bounds");
  suite("", R"(,"sweep":{"N":[8]},"skip":[{"when":{"min":{"NN":5}},"reason":"r"}])");
  expect_input_error(run("run " + s), "skip[0].when.min.NN: unknown key (did you mean 'N'?)");
  suite("", R"(,"sweep":{"N":[8]},"skip":[{"when":{"impls":"cpu"},"reason":"r"}])");
  expect_input_error(run("run " + s), "skip[0].when.impls: unknown key");
  // Seeds use the whole uint64 range and are recorded.
  write(s, small_suite("x", 1).replace(1, 0, R"("seed":18446744073709551615,)"));
  auto o = run("run " + s + " --no-bench --out " + (dir / "r.json").string());
  INFO(o.text);
  CHECK(o.code == 0);
  CHECK(attnbench::load_results((dir / "r.json").string())["suite"]["seed"] == 18446744073709551615ull);
  fs::remove_all(dir);
}

TEST_CASE("every committed suite passes the limits and the skip-rule checks", "[hostile]") {
  for (const auto& e : fs::directory_iterator(fs::path(ATTNBENCH_SOURCE_DIR) / "suites")) {
    INFO(e.path());
    if (attnbench::read_json_file(e.path().string()).value("kind", "") == "train") {
      // Training suites (attnbench train, docs/train.md) have their own format.
      CHECK_NOTHROW(attnbench::train::load_train_suite(e.path().string()));
      continue;
    }
    CHECK_NOTHROW(attnbench::expand(attnbench::load_suite(e.path().string(), false)));
    CHECK_NOTHROW(attnbench::expand(attnbench::load_suite(e.path().string(), true)));
  }
}

TEST_CASE("suite names cannot leave results/ or hold NULs", "[hostile]") {
  const auto dir = temp_dir("hostile_names");
  for (const std::string name : {"../../x", "a/b", "x\\u0000y", ".hidden", ""}) {
    write(dir / "s.json", small_suite(name, 1));
    expect_input_error(run("run " + (dir / "s.json").string() + " --no-bench"), "name: expected a file name");
  }
  fs::remove_all(dir);
}

TEST_CASE("command-line limits: --threads, --shard", "[hostile]") {
  const auto dir = temp_dir("hostile_flags");
  write(dir / "s.json", small_suite("x", 1));
  const auto s = (dir / "s.json").string(), out = (dir / "r.json").string();
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  expect_input_error(run("run " + s + " --threads 100000 --out " + out), "--threads: expected 1 to");
  expect_input_error(run("run " + s + " --threads " + std::to_string(4 * cores + 1) + " --out " + out),
                     "(4 per core");
  expect_input_error(run("roofline --threads 100000"), "--threads");
  auto o = run("run " + s + " --no-bench --threads " + std::to_string(cores + 1) + " --out " + out);
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("warning: --threads"));
  expect_input_error(run("run " + s + " --shard 1/2/3"), "--shard: expected K/N");
  expect_input_error(run("run " + s + " --shard 1/2x"), "--shard: expected K/N");
  CHECK_FALSE(fs::exists(out + ".tmp"));
  fs::remove_all(dir);
}

TEST_CASE("DAG limits: node counts, generators, positions", "[hostile]") {
  using attnbench::load_dag;
  CHECK_THAT(error_of([] { load_dag("le_attention:100000000", "d"); }), Catch::Contains("at most 16382 documents"));
  CHECK_THAT(error_of([] { load_dag("chain:100000:1", "d"); }), Catch::Contains("at most 16384 nodes"));
  CHECK_THAT(error_of([] { load_dag("chain:2:100000000", "d"); }), Catch::Contains("more than 16777216 tokens"));
  const auto node = [](const std::string& extra) {
    return nlohmann::json::parse(R"({"nodes":[{"id":"A","length":4)" + extra + "}]}");
  };
  CHECK_THAT(error_of([&] { attnbench::parse_dag(node(R"(,"start_pos_id":2147483648)"), "d"); }),
             Catch::Contains("start_pos_id: expected an integer in [0, 2147483647]"));
  CHECK_THAT(error_of([&] { attnbench::parse_dag(node(R"(,"start_pos_id":2147483647)"), "d"); }),
             Catch::Contains("makes the last position exceed"));
  CHECK_THAT(error_of([&] { attnbench::parse_dag(node(R"(,"end_pos_id":18446744073709551615)"), "d"); }),
             Catch::Contains("end_pos_id: expected an integer in"));
  const auto dir = temp_dir("hostile_dag");
  write(dir / "chain.json", R"({"mask":"dag","dag":"chain:100000:1","N":100000})");
  expect_input_error(run("mask " + (dir / "chain.json").string() + " --svg " + (dir / "c.svg").string()),
                     "at most 16384 nodes");
  fs::remove_all(dir);
}

TEST_CASE("safetensors: a size after a 0 cannot wrap to a negative dimension", "[hostile]") {
  const auto dir = temp_dir("hostile_st");
  const std::string header = R"({"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}})";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[size_t(i)] = char((header.size() >> (8 * i)) & 0xff);
  write(dir / "z.safetensors", bytes + header);
  CHECK_THAT(error_of([&] { attnbench::read_safetensors((dir / "z.safetensors").string()); }),
             Catch::Contains("tensor 'a'.shape: too large"));
  fs::remove_all(dir);
}

TEST_CASE("shape products past int64 are input errors", "[hostile]") {
  CHECK_THAT(error_of([] { attnbench::numel({int64_t(1) << 60, 16}); }), Catch::Contains("more than 2^63 elements"));
  CHECK_THAT(error_of([] { attnbench::Tensor(attnbench::DType::f32, {int64_t(1) << 40, int64_t(1) << 20}); }),
             Catch::Contains("too many elements to allocate"));
  // 256 TiB: more than any address space (ASan needs allocator_may_return_null=1, as CI sets).
  CHECK_THAT(error_of([] { attnbench::Tensor(attnbench::DType::f32, {int64_t(1) << 36, int64_t(1) << 10}); }),
             Catch::Contains("cannot allocate a f32 tensor of shape [68719476736, 1024]"));
  const auto dir = temp_dir("hostile_shape");
  write(dir / "s.json", R"({"name":"x","groups":[{"variant":"sdpa","impls":["cpu"],"dtypes":["f32"],
    "cases":[{"B":1,"H":1152921504606846976,"N":16,"D":16},{"B":2147483648,"H":2147483648,"N":16,"D":16}]}]})");
  auto o = run("run " + (dir / "s.json").string() + " --no-bench --out " + (dir / "r.json").string());
  INFO(o.text);
  CHECK((o.code == 0 || o.code == 1 || o.code == 2));
  CHECK_THAT(o.text, !Catch::Contains("internal error"));
  o = run("export sdpa --out " + (dir / "e.safetensors").string() + " --shape H=1152921504606846976");
  INFO(o.text);
  CHECK(o.code == 2);
  CHECK_THAT(o.text, !Catch::Contains("internal error"));
  fs::remove_all(dir);
}

TEST_CASE("out paths: problems are reported before any case runs, leaving nothing behind", "[hostile]") {
  const auto dir = temp_dir("hostile_out");
  write(dir / "s.json", small_suite("x", 1));
  write(dir / "file", "");
  const auto s = (dir / "s.json").string();
  expect_input_error(run("run " + s + " --out " + (dir / "file" / "r.json").string()), "--out: cannot create the folder");
  fs::create_directories(dir / "d.json");
  expect_input_error(run("run " + s + " --out " + (dir / "d.json").string()), "is a directory");
  for (const auto& e : fs::recursive_directory_iterator(dir))
    CHECK(e.path().string().find(".tmp") == std::string::npos);
  if (::geteuid() != 0) {  // root writes anywhere
    fs::create_directories(dir / "ro");
    fs::permissions(dir / "ro", fs::perms::owner_read | fs::perms::owner_exec);
    expect_input_error(run("run " + s + " --out " + (dir / "ro" / "r.json").string()), "--out: cannot write in");
    fs::permissions(dir / "ro", fs::perms::owner_all);
  }
  fs::remove_all(dir);
}

TEST_CASE("results files with wrong types or negative times are one-line errors", "[hostile]") {
  const auto dir = temp_dir("hostile_results");
  write(dir / "s.json", small_suite("x", 1));
  const auto good = (dir / "good.json").string();
  REQUIRE(run("run " + (dir / "s.json").string() + " --out " + good).code == 0);
  nlohmann::json doc = attnbench::load_results(good);
  const auto bad = (dir / "bad.json").string();
  auto expect_bad = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& needle) {
    nlohmann::json d = doc;
    edit(d);
    attnbench::write_json_atomic(bad, d);
    expect_input_error(run("compare " + good + " " + bad), needle);
    expect_input_error(run("report " + bad + " --out " + (dir / "rep").string()), needle);
  };
  expect_bad([](auto& d) { d["records"][0]["bench"]["samples_s"] = {"a"}; }, "bench.samples_s: expected times > 0");
  expect_bad([](auto& d) { d["records"][0]["bench"]["median_s"] = -1.0; }, "bench.median_s: expected a number > 0");
  expect_bad([](auto& d) { d["records"][0]["reason"] = 5; }, "records[0].reason: expected a string");
  expect_bad([](auto& d) { d["records"][0]["bench"] = 5; }, "records[0].bench: expected an object");
  expect_bad([](auto& d) { d["suite"]["name"] = 5; }, "suite.name: expected a string");
  // compare refuses results of another suite or thread count.
  nlohmann::json other = doc;
  other["context"]["threads"] = doc["context"]["threads"].get<int>() + 1;
  attnbench::write_json_atomic(bad, other);
  expect_input_error(run("compare " + good + " " + bad), "context.threads differs");
  CHECK(run("compare " + good + " " + bad + " --force").code == 0);
  other = doc;
  other["suite"]["name"] = "y";
  attnbench::write_json_atomic(bad, other);
  expect_input_error(run("compare " + good + " " + bad), "suite.name differs");
  fs::remove_all(dir);
}

TEST_CASE("merge refuses shards run with different seeds", "[hostile]") {
  const auto dir = temp_dir("hostile_seeds");
  write(dir / "s.json", small_suite("x", 2));
  const auto s = (dir / "s.json").string(), a = (dir / "a.json").string(), b = (dir / "b.json").string();
  REQUIRE(run("run " + s + " --no-bench --shard 1/2 --seed 1 --out " + a).code == 0);
  REQUIRE(run("run " + s + " --no-bench --shard 2/2 --seed 2 --out " + b).code == 0);
  expect_input_error(run("merge " + a + " " + b + " --out " + (dir / "m.json").string()), "suite.seed");
  fs::remove_all(dir);
}

TEST_CASE("two runs to one --out: the second is refused, the first keeps every record", "[hostile]") {
  const auto dir = temp_dir("hostile_lock");
  write(dir / "s.json", small_suite("x", 6));
  const auto s = (dir / "s.json").string(), out = (dir / "r.json").string();
  const pid_t first = spawn_run({s, "--out", out});
  wait_for_lines(dir / "r.jsonl", 1);
  expect_input_error(run("run " + s + " --out " + out), "another attnbench run is writing");
  CHECK(exit_status(first) == 0);
  CHECK(attnbench::load_results(out)["records"].size() == 6);
  CHECK(count_lines(dir / "r.jsonl") == 6);
  fs::remove_all(dir);
}

TEST_CASE("a failed JSONL write stops the run with an error", "[hostile]") {
  const auto dir = temp_dir("hostile_full");
  write(dir / "s.json", small_suite("x", 40));
  // 4 KiB file size limit, SIGXFSZ ignored: the writes past it fail with EFBIG, as on a full disk.
  attnbench::test::CommandOutput o{0, ""};
  const std::string cmd = "bash -c 'ulimit -f 4; trap \"\" XFSZ; exec " + std::string(ATTNBENCH_BINARY) + " run " +
                          (dir / "s.json").string() + " --no-bench --out " + (dir / "r.json").string() + "' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) o.text.append(buf, n);
  const int status = pclose(p);
  INFO(o.text);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 2);
  CHECK_THAT(o.text, Catch::Contains("r.jsonl: write failed"));
  fs::remove_all(dir);
}

TEST_CASE("SIGTERM and a second SIGINT keep every finished record in the JSON", "[hostile]") {
  const auto dir = temp_dir("hostile_signals");
  // Long cases: the signal lands while one runs.
  write(dir / "s.json", small_suite("x", 10, R"({"min_time_s":0.3,"repetitions":2})"));
  const auto s = (dir / "s.json").string();
  for (int sig : {SIGTERM, SIGINT}) {
    const auto out = (dir / (std::to_string(sig) + ".json")).string();
    const auto jsonl = dir / (std::to_string(sig) + ".jsonl");
    const pid_t pid = spawn_run({s, "--out", out});
    wait_for_lines(jsonl, 1);
    kill(pid, sig);
    if (sig == SIGINT) {  // the second Ctrl-C leaves at once
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      kill(pid, SIGINT);
    }
    CHECK(exit_status(pid) == 130);
    const auto doc = attnbench::load_results(out);
    CHECK(doc["suite"]["complete"] == false);
    CHECK(doc["records"].size() >= 1);
    CHECK(doc["records"].size() < 10);
    CHECK(int(doc["records"].size()) == count_lines(jsonl));
  }
  fs::remove_all(dir);
}

TEST_CASE("resume after SIGKILL runs only the missing cases", "[hostile]") {
  const auto dir = temp_dir("hostile_resume");
  write(dir / "s.json", small_suite("x", 6, R"({"min_time_s":0.2,"repetitions":2})"));
  const auto s = (dir / "s.json").string(), out = (dir / "r.json").string();
  const pid_t pid = spawn_run({s, "--out", out});
  wait_for_lines(dir / "r.jsonl", 2);
  kill(pid, SIGKILL);
  exit_status(pid);
  CHECK_FALSE(fs::exists(out));
  // Simulate a kill mid-write too: a last line without its newline.
  { std::ofstream(dir / "r.jsonl", std::ios::app) << R"({"variant":"ipa","impl")"; }
  const auto before = attnbench::read_jsonl((dir / "r.jsonl").string());
  CHECK(before.dropped_partial_line);
  const size_t kept = before.records.size();
  REQUIRE(kept >= 2);

  auto o = run("run " + s + " --resume " + out);
  INFO(o.text);
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("dropping a last line cut short"));
  const auto doc = attnbench::load_results(out);
  CHECK(doc["suite"]["complete"] == true);
  REQUIRE(doc["records"].size() == 6);
  std::set<std::string> keys;
  for (const auto& r : doc["records"]) keys.insert(attnbench::record_key(r));
  CHECK(keys.size() == 6);
  CHECK(count_lines(dir / "r.jsonl") == 6);
  // The resumed run only ran the cases that were missing.
  size_t ran = 0;
  for (size_t at = o.text.find("\n  ["); at != std::string::npos; at = o.text.find("\n  [", at + 1)) ++ran;
  CHECK(ran == 6 - kept);

  // A plain rerun after a kill keeps the unfinished stream aside instead of truncating it.
  const pid_t again = spawn_run({s, "--out", (dir / "k.json").string()});
  wait_for_lines(dir / "k.jsonl", 1);
  kill(again, SIGKILL);
  exit_status(again);
  const int lines = count_lines(dir / "k.jsonl");
  o = run("run " + s + " --no-bench --out " + (dir / "k.json").string());
  CHECK(o.code == 0);
  CHECK(count_lines(dir / "k.jsonl.prev") == lines);
  fs::remove_all(dir);
}

TEST_CASE("max-memory: cases whose memory model needs more are skipped", "[hostile]") {
  const auto dir = temp_dir("hostile_maxmem");
  write(dir / "s.json", small_suite("x", 1));
  const auto out = (dir / "r.json").string();
  auto o = run("run " + (dir / "s.json").string() + " --no-bench --max-memory 1KB --out " + out);
  INFO(o.text);
  CHECK(o.code == 1);  // every case skipped: nothing was checked, which is not a pass
  const auto doc = attnbench::load_results(out);
  REQUIRE(doc["records"].size() == 1);
  CHECK(doc["records"][0]["status"] == "skipped");
  CHECK_THAT(doc["records"][0]["reason"].get<std::string>(), Catch::Contains("memory model needs"));
  fs::remove_all(dir);
}

TEST_CASE("timeout per case: records the slow case as failed and the run goes on", "[hostile]") {
  const auto dir = temp_dir("hostile_timeout");
  // Each case benchmarks for 2 x 3 s; the limit is 1 s.
  write(dir / "s.json", small_suite("x", 2, R"({"min_time_s":3,"repetitions":2})"));
  const auto out = (dir / "r.json").string();
  auto o = run("run " + (dir / "s.json").string() + " --timeout-per-case 1 --out " + out);
  INFO(o.text);
  CHECK(o.code == 1);
  const auto doc = attnbench::load_results(out);
  CHECK(doc["suite"]["complete"] == true);
  REQUIRE(doc["records"].size() == 2);
  for (const auto& r : doc["records"]) {
    CHECK(r["status"] == "failed");
    CHECK_THAT(r["reason"].get<std::string>(), Catch::Contains("timed out after"));
  }
  fs::remove_all(dir);
}
