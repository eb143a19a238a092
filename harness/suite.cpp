#include "harness/suite.hpp"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>

#include "harness/errors.hpp"
#include "harness/json_file.hpp"

namespace attnbench {

namespace {

using nlohmann::json;

/// Cases one suite may expand to; beyond it a suite is a typo (or an attack).
constexpr int64_t kMaxSuiteCases = 100000;

/// A JSON object being read, with its location for error messages.
class Node {
 public:
  Node(const json& j, std::string where) : j_(j), where_(std::move(where)) {}

  const std::string& where() const { return where_; }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw InputError(where_ + (key.empty() ? "" : "." + key) + ": " + what);
  }
  void expect_object() const {
    if (!j_.is_object()) fail("", "expected an object, got " + j_.dump());
  }
  /// Rejects keys outside `allowed`, with a did-you-mean.
  void only(const std::vector<std::string>& allowed) const {
    expect_object();
    for (const auto& [k, v] : j_.items())
      if (std::find(allowed.begin(), allowed.end(), k) == allowed.end())
        fail(k, "unknown key" + did_you_mean(k, allowed));
  }
  bool has(const std::string& k) const { return j_.contains(k); }
  Node at(const std::string& k) const { return Node(j_.at(k), where_ + "." + k); }
  const json& raw() const { return j_; }

  std::string str(const std::string& k, const std::string& dflt, bool required = false) const {
    if (!has(k)) {
      if (required) fail(k, "missing (expected a string)");
      return dflt;
    }
    if (!j_[k].is_string()) fail(k, "expected a string, got " + j_[k].dump());
    return j_[k].get<std::string>();
  }
  bool boolean(const std::string& k, bool dflt) const {
    if (!has(k)) return dflt;
    if (!j_[k].is_boolean()) fail(k, "expected true or false, got " + j_[k].dump());
    return j_[k].get<bool>();
  }
  // Every number has an upper bound too: a huge value would hang the run
  // (min_time_s 1e300) or wrap when narrowed (seeds 2^31 as an int).
  double number(const std::string& k, double dflt, double min, double max) const {
    if (!has(k)) return dflt;
    if (!j_[k].is_number()) fail(k, "expected a number, got " + j_[k].dump());
    double v = j_[k].get<double>();
    if (!(v >= min && v <= max)) {
      std::ostringstream range;  // "[0, 60]", not "[0.0, 60.0]"
      range << "[" << min << ", " << max << "]";
      fail(k, "expected a number in " + range.str() + ", got " + j_[k].dump());
    }
    return v;
  }
  int64_t integer(const std::string& k, int64_t dflt, int64_t min, int64_t max) const {
    if (!has(k)) return dflt;
    const json& x = j_[k];
    if (!x.is_number_integer()) fail(k, "expected an integer, got " + x.dump());
    // Unsigned values above INT64_MAX would wrap in get<int64_t>().
    if (x.is_number_unsigned() ? x.get<uint64_t>() > uint64_t(max) : (x.get<int64_t>() < min || x.get<int64_t>() > max))
      fail(k, "expected an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "], got " + x.dump());
    return x.get<int64_t>();
  }
  uint64_t unsigned_integer(const std::string& k, uint64_t dflt) const {
    if (!has(k)) return dflt;
    if (!j_[k].is_number_unsigned()) fail(k, "expected an integer >= 0 (and below 2^64), got " + j_[k].dump());
    return j_[k].get<uint64_t>();
  }
  std::vector<std::string> strings(const std::string& k) const {
    const json& a = j_.at(k);
    if (!a.is_array() || a.empty()) fail(k, "expected a non-empty array of strings");
    std::vector<std::string> out;
    for (const auto& e : a) {
      if (!e.is_string()) fail(k, "expected strings, got " + e.dump());
      out.push_back(e.get<std::string>());
    }
    return out;
  }

