// Training data for attnbench train: a character-level tokenizer over any UTF-8
// text file (vocabulary from the training split; id 0 is reserved for
// characters the training split never had) and the synthetic multi-query
// associative recall task (MQAR, as in the Zoology work), which needs no file.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "harness/rng.hpp"

namespace attnbench::train {

/// The trainer's random stream (batches, sampling): the same splitmix64 as
/// harness Rng, with its state readable so that checkpoints can restore it.
struct TrainRng {
  uint64_t state = 0;
  TrainRng() = default;
  TrainRng(uint64_t seed, std::string_view key, std::string_view name) : state(hash64(name, hash64(key, seed))) {}
  uint64_t next_u64() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }
  int64_t integer(int64_t lo, int64_t hi) { return lo + int64_t(next_u64() % uint64_t(hi - lo + 1)); }
};

/// Characters (Unicode code points) ↔ ids. Id 0 is the unknown character.
struct Tokenizer {
  std::vector<uint32_t> chars{0};  // chars[id]; chars[0] unused (unknown)

  int64_t size() const { return int64_t(chars.size()); }
  /// Vocabulary: id 0 plus every distinct code point of `text`, sorted.
  static Tokenizer from_text(const std::vector<uint32_t>& text);
  /// Ids of the code points; those not in the vocabulary become 0 and are counted in *unknown.
  std::vector<int32_t> encode(const std::vector<uint32_t>& text, int64_t* unknown = nullptr) const;
  /// UTF-8 text of the ids (id 0 and ids out of range as U+FFFD).
  std::string decode(const std::vector<int32_t>& ids) const;
  /// The vocabulary as UTF-8 (chars 1…), for checkpoints.
  std::string vocabulary_utf8() const;
  static Tokenizer from_vocabulary_utf8(const std::string& s);
};

/// Decodes UTF-8; false (with the byte offset of the first bad sequence) when
/// it is not valid UTF-8 (overlong forms, surrogates and NUL count as invalid:
/// NUL marks a binary file).
bool decode_utf8(const std::string& bytes, std::vector<uint32_t>& out, size_t* bad_offset);
void append_utf8(std::string& out, uint32_t cp);

/// A text file split into training and held-out characters.
struct TextData {
  std::string path;
  Tokenizer tok;
  std::vector<int32_t> train, val;
  int64_t val_unknown = 0;  // held-out characters mapped to the unknown id
};

/// Reads `path`: the last `val_fraction` of its characters are held out. Errors
/// (InputError, one line naming the file): not a regular file, empty, binary or
/// not UTF-8, either split shorter than one context window (context + 1 characters).
TextData load_text(const std::string& path, double val_fraction, int64_t context);

/// The MQAR task: each sequence starts with `pairs` key-value pairs
/// (k_1 v_1 … k_n v_n, distinct keys), then asks (k, v) pairs again with keys
/// drawn from those; only the answer positions (predicting v after k) count.
/// Ids: 0 pad, 1…keys keys, keys+1…keys+values values.
struct MqarConfig {
  int64_t pairs = 8, keys = 64, values = 64;
  int64_t vocab() const { return 1 + keys + values; }
};

/// One batch: tokens and next-token targets (−1: not counted), B·T each.
struct Batch {
  std::vector<int32_t> x, y;
};

/// B windows of T + 1 characters at uniformly random offsets of `data`.
void sample_text(Batch& out, const std::vector<int32_t>& data, int64_t B, int64_t T, TrainRng& rng);
/// B MQAR sequences of T tokens.
void sample_mqar(Batch& out, const MqarConfig& m, int64_t B, int64_t T, TrainRng& rng);

}  // namespace attnbench::train
