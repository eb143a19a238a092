// Suite files (docs/suites.md): parsing with one-line errors naming the file
// and JSON path, and expansion of sweeps into cases.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/runner.hpp"

namespace attnbench {

struct SkipRule {
  nlohmann::json when;  // {"impl": "reference", "dtype": "bf16", "N": 4096, "min": {"N": 4096}}
  std::string reason;
};

struct SuiteGroup {
  const Variant* variant = nullptr;
  std::vector<std::string> impls;
  std::vector<DType> dtypes;
  std::vector<Pass> passes = {Pass::fwd};
  std::vector<Params> shapes;  // completed (defaults filled), in sweep order
  std::vector<SkipRule> skips;
  std::string where;           // "suites/x.json: groups[0]"
};

struct Suite {
  std::string file, name, description;
  uint64_t seed = 0;
  RunOptions options;          // checks, bench, seeds, property options
  std::vector<SuiteGroup> groups;
};

/// One case of an expanded suite; `skip_reason` set when a skip rule matched.
struct SuiteCase {
  CaseSpec spec;
  std::string skip_reason;
};

/// Reads and validates `path`; `quick` applies each group's "quick" axes and
/// the lighter quick bench settings.
Suite load_suite(const std::string& path, bool quick);

/// Cases in run order (group, shape, dtype, pass, impl).
std::vector<SuiteCase> expand(const Suite& s);

/// `--filter`: comma-separated conditions on impl, dtype, pass, variant or a shape
/// parameter, each `key=value`, `key!=value`, `key<N`, `key<=N`, `key>N`, `key>=N`.
class CaseFilter {
 public:
  /// Throws InputError for a malformed condition or a comparison with a non-number.
  explicit CaseFilter(const std::string& expr);
  bool matches(const CaseSpec& c) const;
  /// Throws InputError (did-you-mean) for a key that is none of impl, dtype,
  /// variant or a parameter of some variant in `s`: a typo would select nothing.
  void check_keys(const Suite& s) const;

 private:
  struct Cond {
    std::string key, op, value;
  };
  std::vector<Cond> conds_;
};

}  // namespace attnbench
