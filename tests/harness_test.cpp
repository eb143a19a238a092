// Tests of the harness pieces that do not depend on any variant.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "harness/bench.hpp"
#include "harness/check.hpp"
#include "harness/errors.hpp"
#include "harness/results.hpp"
#include "harness/rng.hpp"
#include "harness/safetensors.hpp"
#include "harness/suite.hpp"
#include "harness/workspace.hpp"

using namespace attnbench;
namespace fs = std::filesystem;

namespace {
fs::path temp_dir() {
  fs::path d = fs::temp_directory_path() / ("attnbench_test_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f << bytes;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("bf16 and f16 conversions round to nearest even", "[dtype]") {
  CHECK(to_float(to_bf16(1.0f)) == 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7 in bf16: ties to even → 1.
  CHECK(to_float(to_bf16(1.0f + 0x1.0p-8f)) == 1.0f);
  CHECK(to_float(to_bf16(1.0f + 0x1.8p-8f)) == 1.0f + 0x1.0p-7f);
  CHECK(std::isnan(to_float(to_bf16(NAN))));
  CHECK(to_float(to_f16(1.0f)) == 1.0f);
  CHECK(to_float(to_f16(65504.0f)) == 65504.0f);
  CHECK(std::isinf(to_float(to_f16(70000.0f))));
  CHECK(to_float(to_f16(1.0f + 0x1.0p-11f)) == 1.0f);            // tie → even
  CHECK(to_float(to_f16(0x1.0p-24f)) == 0x1.0p-24f);             // smallest subnormal
  CHECK(to_float(to_f16(-2.5f)) == -2.5f);
  // Every f16 bit pattern survives a round trip through float.
  for (uint32_t b = 0; b < 0x7c00; ++b) REQUIRE(to_f16(to_float(f16_t{uint16_t(b)})).bits == b);
}

TEST_CASE("tensor conversion, NaN fill and hash", "[tensor]") {
  Tensor t(DType::f64, {2, 3});
  for (int i = 0; i < 6; ++i) t.set(i, 0.1 * i);
  Tensor b = t.to(DType::bf16);
  CHECK(b.dtype() == DType::bf16);
  CHECK(b.get(3) == Approx(0.3).epsilon(1e-2));
  const uint64_t h = t.hash();
  t.set(5, 0.7);
  CHECK(t.hash() != h);
  t.fill_nan();
  CHECK(std::isnan(t.get(0)));
  CHECK(shape_str(t.shape()) == "[2, 3]");
}

TEST_CASE("per-tensor RNG streams do not depend on draw order", "[rng]") {
  Rng a(7, "case", "q"), b(7, "case", "k");
  const double qa = a.normal();
  Rng b2(7, "case", "k"), a2(7, "case", "q");
  b2.normal();
  CHECK(a2.normal() == qa);
  CHECK(Rng(7, "case", "q").next_u64() != Rng(8, "case", "q").next_u64());
  // Normal samples have the right moments.
  Rng r(1);
  double s = 0, s2 = 0;
  for (int i = 0; i < 100000; ++i) {
    double x = r.normal();
    s += x, s2 += x * x;
  }
  CHECK(std::abs(s / 1e5) < 0.02);
  CHECK(std::abs(s2 / 1e5 - 1) < 0.02);
}

TEST_CASE("workspace records the peak", "[workspace]") {
  Workspace ws;
  ws.alloc<float>(1000);
  ws.alloc<float>(24);
  CHECK(ws.peak_bytes() == 4032 + 128);  // each block rounded up to 64 bytes
  ws.release();
  CHECK(ws.current_bytes() == 0);
  CHECK(ws.peak_bytes() == 4032 + 128);
#if !ATTNBENCH_ASAN
  auto before = AllocCounter::snapshot();
  auto* v = new std::vector<int>(1000);
  CHECK(AllocCounter::snapshot().allocs > before.allocs);
  CHECK(AllocCounter::snapshot().bytes_in_use >= before.bytes_in_use + 4000);
  delete v;
#endif
}

TEST_CASE("the correctness rule", "[check]") {
  Tensor oracle(DType::f64, {4}), naive(DType::f64, {4}), impl(DType::f64, {4});
  for (int i = 0; i < 4; ++i) oracle.set(i, i + 1.0), naive.set(i, i + 1.0), impl.set(i, i + 1.0);
  naive.set(2, 3.0 + 1e-3);  // naive_T error 1e-3 → bound 2e-3 + floor
  impl.set(1, 2.0 + 1.9e-3);
  CHECK(check_equivalence(impl, oracle, naive, DType::bf16, 0).passed);
  impl.set(1, 2.0 + 2.1e-3);
  auto r = check_equivalence(impl, oracle, naive, DType::bf16, 0);
  CHECK_FALSE(r.passed);
  CHECK(r.max_abs == Approx(2.1e-3));
  CHECK(r.detail.find("[1]") != std::string::npos);
  impl.set(1, NAN);
  CHECK_FALSE(check_equivalence(impl, oracle, naive, DType::f32).passed);
  // worst_of keeps the failing result and fails overall.
  CheckResult ok, bad;
  bad.passed = false, bad.max_abs = 1, bad.bound = 0.5;
  ok.max_abs = 0.1, ok.bound = 1;
  CHECK_FALSE(worst_of({ok, bad}).passed);
  CHECK(worst_of({ok, bad}).max_abs == 1);
}

TEST_CASE("the correctness rule never passes vacuously", "[check]") {
  Tensor oracle(DType::f64, {4}), impl(DType::f64, {4});
  for (int i = 0; i < 4; ++i) oracle.set(i, i + 1.0), impl.set(i, i + 1.0);
  REQUIRE(check_equivalence(impl, oracle, oracle, DType::f32).passed);
  SECTION("a NaN oracle does not compare equal to anything") {
    Tensor o = oracle, g = impl;
    o.set(2, NAN);
    g.set(2, NAN);
    auto r = check_equivalence(g, o, o, DType::f32);
    CHECK_FALSE(r.passed);
    CHECK_THAT(r.detail, Catch::Contains("non-finite values in the oracle"));
    g.set(2, 12345.0);
    CHECK_FALSE(check_equivalence(g, o, o, DType::f32).passed);
    CHECK_FALSE(check_within(g, o, 1e300).passed);
  }
  SECTION("an infinite output equal to an infinite oracle fails") {
    Tensor o = oracle, g = impl;
    o.set(0, INFINITY);
    g.set(0, INFINITY);
    CHECK_FALSE(check_equivalence(g, o, o, DType::f32).passed);
    CHECK_FALSE(check_within(g, o, 1.0).passed);
  }
  SECTION("all NaN") {
    Tensor o = oracle, g = impl;
    o.fill_nan();
    g.fill_nan();
    auto r = check_equivalence(g, o, o, DType::f32);
    CHECK_FALSE(r.passed);
    CHECK_THAT(r.detail, Catch::Contains("4 non-finite values in the output"));
  }
  SECTION("a non-finite naive_T does not make the bound infinite") {
    Tensor naive = oracle, g = impl;
    naive.set(1, NAN);
    g.set(1, 2.5);
    CHECK_FALSE(check_equivalence(g, oracle, naive, DType::f32).passed);
  }
  SECTION("a check of 0 elements fails") {
    Tensor e(DType::f64, {0, 3});
    auto r = check_equivalence(e, e, e, DType::f32);
    CHECK_FALSE(r.passed);
    CHECK_THAT(r.detail, Catch::Contains("nothing compared"));
    CHECK_FALSE(check_within(e, e, 1.0).passed);
  }
  SECTION("failure lines show the digits that differ") {
    Tensor g = impl;
    g.set(3, 4.0 + 4e-12);
    auto r = check_equivalence(g, oracle, oracle, DType::f64, 1);
    CHECK_FALSE(r.passed);
    CHECK_THAT(r.detail, Catch::Contains("got 4.000000000004") && Catch::Contains("want 4"));
  }
}

TEST_CASE("Mann-Whitney U p-values", "[bench]") {
  // Completely separated samples of 5 and 5: p = 2 / C(10,5) = 2/252.
  CHECK(mann_whitney_p({1, 2, 3, 4, 5}, {6, 7, 8, 9, 10}) == Approx(2.0 / 252));
  CHECK(mann_whitney_p({1, 2, 3}, {1, 2, 3}) == Approx(1.0));
  CHECK(median({3, 1, 2, 10}) == 2.5);
}

TEST_CASE("safetensors round trip", "[safetensors]") {
  const auto dir = temp_dir();
  TensorMap m;
  Tensor a(DType::f32, {2, 3}), b(DType::bf16, {5}), c(DType::i32, {1}), e(DType::f64, {0});
  for (int i = 0; i < 6; ++i) a.set(i, i * 0.5);
  for (int i = 0; i < 5; ++i) b.set(i, -i);
  c.set(0, 42);
  m.emplace("a", a), m.emplace("b.weight", b), m.emplace("c", c), m.emplace("empty", e);
  write_safetensors((dir / "x.safetensors").string(), m, {{"params", "{\"N\":3}"}});
  auto f = read_safetensors((dir / "x.safetensors").string());
  REQUIRE(f.tensors.size() == 4);
  CHECK(f.metadata.at("params") == "{\"N\":3}");
  CHECK(f.tensors.at("a").hash() == a.hash());
  CHECK(f.tensors.at("b.weight").dtype() == DType::bf16);
  CHECK(f.tensors.at("b.weight").get(4) == -4);
  CHECK(f.tensors.at("c").get(0) == 42);
  const std::string bytes = read_file(dir / "x.safetensors");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | uint8_t(bytes[size_t(i)]);
  CHECK(header_len % 8 == 0);  // header padded to a multiple of 8 bytes
  CHECK(bytes.size() == 8 + header_len + 24 + 10 + 4);
  fs::remove_all(dir);
}

TEST_CASE("corrupt safetensors files are rejected with a clear error", "[safetensors]") {
  const auto dir = temp_dir();
  const auto path = dir / "bad.safetensors";
  auto with_header = [&](const std::string& header, size_t data_bytes) {
    std::string s(8, '\0');
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) s[size_t(i)] = char((n >> (8 * i)) & 0xff);
    write_file(path, s + header + std::string(data_bytes, '\0'));
    return error_of([&] { read_safetensors(path.string()); });
  };
  write_file(path, "abc");
  CHECK_THAT(error_of([&] { read_safetensors(path.string()); }), Catch::Contains("shorter than"));
  CHECK_THAT(with_header("{\"a\":", 0), Catch::Contains("header: invalid JSON"));
  CHECK_THAT(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4),
             Catch::Contains("runs past the data section"));
  CHECK_THAT(with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), Catch::Contains("needs 12 bytes"));
  CHECK_THAT(with_header(R"({"a":{"dtype":"X9","shape":[2],"data_offsets":[0,8]}})", 8), Catch::Contains("unsupported dtype"));
  CHECK_THAT(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
             Catch::Contains("overlaps"));
  CHECK_THAT(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), Catch::Contains("gap"));
  CHECK_THAT(with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), Catch::Contains("non-negative"));
  CHECK_THAT(with_header(R"({"__metadata__":{"k":1}})", 0), Catch::Contains("__metadata__.k"));
  // Header length past the end of the file.
  write_file(path, std::string("\xff\x00\x00\x00\x00\x00\x00\x00", 8) + "{}");
  CHECK_THAT(error_of([&] { read_safetensors(path.string()); }), Catch::Contains("past the end"));
  CHECK_THAT(error_of([&] { read_safetensors((dir / "missing.safetensors").string()); }), Catch::Contains("cannot open"));
  fs::remove_all(dir);
}

