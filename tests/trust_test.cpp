// The gate cannot pass vacuously (GitHub issue 10): unknown names are errors,
// nothing run is a failure, non-finite values fail wherever they appear, case
// files are checked against their tensors before any kernel reads them, and
// OpenFold dumps are checked in OpenFold's own mask arithmetic.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "harness/safetensors.hpp"
#include "harness/variant.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;
using namespace attnbench;
using attnbench::test::run_attnbench;

namespace {

using attnbench::test::temp_dir;

const Params kIpa = {{"N", 9}, {"c_s", 8}, {"c_z", 4}, {"c", 4}, {"H", 2}, {"P", 2}, {"P_v", 2}};
const Params kTri = {{"N", 7}, {"c_z", 13}, {"c", 5}, {"H", 3}};

/// A case file of `variant` at `given` params: inputs, weights and the f64
/// reference outputs, `edit` applied before writing.
void write_case(const fs::path& path, const std::string& variant, const Params& given,
                const std::function<void(TensorMap&)>& edit = {}, std::map<std::string, std::string> meta = {}) {
  const Variant& v = find_variant(variant, "test");
  const Params p = v.complete(given, "test");
  TensorMap t = v.make_inputs(p, 7, "trust");
  for (auto& [name, o] : v.reference(p, t, DType::f64)) t.emplace(name, std::move(o));
  if (edit) edit(t);
  write_safetensors(path.string(), t, meta);
}

std::string with_params(const Params& p) { return p.dump(); }

const std::string kShared = std::string(ATTNBENCH_SHARED_DIR) + "/cases/";

}  // namespace

TEST_CASE("verify: an unknown --impl or --dtype is bad input, nothing run is a failure", "[trust][cli]") {
  const auto dir = temp_dir("trust_names");
  const auto file = (dir / "ipa.safetensors").string();
  write_case(file, "ipa", kIpa, {}, {{"params", with_params(kIpa)}, {"producer", "attnbench test"}});
  auto o = run_attnbench("verify ipa " + file + " --impl cpu");
  INFO(o.text);
  CHECK(o.code == 0);
  // bf16 inputs, f32 arithmetic and output: the f32 rule (DESIGN §3).
  o = run_attnbench("verify ipa " + file + " --impl cpu --dtype bf16");
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("cpu (bf16, held to the f32 rule)"));
  o = run_attnbench("verify ipa " + file + " --impl cpu --dtype f16");
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("cpu (f16, held to the f32 rule)"));

  o = run_attnbench("verify ipa " + file + " --impl bogus");
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("no implementation 'bogus'"));
  o = run_attnbench("verify ipa " + file + " --impl gpu");
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("did you mean 'cpu'"));
  o = run_attnbench("verify ipa " + file + " --dtype f17");
  CHECK(o.code == 2);

  o = run_attnbench("verify ipa " + file + " --impl cpu --dtype f64");
  INFO(o.text);
  CHECK(o.code == 1);
  CHECK_THAT(o.text, Catch::Contains("no implementation was checked"));
  CHECK_THAT(o.text, !Catch::Contains("all checks passed"));
  if (!cuda_usable()) {
    o = run_attnbench("verify ipa " + file + " --impl cuda");
    CHECK(o.code == 1);
    CHECK_THAT(o.text, Catch::Contains("no implementation was checked"));
  }
  fs::remove_all(dir);
}

