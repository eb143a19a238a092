// End-to-end tests of `attnbench mask`: images (PNG size, SVG labels), the
// printed density and tile counts of masks small enough to count by hand, and
// bad input.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <utility>

#include "tests/support.hpp"

namespace fs = std::filesystem;

namespace {

using attnbench::test::CommandOutput;

CommandOutput mask_tool(const std::string& args) { return attnbench::test::run_attnbench("mask " + args); }

/// A fresh temporary directory, removed when the test case ends.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name)
      : path(fs::temp_directory_path() / ("attnbench_mask_" + name + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

std::string put(const fs::path& p, const std::string& text) {
  std::ofstream(p) << text;
  return p.string();
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

/// Width and height from a PNG's IHDR chunk (after checking the signature).
std::pair<uint32_t, uint32_t> png_size(const fs::path& p) {
  const std::string s = slurp(p);
  REQUIRE(s.size() > 24);
  CHECK(s.substr(0, 8) == std::string("\x89PNG\r\n\x1a\n", 8));
  CHECK(s.substr(12, 4) == "IHDR");
  auto be32 = [&](size_t at) {
    uint32_t v = 0;
    for (size_t k = 0; k < 4; ++k) v = (v << 8) | uint8_t(s[at + k]);
    return v;
  };
  return {be32(16), be32(20)};
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

/// Only the expected files in `dir` (no temporary files left behind).
size_t files_in(const fs::path& dir) { return size_t(std::distance(fs::directory_iterator(dir), {})); }

// X1 -> X2 -> X3 (3 tokens each) and a branch X1 -> Y (2 tokens): 11 tokens.
// Allowed pairs, parents only: within nodes causal 6 + 6 + 6 + 3, X2 sees X1
// 3·3, X3 sees X2 3·3, Y sees X1 2·3: 45 of 121. Ancestors: X3 also sees X1: 54.
const char* kDag = R"({"nodes": [
  {"id": "X1", "length": 3},
  {"id": "X2", "text": "abc", "parents": ["X1"]},
  {"id": "X3", "length": 3, "parents": ["X2"]},
  {"id": "Y", "length": 2, "parents": ["X1"]}
]})";

}  // namespace

TEST_CASE("mask tool: window, tile and token views", "[mask_tool]") {
  const TempDir tmp("window");
  const fs::path& dir = tmp.path;
  // N = 8, w = 2 (h = 1): 8 + 7 + 7 = 22 allowed pairs of 64. Tiles of 2: the 4
  // diagonal tiles are full, the 6 next to them partial, the other 6 empty.
  const auto spec = put(dir / "w.json", R"({"mask": "window", "N": 8, "window": 2, "tile_q": 2, "tile_k": 2})");
  const auto png = dir / "w.png";
  auto o = mask_tool(spec + " --png " + png.string());
  INFO(o.text);
  REQUIRE(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("window (window 2 (h = 1))"));
  CHECK_THAT(o.text, Catch::Contains("8 x 8 (Nq x Nkv)"));
  CHECK_THAT(o.text, Catch::Contains("0.3438 (22 of 64 pairs allowed)"));
  CHECK_THAT(o.text, Catch::Contains("4 x 4 = 16 tiles: 4 full, 6 partial, 6 empty; 62.5 % computed"));
  CHECK_THAT(o.text, Catch::Contains("block map"));
  CHECK_THAT(o.text, Catch::Contains(png.string()));
  CHECK(png_size(png) == std::pair<uint32_t, uint32_t>(1024, 1024));  // 4 x 4 tiles of 256 px

  // Tiles of 4: every tile touches the band, none is inside it.
  o = mask_tool(spec + " --tile-q 4 --tile-k 4 --png " + png.string());
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("2 x 2 = 4 tiles: 0 full, 4 partial, 0 empty; 100.0 % computed"));

  // Non-square tiles: 2 x 4 tiles of 256 px.
  o = mask_tool(spec + " --tile-q 4 --tile-k 2 --png " + png.string());
  CHECK(o.code == 0);
  CHECK(png_size(png) == std::pair<uint32_t, uint32_t>(1024, 512));

  // Token view: 8 x 8 cells of 128 px; the same numbers.
  o = mask_tool(spec + " --tokens --png " + png.string());
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("22 of 64 pairs allowed"));
  CHECK_THAT(o.text, Catch::Contains("token view"));
  CHECK(png_size(png) == std::pair<uint32_t, uint32_t>(1024, 1024));

  // SVG: one <rect> per run of equal non-background cells in a row: at most 3
  // per token row here (faint partial tile, band, faint partial tile), plus
  // the background, the frame and the legend.
  const auto svg = dir / "w.svg";
  o = mask_tool(spec + " --tokens --svg " + svg.string());
  CHECK(o.code == 0);
  const std::string text = slurp(svg);
  CHECK(text.rfind("<svg", 0) == 0);
  CHECK_THAT(text, Catch::Contains("</svg>"));
  CHECK(count(text, "<rect") <= 8 * 3 + 10);
  CHECK(files_in(dir) == 3);  // w.json, w.png, w.svg
}

