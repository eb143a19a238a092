#include "harness/masks.hpp"

#include <cmath>
#include <map>

#include "harness/errors.hpp"
#include "harness/rng.hpp"

namespace attnbench {

const std::vector<std::string>& mask_names() {
  static const std::vector<std::string> names = {"none",     "causal",   "window",    "wrapped_window",
                                                 "strided",  "strided_t", "document", "prefix",
                                                 "registers", "dag",     "dag_ancestors", "maskattn", "key_mask",
                                                 "sliding_window"};
  return names;
}

const std::vector<std::string>& score_mod_names() {
  static const std::vector<std::string> names = {"none", "relative", "cyclic", "alibi", "softcap"};
  return names;
}

namespace {

int64_t get_int(const Params& p, const char* name) { return p.at(name).get<int64_t>(); }

mask::Kind kind_of(const std::string& m) {
  using mask::Kind;
  if (m == "causal") return Kind::causal;
  if (m == "window") return Kind::window;
  if (m == "wrapped_window") return Kind::wrapped_window;
  if (m == "strided") return Kind::strided;
  if (m == "strided_t") return Kind::strided_t;
  if (m == "document") return Kind::document;
  if (m == "prefix") return Kind::prefix;
  if (m == "registers") return Kind::registers;
  if (m == "dag" || m == "dag_ancestors") return Kind::dag;
  if (m == "maskattn") return Kind::maskattn;
  if (m == "key_mask") return Kind::key_mask;
  if (m == "sliding_window") return Kind::sliding_window;
  return Kind::none;
}

mask::ScoreModKind mod_of(const std::string& m) {
  using mask::ScoreModKind;
  if (m == "relative") return ScoreModKind::relative;
  if (m == "cyclic") return ScoreModKind::cyclic;
  if (m == "alibi") return ScoreModKind::alibi;
  if (m == "softcap") return ScoreModKind::softcap;
  return ScoreModKind::none;
}

void check_name(const std::string& field, const std::string& got, const std::vector<std::string>& names) {
  for (const auto& n : names)
    if (n == got) return;
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "\"" : ", \"") + n + "\"";
  throw InputError(field + ": expected one of " + list + ", got \"" + got + "\"" + did_you_mean(got, names));
}

}  // namespace

