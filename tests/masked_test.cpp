// Masked attention: every mask functor against its dense definition, block-map
// classification against the dense mask (odd sizes, tiles larger than N, N not
// a multiple of the tile), DAG semantics and DAG file errors, empty rows,
// block-sparse = dense execution, parameter errors. The numerical equivalence
// of every implementation with the reference on odd shapes and all dtypes is
// the registry-driven tests/equivalence_test.cpp (the variant's test_shapes).
#include <catch2/catch.hpp>
#include <omp.h>

#include <filesystem>
#include <fstream>

#include "harness/dag.hpp"
#include "harness/errors.hpp"
#include "harness/masks.hpp"
#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "impls/block_map.hpp"
#include "impls/cuda/masked_math.hpp"
#include "reference/masked.hpp"
#include "tests/backward_support.hpp"
#include "tests/support.hpp"

using namespace attnbench;
using namespace attnbench::test;

namespace {

const Variant& masked_variant() { return find_variant("masked", "masked_test"); }

Params params(const Params& given) { return masked_variant().complete(given, "masked_test"); }

/// Checks the functor and the block map of case `given` against the dense mask.
void check_against_dense(const Params& given) {
  const Params p = params(given);
  INFO(p.dump());
  const MaskedCase c = masked_case(p);
  const TensorMap in = masked_variant().make_inputs_as(p, 0, "k", DType::f32);
  std::vector<float> logits;
  if (c.mask == "maskattn") {
    const Tensor& t = require(in, "mask_logits", "test");
    logits.assign(t.data<float>(), t.data<float>() + t.numel());
  }
  const MaskStorage s = make_mask(c, logits.empty() ? nullptr : logits.data());
  const ref::MaskDefinition def = mask_definition(c, in);
  const mask::BlockMap map = mask::build_block_map(s.data, c.B, c.tile_q, c.tile_k);
  double allowed_pairs = 0;
  for (int64_t b = 0; b < map.batches; ++b) {
    const std::vector<bool> dense = ref::dense_mask(def, b);
    int64_t predicate_mismatches = 0;
    mask::visit_mask(s.data, [&](const auto& m) {
      for (int64_t i = 0; i < c.Nq; ++i)
        for (int64_t j = 0; j < c.Nkv; ++j) predicate_mismatches += m(b, i, j) != dense[size_t(i * c.Nkv + j)];
    });
    CHECK(predicate_mismatches == 0);
    for (int64_t qt = 0; qt < map.n_qt; ++qt)
      for (int64_t kt = 0; kt < map.n_kt; ++kt) {
        int64_t n = 0, total = 0;
        for (int64_t i = qt * c.tile_q; i < std::min(c.Nq, (qt + 1) * c.tile_q); ++i)
          for (int64_t j = kt * c.tile_k; j < std::min(c.Nkv, (kt + 1) * c.tile_k); ++j, ++total)
            n += dense[size_t(i * c.Nkv + j)];
        allowed_pairs += double(n);
        const mask::Tile want = n == 0 ? mask::Tile::empty : n == total ? mask::Tile::full : mask::Tile::partial;
        INFO("b " << b << " tile (" << qt << ", " << kt << ")");
        CHECK(int(map.at(b, qt, kt)) == int(want));
      }
  }
  CHECK(map.allowed_pairs == allowed_pairs);
  // The compacted lists name exactly the non-empty tiles, ascending.
  for (int64_t bq = 0; bq < map.batches * map.n_qt; ++bq) {
    int32_t n = 0;
    for (int64_t kt = 0; kt < map.n_kt; ++kt)
      if (mask::Tile(map.tiles[size_t(bq * map.n_kt + kt)]) != mask::Tile::empty)
        CHECK(map.kv_index[size_t(bq * map.n_kt + n++)] == kt);
    CHECK(map.kv_count[size_t(bq)] == n);
  }
}

}  // namespace

