// Deterministic random numbers.
//
// Every tensor gets its own stream, keyed by (seed, case key, tensor name), so a
// case's inputs do not depend on which cases ran before it, on the order of the
// sweep, on sharding or on the thread count.
#pragma once

#include <cstdint>
#include <string_view>

namespace attnbench {

uint64_t hash64(std::string_view s, uint64_t seed = 0);

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  Rng(uint64_t seed, std::string_view case_key, std::string_view tensor)
      : state_(hash64(tensor, hash64(case_key, seed))) {}

  uint64_t next_u64() {  // splitmix64
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1).
  double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Standard normal (Box–Muller, one value per call).
  double normal();
  /// Uniform integer in [lo, hi].
  int64_t integer(int64_t lo, int64_t hi) { return lo + int64_t(next_u64() % uint64_t(hi - lo + 1)); }

 private:
  uint64_t state_;
};

}  // namespace attnbench