MaskedCase masked_case(const Params& p) {
  MaskedCase c;
  const int64_t N = get_int(p, "N");
  c.B = get_int(p, "B"), c.H = get_int(p, "H"), c.D = get_int(p, "D");
  c.Nq = get_int(p, "Nq") > 0 ? get_int(p, "Nq") : N;
  c.Nkv = get_int(p, "Nkv") > 0 ? get_int(p, "Nkv") : N;
  c.mask = p.at("mask").get<std::string>();
  check_name("mask", c.mask, mask_names());
  c.score_mod = p.at("score_mod").get<std::string>();
  check_name("score_mod", c.score_mod, score_mod_names());
  c.window = get_int(p, "window"), c.doc_len = get_int(p, "doc_len"), c.prefix = get_int(p, "prefix");
  c.registers = get_int(p, "registers"), c.tile_q = get_int(p, "tile_q"), c.tile_k = get_int(p, "tile_k");
  c.cyclic = p.at("cyclic").get<bool>(), c.causal = p.at("causal").get<bool>();
  c.attend_all = p.at("attend_all").get<bool>(), c.sort_queries = p.at("sort_queries").get<bool>();
  c.threshold = p.at("threshold").get<double>(), c.density = p.at("density").get<double>();
  c.softcap = p.at("softcap").get<double>();
  const std::string rope = p.at("rope").get<std::string>();
  check_name("rope", rope, {"none", "half"});
  c.rope = rope == "half";
  c.dag = p.at("dag").get<std::string>();

  for (const char* name : {"B", "H", "N", "D", "tile_q", "tile_k"})
    if (get_int(p, name) < 1) throw InputError(std::string(name) + ": expected >= 1, got " + p.at(name).dump());
  for (const char* name : {"Nq", "Nkv", "window", "prefix", "registers"})
    if (get_int(p, name) < 0) throw InputError(std::string(name) + ": expected >= 0, got " + p.at(name).dump());
  if (c.rope && c.D % 2) throw InputError("D: RoPE needs an even head dimension, got D = " + std::to_string(c.D));
  const bool cross = c.mask == "strided" || c.mask == "strided_t" || c.mask == "maskattn" || c.mask == "none" ||
                     c.mask == "causal" || c.mask == "key_mask";
  if (!cross && c.Nq != c.Nkv)
    throw InputError("Nq: mask \"" + c.mask + "\" is a self-attention mask and needs Nq = Nkv, got " +
                     std::to_string(c.Nq) + " and " + std::to_string(c.Nkv));
  if ((c.mask == "window" || c.mask == "wrapped_window" || c.mask == "strided" || c.mask == "strided_t" ||
       c.mask == "registers") &&
      c.window < 1)
    throw InputError("window: mask \"" + c.mask + "\" needs a window >= 1 (h = window / 2), got " +
                     std::to_string(c.window));
  if (c.mask == "sliding_window" && c.window < 1)
    throw InputError("window: mask \"sliding_window\" needs a window >= 1 (the keys each query sees), got " +
                     std::to_string(c.window));
  if ((c.mask == "document" || c.mask == "prefix") && c.doc_len < 1)
    throw InputError("doc_len: mask \"" + c.mask + "\" needs a mean document length >= 1");
  if (c.mask == "prefix" && c.prefix > c.Nq)
    throw InputError("prefix: expected <= N = " + std::to_string(c.Nq) + ", got " + std::to_string(c.prefix));
  if (c.mask == "key_mask" && !(c.density >= 0 && c.density <= 1))
    throw InputError("density: mask \"key_mask\" keeps each key with probability density, expected a number in "
                     "[0, 1], got " + std::to_string(c.density));
  if (c.mask == "maskattn") {
    if (!(c.threshold > 0 && c.threshold < 1))
      throw InputError("threshold: expected a probability in (0, 1), got " + std::to_string(c.threshold));
    if (!(c.density > 0 && c.density <= 1))
      throw InputError("density: expected a fraction in (0, 1], got " + std::to_string(c.density));
  }
  if (c.score_mod == "softcap" && !(c.softcap > 0))
    throw InputError("softcap: score_mod \"softcap\" needs softcap > 0, got " + std::to_string(c.softcap));
  if (c.mask == "dag" || c.mask == "dag_ancestors") {
    if (c.dag.empty()) throw InputError("dag: mask \"" + c.mask + "\" needs a DAG (a JSON file, \"chain:K:L\" or \"le_attention:K\")");
    try {
      c.dag_graph = std::make_shared<Dag>(load_dag(c.dag, "dag"));
    } catch (const InputError& e) {  // a file's errors start with its path: name the parameter first
      const std::string msg = e.what();
      throw InputError(msg.rfind("dag:", 0) == 0 ? msg : "dag: " + msg);
    }
    c.dag_layout = std::make_shared<DagLayout>(layout_dag(*c.dag_graph, c.mask == "dag_ancestors"));
    if (c.dag_layout->tokens != c.Nq)
      throw InputError("N: the DAG \"" + c.dag + "\" has " + std::to_string(c.dag_layout->tokens) + " tokens, got N = " +
                       std::to_string(c.Nq));
  }
  return c;
}

std::vector<int64_t> document_lengths(int64_t tokens, int64_t doc_len) {
  Rng rng(0x646f6373, "documents", std::to_string(doc_len));
  std::vector<int64_t> out;
  for (int64_t used = 0; used < tokens;) {
    const int64_t n = std::min(tokens - used, rng.integer(1, 2 * doc_len - 1));
    out.push_back(n);
    used += n;
  }
  return out;
}