TEST_CASE("run: no case selected, or only skipped ones, is not a pass, and typos are bad input", "[trust][cli]") {
  const auto dir = temp_dir("trust_run");
  const auto suite = (dir / "s.json").string();
  std::ofstream(suite) << R"({"name":"t","checks":{"seeds":1},"bench":{"min_time_s":0.001,"repetitions":1},
    "groups":[{"variant":"sdpa","impls":["cpu","cuda"],"dtypes":["f32"],"cases":[{"N":5,"D":8,"H":1}]}]})";
  const std::string base = "run " + suite + " --no-bench --out " + (dir / "r.json").string();
  auto o = run_attnbench(base + " --impl cpu");
  INFO(o.text);
  CHECK(o.code == 0);

  o = run_attnbench(base + " --impl bogus");
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("'bogus'"));
  o = run_attnbench(base + " --impl cpuu");
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("did you mean 'cpu'"));
  o = run_attnbench(base + " --filter 'NN<=5'");
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("did you mean 'N'"));
  o = run_attnbench(base + " --impl cpu --filter 'pass=fwd,dtype=f32,impl=cpu,variant=sdpa'");
  CHECK(o.code == 0);  // every key the filter matches on is accepted by its key check
  o = run_attnbench(base + " --filter 'pass=bwd'");
  CHECK(o.code == 1);  // the suite has no backward group
  CHECK_THAT(o.text, Catch::Contains("no case selected"));
  o = run_attnbench("run " + std::string(ATTNBENCH_SOURCE_DIR) + "/suites/gpt-quick.json --out " + (dir / "g.json").string());
  CHECK(o.code == 2);  // a training suite names the command that runs it
  CHECK_THAT(o.text, Catch::Contains("attnbench train"));
  o = run_attnbench(base + " --filter 'N<abc'");
  CHECK(o.code == 2);
  CHECK_THAT(o.text, Catch::Contains("needs a number"));

  o = run_attnbench(base + " --filter 'N>1000'");
  CHECK(o.code == 1);
  CHECK_THAT(o.text, Catch::Contains("no case selected"));
  {  // checks skipped for their cost and no benchmark: the case ran nothing, so it is skipped, not ok
    const auto costly = (dir / "costly.json").string();
    std::ofstream(costly) << R"({"name":"t","checks":{"seeds":1,"max_oracle_gflop":1e-9},
      "groups":[{"variant":"sdpa","impls":["cpu"],"dtypes":["f32"],"cases":[{"N":5,"D":8,"H":1}]}]})";
    o = run_attnbench("run " + costly + " --no-bench --out " + (dir / "c.json").string());
    CHECK(o.code == 1);
    CHECK_THAT(o.text, Catch::Contains("every selected case was skipped"));
  }
  o = run_attnbench(base + " --dtype bf16");
  CHECK(o.code == 1);
  if (!cuda_usable()) {
    o = run_attnbench(base + " --impl cuda");
    CHECK(o.code == 1);
    CHECK_THAT(o.text, Catch::Contains("every selected case was skipped"));
  }
  fs::remove_all(dir);
}

TEST_CASE("verify: non-finite inputs fail, with garbage outputs too", "[trust][cli][nonfinite]") {
  const auto dir = temp_dir("trust_nan");
  const auto file = (dir / "ipa.safetensors").string();
  const std::map<std::string, std::string> meta = {{"params", with_params(kIpa)}, {"producer", "attnbench test"}};
  auto garbage = [](TensorMap& t) {
    Tensor& out = t.at("output");
    for (int64_t i = 0; i < out.numel(); ++i) out.set(i, 12345.0);
  };
  SECTION("one NaN") {
    write_case(file, "ipa", kIpa, [&](TensorMap& t) { t.at("s").set(3, NAN), garbage(t); }, meta);
  }
  SECTION("one infinity") {
    write_case(file, "ipa", kIpa, [&](TensorMap& t) { t.at("z").set(5, INFINITY), garbage(t); }, meta);
  }
  SECTION("all NaN") {
    write_case(file, "ipa", kIpa, [&](TensorMap& t) { t.at("s").fill_nan(), t.at("output").fill_nan(); }, meta);
  }
  SECTION("a NaN weight, the stored output correct for the finite weight") {
    write_case(file, "ipa", kIpa, [&](TensorMap& t) { t.at("linear_q.weight").set(0, NAN); }, meta);
  }
  auto o = run_attnbench("verify ipa " + file);
  INFO(o.text);
  CHECK(o.code == 1);
  CHECK_THAT(o.text, Catch::Contains("non-finite inputs"));
  CHECK_THAT(o.text, Catch::Contains("verify: FAILED"));
  CHECK_THAT(o.text, !Catch::Contains("PASS  max_abs 0.000e+00"));
  fs::remove_all(dir);
}