 private:
  const json& j_;
  std::string where_;
};

/// Cartesian product of the named axes, in the order the suite gives them
/// (nlohmann keeps keys sorted; the last axis varies fastest). Its size is
/// checked before it is built: 40 values on 6 axes would never finish.
std::vector<json> cartesian(const Node& sweep) {
  sweep.expect_object();
  uint64_t count = 1;
  for (const auto& [axis, values] : sweep.raw().items()) {
    if (!values.is_array() || values.empty()) sweep.fail(axis, "expected a non-empty array of values");
    count *= values.size();
    if (count > uint64_t(kMaxSuiteCases))
      sweep.fail("", "the sweep has more than " + std::to_string(kMaxSuiteCases) + " shapes, the most a suite may have");
  }
  std::vector<json> out{json::object()};
  for (const auto& [axis, values] : sweep.raw().items()) {
    std::vector<json> next;
    for (const auto& partial : out)
      for (const auto& v : values) {
        json p = partial;
        p[axis] = v;
        next.push_back(std::move(p));
      }
    out = std::move(next);
  }
  return out;
}

void read_checks(const Node& n, RunOptions& o) {
  n.only({"enabled", "seeds", "floor_ulps", "max_oracle_gflop", "properties"});
  o.check = n.boolean("enabled", true);
  o.check_seeds = int(n.integer("seeds", 3, 1, 1000));
  o.floor_ulps = n.number("floor_ulps", 8.0, 0.0, 1e6);
  o.max_oracle_gflop = n.number("max_oracle_gflop", 0.0, 0.0, 1e9);
  if (n.has("properties")) {
    n.at("properties").expect_object();
    o.property_options = n.raw().at("properties");
  }
}

void read_bench(const Node& n, RunOptions& o) {
  n.only({"enabled", "min_time_s", "repetitions", "memory"});
  o.bench = n.boolean("enabled", true);
  o.bench_settings.min_time_s = n.number("min_time_s", 0.2, 0.0, 60.0);
  o.bench_settings.repetitions = int(n.integer("repetitions", 5, 1, 1000));
  o.bench_settings.memory = n.boolean("memory", true);
}

/// A skip rule's conditions must be able to match: known keys, and "min" an
/// object of numeric bounds on parameters ({"min": 5} matched nothing).
void check_skip_rule(const Node& when, const Variant& v) {
  std::vector<std::string> keys{"impl", "dtype", "pass", "min"}, params;
  for (const auto& p : v.params()) params.push_back(p.name);
  keys.insert(keys.end(), params.begin(), params.end());
  when.only(keys);
  if (when.raw().empty()) when.fail("", "expected at least one condition (an empty rule skips every case)");
  for (const char* k : {"impl", "dtype", "pass"})
    if (when.has(k) && !when.raw().at(k).is_string()) when.fail(k, "expected a string, got " + when.raw().at(k).dump());
  if (when.has("min")) {
    const Node min = when.at("min");
    if (!min.raw().is_object() || min.raw().empty())
      min.fail("", "expected an object of lower bounds such as {\"N\": 4096}, got " + min.raw().dump());
    min.only(params);
    for (const auto& [axis, bound] : min.raw().items())
      if (!bound.is_number()) min.fail(axis, "expected a number, got " + bound.dump());
  }
}

SuiteGroup read_group(const Node& g, bool quick) {
  g.only({"variant", "impls", "dtypes", "passes", "sweep", "cases", "quick", "skip", "description"});
  SuiteGroup out;
  out.where = g.where();
  out.variant = &find_variant(g.str("variant", "", true), g.where() + ".variant");
  const Variant& v = *out.variant;

  if (!g.has("impls")) g.fail("impls", "missing (expected an array of implementation names)");
  std::vector<std::string> impl_names;
  for (const auto& i : v.impls()) impl_names.push_back(i.name);
  for (const auto& name : g.strings("impls")) {
    if (std::find(impl_names.begin(), impl_names.end(), name) == impl_names.end())
      g.fail("impls", "variant '" + v.name() + "' has no implementation '" + name + "'" + did_you_mean(name, impl_names));
    out.impls.push_back(name);
  }
  if (!g.has("dtypes")) g.fail("dtypes", "missing (expected an array such as [\"f32\", \"bf16\"])");
  for (const auto& d : g.strings("dtypes")) out.dtypes.push_back(parse_dtype(d, g.where() + ".dtypes"));
  if (g.has("passes")) {
    out.passes.clear();
    for (const auto& name : g.strings("passes")) out.passes.push_back(parse_pass(name, g.where() + ".passes"));
  }

  std::vector<std::pair<json, std::string>> shapes;  // raw params and where they came from
  if (g.has("sweep")) {
    json sweep = g.raw().at("sweep");
    if (quick && g.has("quick")) {
      Node q = g.at("quick");
      q.expect_object();
      for (const auto& [axis, values] : q.raw().items()) sweep[axis] = values;
    }
    for (auto& p : cartesian(Node(sweep, g.where() + ".sweep"))) shapes.emplace_back(p, g.where() + ".sweep");
  } else if (g.has("quick")) {
    g.fail("quick", "only meaningful with a sweep");
  }
  if (g.has("cases")) {
    const json& cases = g.raw().at("cases");
    if (!cases.is_array()) g.fail("cases", "expected an array of shape objects");
    for (size_t i = 0; i < cases.size(); ++i)
      shapes.emplace_back(cases[i], g.where() + ".cases[" + std::to_string(i) + "]");
  }
  if (shapes.empty()) g.fail("", "expected a \"sweep\" or \"cases\"");
  if (shapes.size() > size_t(kMaxSuiteCases))
    g.fail("", "more than " + std::to_string(kMaxSuiteCases) + " shapes, the most a suite may have");
  for (auto& [p, where] : shapes) out.shapes.push_back(v.complete(p, where));

  if (g.has("skip")) {
    const json& skips = g.raw().at("skip");
    if (!skips.is_array()) g.fail("skip", "expected an array of {\"when\": {...}, \"reason\": \"...\"}");
    for (size_t i = 0; i < skips.size(); ++i) {
      Node s(skips[i], g.where() + ".skip[" + std::to_string(i) + "]");
      s.only({"when", "reason"});
      if (!s.has("when") || !s.raw().at("when").is_object()) s.fail("when", "expected an object of conditions");
      check_skip_rule(Node(s.raw().at("when"), s.where() + ".when"), v);
      out.skips.push_back({s.raw().at("when"), s.str("reason", "", true)});
    }
  }
  return out;
}

bool numeric_match(const json& have, const json& want, bool at_least) {
  if (!have.is_number() || !want.is_number()) return false;
  return at_least ? have.get<double>() >= want.get<double>() : have.get<double>() == want.get<double>();
}

bool skip_matches(const SkipRule& r, const CaseSpec& c) {
  for (const auto& [key, want] : r.when.items()) {
    if (key == "impl") {
      if (want != c.impl) return false;
    } else if (key == "dtype") {
      if (want != dtype_name(c.dtype)) return false;
    } else if (key == "pass") {
      if (want != pass_name(c.pass)) return false;
    } else if (key == "min") {
      for (const auto& [axis, bound] : want.items())
        if (!c.params.contains(axis) || !numeric_match(c.params[axis], bound, true)) return false;
    } else if (!c.params.contains(key) || c.params[key] != want) {
      return false;
    }
  }
  return true;
}

}  // namespace

