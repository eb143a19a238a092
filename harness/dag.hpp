// DAG prompts (LE-ATTENTION): the JSON input format, its validation, built-in
// generators and the token layout the `dag` mask reads (DESIGN §5 "Mask family").
//
// Format (docs/masked.md has the full description):
//   {"nodes": [
//      {"id": "BOS", "length": 1},
//      {"id": "X1", "text": "The cat sat.", "parents": ["BOS"]},
//      {"id": "Q",  "length": 12, "parents": ["X1"], "start_pos_id": 40}
//   ]}
// A node has an id (unique), a token count (`length`, or `text` tokenized per
// character; both given must agree), parents (ids; default none) and optional
// position options. Nodes are laid out in a topological order (the file's order
// where it is one): node tokens are contiguous, parents come first. Position ids
// restart at 0 in every node, or run from start_pos_id, or end just before
// end_pos_id (exclusive, LE-ATTENTION's convention); a node gives at most one.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace attnbench {

struct DagNode {
  std::string id;
  int64_t length = 0;
  std::vector<std::string> parents;
  std::optional<int64_t> start_pos_id, end_pos_id;
};

struct Dag {
  std::vector<DagNode> nodes;  // in topological order after parse_dag / load_dag
};

/// Validates and orders a DAG given as JSON. Errors: InputError("<where>: nodes[3].parents[0]: ...").
Dag parse_dag(const nlohmann::json& j, const std::string& where);

/// A DAG from a spec string: a built-in generator or the path of a JSON file.
///   "chain:K:L"         K nodes X1 → X2 → ... of L tokens each
///   "le_attention:K"    LE-ATTENTION's benchmark shape: BOS (1 token), K one-sentence
///                       documents (5..9 tokens, parent BOS), a query of 83 tokens whose
///                       parents are all documents (K = 500: 3 584 tokens)
///   "path/to/file.json" the format above
///   "{\"nodes\": ...}"    the format above, inline
Dag load_dag(const std::string& spec, const std::string& where);

/// The spec with a file path replaced by the file's JSON inline (generators and
/// inline DAGs unchanged): what a case file stores, so it verifies anywhere.
std::string dag_inline(const std::string& spec, const std::string& where);

/// Token layout of a DAG: node of each token, the first token of each node,
/// position ids, and which nodes each node sees (parents only, or the
/// transitive closure: ancestors) as a bit matrix.
struct DagLayout {
  int64_t tokens = 0, nodes = 0, words = 0;
  std::vector<int32_t> node;        // (tokens,)
  std::vector<int32_t> node_start;  // (nodes + 1,)
  std::vector<int32_t> pos;         // (tokens,) position ids
  std::vector<uint32_t> reach;      // (nodes, words): bit b of row a = node a sees node b
  std::vector<std::string> ids;     // (nodes,)
};

DagLayout layout_dag(const Dag& dag, bool ancestors);

}  // namespace attnbench
