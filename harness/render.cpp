#include "harness/render.hpp"

#include <png.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <fmt/format.h>

#include "harness/errors.hpp"

namespace attnbench::render {
namespace {

namespace fs = std::filesystem;

/// Calls write(tmp) for a temporary path next to `path`, then renames it over
/// `path`; the temporary file is removed when write throws.
void write_atomic(const std::string& path, const std::function<void(const std::string&)>& write) {
  const fs::path target(path);
  std::error_code ec;
  if (target.has_parent_path()) fs::create_directories(target.parent_path(), ec);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  try {
    write(tmp);
    fs::rename(tmp, target, ec);
    if (ec) throw InputError(path + ": cannot write (" + ec.message() + ")");
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
}

constexpr int64_t kFont = 10;     // SVG label font size (px)
constexpr int64_t kCharW = 6;     // approximate width of a character at that size
constexpr int64_t kLineH = 14;    // SVG text line height
constexpr size_t kMaxLabel = 24;  // longer labels are cut

std::string cut(const std::string& s) { return s.size() <= kMaxLabel ? s : s.substr(0, kMaxLabel - 1) + "~"; }

}  // namespace

std::string hex(Rgb c) { return fmt::format("#{:02x}{:02x}{:02x}", c.r, c.g, c.b); }

std::string xml_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += ch;
    }
  }
  return out;
}

void write_png(const Picture& p, const std::string& path) {
  const int64_t W = p.width(), H = p.height();
  if (W < 1 || H < 1) throw InputError(path + ": empty image");
  std::vector<uint8_t> rgb(size_t(W * H * 3));
  for (int64_t r = 0; r < p.rows; ++r) {
    uint8_t* first = rgb.data() + size_t(r * p.sy * W * 3);
    for (int64_t c = 0; c < p.cols; ++c) {
      const Rgb col = p.palette.at(p.at(r, c));
      for (int64_t x = c * p.sx; x < (c + 1) * p.sx; ++x) {
        first[x * 3] = col.r, first[x * 3 + 1] = col.g, first[x * 3 + 2] = col.b;
      }
    }
    for (int64_t y = 1; y < p.sy; ++y) std::memcpy(first + y * W * 3, first, size_t(W * 3));
  }
  for (const Line& l : p.lines) {
    auto put = [&](int64_t x, int64_t y) {
      uint8_t* px = rgb.data() + size_t((y * W + x) * 3);
      const int a = l.alpha;
      auto mix = [a](uint8_t over, uint8_t under) { return uint8_t((over * a + under * (255 - a) + 127) / 255); };
      px[0] = mix(l.color.r, px[0]), px[1] = mix(l.color.g, px[1]), px[2] = mix(l.color.b, px[2]);
    };
    if (l.vertical) {
      const int64_t x = std::clamp<int64_t>(l.at, 0, W - 1);
      for (int64_t y = 0; y < H; ++y) put(x, y);
    } else {
      const int64_t y = std::clamp<int64_t>(l.at, 0, H - 1);
      for (int64_t x = 0; x < W; ++x) put(x, y);
    }
  }
  write_atomic(path, [&](const std::string& tmp) {
    png_image image;
    std::memset(&image, 0, sizeof image);
    image.version = PNG_IMAGE_VERSION;
    image.width = png_uint_32(W);
    image.height = png_uint_32(H);
    image.format = PNG_FORMAT_RGB;
    if (!png_image_write_to_file(&image, tmp.c_str(), 0, rgb.data(), 0, nullptr)) {
      const std::string why = image.message;
      png_image_free(&image);
      throw InputError(path + ": cannot write PNG (" + why + ")");
    }
  });
}