std::vector<uint8_t> key_mask_keys(const MaskedCase& c) {
  std::vector<uint8_t> keys(size_t(c.B * c.Nkv));
  const std::string key = "key_mask/" + std::to_string(c.Nkv) + "/" + std::to_string(c.density);
  for (int64_t b = 0; b < c.B; ++b) {
    Rng rng(0x6b657973, key, std::to_string(b));
    for (int64_t j = 0; j < c.Nkv; ++j) keys[size_t(b * c.Nkv + j)] = rng.uniform() < c.density ? 1 : 0;
  }
  return keys;
}

MaskStorage make_mask(const MaskedCase& c, const float* logits) {
  MaskStorage s;
  mask::MaskData& m = s.data;
  m.kind = kind_of(c.mask);
  m.Nq = c.Nq, m.Nkv = c.Nkv;
  m.half = c.window / 2;
  m.lookback = c.window - 1;
  m.cyclic = c.cyclic, m.causal = c.causal, m.prefix = c.prefix, m.registers = c.registers;
  s.pos_q.resize(size_t(c.Nq));
  s.pos_k.resize(size_t(c.Nkv));
  for (int64_t i = 0; i < c.Nq; ++i) s.pos_q[size_t(i)] = int32_t(i);
  for (int64_t j = 0; j < c.Nkv; ++j) s.pos_k[size_t(j)] = int32_t(j);

  if (c.mask == "document" || c.mask == "prefix") {
    const int64_t P = c.mask == "prefix" ? c.prefix : 0;
    s.group.assign(size_t(P), -1);
    int32_t d = 0;
    for (int64_t len : document_lengths(c.Nq - P, c.doc_len)) {
      s.group_start.push_back(int32_t(s.group.size()));
      s.group.insert(s.group.end(), size_t(len), d);
      s.labels.push_back("doc" + std::to_string(d++));
    }
    s.group_start.push_back(int32_t(c.Nq));
  } else if (c.dag_layout) {
    const DagLayout& L = *c.dag_layout;
    s.group = L.node, s.group_start = L.node_start, s.reach = L.reach, s.labels = L.ids;
    s.pos_q = s.pos_k = L.pos;
    m.reach = s.reach.data();
    m.reach_words = L.words;
  } else if (c.mask == "maskattn") {
    m.logits = logits;
    m.logit_threshold = float(std::log(c.threshold / (1.0 - c.threshold)));
    if (c.attend_all && logits) {
      s.row_all = mask::maskattn_empty_rows(logits, c.B, c.Nq, c.Nkv, m.logit_threshold);
      m.row_all = s.row_all.data();
    }
  } else if (c.mask == "key_mask") {
    s.keys = key_mask_keys(c);
    m.keys = s.keys.data();
  }
  m.group = s.group.empty() ? nullptr : s.group.data();
  m.group_start = s.group_start.empty() ? nullptr : s.group_start.data();

  s.mod.kind = mod_of(c.score_mod);
  s.mod.N = c.Nkv;
  s.mod.H = c.H;
  s.mod.softcap = float(c.softcap);
  return s;
}

ref::MaskDefinition mask_definition(const MaskedCase& c, const TensorMap& inputs) {
  ref::MaskDefinition def;
  def.kind = c.mask, def.Nq = c.Nq, def.Nkv = c.Nkv, def.window = c.window, def.cyclic = c.cyclic;
  def.causal = c.causal, def.attend_all = c.attend_all, def.prefix = c.prefix, def.registers = c.registers;
  def.threshold = c.threshold;
  def.doc = make_mask(c, nullptr).group;
  if (c.mask == "maskattn") def.logits = require(inputs, "mask_logits", "masked reference").to_f64_vector();
  if (c.mask == "key_mask") def.keys = key_mask_keys(c);
  if (c.dag_graph) {
    std::map<std::string, int32_t> index;
    for (const auto& n : c.dag_graph->nodes) index[n.id] = int32_t(index.size());
    for (const auto& n : c.dag_graph->nodes) {
      def.parents.emplace_back();
      for (const auto& par : n.parents) def.parents.back().push_back(index.at(par));
      def.node.insert(def.node.end(), size_t(n.length), int32_t(def.parents.size() - 1));
    }
  }
  return def;
}

}  // namespace attnbench