TEST_CASE("every mask and its block map equal the dense definition", "[masked]") {
  for (const Params& shape : masked_variant().test_shapes()) check_against_dense(shape);
  // Odd sizes and tiles: tiles larger than N, N not a multiple of the tile, single-token tiles.
  for (int64_t tile : {1, 5, 64, 300}) {
    const Params t = {{"tile_q", tile}, {"tile_k", tile == 5 ? 7 : tile}};
    auto with = [&](Params p) {
      p.update(t);
      return p;
    };
    check_against_dense(with({{"N", 61}, {"mask", "window"}, {"window", 7}}));
    check_against_dense(with({{"N", 61}, {"mask", "window"}, {"window", 200}}));
    check_against_dense(with({{"N", 61}, {"mask", "wrapped_window"}, {"window", 12}}));
    check_against_dense(with({{"N", 61}, {"mask", "wrapped_window"}, {"window", 61}}));
    check_against_dense(with({{"N", 61}, {"mask", "sliding_window"}, {"window", 1}}));
    check_against_dense(with({{"N", 61}, {"mask", "sliding_window"}, {"window", 9}}));
    check_against_dense(with({{"N", 61}, {"mask", "sliding_window"}, {"window", 200}}));
    check_against_dense(with({{"Nq", 23}, {"Nkv", 71}, {"mask", "strided"}, {"window", 4}, {"cyclic", true}}));
    check_against_dense(with({{"Nq", 71}, {"Nkv", 23}, {"mask", "strided"}, {"window", 2}}));
    check_against_dense(with({{"Nq", 30}, {"Nkv", 12}, {"mask", "strided"}, {"window", 2}, {"cyclic", true}}));
    check_against_dense(with({{"Nq", 71}, {"Nkv", 23}, {"mask", "strided_t"}, {"window", 6}, {"cyclic", true}}));
    check_against_dense(with({{"Nq", 12}, {"Nkv", 40}, {"mask", "strided_t"}, {"window", 3}, {"cyclic", true}}));
    // Cyclic windows covering the whole cycle (2h + 1 >= the period).
    check_against_dense(with({{"Nq", 30}, {"Nkv", 30}, {"mask", "strided"}, {"window", 40}, {"cyclic", true}}));
    check_against_dense(with({{"Nq", 21}, {"Nkv", 20}, {"mask", "strided"}, {"window", 19}, {"cyclic", true}}));
    check_against_dense(with({{"Nq", 20}, {"Nkv", 45}, {"mask", "strided_t"}, {"window", 20}, {"cyclic", true}}));
    check_against_dense(with({{"N", 61}, {"mask", "document"}, {"doc_len", 6}}));
    check_against_dense(with({{"N", 61}, {"mask", "prefix"}, {"prefix", 0}, {"doc_len", 9}}));
    check_against_dense(with({{"N", 61}, {"mask", "prefix"}, {"prefix", 61}, {"doc_len", 9}}));
    check_against_dense(with({{"N", 61}, {"mask", "registers"}, {"registers", 4}, {"window", 6}}));
    check_against_dense(with({{"N", 102}, {"mask", "dag"}, {"dag", "le_attention:3"}}));
    check_against_dense(with({{"N", 102}, {"mask", "dag_ancestors"}, {"dag", "le_attention:3"}}));
    check_against_dense(with({{"Nq", 9}, {"Nkv", 61}, {"mask", "maskattn"}, {"density", 0.1}, {"attend_all", true}}));
    check_against_dense(with({{"Nq", 61}, {"Nkv", 9}, {"mask", "causal"}}));
    check_against_dense(with({{"B", 3}, {"Nq", 9}, {"Nkv", 61}, {"mask", "key_mask"}, {"density", 0.5}}));
    check_against_dense(with({{"B", 2}, {"N", 61}, {"mask", "key_mask"}, {"density", 0.9}}));
  }
  // Every key dropped, every key kept.
  check_against_dense({{"B", 2}, {"N", 40}, {"mask", "key_mask"}, {"density", 0.0}, {"tile_q", 16}, {"tile_k", 16}});
  check_against_dense({{"B", 2}, {"N", 40}, {"mask", "key_mask"}, {"density", 1.0}, {"tile_q", 16}, {"tile_k", 16}});
}