std::pair<int64_t, int64_t> write_svg(const Picture& p, const std::string& path) {
  const int64_t gw = p.width(), gh = p.height();
  size_t col_chars = 0, row_chars = 0, title_chars = 0;
  for (const Label& l : p.labels) {
    size_t& m = l.column ? col_chars : row_chars;
    m = std::max(m, cut(l.text).size());
  }
  for (const auto& t : p.title) title_chars = std::max(title_chars, t.size());
  // Margins: captions take one text line, labels their length.
  const int64_t ml = kLineH + 6 + (row_chars ? int64_t(row_chars) * kCharW + 6 : 0);
  const int64_t mt = kLineH + 6 + (col_chars ? int64_t(col_chars) * kCharW + 6 : 0);
  int64_t legend_w = 0;
  for (const auto& [idx, text] : p.legend) legend_w += 16 + int64_t(text.size()) * kCharW + 14;
  const int64_t mb = 8 + kLineH * int64_t(p.title.size() + (p.legend.empty() ? 0 : 1)) + 6;
  const int64_t W = std::max({ml + gw + 10, int64_t(title_chars) * kCharW + 20, legend_w + 20});
  const int64_t H = mt + gh + mb;

  std::string s;
  s.reserve(1 << 16);
  s += fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\">\n", W, H);
  s += "<style>text{font-family:sans-serif;font-size:" + std::to_string(kFont) + "px;fill:#333}"
       ".g rect{shape-rendering:crispEdges}";
  for (size_t i = 0; i < p.palette.size(); ++i) s += fmt::format(".c{}{{fill:{}}}", i, hex(p.palette[i]));
  s += "</style>\n";
  s += fmt::format("<rect width=\"{}\" height=\"{}\" fill=\"#ffffff\"/>\n", W, H);
  s += fmt::format("<g class=\"g\" transform=\"translate({},{})\">\n", ml, mt);
  s += fmt::format("<rect class=\"c0\" width=\"{}\" height=\"{}\"/>\n", gw, gh);
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols;) {
      const uint8_t v = p.at(r, c);
      int64_t e = c + 1;
      while (e < p.cols && p.at(r, e) == v) ++e;
      if (v != 0)
        s += fmt::format("<rect class=\"c{}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/>\n", v, c * p.sx,
                         r * p.sy, (e - c) * p.sx, p.sy);
      c = e;
    }
  // Lines grouped by colour and opacity into one path each (in order of first use).
  std::vector<std::pair<std::string, std::string>> paths;
  for (const Line& l : p.lines) {
    const std::string color =
        "stroke=\"" + hex(l.color) + "\"" +
        (l.alpha == 255 ? std::string() : fmt::format(" stroke-opacity=\"{:.3f}\"", l.alpha / 255.0));
    auto it = std::find_if(paths.begin(), paths.end(), [&](const auto& x) { return x.first == color; });
    if (it == paths.end()) {
      paths.emplace_back(color, "");
      it = paths.end() - 1;
    }
    it->second += l.vertical ? fmt::format("M{}.5 0V{}", std::clamp<int64_t>(l.at, 0, gw - 1), gh)
                             : fmt::format("M0 {}.5H{}", std::clamp<int64_t>(l.at, 0, gh - 1), gw);
  }
  for (const auto& [color, d] : paths)
    s += fmt::format("<path d=\"{}\" {} stroke-width=\"1\" fill=\"none\"/>\n", d, color);
  s += fmt::format("<rect width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888888\"/>\n", gw, gh);
  s += "</g>\n";

  for (const Label& l : p.labels) {
    const int64_t mid = (l.lo + l.hi) / 2;
    const std::string text = xml_escape(cut(l.text));
    if (l.column)
      s += fmt::format("<text transform=\"translate({},{}) rotate(-90)\">{}</text>\n", ml + mid + 4, mt - 4, text);
    else
      s += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", ml - 4, mt + mid + 4, text);
  }
  if (!p.column_caption.empty())
    s += fmt::format("<text x=\"{}\" y=\"{}\">{} &#8594;</text>\n", ml, kLineH - 2, xml_escape(p.column_caption));
  if (!p.row_caption.empty())
    s += fmt::format("<text transform=\"translate({},{}) rotate(90)\">{} &#8594;</text>\n", 4, mt,
                     xml_escape(p.row_caption));
  int64_t y = mt + gh + 8 + kLineH - 3;
  for (const auto& t : p.title) {
    s += fmt::format("<text x=\"{}\" y=\"{}\">{}</text>\n", 10, y, xml_escape(t));
    y += kLineH;
  }
  int64_t x = 10;
  for (const auto& [idx, text] : p.legend) {
    s += fmt::format("<rect class=\"c{}\" x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" stroke=\"#888888\"/>\n", idx, x,
                     y - 9);
    s += fmt::format("<text x=\"{}\" y=\"{}\">{}</text>\n", x + 14, y, xml_escape(text));
    x += 16 + int64_t(text.size()) * kCharW + 14;
  }
  s += "</svg>\n";

  write_atomic(path, [&](const std::string& tmp) {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
    f.write(s.data(), std::streamsize(s.size()));
    f.flush();
    if (!f) throw InputError(path + ": write failed");
  });
  return {W, H};
}

}  // namespace attnbench::render