Suite load_suite(const std::string& path, bool quick) {
  const json doc = read_json_file(path);
  Node root(doc, path);
  if (doc.is_object() && doc.contains("kind") && doc.at("kind") == "train")
    root.fail("kind", "this is a training suite: run it with `attnbench train " + path + "`");
  root.only({"name", "description", "seed", "checks", "bench", "groups"});
  Suite s;
  s.file = path;
  s.name = root.str("name", "", true);
  // The name becomes results/<name>.json: no path separators, "..", NULs or
  // anything else a file name should not hold.
  const bool safe = !s.name.empty() && s.name.size() <= 100 && std::isalnum(static_cast<unsigned char>(s.name[0])) &&
                    std::all_of(s.name.begin(), s.name.end(), [](char ch) {
                      return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.';
                    });
  if (!safe)
    root.fail("name", "expected a file name of letters, digits, '-', '_' and '.' (starting with a letter or digit, "
                      "at most 100), got " + doc.at("name").dump());
  s.description = root.str("description", "");
  s.seed = root.unsigned_integer("seed", 0);
  s.options.seed = s.seed;
  if (root.has("checks")) read_checks(root.at("checks"), s.options);
  if (root.has("bench")) read_bench(root.at("bench"), s.options);
  if (quick) {
    s.options.bench_settings.repetitions = std::min(s.options.bench_settings.repetitions, 3);
    s.options.bench_settings.min_time_s = std::min(s.options.bench_settings.min_time_s, 0.05);
  }
  if (!root.has("groups")) root.fail("groups", "missing (expected an array of groups)");
  const json& groups = doc.at("groups");
  if (!groups.is_array() || groups.empty()) root.fail("groups", "expected a non-empty array of groups");
  uint64_t cases = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    s.groups.push_back(read_group(Node(groups[i], path + ": groups[" + std::to_string(i) + "]"), quick));
    const SuiteGroup& g = s.groups.back();
    cases += g.shapes.size() * g.dtypes.size() * g.impls.size() * g.passes.size();
    if (cases > uint64_t(kMaxSuiteCases))
      root.fail("groups", "the suite expands to more than " + std::to_string(kMaxSuiteCases) + " cases, the most supported");
  }
  return s;
}