TEST_CASE("key mask: a random boolean key mask per batch entry, block-sparse", "[masked][key_mask]") {
  const Params p = params({{"B", 3}, {"H", 2}, {"Nq", 50}, {"Nkv", 400}, {"D", 16}, {"mask", "key_mask"},
                           {"density", 0.5}, {"tile_q", 16}, {"tile_k", 4}});
  const MaskedCase c = masked_case(p);
  const std::vector<uint8_t> keys = key_mask_keys(c);
  REQUIRE(keys.size() == size_t(3 * 400));
  // Independent draws: each batch entry has its own mask, about half of the keys kept.
  for (int64_t b = 0; b < 3; ++b) {
    const auto kept = std::count(keys.begin() + b * 400, keys.begin() + (b + 1) * 400, uint8_t(1));
    CHECK(kept > 150);
    CHECK(kept < 250);
  }
  CHECK(!std::equal(keys.begin(), keys.begin() + 400, keys.begin() + 400));
  CHECK(key_mask_keys(c) == keys);  // a property of the case, not of the seed
  // Tiles of 4 keys with p = 1/2: some empty (skipped), some full, the rest partial.
  const MaskStorage s = make_mask(c, nullptr);
  const mask::BlockMap map = mask::build_block_map(s.data, c.B, c.tile_q, c.tile_k);
  CHECK(map.batches == 3);
  CHECK(map.empty > 0);
  CHECK(map.full > 0);
  CHECK(map.partial > 0);
  // Outputs of a batch entry depend only on its kept keys: changing a dropped key's k and v changes nothing.
  const TensorMap in = masked_variant().cast_inputs(p, masked_variant().make_inputs(p, 3, "km"), DType::f32);
  const TensorMap o = run_impl(masked_variant(), "cpu", p, DType::f32, in);
  TensorMap changed = in;
  for (const char* name : {"k", "v"}) {
    Tensor& t = changed.at(name);
    for (int64_t b = 0; b < 3; ++b)
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t j = 0; j < 400; ++j)
          if (!keys[size_t(b * 400 + j)])
            for (int64_t d = 0; d < 16; ++d) t.set(((b * 2 + h) * 400 + j) * 16 + d, 1e3);
  }
  const TensorMap o2 = run_impl(masked_variant(), "cpu", p, DType::f32, changed);
  CHECK(max_abs_diff(o.at("o"), o2.at("o")) == 0.0);
  // A batch entry without kept keys gives zeros.
  const Params none = params({{"B", 2}, {"H", 1}, {"N", 20}, {"D", 8}, {"mask", "key_mask"}, {"density", 0.0}});
  const TensorMap in0 = masked_variant().cast_inputs(none, masked_variant().make_inputs(none, 1, "km"), DType::f32);
  const TensorMap z = run_impl(masked_variant(), "cpu", none, DType::f32, in0);
  for (int64_t i = 0; i < z.at("o").numel(); ++i) CHECK(z.at("o").get(i) == 0.0);
  CHECK_THROWS_WITH(params({{"mask", "key_mask"}, {"density", 1.5}}),
                    Catch::Contains("density: mask \"key_mask\" keeps each key with probability density"));
}

