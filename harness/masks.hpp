// From the `masked` variant's parameters to the data its mask reads: document
// ids, DAG layouts, mask-attention rows. Shared by the variant
// (harness/variants/masked.cpp) and the `attnbench mask` tool.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "harness/dag.hpp"
#include "harness/variant.hpp"
#include "impls/block_map.hpp"
#include "impls/mask.hpp"
#include "reference/masked.hpp"

namespace attnbench {

/// The `masked` variant's parameters, resolved (N → Nq / Nkv, the DAG loaded).
struct MaskedCase {
  int64_t B = 1, H = 1, Nq = 1, Nkv = 1, D = 1;
  std::string mask = "none";
  int64_t window = 0, doc_len = 0, prefix = 0, registers = 0, tile_q = 64, tile_k = 64;
  bool cyclic = false, causal = false, attend_all = false, sort_queries = true, rope = false;
  double threshold = 0.5, density = 0.02, softcap = 0;
  std::string score_mod = "none", dag;
  std::shared_ptr<const Dag> dag_graph;         // mask "dag" / "dag_ancestors": the parsed graph
  std::shared_ptr<const DagLayout> dag_layout;  // and its token layout
};

/// Names of the masks ("none", "causal", "window", ...) and score mods.
const std::vector<std::string>& mask_names();
const std::vector<std::string>& score_mod_names();

/// Resolves complete parameters (Variant::complete). Throws InputError naming
/// the field for impossible combinations ("dag: ...", "N: the DAG has ...").
MaskedCase masked_case(const Params& p);

/// A mask's data with the storage it points into. For mask attention,
/// `logits` (B, Nq, Nkv) f32 must outlive it.
struct MaskStorage {
  mask::MaskData data;
  mask::ScoreMod mod;
  std::vector<int32_t> group, group_start, pos_q, pos_k;  // pos: RoPE positions
  std::vector<uint32_t> reach;
  std::vector<uint8_t> row_all;
  std::vector<uint8_t> keys;        // key_mask: (B, Nkv) 1 = kept
  std::vector<std::string> labels;  // node / document label of each group (dag: node ids)
};

/// The mask of case `c` (logits: mask attention's (B, Nq, Nkv) f32, else null).
MaskStorage make_mask(const MaskedCase& c, const float* logits);

/// The reference's definition of case `c`'s mask (documents, DAG parents from
/// the parsed graph rather than the kernels' bit matrix, mask attention's
/// logits from `inputs`).
ref::MaskDefinition mask_definition(const MaskedCase& c, const TensorMap& inputs);

/// The key mask of case `c` (mask "key_mask"): (B, Nkv), 1 = kept, each key
/// independently with probability `density`. Drawn from a stream keyed by
/// Nkv and density only (not the seed): like mask attention's logits, the mask
/// (and so the block map and FLOP count) is a property of the case.
std::vector<uint8_t> key_mask_keys(const MaskedCase& c);

/// Document lengths of the document and prefix masks: drawn uniformly in
/// [1, 2·doc_len − 1] from a fixed stream, so the same N and doc_len always
/// give the same documents.
std::vector<int64_t> document_lengths(int64_t tokens, int64_t doc_len);

}  // namespace attnbench