std::vector<SuiteCase> expand(const Suite& s) {
  std::vector<SuiteCase> out;
  for (const auto& g : s.groups)
    for (const auto& p : g.shapes)
      for (DType d : g.dtypes)
        for (Pass pass : g.passes)
          for (const auto& impl : g.impls) {
            SuiteCase c{CaseSpec{g.variant, impl, d, p, pass}, ""};
            for (const auto& r : g.skips)
              if (skip_matches(r, c.spec)) {
                c.skip_reason = r.reason;
                break;
              }
            out.push_back(std::move(c));
          }
  return out;
}

CaseFilter::CaseFilter(const std::string& expr) {
  std::stringstream ss(expr);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    static const char* ops[] = {"!=", "<=", ">=", "=", "<", ">"};
    bool found = false;
    for (const char* op : ops) {
      auto pos = item.find(op);
      if (pos == std::string::npos || pos == 0) continue;
      Cond c{item.substr(0, pos), op, item.substr(pos + std::string(op).size())};
      if (c.op != "=" && c.op != "!=") {
        char* end = nullptr;
        std::strtod(c.value.c_str(), &end);
        if (c.value.empty() || end != c.value.c_str() + c.value.size())
          throw InputError("--filter: '" + item + "': " + c.op + " needs a number, got '" + c.value + "'");
      }
      conds_.push_back(std::move(c));
      found = true;
      break;
    }
    if (!found)
      throw InputError("--filter: '" + item + "' is not a condition; expected key=value, key!=value, key<N, key<=N, key>N or key>=N");
  }
}

void CaseFilter::check_keys(const Suite& s) const {
  std::vector<std::string> known = {"impl", "dtype", "pass", "variant"};
  for (const auto& g : s.groups)
    for (const auto& spec : g.variant->params())
      if (std::find(known.begin(), known.end(), spec.name) == known.end()) known.push_back(spec.name);
  for (const auto& cond : conds_)
    if (std::find(known.begin(), known.end(), cond.key) == known.end())
      throw InputError("--filter: '" + cond.key + "' is not impl, dtype, pass, variant or a parameter of this suite's variants" +
                       did_you_mean(cond.key, known));
}

bool CaseFilter::matches(const CaseSpec& c) const {
  for (const auto& cond : conds_) {
    std::string have;
    json have_json;
    if (cond.key == "impl") have = c.impl;
    else if (cond.key == "dtype") have = std::string(dtype_name(c.dtype));
    else if (cond.key == "pass") have = std::string(pass_name(c.pass));
    else if (cond.key == "variant") have = c.variant->name();
    else if (c.params.contains(cond.key)) {
      have_json = c.params[cond.key];
      have = have_json.is_string() ? have_json.get<std::string>() : have_json.dump();
    } else {
      return false;
    }
    if (cond.op == "=" || cond.op == "!=") {
      if ((have == cond.value) != (cond.op == "=")) return false;
      continue;
    }
    char* end = nullptr;
    const double want = std::strtod(cond.value.c_str(), &end);
    if (!have_json.is_number() || end == cond.value.c_str()) return false;
    const double h = have_json.get<double>();
    if ((cond.op == "<" && !(h < want)) || (cond.op == "<=" && !(h <= want)) || (cond.op == ">" && !(h > want)) ||
        (cond.op == ">=" && !(h >= want)))
      return false;
  }
  return true;
}

}  // namespace attnbench