TEST_CASE("mask tool: DAG file and spec with a DAG", "[mask_tool]") {
  const TempDir tmp("dag");
  const fs::path& dir = tmp.path;
  const auto dag = put(dir / "g.json", kDag);
  const auto svg = dir / "g.svg";
  auto o = mask_tool(dag + " --tile-q 4 --tile-k 4 --svg " + svg.string());
  INFO(o.text);
  REQUIRE(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("11 x 11 (Nq x Nkv)"));
  CHECK_THAT(o.text, Catch::Contains("nodes      4 (X1, X2, X3, Y)"));
  CHECK_THAT(o.text, Catch::Contains("45 of 121 pairs allowed"));
  const std::string text = slurp(svg);
  for (const char* id : {">X1<", ">X2<", ">X3<", ">Y<"}) CHECK_THAT(text, Catch::Contains(id));

  o = mask_tool(dag + " --ancestors --png " + (dir / "g.png").string());
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("dag_ancestors"));
  CHECK_THAT(o.text, Catch::Contains("54 of 121 pairs allowed"));
  CHECK(png_size(dir / "g.png") == std::pair<uint32_t, uint32_t>(1024, 1024));  // one 64 x 64 tile

  o = mask_tool(dag + " --tokens --png " + (dir / "g.png").string());
  CHECK(o.code == 0);
  CHECK(png_size(dir / "g.png") == std::pair<uint32_t, uint32_t>(1023, 1023));  // 11 cells of 93 px

  // A case spec naming the DAG relative to its own folder (the tests run elsewhere).
  const auto spec = put(dir / "case.json", R"({"mask": "dag", "dag": "g.json", "N": 11, "tile_q": 4, "tile_k": 4})");
  o = mask_tool(spec + " --png " + (dir / "c.png").string());
  CHECK(o.code == 0);
  CHECK_THAT(o.text, Catch::Contains("45 of 121 pairs allowed"));
  CHECK(png_size(dir / "c.png") == std::pair<uint32_t, uint32_t>(1023, 1023));  // 3 x 3 tiles of 341 px

  // Generators need no file.
  o = mask_tool(put(dir / "chain.json", R"({"mask": "dag_ancestors", "dag": "chain:3:4", "N": 12, "tile_q": 4,
                                            "tile_k": 4})") + " --png " + (dir / "c.png").string());
  CHECK(o.code == 0);
  // Chain of 3 nodes of 4 tokens, ancestors: causal over all 12 tokens: 78 pairs;
  // tiles of 4 = the nodes: 3 diagonal partial, 3 below full, 3 above empty.
  CHECK_THAT(o.text, Catch::Contains("78 of 144 pairs allowed"));
  CHECK_THAT(o.text, Catch::Contains("3 full, 3 partial, 3 empty"));
}

TEST_CASE("mask tool: bad input", "[mask_tool]") {
  const TempDir tmp("bad");
  const fs::path& dir = tmp.path;
  const auto out = dir / "out.png";
  auto fails = [&](const std::string& args, const std::string& expect) {
    const auto o = mask_tool(args);
    INFO(args << "\n" << o.text);
    CHECK(o.code == 2);
    CHECK_THAT(o.text, Catch::Contains(expect));
    CHECK(std::count(o.text.begin(), o.text.end(), '\n') == 1);
    CHECK_FALSE(fs::exists(out));
  };
  const std::string png = " --png " + out.string();
  fails(put(dir / "u.json", R"({"mask": "window", "N": 8, "windw": 2})") + png, "windw: unknown parameter");
  fails(put(dir / "m.json", R"({"mask": "windo", "N": 8})") + png, "did you mean 'window'");
  fails(put(dir / "p.json", R"({"nodes": [{"id": "A", "length": 2}, {"id": "B", "length": 1, "parents": ["Z"]}]})") +
            png,
        "unknown parent \"Z\"");
  fails(put(dir / "c.json", R"({"nodes": [{"id": "A", "length": 2, "parents": ["B"]},
                                          {"id": "B", "length": 1, "parents": ["A"]}]})") +
            png,
        "cycle");
  fails(put(dir / "n.json", R"({"mask": "dag", "dag": "g.json", "N": 11})") + png, "g.json");
  fails(put(dir / "j.json", R"({"mask": "window", "N": )") + png, "invalid JSON");
  fails((dir / "missing.json").string() + png, "cannot open");
  fails(put(dir / "big.json", R"({"mask": "window", "N": 9000, "window": 8})") + " --tokens" + png, "tile view");
  fails(dir.string() + "/big.json --ancestors" + png, "--ancestors");

  auto help = mask_tool("--help");
  CHECK(help.code == 0);
  CHECK_THAT(help.text, Catch::Contains("--tokens"));

  // Output options: exactly one of --png and --svg (CLI11 errors).
  const auto spec = put(dir / "w.json", R"({"mask": "window", "N": 8, "window": 2})");
  auto o = mask_tool(spec);
  CHECK(o.code != 0);
  CHECK(o.code != 2);
  o = mask_tool(spec + png + " --svg " + (dir / "out.svg").string());
  CHECK(o.code != 0);
  CHECK_FALSE(fs::exists(out));
  CHECK_FALSE(fs::exists(dir / "out.svg"));
}