TEST_CASE("DAG semantics: the chain X1 -> X2 -> X3", "[masked][dag]") {
  // The README's example: under parents-only X3 sees X2 but not X1; with ancestors it sees both.
  const Dag dag = load_dag("chain:3:2", "test");
  for (bool ancestors : {false, true}) {
    const DagLayout L = layout_dag(dag, ancestors);
    REQUIRE(L.tokens == 6);
    const mask::Dag m{L.node.data(), L.node_start.data(), L.reach.data(), L.words};
    const int64_t x3 = 5;  // last token of X3
    CHECK(m(0, x3, 2));    // X2's first token
    CHECK(m(0, x3, 4));    // own node, earlier token
    CHECK(m(0, x3, 0) == ancestors);  // X1
    CHECK_FALSE(m(0, 4, 5));          // not a later token of the own node
    CHECK_FALSE(m(0, 0, 2));          // a parent does not see its child
    CHECK(L.pos == std::vector<int32_t>{0, 1, 0, 1, 0, 1});  // positions restart in every node
  }
}

TEST_CASE("DAG position ids: start_pos_id and end_pos_id (exclusive, as LE-ATTENTION)", "[masked][dag]") {
  const nlohmann::json j = {{"nodes",
                             {{{"id", "a"}, {"length", 3}},
                              {{"id", "b"}, {"text", "héllo"}, {"parents", {"a"}}, {"start_pos_id", 10}},
                              {{"id", "c"}, {"length", 2}, {"parents", {"a"}}, {"end_pos_id", 7}},
                              {{"id", "d"}, {"length", 4}, {"parents", {"b", "c"}}, {"end_pos_id", 20}}}}};
  const DagLayout L = layout_dag(parse_dag(j, "test"), false);
  CHECK(L.tokens == 14);  // "héllo" is 5 characters
  // end_pos_id 20 on 4 tokens gives 16..19 (LE-ATTENTION's convention).
  CHECK(L.pos == std::vector<int32_t>{0, 1, 2, 10, 11, 12, 13, 14, 5, 6, 16, 17, 18, 19});
}

TEST_CASE("DAG files: bad input gives one clear error naming the field", "[masked][dag]") {
  auto error_of = [](const nlohmann::json& j) {
    try {
      parse_dag(j, "g.json");
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  using nlohmann::json;
  CHECK_THAT(error_of(json{{"nodes", json::array()}}), Catch::Contains("g.json: nodes: the graph is empty"));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"length", 1}, {"parents", {"b"}}}}}}),
             Catch::Contains("nodes[0].parents[0]: unknown parent \"b\""));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"length", 1}, {"parents", {"b"}}}}}}),
             !Catch::Contains("did you mean"));  // "a" is no suggestion for "b"
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "doc1"}, {"length", 1}}, {{"id", "q"}, {"length", 1}, {"parents", {"dco1"}}}}}}),
             Catch::Contains("unknown parent \"dco1\" (did you mean 'doc1'?)"));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"length", 1}}, {{"id", "a"}, {"length", 2}}}}}),
             Catch::Contains("nodes[1].id: duplicate id \"a\""));
  CHECK_THAT(error_of(json{{"nodes",
                            {{{"id", "a"}, {"length", 1}, {"parents", {"c"}}},
                             {{"id", "b"}, {"length", 1}, {"parents", {"a"}}},
                             {{"id", "c"}, {"length", 1}, {"parents", {"b"}}}}}}),
             Catch::Contains("cycle among \"a\", \"b\", \"c\""));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"length", 1}, {"parents", {"a"}}}}}}),
             Catch::Contains("lists itself as a parent"));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"length", 3}, {"start_pos_id", 2}, {"end_pos_id", 5}}}}}),
             Catch::Contains("nodes[0]: start_pos_id and end_pos_id together"));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"length", 3}, {"end_pos_id", 2}}}}}),
             Catch::Contains("nodes[0].end_pos_id: 2 would make the first position negative"));
  CHECK(error_of(json{{"nodes", {{{"id", "a"}, {"length", 3}, {"end_pos_id", 3}}}}}) == "no error");
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"length", 3}, {"text", "ab"}}}}}),
             Catch::Contains("length 3 disagrees with text of 2 characters"));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}, {"lenght", 3}}}}}),
             Catch::Contains("unknown field \"lenght\" (did you mean 'length'?)"));
  CHECK_THAT(error_of(json{{"nodes", {{{"id", "a"}}}}}), Catch::Contains("nodes[0]: expected \"length\" or \"text\""));

  // Files: unreadable and malformed.
  const auto dir = std::filesystem::temp_directory_path() / "attnbench_dag_test";
  std::filesystem::create_directories(dir);
  const std::string bad = (dir / "bad.json").string();
  std::ofstream(bad) << "{\"nodes\": [";
  CHECK_THROWS_WITH(load_dag(bad, "dag"), Catch::Contains("bad.json: invalid JSON"));
  CHECK_THROWS_WITH(load_dag((dir / "missing.json").string(), "dag"),
                    Catch::Contains("is neither a readable DAG file nor a generator"));
  CHECK_THROWS_WITH(load_dag("chain:3", "dag"), Catch::Contains("expected \"chain:K:L\""));
  // Through a case: the parameter is named before the file's own message.
  std::ofstream(dir / "cycle.json") << R"({"nodes": [{"id": "a", "length": 1, "parents": ["a"]}]})";
  CHECK_THROWS_WITH(params({{"mask", "dag"}, {"dag", (dir / "cycle.json").string()}, {"N", 1}}),
                    Catch::StartsWith("masked_test.dag: ") && Catch::Contains("cycle.json: nodes[0].parents[0]"));
}