TEST_CASE("verify: the OpenFold triangle file with one NaN in layer_norm.weight fails", "[trust][cli][nonfinite]") {
  const std::string path = kShared + "openfold_triangle_start_N17.safetensors";
  if (!fs::exists(path)) {
    WARN("skipped: " << path << " not found");
    return;
  }
  const auto dir = temp_dir("trust_nan_openfold");
  SafetensorsFile f = read_safetensors(path);
  REQUIRE(run_attnbench("verify triangle_attention " + path + " --impl cpu").code == 0);
  f.tensors.at("layer_norm.weight").set(0, NAN);
  const auto file = (dir / "t.safetensors").string();
  write_safetensors(file, f.tensors, f.metadata);
  auto o = run_attnbench("verify triangle_attention " + file + " --impl cpu");
  INFO(o.text);
  CHECK(o.code == 1);
  CHECK_THAT(o.text, Catch::Contains("non-finite inputs: 'layer_norm.weight' (1 of 128)"));
  fs::remove_all(dir);
}

TEST_CASE("verify: tensors are checked against the params before any kernel runs", "[trust][cli][tensors]") {
  const auto dir = temp_dir("trust_tensors");
  const auto file = (dir / "c.safetensors").string();
  const Params sdpa = {{"B", 2}, {"H", 2}, {"N", 16}, {"D", 8}};
  auto meta_with = [](Params p) { return std::map<std::string, std::string>{{"params", p.dump()}}; };
  auto expect_error = [&](const std::string& contains) {
    auto o = run_attnbench("verify sdpa " + file);
    INFO(o.text);
    CHECK(o.code == 2);
    CHECK_THAT(o.text, Catch::Contains(file) && Catch::Contains(contains));
    CHECK(std::count(o.text.begin(), o.text.end(), '\n') == 1);
  };
  SECTION("a huge Nkv") {
    Params big = sdpa;
    big["Nkv"] = 4096;
    write_case(file, "sdpa", sdpa, {}, meta_with(big));
    expect_error("tensor 'k': expected shape [2, 2, 4096, 8]");
  }
  SECTION("q smaller than B·H·N·D") {
    write_case(file, "sdpa", sdpa, [](TensorMap& t) { t.at("q") = Tensor(DType::f64, {2, 2, 16, 7}); },
               meta_with(sdpa));
    expect_error("tensor 'q': expected shape [2, 2, 16, 8]");
    // Fewer rows: Nq is read from q, and the stored output no longer fits.
    write_case(file, "sdpa", sdpa, [](TensorMap& t) { t.at("q") = Tensor(DType::f64, {2, 2, 15, 8}); },
               meta_with(sdpa));
    expect_error("tensor 'o': expected shape [2, 2, 15, 8]");
  }
  SECTION("a bool q") {
    write_case(file, "sdpa", sdpa, [](TensorMap& t) { t.at("q") = Tensor(DType::boolean, {2, 2, 16, 8}); },
               meta_with(sdpa));
    expect_error("tensor 'q': expected a floating dtype");
  }
  SECTION("a missing tensor") {
    write_case(file, "sdpa", sdpa, [](TensorMap& t) { t.erase("v"); }, meta_with(sdpa));
    expect_error("tensor 'v': missing");
  }
  SECTION("kv_len outside [0, Nkv]") {
    for (int32_t bad : {17, -1}) {
      write_case(file, "sdpa", sdpa, [&](TensorMap& t) { t.at("kv_len").data<int32_t>()[1] = bad; }, meta_with(sdpa));
      expect_error("tensor 'kv_len': [1]");
    }
  }
  fs::remove_all(dir);
}

TEST_CASE("verify: triangle ending node from partial params or --shape", "[trust][cli][triangle]") {
  const auto dir = temp_dir("trust_ending");
  const auto file = (dir / "t.safetensors").string();
  Params ending = kTri;
  ending["starting"] = false;
  ending["mask_fraction"] = 0.25;
  SECTION("partial __metadata__.params") {
    write_case(file, "triangle_attention", ending, {}, {{"params", R"({"starting": false})"}});
    auto o = run_attnbench("verify triangle_attention " + file + " --impl cpu");
    INFO(o.text);
    CHECK(o.code == 0);
    CHECK_THAT(o.text, Catch::Contains(R"("starting":false)"));
  }
  SECTION("--shape starting=false") {
    write_case(file, "triangle_attention", ending);
    auto o = run_attnbench("verify triangle_attention " + file + " --impl cpu --shape starting=false");
    INFO(o.text);
    CHECK(o.code == 0);
    // Without it the file is read as a starting node and its stored output disagrees.
    CHECK(run_attnbench("verify triangle_attention " + file + " --impl cpu").code == 1);
  }
  fs::remove_all(dir);
}

