#include "harness/dag.hpp"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <queue>
#include <sstream>

#include "harness/errors.hpp"
#include "harness/json_file.hpp"

namespace attnbench {
namespace {

/// Characters of a UTF-8 string (code points; "tokenized per character").
int64_t utf8_length(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

int64_t parse_int(const std::string& s, const std::string& where) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || v < 1) throw InputError(where + ": expected a positive integer, got \"" + s + "\"");
  return v;
}

// Limits that keep a hostile DAG from exhausting the machine: the layout holds
// a nodes x nodes bit matrix (16 384 nodes: 32 MiB) and int32 token indices and
// position ids. LE-ATTENTION's largest published prompt has ~1 000 nodes.
constexpr int64_t kMaxNodes = 16384;
constexpr int64_t kMaxTokens = int64_t(1) << 24;
constexpr int64_t kMaxPosition = (int64_t(1) << 31) - 1;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, sep);) out.push_back(part);
  return out;
}

}  // namespace

Dag parse_dag(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("nodes"))
    throw InputError(where + ": expected an object with \"nodes\": [{\"id\": ..., \"length\": ..., \"parents\": [...]}, ...]");
  const auto& arr = j.at("nodes");
  if (!arr.is_array()) throw InputError(where + ": nodes: expected an array");
  if (arr.empty()) throw InputError(where + ": nodes: the graph is empty (expected at least one node)");
  if (int64_t(arr.size()) > kMaxNodes)
    throw InputError(where + ": nodes: " + std::to_string(arr.size()) + " nodes, more than the " +
                     std::to_string(kMaxNodes) + " supported");
  int64_t tokens = 0;

  std::vector<DagNode> given;
  std::map<std::string, size_t> index;
  for (size_t n = 0; n < arr.size(); ++n) {
    const std::string at = where + ": nodes[" + std::to_string(n) + "]";
    const auto& o = arr[n];
    if (!o.is_object()) throw InputError(at + ": expected an object");
    for (const auto& [key, _] : o.items())
      if (key != "id" && key != "length" && key != "text" && key != "parents" && key != "start_pos_id" &&
          key != "end_pos_id")
        throw InputError(at + ": unknown field \"" + key + "\"" +
                         did_you_mean(key, {"id", "length", "text", "parents", "start_pos_id", "end_pos_id"}));
    DagNode node;
    if (!o.contains("id") || !o["id"].is_string() || o["id"].get<std::string>().empty())
      throw InputError(at + ".id: expected a non-empty string");
    node.id = o["id"].get<std::string>();
    if (index.count(node.id)) throw InputError(at + ".id: duplicate id \"" + node.id + "\"");
    const bool has_len = o.contains("length"), has_text = o.contains("text");
    if (has_len && !(o["length"].is_number_integer() && o["length"].get<int64_t>() >= 1))
      throw InputError(at + ".length: expected an integer >= 1, got " + o["length"].dump());
    if (has_text && !o["text"].is_string()) throw InputError(at + ".text: expected a string");
    if (!has_len && !has_text) throw InputError(at + ": expected \"length\" or \"text\"");
    node.length = has_len ? o["length"].get<int64_t>() : utf8_length(o["text"].get<std::string>());
    if (has_text && utf8_length(o["text"].get<std::string>()) != node.length)
      throw InputError(at + ": length " + std::to_string(node.length) + " disagrees with text of " +
                       std::to_string(utf8_length(o["text"].get<std::string>())) + " characters");
    if (node.length < 1) throw InputError(at + ".text: expected at least one character");
    tokens += std::min(node.length, kMaxTokens + 1);
    if (tokens > kMaxTokens)
      throw InputError(at + ": the DAG has more than " + std::to_string(kMaxTokens) + " tokens, the most supported");
    if (o.contains("parents")) {
      if (!o["parents"].is_array()) throw InputError(at + ".parents: expected an array of node ids");
      for (size_t k = 0; k < o["parents"].size(); ++k) {
        if (!o["parents"][k].is_string())
          throw InputError(at + ".parents[" + std::to_string(k) + "]: expected a node id (string)");
        node.parents.push_back(o["parents"][k].get<std::string>());
      }
    }
    for (const char* key : {"start_pos_id", "end_pos_id"})
      if (o.contains(key)) {
        if (!o[key].is_number_integer() || o[key].get<int64_t>() < 0 || o[key].get<int64_t>() > kMaxPosition)
          throw InputError(at + "." + key + ": expected an integer in [0, " + std::to_string(kMaxPosition) +
                           "], got " + o[key].dump());
        (std::string(key) == "start_pos_id" ? node.start_pos_id : node.end_pos_id) = o[key].get<int64_t>();
      }
    // LE-ATTENTION's convention: end_pos_id is exclusive (positions end − length … end − 1),
    // and a node gives one of the two, never both.
    if (node.start_pos_id && node.end_pos_id)
      throw InputError(at + ": start_pos_id and end_pos_id together: give one (end_pos_id is exclusive)");
    if (node.end_pos_id && *node.end_pos_id < node.length)
      throw InputError(at + ".end_pos_id: " + std::to_string(*node.end_pos_id) +
                       " would make the first position negative (" + std::to_string(node.length) +
                       " tokens; end_pos_id is exclusive)");
    if (node.start_pos_id && *node.start_pos_id + node.length - 1 > kMaxPosition)
      throw InputError(at + ".start_pos_id: " + std::to_string(*node.start_pos_id) +
                       " makes the last position exceed " + std::to_string(kMaxPosition));
    index[node.id] = n;
    given.push_back(std::move(node));
  }
  std::vector<std::string> ids;
  for (const auto& n : given) ids.push_back(n.id);
  std::vector<std::vector<size_t>> children(given.size());
  std::vector<size_t> missing(given.size(), 0);
  for (size_t n = 0; n < given.size(); ++n) {
    std::map<std::string, bool> seen;
    for (size_t k = 0; k < given[n].parents.size(); ++k) {
      const std::string& p = given[n].parents[k];
      const std::string at = where + ": nodes[" + std::to_string(n) + "].parents[" + std::to_string(k) + "]";
      auto it = index.find(p);
      if (it == index.end()) throw InputError(at + ": unknown parent \"" + p + "\"" + did_you_mean(p, ids));
      if (it->second == n) throw InputError(at + ": node \"" + p + "\" lists itself as a parent (a cycle)");
      if (seen[p]) throw InputError(at + ": parent \"" + p + "\" listed twice");
      seen[p] = true;
      children[it->second].push_back(n);
      ++missing[n];
    }
  }
  // Kahn's algorithm, taking the earliest-listed ready node first (a min-heap
  // of ready indices, O(n log n) for the largest DAGs): the file's order when it
  // already is topological.
  Dag out;
  std::vector<bool> done(given.size(), false);
  std::priority_queue<size_t, std::vector<size_t>, std::greater<>> ready;
  for (size_t n = 0; n < given.size(); ++n)
    if (missing[n] == 0) ready.push(n);
  while (!ready.empty()) {
    const size_t pick = ready.top();
    ready.pop();
    done[pick] = true;
    for (size_t c : children[pick])
      if (--missing[c] == 0) ready.push(c);
    out.nodes.push_back(given[pick]);
  }
  if (out.nodes.size() != given.size()) {
    std::string cyc;
    for (size_t n = 0; n < given.size(); ++n)
      if (!done[n]) cyc += (cyc.empty() ? "\"" : ", \"") + given[n].id + "\"";
    throw InputError(where + ": nodes: the parents form a cycle among " + cyc);
  }
  return out;
}