TEST_CASE("masked parameters: impossible combinations are refused naming the field", "[masked]") {
  CHECK_THROWS_WITH(params({{"mask", "window"}, {"window", 0}}), Catch::Contains("window: mask \"window\" needs"));
  CHECK_THROWS_WITH(params({{"mask", "windw"}}), Catch::Contains("mask: expected one of") && Catch::Contains("did you mean 'window'"));
  CHECK_THROWS_WITH(params({{"mask", "dag"}, {"dag", "chain:3:5"}, {"N", 16}}),
                    Catch::Contains("N: the DAG \"chain:3:5\" has 15 tokens, got N = 16"));
  CHECK_THROWS_WITH(params({{"mask", "document"}, {"Nq", 10}, {"Nkv", 20}}), Catch::Contains("needs Nq = Nkv"));
  CHECK_THROWS_WITH(params({{"mask", "maskattn"}, {"threshold", 1.0}}), Catch::Contains("threshold: expected a probability"));
  CHECK_THROWS_WITH(params({{"score_mod", "softcap"}}), Catch::Contains("softcap: score_mod \"softcap\" needs softcap > 0"));
  CHECK_THROWS_WITH(params({{"mask", "window"}, {"rope", "half"}, {"D", 15}}), Catch::Contains("D: RoPE needs an even"));
}

TEST_CASE("mask attention: empty rows give zeros, or attend to every key with attend_all", "[masked]") {
  for (bool attend_all : {false, true}) {
    const Params p = params({{"B", 1}, {"H", 2}, {"Nq", 40}, {"Nkv", 64}, {"D", 16}, {"mask", "maskattn"},
                             {"density", 0.05}, {"attend_all", attend_all}, {"tile_q", 16}, {"tile_k", 16}});
    const TensorMap in = masked_variant().cast_inputs(p, masked_variant().make_inputs(p, 1, "e"), DType::f32);
    const Tensor& logits = require(in, "mask_logits", "test");
    const auto empty = mask::maskattn_empty_rows(logits.data<float>(), 1, 40, 64, 0.0f);
    REQUIRE(std::count(empty.begin(), empty.end(), 1) > 0);  // the generator leaves ~10 % of queries without hits
    const TensorMap o = run_impl(masked_variant(), "cpu", p, DType::f32, in);
    const TensorMap full = run_impl(masked_variant(), "cpu", params({{"B", 1}, {"H", 2}, {"N", 64}, {"Nq", 40}, {"Nkv", 64},
                                                                    {"D", 16}, {"mask", "none"}}),
                                    DType::f32, in);
    const Tensor& out = o.at("o");
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < 40; ++i) {
        if (!empty[size_t(i)]) continue;
        for (int64_t d = 0; d < 16; ++d) {
          const int64_t at = (h * 40 + i) * 16 + d;
          if (attend_all)
            CHECK(out.get(at) == Approx(full.at("o").get(at)).margin(1e-6));
          else
            CHECK(out.get(at) == 0.0);
        }
      }
  }
}