namespace {

/// A copy of the shared OpenFold file with `masked` entries of its mask set to 0
/// and its output recomputed the way OpenFold computes it (the additive mask):
/// what OpenFold itself would have dumped.
void masked_openfold_copy(const std::string& variant, const std::string& from, const fs::path& to,
                          const std::vector<int64_t>& masked, double* exact_vs_file) {
  const Variant& v = find_variant(variant, "test");
  SafetensorsFile f = read_safetensors(from);
  TensorMap in = test::to_f64(f.tensors);
  in.erase("output");
  for (int64_t i : masked) in.at("mask").set(i, 0.0);
  const Params p = v.complete(v.params_from_tensors(in), "test");
  const Tensor openfold = v.file_reference(p, in).at("output");
  *exact_vs_file = test::max_abs_diff(openfold, v.reference(p, in, DType::f64).at("output")) / test::max_abs(openfold);
  f.tensors.at("mask") = in.at("mask").to(f.tensors.at("mask").dtype());
  f.tensors.at("output") = openfold.to(f.tensors.at("output").dtype());
  write_safetensors(to.string(), f.tensors, f.metadata);
}

}  // namespace

TEST_CASE("verify: masked OpenFold f64 dumps are checked in OpenFold's mask arithmetic", "[trust][cli][openfold]") {
  const auto dir = temp_dir("trust_openfold_mask");
  const auto file = dir / "c.safetensors";
  double rel = 0;
  SECTION("IPA, masked residues") {
    const std::string path = kShared + "openfold_ipa_N23.safetensors";
    if (!fs::exists(path)) return;
    masked_openfold_copy("ipa", path, file, {2, 5, 6, 20}, &rel);
    auto o = run_attnbench("verify ipa " + file.string() + " --impl cpu");
    INFO(o.text << "exact vs OpenFold's arithmetic, relative: " << rel);
    CHECK(o.code == 0);
    CHECK(rel > 1024 * 0x1p-52);  // the offset does not cancel: the exact reference alone would fail
  }
  SECTION("triangle, fully masked rows") {
    const std::string path = kShared + "openfold_triangle_start_N17.safetensors";
    if (!fs::exists(path)) return;
    std::vector<int64_t> row3;
    for (int64_t k = 0; k < 17; ++k) row3.push_back(3 * 17 + k);
    row3.push_back(5 * 17 + 2);
    masked_openfold_copy("triangle_attention", path, file, row3, &rel);
    auto o = run_attnbench("verify triangle_attention " + file.string() + " --impl cpu");
    INFO(o.text << "exact vs OpenFold's arithmetic, relative: " << rel);
    CHECK(o.code == 0);
    CHECK(rel > 1024 * 0x1p-52);
  }
  fs::remove_all(dir);
}

TEST_CASE("DAG case files carry their DAG, and N comes from it", "[trust][cli][dag]") {
  const auto dir = temp_dir("trust_dag");
  const auto dag = dir / "g.json";
  std::ofstream(dag) << R"({"nodes": [{"id": "a", "length": 5}, {"id": "b", "length": 6, "parents": ["a"]},
                                    {"id": "c", "length": 4, "parents": ["a"], "end_pos_id": 20}]})";
  const auto file = (dir / "c.safetensors").string();
  // No N: the DAG's 15 tokens.
  auto o = run_attnbench("export masked --shape H=2,D=16,mask=dag,dag=" + dag.string() + ",tile_q=4,tile_k=8 --out " + file);
  INFO(o.text);
  REQUIRE(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains(R"("N":15)"));
  fs::remove(dag);  // the case file must not need it
  o = run_attnbench("verify masked " + file + " --impl cpu");
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("all checks passed"));
  const Variant& v = find_variant("masked", "test");
  CHECK(v.complete({{"mask", "dag_ancestors"}, {"dag", "chain:3:5"}}, "t")["N"] == 15);
  CHECK_THROWS_WITH(v.complete({{"mask", "dag"}, {"dag", "chain:3:5"}, {"N", 14}}, "t"), Catch::Contains("15 tokens"));
  fs::remove_all(dir);
}