Dag load_dag(const std::string& spec, const std::string& where) {
  const auto parts = split(spec, ':');
  if (!parts.empty() && parts[0] == "chain") {
    if (parts.size() != 3) throw InputError(where + ": expected \"chain:K:L\" (K nodes of L tokens), got \"" + spec + "\"");
    const int64_t K = parse_int(parts[1], where + " (chain K)"), L = parse_int(parts[2], where + " (chain L)");
    if (K > kMaxNodes) throw InputError(where + " (chain K): at most " + std::to_string(kMaxNodes) + " nodes, got " + parts[1]);
    nlohmann::json j = {{"nodes", nlohmann::json::array()}};
    for (int64_t k = 1; k <= K; ++k) {
      nlohmann::json node = {{"id", "X" + std::to_string(k)}, {"length", L}};
      if (k > 1) node["parents"] = {"X" + std::to_string(k - 1)};
      j["nodes"].push_back(node);
    }
    return parse_dag(j, where);
  }
  if (!parts.empty() && parts[0] == "le_attention") {
    if (parts.size() != 2) throw InputError(where + ": expected \"le_attention:K\" (K documents), got \"" + spec + "\"");
    const int64_t K = parse_int(parts[1], where + " (le_attention K)");
    if (K > kMaxNodes - 2)
      throw InputError(where + " (le_attention K): at most " + std::to_string(kMaxNodes - 2) + " documents, got " + parts[1]);
    nlohmann::json j = {{"nodes", {{{"id", "BOS"}, {"length", 1}}}}};
    nlohmann::json query = {{"id", "query"}, {"length", 83}, {"parents", nlohmann::json::array()}};
    for (int64_t k = 0; k < K; ++k) {
      const std::string id = "doc" + std::to_string(k);
      j["nodes"].push_back({{"id", id}, {"length", 5 + k % 5}, {"parents", {"BOS"}}});  // mean 7 tokens
      query["parents"].push_back(id);
    }
    j["nodes"].push_back(query);
    return parse_dag(j, where);
  }
  // Inline JSON (what `attnbench export` stores in a case file: no path to resolve).
  if (!spec.empty() && spec.front() == '{') return parse_dag(parse_json_text(spec, where + ": inline DAG"), where);
  std::error_code ec;
  if (!std::filesystem::exists(spec, ec))
    throw InputError(where + ": \"" + spec +
                     "\" is neither a readable DAG file nor a generator (\"chain:K:L\", \"le_attention:K\")");
  return parse_dag(read_json_file(spec), spec);
}