TEST_CASE("results files: atomic write, validation", "[results]") {
  const auto dir = temp_dir();
  nlohmann::json doc = {{"schema", kResultsSchema},
                        {"suite", {{"name", "t"}}},
                        {"context", {{"host", "h"}, {"cpu_model", "c"}, {"git_sha", "s"}, {"peak_gflops", 1.0}}},
                        {"records", nlohmann::json::array()}};
  const auto path = (dir / "r.json").string();
  write_json_atomic(path, doc);
  CHECK(load_results(path)["suite"]["name"] == "t");
  doc["records"].push_back({{"variant", "sdpa"}, {"impl", "cpu"}, {"dtype", "f32"}, {"status", "maybe"}, {"shape", {}}});
  write_json_atomic(path, doc);
  CHECK_THAT(error_of([&] { load_results(path); }), Catch::Contains("records[0].status"));
  write_file(path, "{\"schema\": 3}");
  CHECK_THAT(error_of([&] { load_results(path); }), Catch::Contains("schema"));
  write_file(path, "[1,");
  CHECK_THAT(error_of([&] { load_results(path); }), Catch::Contains("invalid JSON"));
  CHECK(summarize(nlohmann::json::array({{{"status", "ok"}}, {{"status", "skipped"}}}))["skipped"] == 1);
  fs::remove_all(dir);
}