TEST_CASE("block-sparse and dense execution agree and the sparse one skips tiles", "[masked]") {
  const Params p = params({{"B", 1}, {"H", 2}, {"N", 300}, {"D", 32}, {"mask", "wrapped_window"}, {"window", 40},
                           {"score_mod", "alibi"}, {"tile_q", 32}, {"tile_k", 32}});
  const TensorMap in = masked_variant().cast_inputs(p, masked_variant().make_inputs(p, 2, "d"), DType::f32);
  const TensorMap sparse = run_impl(masked_variant(), "cpu", p, DType::f32, in);
  const TensorMap dense = run_impl(masked_variant(), "cpu_dense", p, DType::f32, in);
  CHECK(max_abs_diff(sparse.at("o"), dense.at("o")) < 1e-5);
  const auto info = masked_variant().case_info(p);
  CHECK(info["tiles_fraction"].get<double>() < 0.5);
  CHECK(info["density"].get<double>() == Approx(41.0 / 300.0));
  CHECK(info["useful_flops"].get<double>() == Approx(4.0 * 2 * 32 * 41 * 300));
}

TEST_CASE("CUDA masked kernel: per-element helpers on the host", "[masked][cuda_host]") {
  // Block-map row of a CTA: per-batch maps (mask attention) vs one shared map.
  CHECK(masked_math::map_row(1, 3, 10, 4) == 4);
  CHECK(masked_math::map_row(4, 3, 10, 4) == 34);
  CHECK(masked_math::query_tile_of_block(0, 7) == 6);
  // Allowed elements: padding never (the functor is not asked), full tiles always,
  // partial tiles by the functor.
  const mask::Window w{10, 2};
  CHECK_FALSE(masked_math::element_allowed(w, true, 0, 10, 3, 10, 10));
  CHECK_FALSE(masked_math::element_allowed(w, true, 0, 3, 10, 10, 10));
  CHECK(masked_math::element_allowed(w, true, 0, 0, 9, 10, 10));
  CHECK(masked_math::element_allowed(w, false, 0, 4, 6, 10, 10));
  CHECK_FALSE(masked_math::element_allowed(w, false, 0, 4, 7, 10, 10));
  // Logits in base 2: the mod in natural units, then ×log2(e); masked is −inf for every mod.
  for (auto kind : {mask::ScoreModKind::none, mask::ScoreModKind::relative, mask::ScoreModKind::cyclic,
                    mask::ScoreModKind::alibi, mask::ScoreModKind::softcap}) {
    const mask::ScoreMod mod{kind, 50, 4, 2.0f};
    CHECK(std::isinf(masked_math::score_base2(mod, 1.5f, 1, 3, 40, false)));
    const double s = 1.5, d = 37;
    const double want = kind == mask::ScoreModKind::relative  ? s - d
                        : kind == mask::ScoreModKind::cyclic  ? s - 13
                        : kind == mask::ScoreModKind::alibi   ? s + std::exp2(-8.0 * 2 / 4) * d
                        : kind == mask::ScoreModKind::softcap ? 2.0 * std::tanh(s / 2.0)
                                                              : s;
    CHECK(masked_math::score_base2(mod, 1.5f, 1, 3, 40, true) == Approx(want * 1.4426950408889634).epsilon(1e-6));
  }
  CHECK(masked_math::rope_table_index(3, 2, 16) == 26);
}

