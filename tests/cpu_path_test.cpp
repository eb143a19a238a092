// CPU feature detection and the kernel-path limit (impls/cpu/cpu_features.hpp):
// every path the machine has can be chosen, a path it lacks is an input error
// (library: std::invalid_argument; CLI: one line, exit 2, for the flag and the
// environment variable), and records say the path they ran on.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "harness/results.hpp"
#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "impls/cpu/cpu_features.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;
using namespace attnbench;

namespace {
/// Restores "no limit" when a test ends (the limit is process-wide).
struct LimitGuard {
  ~LimitGuard() { cpu::set_cpu_path_limit(""); }
};
bool has_path(const std::string& name) {
  const auto all = cpu::cpu_paths_available();
  return std::find(all.begin(), all.end(), name) != all.end();
}
}  // namespace

TEST_CASE("cpu paths: detection is consistent and every path can be chosen", "[cpu-path]") {
  const LimitGuard guard;
  const auto& f = cpu::cpu_features();
  const auto paths = cpu::cpu_paths_available();
  REQUIRE_FALSE(paths.empty());
  CHECK(has_path("amx-bf16") == f.amx_usable());
  CHECK(has_path("avx512bf16") == f.bf16_usable());
  if (f.amx_tile && !f.amx_usable()) CHECK_FALSE(f.amx_note.empty());
  for (const char* p : {"amx-bf16", "avx512bf16", "avx512-f32"})
    if (!has_path(p)) WARN("path " << p << " skipped: this machine lacks it");
  // The f32 kernels take the first non-bf16 path when nothing is forced.
  for (const auto& p : paths) {
    if (p == "amx-bf16" || p == "avx512bf16") continue;
    CHECK(cpu::f32_kernel_path() == p);
    break;
  }
  for (const auto& p : paths) {
    cpu::set_cpu_path_limit(p);
    CHECK(cpu::cpu_path_limit() == p);
    CHECK(cpu::amx_bf16_enabled() == (p == "amx-bf16"));
    CHECK(cpu::avx512bf16_enabled() == (p == "amx-bf16" || p == "avx512bf16"));
    if (p != "amx-bf16" && p != "avx512bf16") CHECK(cpu::f32_kernel_path() == p);
  }
  cpu::set_cpu_path_limit("");
  CHECK(cpu::cpu_path_limit().empty());
  CHECK(cpu::amx_bf16_enabled() == f.amx_usable());
  // Names are case-insensitive.
  std::string upper = paths.front();
  for (char& c : upper) c = char(std::toupper(static_cast<unsigned char>(c)));
  cpu::set_cpu_path_limit(upper);
  CHECK(cpu::cpu_path_limit() == paths.front());
}

TEST_CASE("cpu paths: a path the machine lacks is an error naming what it has", "[cpu-path]") {
  const LimitGuard guard;
  try {
    cpu::set_cpu_path_limit("avx10-nosuch");
    FAIL("no error");
  } catch (const std::invalid_argument& e) {
    CHECK_THAT(e.what(), Catch::Contains("avx10-nosuch") && Catch::Contains("it has:"));
  }
  if (!has_path("amx-bf16")) CHECK_THROWS_AS(cpu::set_cpu_path_limit("amx-bf16"), std::invalid_argument);
}

TEST_CASE("cpu paths: --cpu-path and ATTNBENCH_CPU_PATH on the command line", "[cpu-path][cli]") {
  const fs::path dir = fs::temp_directory_path() / ("attnbench_cpupath_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string suite = (dir / "s.json").string(), out = (dir / "r.json").string();
  std::ofstream(suite) << R"({"name":"p","checks":{"seeds":1},"bench":{"min_time_s":0.01,"repetitions":1},
    "groups":[{"variant":"sdpa","impls":["cpu"],"dtypes":["f32","bf16"],
               "cases":[{"B":1,"H":2,"Hkv":1,"N":40,"D":16}]}]})";

  auto o = test::run_attnbench("run " + suite + " --cpu-path nosuch --out " + out);
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("--cpu-path: 'nosuch' is not a CPU path"));
  CHECK(std::count(o.text.begin(), o.text.end(), '\n') == 1);
  CHECK_FALSE(fs::exists(out));

  ::setenv("ATTNBENCH_CPU_PATH", "nosuch", 1);
  o = test::run_attnbench("run " + suite + " --out " + out);
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("ATTNBENCH_CPU_PATH: 'nosuch'"));
  o = test::run_attnbench("verify sdpa " + (dir / "missing.safetensors").string() + " --cpu-path nosuch");
  CHECK(o.code == 2);
  ::unsetenv("ATTNBENCH_CPU_PATH");

  // A forced path is recorded: in the context and in every CPU record.
  const std::string lowest = cpu::cpu_paths_available().back();
  o = test::run_attnbench("run " + suite + " --cpu-path " + lowest + " --out " + out);
  INFO(o.text);
  REQUIRE(o.code == 0);
  const auto doc = load_results(out);
  CHECK(doc["context"]["cpu_path_limit"] == lowest);
  CHECK(doc["context"]["cpu_paths"].size() == cpu::cpu_paths_available().size());
  for (const auto& r : doc["records"]) {
    INFO(r.dump());
    CHECK(r["status"] == "ok");
    CHECK(r["bench"]["kernel_path"] == lowest);
  }
  fs::remove_all(dir);
}