TEST_CASE("suite validation names the file, path and expectation", "[suite]") {
  const auto dir = temp_dir();
  const auto path = (dir / "s.json").string();
  auto err = [&](const std::string& text) {
    write_file(path, text);
    return error_of([&] { load_suite(path, false); });
  };
  CHECK_THAT(err("{"), Catch::Contains(path + ": invalid JSON"));
  CHECK_THAT(err(R"({"name":"x","groups":[],"benchh":{}})"), Catch::Contains("benchh: unknown key (did you mean 'bench'?)"));
  CHECK_THAT(err(R"({"name":"x","groups":[]})"), Catch::Contains("groups: expected a non-empty array"));
  CHECK_THAT(err(R"({"groups":[{}]})"), Catch::Contains("name: missing"));
  CHECK_THAT(err(R"({"name":"x","seed":-1,"groups":[{}]})"), Catch::Contains("seed: expected an integer >= 0"));
  CHECK_THAT(err(R"({"name":"x","groups":[{"variant":"nope","impls":["cpu"],"dtypes":["f32"]}]})"),
             Catch::Contains("groups[0].variant: unknown variant 'nope'"));
  CHECK_THAT(err(R"({"name":"x","bench":{"repetitions":"5"},"groups":[{}]})"), Catch::Contains("bench.repetitions: expected an integer"));
  CHECK_THAT(error_of([&] { load_suite((dir / "none.json").string(), false); }), Catch::Contains("cannot open"));
  fs::remove_all(dir);
}

TEST_CASE("case filter expressions", "[suite]") {
  CHECK_THAT(error_of([] { CaseFilter("N"); }), Catch::Contains("not a condition"));
  CHECK_NOTHROW(CaseFilter("N<=1024,impl!=reference,causal=true"));
}