TEST_CASE("masked timing records the block-map build and the tiles computed", "[masked]") {
  RunOptions o;
  o.check = false;
  o.bench_settings.min_time_s = 0.001;
  o.bench_settings.repetitions = 1;
  const Params p = params({{"B", 1}, {"H", 1}, {"N", 256}, {"D", 16}, {"mask", "window"}, {"window", 32}});
  const auto rec = run_case(CaseSpec{&masked_variant(), "cpu", DType::f32, p}, o);
  INFO(rec.dump());
  REQUIRE(rec["status"] == "ok");
  CHECK(rec["bench"]["block_map_s"].get<double>() >= 0);
  CHECK(rec["bench"]["tiles_computed"] == rec["info"]["tiles_computed"]);
  CHECK(rec["bench"]["tiles_total"] == 16);
  CHECK(rec["info"]["density"].get<double>() == Approx((256.0 * 33 - 2 * (16 * 17 / 2)) / (256.0 * 256)));
}

// ---- Backward -----------------------------------------------------------------------

TEST_CASE("masked reference backward equals central finite differences of the forward", "[masked][backward]") {
  for (const Params& given : std::vector<Params>{
           {{"B", 1}, {"H", 2}, {"N", 9}, {"D", 4}, {"mask", "window"}, {"window", 4}, {"score_mod", "relative"}},
           {{"B", 2}, {"H", 1}, {"N", 12}, {"D", 6}, {"mask", "document"}, {"doc_len", 3}, {"causal", true},
            {"score_mod", "softcap"}, {"softcap", 1.5}},
           {{"B", 1}, {"H", 3}, {"Nq", 11}, {"Nkv", 5}, {"D", 4}, {"mask", "strided_t"}, {"window", 2},
            {"score_mod", "alibi"}},
           {{"B", 1}, {"H", 1}, {"N", 10}, {"D", 6}, {"mask", "registers"}, {"registers", 2}, {"window", 2},
            {"score_mod", "cyclic"}},
           {{"B", 1}, {"H", 2}, {"N", 15}, {"D", 8}, {"mask", "dag_ancestors"}, {"dag", "chain:3:5"}, {"rope", "half"}},
           {{"B", 2}, {"H", 1}, {"Nq", 7}, {"Nkv", 20}, {"D", 4}, {"mask", "maskattn"}, {"density", 0.1}},
       })
    test::check_reference_gradients_fd(masked_variant(), given);
}

TEST_CASE("masked cpu and cpu_dense backward match the f64 reference on every test shape", "[masked][backward]") {
  // Every mask family and score mod, odd tiles, DAG position ids (the variant's odd test shapes).
  for (const Params& shape : masked_variant().test_shapes())
    for (const char* impl : {"cpu", "cpu_dense"})
      for (DType dt : {DType::f32, DType::bf16}) test::require_pass_ok(masked_variant(), impl, dt, shape, Pass::bwd, 1);
  for (const char* impl : {"cpu", "cpu_dense"})
    for (const Params& shape : std::vector<Params>{
             {{"B", 2}, {"H", 2}, {"N", 150}, {"D", 40}, {"mask", "document"}, {"doc_len", 20}, {"causal", true},
              {"score_mod", "softcap"}, {"softcap", 5.0}, {"tile_q", 32}, {"tile_k", 64}},
             {{"B", 1}, {"H", 2}, {"N", 224}, {"D", 32}, {"mask", "dag"}, {"dag", "le_attention:20"},
              {"rope", "half"}, {"tile_q", 32}, {"tile_k", 32}},
         })
      test::require_pass_ok(masked_variant(), impl, DType::f32, shape, Pass::fwd_bwd);
  const auto cpu = masked_variant().find_impl("cpu_dense");
  REQUIRE(cpu);
  CHECK(cpu->passes == std::vector<Pass>{Pass::fwd, Pass::bwd, Pass::fwd_bwd});
  CHECK(masked_variant().differentiable() == std::vector<std::string>{"q", "k", "v"});
}