namespace {
const Variant& sdpa_v() { return find_variant("sdpa", "cpu_path_test"); }

/// `pass` of sdpa cpu in bf16 through the runner (the correctness rule against
/// the f64 reference at the f32 bound); returns the path it ran on.
std::string sdpa_bf16_passes(const Params& given, Pass pass = Pass::fwd) {
  const Params p = sdpa_v().complete(given, "cpu_path_test");
  RunOptions o;
  o.check_seeds = 2;
  o.bench_settings.min_time_s = 0.001;
  o.bench_settings.repetitions = 1;
  o.bench_settings.memory = false;
  const auto rec = run_case(CaseSpec{&sdpa_v(), "cpu", DType::bf16, p, pass}, o);
  INFO(cpu::cpu_path_limit() << " " << p.dump() << ": " << rec.dump());
  REQUIRE(rec["status"] == "ok");
  REQUIRE(rec["checks"].size() >= 1);
  for (const auto& [name, r] : rec["checks"].items()) CHECK(r["passed"].get<bool>());
  return rec["bench"]["kernel_path"].get<std::string>();
}
}  // namespace

TEST_CASE("cpu paths: sdpa bf16 forward on every path the machine has", "[cpu-path][sdpa]") {
  const LimitGuard guard;
  bool any = false;
  for (const char* path : {"amx-bf16", "avx512bf16", "avx512-f32"}) {
    if (!has_path(path)) {
      WARN("sdpa bf16 on " << path << " skipped: this machine lacks it");
      continue;
    }
    any = true;
    cpu::set_cpu_path_limit(path);
    // Odd shapes (D not a multiple of 16 or 32, N not of the tile), causal with
    // Nq != Nkv, GQA, decode, padding: the bf16 paths serve all of them.
    CHECK(sdpa_bf16_passes({{"B", 2}, {"H", 6}, {"Hkv", 2}, {"N", 77}, {"D", 48}}) == path);
    CHECK(sdpa_bf16_passes({{"H", 2}, {"Nq", 37}, {"Nkv", 300}, {"D", 64}, {"causal", true}}) == path);
    CHECK(sdpa_bf16_passes({{"H", 2}, {"Nq", 300}, {"Nkv", 37}, {"D", 128}, {"causal", true}}) == path);
    CHECK(sdpa_bf16_passes({{"H", 4}, {"Hkv", 1}, {"Nq", 1}, {"Nkv", 513}, {"D", 40}}) == path);
    CHECK(sdpa_bf16_passes({{"B", 4}, {"H", 2}, {"Hkv", 1}, {"N", 65}, {"D", 18}, {"padding", true}}) == path);
    // A forward that feeds a backward (it saves the lse) takes the f32 path whatever the limit.
    CHECK(sdpa_bf16_passes({{"H", 2}, {"N", 77}, {"D", 48}}, Pass::fwd_bwd) == cpu::f32_kernel_path());
    // RoPE and weights take the f32 path whatever the limit.
    CHECK(sdpa_bf16_passes({{"H", 2}, {"N", 70}, {"D", 32}, {"rope", "half"}, {"causal", true}}) == cpu::f32_kernel_path());
    CHECK(sdpa_bf16_passes({{"H", 2}, {"N", 40}, {"D", 16}, {"need_weights", true}}) == cpu::f32_kernel_path());
  }
  if (!any) WARN("no AVX-512 path here: the bf16 forward ran its f32 path only (tested by sdpa_test)");
}
