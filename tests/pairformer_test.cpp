// The Pairformer block (composed from the registered operations): the weights reach the right
// operation (with every other operation's output projection zeroed the block is the identity plus
// that one operation, checked against the operation's own reference, in the reference and in the
// cpu composition); the cpu block against the composed reference through the runner at Boltz's
// dims; the per-operation breakdown every cpu record carries.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "tests/backward_support.hpp"
#include "tests/support.hpp"

using namespace attnbench;

namespace {

const Variant& block() { return find_variant("pairformer", "pairformer_test"); }

Params small(double mask) {
  return block().complete({{"N", 11},
                           {"c_s", 12},
                           {"c_z", 8},
                           {"c_hidden_mul", 5},
                           {"c_tri", 3},
                           {"H_tri", 2},
                           {"H_s", 3},
                           {"transition_n", 2},
                           {"mask_fraction", mask}},
                          "pairformer_test");
}

struct OpInfo {
  const char* prefix;
  const char* variant;
  std::vector<const char*> output_weights;  // zeroing these makes the operation's output 0
  Params params;                            // given the block's small(): the operation's own
};

std::vector<OpInfo> ops() {
  const Params t = {{"N", 11}, {"c_z", 8}, {"c", 3}, {"H", 2}};
  return {
      {"tri_mul_out",
       "trimul_af3",
       {"p_out.weight"},
       {{"N", 11}, {"c_z", 8}, {"c_hidden", 5}, {"direction", "outgoing"}}},
      {"tri_mul_in",
       "trimul_af3",
       {"p_out.weight"},
       {{"N", 11}, {"c_z", 8}, {"c_hidden", 5}, {"direction", "incoming"}}},
      {"tri_att_start", "triangle_attention", {"mha.linear_o.weight", "mha.linear_o.bias"}, t},
      {"tri_att_end",
       "triangle_attention",
       {"mha.linear_o.weight", "mha.linear_o.bias"},
       {{"N", 11}, {"c_z", 8}, {"c", 3}, {"H", 2}, {"starting", false}}},
      {"transition_z", "transition", {"fc3.weight"}, {{"N", 11}, {"c", 8}, {"hidden", 16}, {"track", "pair"}}},
      {"attention", "attention_pair_bias", {"proj_o.weight"}, {{"N", 11}, {"c_s", 12}, {"c_z", 8}, {"H", 3}}},
      {"transition_s", "transition", {"fc3.weight"}, {{"N", 11}, {"c", 12}, {"hidden", 24}, {"track", "single"}}},
  };
}

Tensor pair_mask(const Tensor& m) {
  const int64_t N = m.numel();
  Tensor pm(DType::f64, {N, N});
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) pm.set(i * N + j, m.get(i) * m.get(j));
  return pm;
}

/// The block's inputs with every operation's output projection zeroed except `keep`'s.
TensorMap only(const TensorMap& in, const std::string& keep) {
  TensorMap r = in;
  for (const auto& op : ops())
    if (op.prefix != keep)
      for (const char* w : op.output_weights) {
        Tensor& t = r.at(std::string(op.prefix) + "." + w);
        for (int64_t i = 0; i < t.numel(); ++i) t.set(i, 0.0);
      }
  return r;
}

/// What the block must give when only operation `op` contributes: its input plus its output,
/// from the operation's own variant and reference.
std::pair<Tensor, Tensor> expected(const OpInfo& op, const TensorMap& in) {
  const Variant& v = find_variant(op.variant, "pairformer_test");
  TensorMap sub;
  const std::string prefix = std::string(op.prefix) + ".";
  for (const auto& [name, t] : in)
    if (name.rfind(prefix, 0) == 0) sub.emplace(name.substr(prefix.size()), t);
  const std::string var = op.variant;
  const bool single = std::string(op.prefix) == "attention" || std::string(op.prefix) == "transition_s";
  if (var == "transition") sub.emplace("x", single ? in.at("s") : in.at("z"));
  if (var == "attention_pair_bias") {
    sub.emplace("s", in.at("s"));
    sub.emplace("z", in.at("z"));
    sub.emplace("mask", in.at("mask"));
  }
  if (var == "trimul_af3" || var == "triangle_attention") {
    sub.emplace("z", in.at("z"));
    sub.emplace("mask", pair_mask(in.at("mask")));
  }
  const Tensor out = v.reference(v.complete(op.params, "pairformer_test"), sub, DType::f64).at("output");
  Tensor s = in.at("s"), z = in.at("z");
  Tensor& track = single ? s : z;
  for (int64_t i = 0; i < track.numel(); ++i) track.set(i, track.get(i) + out.get(i));
  return {s, z};
}

}  // namespace