DagLayout layout_dag(const Dag& dag, bool ancestors) {
  DagLayout L;
  L.nodes = int64_t(dag.nodes.size());
  L.words = (L.nodes + 31) / 32;
  L.reach.assign(size_t(L.nodes * L.words), 0u);
  std::map<std::string, int64_t> index;
  L.node_start.push_back(0);
  for (int64_t n = 0; n < L.nodes; ++n) {
    const DagNode& node = dag.nodes[size_t(n)];
    index[node.id] = n;
    L.ids.push_back(node.id);
    const int64_t first = node.start_pos_id   ? *node.start_pos_id
                          : node.end_pos_id ? *node.end_pos_id - node.length
                                            : 0;
    for (int64_t t = 0; t < node.length; ++t) {
      L.node.push_back(int32_t(n));
      L.pos.push_back(int32_t(first + t));
    }
    L.node_start.push_back(int32_t(L.node.size()));
    uint32_t* row = L.reach.data() + n * L.words;
    for (const auto& p : node.parents) {
      const int64_t pn = index.at(p);  // parents come first (topological order)
      row[pn / 32] |= 1u << (pn % 32);
      if (ancestors)
        for (int64_t w = 0; w < L.words; ++w) row[w] |= L.reach[size_t(pn * L.words + w)];
    }
  }
  L.tokens = int64_t(L.node.size());
  return L;
}

std::string dag_inline(const std::string& spec, const std::string& where) {
  const auto parts = split(spec, ':');
  if (spec.empty() || spec.front() == '{' || (!parts.empty() && (parts[0] == "chain" || parts[0] == "le_attention")))
    return spec;
  return read_json_file(spec).dump();
}

}  // namespace attnbench
