// attnbench mask: draws the mask and block map of a `masked` case, or of a DAG
// file, as PNG or SVG (docs/mask-tool.md).
//
// Tile view (default): one cell per (query tile, key tile), coloured by class
// (empty, partial, full). Token view (--tokens): one cell per (query, key) pair,
// allowed dark, with the tile classes as a faint background. Rows are queries,
// columns keys. Images are scaled to ~1024 px per side (at least 256, at most
// 4096: beyond that, cells are merged, keeping the highest class).
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <type_traits>

#include <fmt/format.h>

#include "harness/cli/commands.hpp"
#include "harness/dag.hpp"
#include "harness/errors.hpp"
#include "harness/json_file.hpp"
#include "harness/masks.hpp"
#include "harness/render.hpp"
#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "impls/block_map.hpp"
#include "impls/mask.hpp"

namespace attnbench::cli {
namespace {

namespace fs = std::filesystem;
using render::Rgb;

struct Options {
  std::string spec, png, svg;
  bool tokens = false, ancestors = false;
  int64_t tile_q = 0, tile_k = 0;
};

constexpr int64_t kMaxTokens = 8192;  // --tokens: at most this many tokens per side
constexpr int64_t kMaxCells = 4096;   // cells per side before merging
constexpr int64_t kTarget = 1024;     // preferred image side (px)
constexpr int64_t kMinSide = 256;     // smallest image side (px)
constexpr int64_t kMinLinePx = 4;     // tile grid lines only when tiles are at least this wide
constexpr int64_t kMinGroupPx = 16;   // node / document lines only next to one at least this wide
constexpr int64_t kMinLabelPx = 12;   // labels only for nodes / documents at least this wide

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

nlohmann::json read_json(const std::string& path) {
  return read_json_file(path);
}

/// "chain:K:L", "le_attention:K" (anything load_dag treats as a generator).
bool is_generator(const std::string& dag) {
  const std::string head = dag.substr(0, dag.find(':'));
  return head == "chain" || head == "le_attention";
}

/// The completed parameters of the `masked` case the spec file describes.
Params spec_params(const Options& o) {
  const nlohmann::json j = read_json(o.spec);
  nlohmann::json given;
  if (j.is_object() && j.contains("nodes")) {  // a DAG file
    const DagLayout L = layout_dag(parse_dag(j, o.spec), false);
    given = {{"mask", o.ancestors ? "dag_ancestors" : "dag"}, {"dag", o.spec}, {"N", L.tokens}};
  } else {
    if (!j.is_object())
      throw InputError(o.spec +
                       ": expected an object of `masked` parameters (e.g. {\"mask\": \"window\", \"N\": 512, "
                       "\"window\": 64}) or a DAG file (an object with \"nodes\")");
    given = j;
    const std::string m = given.contains("mask") && given["mask"].is_string() ? given["mask"].get<std::string>() : "";
    if (o.ancestors) {
      if (m == "dag")
        given["mask"] = "dag_ancestors";
      else if (m != "dag_ancestors")
        throw InputError("--ancestors: only for DAG files and \"mask\": \"dag\" specs, " + o.spec + " has mask \"" +
                         (m.empty() ? "window (default)" : m) + "\"");
    }
    // A DAG path is relative to the working directory or, failing that, to the spec's folder.
    if ((m == "dag" || m == "dag_ancestors") && given.contains("dag") && given["dag"].is_string()) {
      const std::string dag = given["dag"].get<std::string>();
      std::error_code ec;
      if (!dag.empty() && !is_generator(dag) && !fs::exists(dag, ec)) {
        const fs::path beside = fs::path(o.spec).parent_path() / dag;
        if (fs::path(dag).is_relative() && fs::exists(beside, ec))
          given["dag"] = beside.string();
        else
          throw InputError(o.spec + ".dag: \"" + dag + "\" is neither a DAG file (looked for in the working directory" +
                           (fs::path(dag).is_relative() ? " and beside " + o.spec : std::string()) +
                           ") nor a generator (\"chain:K:L\", \"le_attention:K\")");
      }
    }
  }
  if (o.tile_q > 0) given["tile_q"] = o.tile_q;
  if (o.tile_k > 0) given["tile_k"] = o.tile_k;
  return find_variant("masked", o.spec).complete(given, o.spec);
}

/// What the mask's own parameters are, for the summary ("window 64 (h = 32)").
std::string mask_detail(const MaskedCase& c) {
  const std::string& m = c.mask;
  if (m == "window" || m == "wrapped_window" || m == "strided" || m == "strided_t" || m == "registers") {
    std::string s = fmt::format("window {} (h = {})", c.window, c.window / 2);
    if ((m == "strided" || m == "strided_t") && c.cyclic) s += ", cyclic";
    if (m == "registers") s += fmt::format(", {} registers", c.registers);
    return s;
  }
  if (m == "sliding_window")
    return fmt::format("window {} (each query sees its {} most recent keys)", c.window, c.window);
  if (m == "document" || m == "prefix") {
    std::string s = fmt::format("doc_len {}", c.doc_len);
    if (m == "document" && c.causal) s += ", causal";
    if (m == "prefix") s += fmt::format(", prefix {}", c.prefix);
    return s;
  }
  if (m == "dag" || m == "dag_ancestors") return c.dag;
  if (m == "maskattn")
    return fmt::format("density {}, threshold {}{}", c.density, c.threshold, c.attend_all ? ", attend_all" : "");
  if (m == "key_mask") return fmt::format("keys kept with probability {}", c.density);
  return "";
}

/// One side of the image: `units` cells (tiles or tokens) of `unit_tokens`
/// tokens each, merged `merge` to a raster cell, drawn `scale` px per raster cell.
struct Axis {
  int64_t units = 0, unit_tokens = 1;
  int64_t merge = 1, cells = 0, scale = 1;
  int64_t px() const { return cells * scale; }
  /// Pixel of the boundary before token t.
  int64_t token_px(int64_t t) const { return t * scale / (unit_tokens * merge); }
  /// Pixels per tile of `tile` tokens.
  double tile_px(int64_t tile) const { return double(tile) * double(scale) / double(unit_tokens * merge); }
};

void fit(Axis& rows, Axis& cols) {
  for (Axis* a : {&rows, &cols}) {
    a->merge = ceil_div(a->units, kMaxCells);
    a->cells = ceil_div(a->units, a->merge);
  }
  const int64_t p = std::max<int64_t>(1, kTarget / std::max(rows.cells, cols.cells));
  for (Axis* a : {&rows, &cols}) a->scale = a->cells * p < kMinSide ? ceil_div(kMinSide, a->cells) : p;
}

/// Document / node segments of a mask: [start, end) tokens and a label.
struct Segment {
  int64_t lo, hi;
  std::string label;
};

std::vector<Segment> segments(const MaskStorage& s, int64_t N) {
  std::vector<Segment> out;
  if (s.group.empty() || s.group_start.empty()) return out;
  if (s.group_start.front() > 0) out.push_back({0, s.group_start.front(), "prefix"});
  for (size_t g = 0; g + 1 < s.group_start.size(); ++g)
    out.push_back({s.group_start[g], s.group_start[g + 1], g < s.labels.size() ? s.labels[g] : std::to_string(g)});
  if (!out.empty() && out.back().hi < N) out.push_back({out.back().hi, N, ""});
  return out;
}

const Rgb kWhite{255, 255, 255}, kPartial{248, 196, 113}, kFull{46, 92, 138};         // tile view
const Rgb kFaintPartial{253, 235, 208}, kFaintFull{214, 228, 240}, kAllowed{27, 42, 65};  // token view
const Rgb kGrid{120, 120, 120}, kGroup{214, 39, 40};
constexpr uint8_t kGridAlpha = 80, kGroupAlpha = 200;

/// Lines between tiles along one axis (when tiles are wide enough), between
/// segments (when a neighbouring segment is wide enough: dense boundaries would
/// hide the cells) and labels of segments wide enough for a line of text.
void decorate(render::Picture& pic, const Axis& a, int64_t tile, int64_t n_tiles, bool vertical,
              const std::vector<Segment>& segs) {
  if (a.tile_px(tile) >= double(kMinLinePx))
    for (int64_t k = 1; k < n_tiles; ++k) pic.lines.push_back({vertical, a.token_px(k * tile), kGrid, kGridAlpha});
  int64_t last_line = -1000, last_label = -1000;
  for (size_t g = 0; g < segs.size(); ++g) {
    const int64_t lo = a.token_px(segs[g].lo), hi = a.token_px(segs[g].hi);
    if (g > 0) {
      const int64_t before = lo - a.token_px(segs[g - 1].lo);
      if ((before >= kMinGroupPx || hi - lo >= kMinGroupPx) && lo - last_line >= 3) {
        pic.lines.push_back({vertical, lo, kGroup, kGroupAlpha});
        last_line = lo;
      }
    }
    const int64_t mid = (lo + hi) / 2;
    if (hi - lo >= kMinLabelPx && mid - last_label >= kMinLabelPx && !segs[g].label.empty()) {
      pic.labels.push_back({vertical, lo, hi, segs[g].label});
      last_label = mid;
    }
  }
}

/// Tile view: raster cell = highest class among its tiles.
void tile_cells(render::Picture& pic, const mask::BlockMap& map, const Axis& rows, const Axis& cols) {
  for (int64_t qt = 0; qt < map.n_qt; ++qt)
    for (int64_t kt = 0; kt < map.n_kt; ++kt) {
      uint8_t& v = pic.at(qt / rows.merge, kt / cols.merge);
      v = std::max(v, uint8_t(map.at(0, qt, kt)));
    }
}

/// Token view: 3 where some pair of the raster cell is allowed, else the
/// highest tile class under it (0 empty, 1 partial, 2 full). Rows of interval
/// masks are visited as intervals; the others are evaluated pair by pair.
void token_cells(render::Picture& pic, const mask::BlockMap& map, const mask::MaskData& data, const Axis& rows,
                 const Axis& cols) {
  const int64_t Nq = data.Nq, Nkv = data.Nkv;
  std::vector<int64_t> kt_lo(size_t(pic.cols)), kt_hi(size_t(pic.cols));
  for (int64_t c = 0; c < pic.cols; ++c) {
    const int64_t j0 = c * cols.merge, j1 = std::min(Nkv, j0 + cols.merge);
    kt_lo[size_t(c)] = j0 / map.tile_k, kt_hi[size_t(c)] = (j1 - 1) / map.tile_k;
  }
  for (int64_t r = 0; r < pic.rows; ++r) {
    const int64_t i0 = r * rows.merge, i1 = std::min(Nq, i0 + rows.merge);
    for (int64_t c = 0; c < pic.cols; ++c) {
      uint8_t v = 0;
      for (int64_t qt = i0 / map.tile_q; qt <= (i1 - 1) / map.tile_q; ++qt)
        for (int64_t kt = kt_lo[size_t(c)]; kt <= kt_hi[size_t(c)]; ++kt) v = std::max(v, uint8_t(map.at(0, qt, kt)));
      pic.at(r, c) = v;
    }
  }
  mask::visit_mask(data, [&](const auto& m) {
    using M = std::decay_t<decltype(m)>;
    for (int64_t i = 0; i < Nq; ++i) {
      uint8_t* row = pic.cells.data() + (i / rows.merge) * pic.cols;
      if constexpr (M::kIntervals) {
        m.row_keys(0, i, [&](int64_t lo, int64_t hi) {
          if (lo >= hi) return;
          std::fill(row + lo / cols.merge, row + (hi - 1) / cols.merge + 1, uint8_t(3));
        });
      } else {
        for (int64_t j = 0; j < Nkv; ++j)
          if (m(0, i, j)) row[j / cols.merge] = 3;
      }
    }
  });
}

std::string percent(double x) { return fmt::format("{:.1f} %", 100.0 * x); }

void run_mask(const Options& o) {
  Params p = spec_params(o);
  const Variant& variant = find_variant("masked", o.spec);
  const int64_t batches = p.at("B").get<int64_t>();
  // The mask depends on neither heads nor head dimension; batch entry 0 is drawn
  // (mask attention's logits of entry 0 do not depend on B).
  p["B"] = 1, p["H"] = 1, p["D"] = 2;
  const MaskedCase c = masked_case(p);
  if (o.tokens && std::max(c.Nq, c.Nkv) > kMaxTokens)
    throw InputError(fmt::format(
        "--tokens: the token view draws one cell per (query, key) pair and is limited to {} tokens per side; this "
        "mask is {} x {} (the image would be {} x {} px before merging): draw the tile view instead (leave out "
        "--tokens, and use --tile-q / --tile-k for finer tiles)",
        kMaxTokens, c.Nq, c.Nkv, c.Nkv, c.Nq));

  TensorMap inputs;
  const float* logits = nullptr;
  if (c.mask == "maskattn") {
    inputs = variant.make_inputs_as(p, 0, case_key(variant, p), DType::f32);
    logits = inputs.at("mask_logits").data<float>();
  }
  const MaskStorage storage = make_mask(c, logits);
  const auto t0 = std::chrono::steady_clock::now();
  const mask::BlockMap map = mask::build_block_map(storage.data, 1, c.tile_q, c.tile_k);
  const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  Axis rows, cols;
  rows.units = o.tokens ? c.Nq : map.n_qt, rows.unit_tokens = o.tokens ? 1 : c.tile_q;
  cols.units = o.tokens ? c.Nkv : map.n_kt, cols.unit_tokens = o.tokens ? 1 : c.tile_k;
  fit(rows, cols);

  render::Picture pic;
  pic.rows = rows.cells, pic.cols = cols.cells, pic.sx = cols.scale, pic.sy = rows.scale;
  pic.cells.assign(size_t(pic.rows * pic.cols), 0);
  if (o.tokens) {
    pic.palette = {kWhite, kFaintPartial, kFaintFull, kAllowed};
    pic.legend = {{3, "allowed"}, {0, "masked, empty tile"}, {1, "masked, partial tile"}, {2, "full tile"}};
    token_cells(pic, map, storage.data, rows, cols);
  } else {
    pic.palette = {kWhite, kPartial, kFull};
    pic.legend = {{2, "full tile"}, {1, "partial tile"}, {0, "empty tile"}};
    tile_cells(pic, map, rows, cols);
  }
  const std::vector<Segment> segs = segments(storage, c.Nq);
  decorate(pic, cols, c.tile_k, map.n_kt, true, c.Nq == c.Nkv ? segs : std::vector<Segment>{});
  decorate(pic, rows, c.tile_q, map.n_qt, false, c.Nq == c.Nkv ? segs : std::vector<Segment>{});
  pic.column_caption = "keys (" + std::to_string(c.Nkv) + ")";
  pic.row_caption = "queries (" + std::to_string(c.Nq) + ")";

  const std::string detail = mask_detail(c);
  const std::string name = c.mask + (detail.empty() ? "" : " (" + detail + ")");
  const std::string tiles_line =
      fmt::format("{} x {} tokens per tile, {} x {} = {} tile{}: {} full, {} partial, {} empty; {} computed",
                  c.tile_q, c.tile_k, map.n_qt, map.n_kt, map.total(), map.total() == 1 ? "" : "s", map.full,
                  map.partial, map.empty, percent(map.computed_fraction()));
  const std::string density_line = fmt::format("{:.4g} ({:.0f} of {} pairs allowed)", map.density(),
                                               map.allowed_pairs, c.Nq * c.Nkv);
  pic.title = {"mask " + name + ", " + std::to_string(c.Nq) + " x " + std::to_string(c.Nkv) + ", density " +
                   fmt::format("{:.4g}", map.density()),
               tiles_line};

  std::string merged;
  if (rows.merge > 1 || cols.merge > 1)
    merged = fmt::format(", cells of {} x {} {} merged (highest class shown)", rows.merge, cols.merge,
                         o.tokens ? "tokens" : "tiles");
  std::string size;
  if (!o.png.empty()) {
    render::write_png(pic, o.png);
    size = fmt::format("{} x {} px", pic.width(), pic.height());
  } else {
    const auto [w, h] = render::write_svg(pic, o.svg);
    size = fmt::format("{} x {} px, grid {} x {} px", w, h, pic.width(), pic.height());
  }

  fmt::print("mask       {}\n", name);
  fmt::print("size       {} x {} (Nq x Nkv){}\n", c.Nq, c.Nkv,
             (c.mask == "maskattn" || c.mask == "key_mask") && batches > 1 ? fmt::format(", batch entry 0 of {}", batches) : "");
  if (!segs.empty()) {
    const bool dag = c.dag_layout != nullptr;
    std::string names;
    for (size_t g = 0; g < segs.size() && g < 6; ++g) names += (g ? ", " : "") + segs[g].label;
    if (segs.size() > 6) names += ", ...";
    fmt::print("{:<11}{} ({})\n", dag ? "nodes" : "documents", segs.size(), names);
  }
  fmt::print("density    {}\n", density_line);
  fmt::print("tiles      {}\n", tiles_line);
  fmt::print("block map  {:.3f} ms\n", build_s * 1e3);
  fmt::print("wrote      {} ({}, {} view{})\n", o.png.empty() ? o.svg : o.png, size, o.tokens ? "token" : "tile",
             merged);
}

}  // namespace

void add_mask(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<Options>();
  auto* c = app.add_subcommand("mask", "Draw a mask and its block map (a masked case or a DAG file) as PNG or SVG");
  c->add_option("spec", o->spec,
                "JSON file: parameters of a `masked` case ({\"mask\": \"window\", \"N\": 512, ...}) or a DAG "
                "({\"nodes\": [...]})")
      ->required();
  auto* out = c->add_option_group("output", "The image to write");
  out->add_option("--png", o->png, "Write a PNG image (no text)");
  out->add_option("--svg", o->svg, "Write an SVG image (with node / document labels)");
  out->require_option(1);
  c->add_flag("--tokens", o->tokens, "Token view: one cell per (query, key) pair (at most 8192 tokens per side)");
  c->add_flag("--ancestors", o->ancestors, "DAG: nodes see all their ancestors (mask dag_ancestors), not only parents");
  c->add_option("--tile-q", o->tile_q, "Queries per tile (overrides the spec's tile_q)")->check(CLI::PositiveNumber);
  c->add_option("--tile-k", o->tile_k, "Keys per tile (overrides the spec's tile_k)")->check(CLI::PositiveNumber);
  c->callback([o, &exit_code] {
    run_mask(*o);
    exit_code = 0;
  });
}

}  // namespace attnbench::cli