TEST_CASE("pairformer routes each operation's weights and masks: the block with one operation left is that operation",
          "[pairformer]") {
  const Params p = small(0.3);
  const TensorMap in = block().make_inputs(p, 4, "routing");
  // Every output projection zeroed: the identity.
  TensorMap none = only(in, "");
  const TensorMap id = block().reference(p, none, DType::f64);
  CHECK(test::max_abs_diff(id.at("s_out"), in.at("s")) == 0.0);
  CHECK(test::max_abs_diff(id.at("z_out"), in.at("z")) == 0.0);
  for (const OpInfo& op : ops()) {
    INFO(op.prefix);
    const TensorMap one = only(in, op.prefix);
    const auto [s, z] = expected(op, one);
    const TensorMap got = block().reference(p, one, DType::f64);
    CHECK(test::max_abs_diff(got.at("s_out"), s) < 1e-13);
    CHECK(test::max_abs_diff(got.at("z_out"), z) < 1e-13);
    // Not vacuous: the operation changed its track.
    const bool single = std::string(op.prefix) == "attention" || std::string(op.prefix) == "transition_s";
    CHECK(test::max_abs_diff(single ? got.at("s_out") : got.at("z_out"), single ? in.at("s") : in.at("z")) > 1e-3);
    // The cpu composition on the same inputs (f32; the other operations contribute exactly 0).
    const TensorMap cpu =
        test::run_pass(block(), "cpu", p, DType::f32, block().cast_inputs(p, one, DType::f32), Pass::fwd);
    CHECK(test::max_abs_diff(cpu.at("s_out"), s) < 1e-4);
    CHECK(test::max_abs_diff(cpu.at("z_out"), z) < 1e-4);
  }
}

TEST_CASE("pairformer cpu holds the rule against the composed reference at Boltz's dims, every dtype, masks",
          "[pairformer]") {
  for (double mask : {0.0, 0.25, 1.0})
    for (DType d : {DType::f32, DType::bf16, DType::f16}) {
      RunOptions o;
      o.bench = false;
      o.check_seeds = 1;
      const Params p = block().complete({{"N", 13}, {"mask_fraction", mask}}, "pairformer_test");
      const auto rec = run_case(CaseSpec{&block(), "cpu", d, p, Pass::fwd}, o);
      INFO(dtype_name(d) << " mask " << mask << ": " << rec.dump());
      REQUIRE(rec["status"] == "ok");
      REQUIRE(rec["checks"].size() == 2);
      for (const auto& [name, r] : rec["checks"].items()) CHECK(r["passed"].get<bool>());
    }
}

TEST_CASE("pairformer cpu records a per-operation breakdown in execution order", "[pairformer]") {
  RunOptions o;
  o.check = false;
  o.bench_settings.min_time_s = 0.01;
  o.bench_settings.repetitions = 2;
  const auto rec = run_case(CaseSpec{&block(), "cpu", DType::f32, small(0.0), Pass::fwd}, o);
  REQUIRE(rec["status"] == "ok");
  const auto& rows = rec["bench"]["breakdown"];
  REQUIRE(rows.is_array());
  const std::vector<std::string> order = {"tri_mul_out",  "tri_mul_in", "tri_att_start", "tri_att_end",
                                          "transition_z", "attention",  "transition_s"};
  REQUIRE(rows.size() == order.size());
  double bytes = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    CHECK(rows[k]["op"] == order[k]);
    CHECK(rows[k]["s"].get<double>() > 0.0);
    bytes += rows[k]["bytes"].get<double>();
  }
  CHECK(bytes > 0.0);
  CHECK(bytes <= rec["bench"]["peak_bytes"].get<double>());
}
