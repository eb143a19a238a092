// Training data: harness/train/data.hpp.
#include "harness/train/data.hpp"

#include <algorithm>
#include <set>

#include "harness/errors.hpp"
#include "harness/json_file.hpp"

namespace attnbench::train {

bool decode_utf8(const std::string& bytes, std::vector<uint32_t>& out, size_t* bad_offset) {
  out.clear();
  out.reserve(bytes.size());
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  auto bad = [&](size_t at) {
    if (bad_offset) *bad_offset = at;
    return false;
  };
  while (i < n) {
    const unsigned c = s[i];
    if (c == 0) return bad(i);
    if (c < 0x80) {
      out.push_back(c);
      ++i;
      continue;
    }
    int len;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return bad(i);
    }
    if (i + size_t(len) > n) return bad(i);
    for (int k = 1; k < len; ++k) {
      const unsigned cc = s[i + size_t(k)];
      if ((cc & 0xC0) != 0x80) return bad(i);
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return bad(i);
    out.push_back(cp);
    i += size_t(len);
  }
  return true;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

Tokenizer Tokenizer::from_text(const std::vector<uint32_t>& text) {
  std::set<uint32_t> seen(text.begin(), text.end());
  Tokenizer t;
  t.chars.assign(1, 0);
  t.chars.insert(t.chars.end(), seen.begin(), seen.end());
  return t;
}

std::vector<int32_t> Tokenizer::encode(const std::vector<uint32_t>& text, int64_t* unknown) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  int64_t unk = 0;
  for (uint32_t cp : text) {
    const auto it = std::lower_bound(chars.begin() + 1, chars.end(), cp);
    if (it != chars.end() && *it == cp) {
      ids.push_back(int32_t(it - chars.begin()));
    } else {
      ids.push_back(0);
      ++unk;
    }
  }
  if (unknown) *unknown = unk;
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  for (int32_t id : ids) append_utf8(s, id > 0 && id < size() ? chars[size_t(id)] : 0xFFFD);
  return s;
}

std::string Tokenizer::vocabulary_utf8() const {
  std::string s;
  for (size_t i = 1; i < chars.size(); ++i) append_utf8(s, chars[i]);
  return s;
}

Tokenizer Tokenizer::from_vocabulary_utf8(const std::string& s) {
  std::vector<uint32_t> cps;
  size_t bad = 0;
  if (!decode_utf8(s, cps, &bad)) throw InputError("vocabulary: not UTF-8 at byte " + std::to_string(bad));
  Tokenizer t;
  t.chars.assign(1, 0);
  t.chars.insert(t.chars.end(), cps.begin(), cps.end());
  if (!std::is_sorted(t.chars.begin() + 1, t.chars.end()) ||
      std::adjacent_find(t.chars.begin() + 1, t.chars.end()) != t.chars.end())
    throw InputError("vocabulary: expected distinct characters in increasing order");
  return t;
}

TextData load_text(const std::string& path, double val_fraction, int64_t context) {
  const std::string bytes = read_regular_file(path, uint64_t(1) << 30);
  if (bytes.empty()) throw InputError(path + ": empty file, expected UTF-8 text");
  std::vector<uint32_t> cps;
  size_t bad = 0;
  if (!decode_utf8(bytes, cps, &bad)) {
    if (bytes[bad] == '\0')
      throw InputError(path + ": NUL byte at offset " + std::to_string(bad) + ": a binary file, expected UTF-8 text");
    throw InputError(path + ": not UTF-8 (invalid byte sequence at offset " + std::to_string(bad) +
                     "), expected UTF-8 text");
  }
  const int64_t n = int64_t(cps.size());
  const int64_t n_val = int64_t(double(n) * val_fraction);
  const int64_t n_train = n - n_val;
  const int64_t need = context + 1;
  if (n_train < need || n_val < need)
    throw InputError(path + ": " + std::to_string(n) + " characters (" + std::to_string(n_train) + " training, " +
                     std::to_string(n_val) + " held out) is shorter than one context window: each split needs " +
                     std::to_string(need) + " (context + 1)");
  TextData d;
  d.path = path;
  const std::vector<uint32_t> train(cps.begin(), cps.begin() + n_train), val(cps.begin() + n_train, cps.end());
  d.tok = Tokenizer::from_text(train);
  d.train = d.tok.encode(train);
  d.val = d.tok.encode(val, &d.val_unknown);
  return d;
}

void sample_text(Batch& out, const std::vector<int32_t>& data, int64_t B, int64_t T, TrainRng& rng) {
  out.x.resize(size_t(B * T));
  out.y.resize(size_t(B * T));
  const int64_t last = int64_t(data.size()) - T - 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t off = rng.integer(0, last);
    for (int64_t t = 0; t < T; ++t) {
      out.x[size_t(b * T + t)] = data[size_t(off + t)];
      out.y[size_t(b * T + t)] = data[size_t(off + t + 1)];
    }
  }
}

void sample_mqar(Batch& out, const MqarConfig& m, int64_t B, int64_t T, TrainRng& rng) {
  out.x.assign(size_t(B * T), 0);
  out.y.assign(size_t(B * T), -1);
  std::vector<int32_t> keys(size_t(m.keys)), vals(size_t(m.pairs));
  for (int64_t b = 0; b < B; ++b) {
    int32_t* x = out.x.data() + b * T;
    int32_t* y = out.y.data() + b * T;
    for (int64_t k = 0; k < m.keys; ++k) keys[size_t(k)] = int32_t(1 + k);
    // A partial Fisher–Yates shuffle: the first `pairs` keys are distinct.
    for (int64_t i = 0; i < m.pairs; ++i) std::swap(keys[size_t(i)], keys[size_t(rng.integer(i, m.keys - 1))]);
    for (int64_t i = 0; i < m.pairs; ++i) {
      vals[size_t(i)] = int32_t(1 + m.keys + rng.integer(0, m.values - 1));
      x[2 * i] = keys[size_t(i)];
      x[2 * i + 1] = vals[size_t(i)];
    }
    for (int64_t t = 2 * m.pairs; t + 1 < T; t += 2) {
      const int64_t i = rng.integer(0, m.pairs - 1);
      x[t] = keys[size_t(i)];
      x[t + 1] = vals[size_t(i)];
      y[t] = vals[size_t(i)];  // at the query key, predict its value
    }
  }
}

}  // namespace attnbench::train
