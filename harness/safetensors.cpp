#include "harness/safetensors.hpp"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "harness/errors.hpp"
#include "harness/json_file.hpp"

namespace attnbench {

namespace {

using nlohmann::json;

constexpr uint64_t kMaxHeader = 100ull << 20;  // same limit as the reference implementation

const std::vector<std::pair<std::string, DType>>& dtype_codes() {
  static const std::vector<std::pair<std::string, DType>> codes{
      {"F64", DType::f64}, {"F32", DType::f32}, {"BF16", DType::bf16}, {"F16", DType::f16},
      {"I64", DType::i64}, {"I32", DType::i32}, {"U8", DType::u8},     {"BOOL", DType::boolean}};
  return codes;
}

std::string dtype_code(DType t) {
  for (const auto& [code, d] : dtype_codes())
    if (d == t) return code;
  return "?";
}

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

}  // namespace

SafetensorsFile read_safetensors(const std::string& path) {
  auto fail = [&](const std::string& what) -> void { throw InputError(path + ": " + what); };
  // Only regular files: a FIFO or /dev/zero would block or never end.
  (void)regular_file_size(path);
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open file");
  f.seekg(0, std::ios::end);
  const uint64_t file_size = uint64_t(f.tellg());
  f.seekg(0);
  if (file_size < 8) fail("not a safetensors file: shorter than the 8-byte header length");
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeader) fail("header length " + std::to_string(header_len) + " exceeds 100 MiB");
  if (header_len > file_size - 8)
    fail("header length " + std::to_string(header_len) + " runs past the end of the file (" +
         std::to_string(file_size) + " bytes)");
  std::string header(header_len, '\0');
  f.read(header.data(), std::streamsize(header_len));

  const json h = parse_json_text(header, path + ": header");
  if (!h.is_object()) fail("header: expected a JSON object");

  SafetensorsFile out;
  std::vector<Entry> entries;
  const uint64_t data_size = file_size - 8 - header_len;
  for (const auto& [name, e] : h.items()) {
    if (name == "__metadata__") {
      if (!e.is_object()) fail("__metadata__: expected an object of strings");
      for (const auto& [k, v] : e.items()) {
        if (!v.is_string()) fail("__metadata__." + k + ": expected a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string at = "tensor '" + name + "'";
    if (!e.is_object()) fail(at + ": expected an object");
    for (const auto& [k, v] : e.items())
      if (k != "dtype" && k != "shape" && k != "data_offsets") fail(at + ": unknown key '" + k + "'");
    if (!e.contains("dtype") || !e["dtype"].is_string()) fail(at + ".dtype: expected a string");
    const auto code = e["dtype"].get<std::string>();
    auto it = std::find_if(dtype_codes().begin(), dtype_codes().end(), [&](auto& p) { return p.first == code; });
    if (it == dtype_codes().end()) fail(at + ".dtype: unsupported dtype '" + code + "' (expected F64, F32, BF16, F16, I64, I32, U8 or BOOL)");
    Entry en{name, it->second, {}, 0, 0};
    if (!e.contains("shape") || !e["shape"].is_array()) fail(at + ".shape: expected an array of sizes");
    uint64_t count = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned()) fail(at + ".shape: expected non-negative integers, got " + d.dump());
      const uint64_t v = d.get<uint64_t>();
      // Each size on its own too: after a 0 the product stays 0 whatever follows.
      if (v > (uint64_t(1) << 62) || (v != 0 && count > std::numeric_limits<uint64_t>::max() / 16 / v))
        fail(at + ".shape: too large");
      count *= v;
      en.shape.push_back(int64_t(v));
    }
    const auto& off = e.contains("data_offsets") ? e["data_offsets"] : json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(at + ".data_offsets: expected [begin, end]");
    en.begin = off[0].get<uint64_t>();
    en.end = off[1].get<uint64_t>();
    if (en.end < en.begin) fail(at + ".data_offsets: end before begin");
    if (en.end > data_size)
      fail(at + ".data_offsets: [" + std::to_string(en.begin) + ", " + std::to_string(en.end) +
           ") runs past the data section (" + std::to_string(data_size) + " bytes)");
    if (en.end - en.begin != count * dtype_size(en.dtype))
      fail(at + ": shape " + shape_str(en.shape) + " of " + code + " needs " + std::to_string(count * dtype_size(en.dtype)) +
           " bytes, data_offsets span " + std::to_string(en.end - en.begin));
    entries.push_back(std::move(en));
  }

  // The tensors must tile the data section: no overlaps, no gaps.
  std::vector<const Entry*> sorted;
  for (const auto& e : entries) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->begin < b->begin || (a->begin == b->begin && a->end < b->end); });
  uint64_t pos = 0;
  for (const Entry* e : sorted) {
    if (e->begin < pos) fail("tensor '" + e->name + "' overlaps the tensor before it in the data section");
    if (e->begin > pos) fail("gap in the data section before tensor '" + e->name + "'");
    pos = e->end;
  }
  if (pos != data_size) fail("data section has " + std::to_string(data_size - pos) + " trailing bytes not covered by any tensor");

  const uint64_t data_start = 8 + header_len;
  for (const auto& e : entries) {
    Tensor t(e.dtype, e.shape);
    f.seekg(std::streamoff(data_start + e.begin));
    f.read(static_cast<char*>(t.raw()), std::streamsize(e.end - e.begin));
    if (!f) fail("tensor '" + e.name + "': read failed");
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t pos = 0;
  for (const auto& [name, t] : tensors) {
    h[name] = {{"dtype", dtype_code(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {pos, pos + t.nbytes()}}};
    pos += t.nbytes();
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');

  namespace fs = std::filesystem;
  if (fs::path(path).has_parent_path()) fs::create_directories(fs::path(path).parent_path());
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw InputError(path + ": cannot write");
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
    f.write(reinterpret_cast<const char*>(len), 8);
    f.write(header.data(), std::streamsize(header.size()));
    for (const auto& [name, t] : tensors) f.write(static_cast<const char*>(t.raw()), std::streamsize(t.nbytes()));
    if (!f) {
      f.close();
      fs::remove(tmp);
      throw InputError(path + ": write failed");
    }
  }
  fs::rename(tmp, path);
}

}  // namespace attnbench