TEST_CASE("masked backward: rows without keys and keys without queries get zero gradients", "[masked][backward]") {
  // Mask attention without attend_all leaves ~10 % of the queries without keys (and some
  // keys without queries); several threads split a head's key tiles (B·H = 1).
  const Params p = params({{"B", 1}, {"H", 1}, {"Nq", 40}, {"Nkv", 300}, {"D", 16}, {"mask", "maskattn"},
                           {"density", 0.03}, {"tile_q", 16}, {"tile_k", 32}});
  const TensorMap in = masked_variant().cast_inputs(p, test::inputs_with_cotangents(masked_variant(), p, 4), DType::f32);
  const auto empty_rows = mask::maskattn_empty_rows(require(in, "mask_logits", "t").data<float>(), 1, 40, 300, 0.0f);
  REQUIRE(std::count(empty_rows.begin(), empty_rows.end(), 1) > 0);
  const ref::MaskDefinition def = mask_definition(masked_case(p), in);
  const std::vector<bool> allowed = ref::dense_mask(def, 0);
  const TensorMap out = test::run_pass(masked_variant(), "cpu", p, DType::f32, in, Pass::bwd);
  int64_t lonely_keys = 0;
  for (int64_t j = 0; j < 300; ++j) {
    bool seen = false;
    for (int64_t i = 0; i < 40; ++i) seen = seen || allowed[size_t(i * 300 + j)];
    lonely_keys += !seen;
    for (int64_t d = 0; d < 16; ++d) {
      REQUIRE(std::isfinite(out.at("dk").get(j * 16 + d)));
      if (!seen) {
        REQUIRE(out.at("dk").get(j * 16 + d) == 0.0);
        REQUIRE(out.at("dv").get(j * 16 + d) == 0.0);
      }
    }
  }
  CHECK(lonely_keys > 0);
  for (int64_t i = 0; i < 40; ++i)
    for (int64_t d = 0; d < 16; ++d) {
      REQUIRE(std::isfinite(out.at("dq").get(i * 16 + d)));
      if (empty_rows[size_t(i)]) REQUIRE(out.at("dq").get(i * 16 + d) == 0.0);
    }
  for (int threads : {1, 3}) {  // the same gradients whatever the split of the key tiles
    omp_set_num_threads(threads);
    const TensorMap again = test::run_pass(masked_variant(), "cpu", p, DType::f32, in, Pass::bwd);
    for (const char* g : {"dq", "dk", "dv"}) CHECK(max_abs_diff(again.at(g), out.at(g)) < 1e-6 * max_abs(out.at(g)));
  }
  omp_set_num_threads(omp_get_num_procs());
}

TEST_CASE("block-sparse and dense backward agree", "[masked][backward]") {
  const Params p = params({{"B", 2}, {"H", 2}, {"N", 300}, {"D", 32}, {"mask", "wrapped_window"}, {"window", 40},
                           {"score_mod", "alibi"}, {"rope", "half"}, {"tile_q", 32}, {"tile_k", 48}});
  const TensorMap in = masked_variant().cast_inputs(p, test::inputs_with_cotangents(masked_variant(), p, 5), DType::f32);
  const TensorMap sparse = test::run_pass(masked_variant(), "cpu", p, DType::f32, in, Pass::fwd_bwd);
  const TensorMap dense = test::run_pass(masked_variant(), "cpu_dense", p, DType::f32, in, Pass::fwd_bwd);
  for (const char* g : {"o", "dq", "dk", "dv"}) CHECK(max_abs_diff(sparse.at(g), dense.at(g)) < 1e-5 * max_abs(dense.at(g)));
}
