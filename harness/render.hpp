// Small raster pictures written as PNG (libpng) or SVG, for `attnbench mask`.
//
// A Picture is a grid of cells, each a palette index, drawn as sx × sy pixel
// blocks, with straight lines over it and (SVG only) labels along the axes, a
// title and a legend. Both writers are atomic: they write a temporary file next
// to the target and rename it, so a failure never leaves a partial image.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace attnbench::render {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};

/// "#rrggbb".
std::string hex(Rgb c);

struct Line {
  bool vertical = true;  // vertical: x = at; else horizontal: y = at
  int64_t at = 0;        // pixel position of the line (drawn on pixel column / row `at`)
  Rgb color;
  uint8_t alpha = 255;   // opacity over the cells (255: opaque)
};

/// A label along an axis (SVG): `column` labels go above the grid, row labels
/// to its left; [lo, hi) is the pixel extent they name.
struct Label {
  bool column = true;
  int64_t lo = 0, hi = 0;
  std::string text;
};

struct Picture {
  int64_t rows = 0, cols = 0;  // cells
  int64_t sx = 1, sy = 1;      // pixels per cell, horizontally and vertically
  std::vector<uint8_t> cells;  // (rows, cols) palette indices
  std::vector<Rgb> palette;
  std::vector<Line> lines;     // drawn in order, over the cells
  std::vector<Label> labels;   // SVG only
  std::string column_caption, row_caption;          // SVG only: axis captions ("keys", "queries")
  std::vector<std::string> title;                   // SVG only: lines of text under the grid
  std::vector<std::pair<uint8_t, std::string>> legend;  // SVG only: palette index, meaning

  int64_t width() const { return cols * sx; }
  int64_t height() const { return rows * sy; }
  uint8_t& at(int64_t r, int64_t c) { return cells[size_t(r * cols + c)]; }
  uint8_t at(int64_t r, int64_t c) const { return cells[size_t(r * cols + c)]; }
};

/// The picture as an RGB PNG of exactly width() × height() pixels (no labels).
/// Throws InputError("<path>: cannot write ...") on failure.
void write_png(const Picture& p, const std::string& path);

/// The picture as SVG: runs of equal cells of a row are one <rect>; cells of
/// palette index 0 are the background (not emitted). Margins hold the labels.
/// Returns the SVG's width and height in pixels (grid plus margins).
std::pair<int64_t, int64_t> write_svg(const Picture& p, const std::string& path);

/// XML-escapes text (&, <, >, ", ').
std::string xml_escape(const std::string& s);

}  // namespace attnbench::render
