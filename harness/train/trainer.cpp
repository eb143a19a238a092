// attnbench train: harness/train/trainer.hpp; the format is in docs/train.md.
#include "harness/train/trainer.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "harness/errors.hpp"
#include "harness/json_file.hpp"
#include "harness/safetensors.hpp"

namespace attnbench::train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

volatile std::sig_atomic_t g_interrupted = 0;
extern "C" void on_sigint(int) { g_interrupted = 1; }

void check_keys(const json& j, const std::vector<std::string>& allowed, const std::string& where) {
  if (!j.is_object()) throw InputError(where + ": expected an object");
  for (const auto& [k, v] : j.items())
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end())
      throw InputError(where + ": unknown key '" + k + "'" + did_you_mean(k, allowed));
}

int64_t get_int(const json& j, const char* key, int64_t def, int64_t lo, int64_t hi, const std::string& where) {
  if (!j.contains(key)) return def;
  const json& v = j.at(key);
  if (!v.is_number_integer() && !v.is_number_unsigned())
    throw InputError(where + "." + key + ": expected an integer, got " + v.dump());
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi)
    throw InputError(where + "." + key + ": expected an integer in [" + std::to_string(lo) + ", " +
                     std::to_string(hi) + "], got " + std::to_string(x));
  return x;
}

double get_double(const json& j, const char* key, double def, double lo, double hi, const std::string& where) {
  if (!j.contains(key)) return def;
  const json& v = j.at(key);
  if (!v.is_number()) throw InputError(where + "." + key + ": expected a number, got " + v.dump());
  const double x = v.get<double>();
  if (!(x > lo && x <= hi))
    throw InputError(where + "." + key + ": expected a number in (" + fmt::format("{}", lo) + ", " +
                     fmt::format("{}", hi) + "], got " + v.dump());
  return x;
}

bool get_bool(const json& j, const char* key, bool def, const std::string& where) {
  if (!j.contains(key)) return def;
  if (!j.at(key).is_boolean()) throw InputError(where + "." + key + ": expected true or false, got " + j.at(key).dump());
  return j.at(key).get<bool>();
}

std::string get_string(const json& j, const char* key, const std::string& def, const std::string& where) {
  if (!j.contains(key)) return def;
  if (!j.at(key).is_string()) throw InputError(where + "." + key + ": expected a string, got " + j.at(key).dump());
  return j.at(key).get<std::string>();
}

std::string run_name(AttentionKind k, uint64_t seed) { return attention_kind_name(k) + "-seed" + std::to_string(seed); }

void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw InputError(path + ": cannot write");
    f << text;
    if (!f.flush()) throw InputError(path + ": write failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw InputError(path + ": cannot rename into place: " + ec.message());
}

std::string fmt_duration(double s) {
  if (!(s >= 0) || s > 1e8) return "?";
  const int64_t t = int64_t(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, (t / 60) % 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

/// The data of one suite run, loaded once.
struct Data {
  bool text = false;
  TextData td;
  MqarConfig mqar;
  int64_t vocab = 0;
  std::string fingerprint;  // identifies the data in checkpoints
};

Data load_data(const TrainSuite& s) {
  Data d;
  if (s.data_kind == "text") {
    d.text = true;
    d.td = load_text(s.data_path, s.val_fraction, s.context);
    d.vocab = d.td.tok.size();
    uint64_t h = 1469598103934665603ull;
    for (int32_t x : d.td.train) h = (h ^ uint64_t(uint32_t(x))) * 1099511628211ull;
    for (int32_t x : d.td.val) h = (h ^ uint64_t(uint32_t(x))) * 1099511628211ull;
    d.fingerprint = fmt::format("text:{} chars:{:016x}", d.td.train.size() + d.td.val.size(), h);
  } else {
    d.mqar = s.mqar;
    d.vocab = s.mqar.vocab();
    d.fingerprint = fmt::format("mqar:pairs={},keys={},values={}", s.mqar.pairs, s.mqar.keys, s.mqar.values);
  }
  return d;
}

void sample_batch(Batch& b, const Data& d, bool train_split, int64_t B, int64_t T, TrainRng& rng) {
  if (d.text)
    sample_text(b, train_split ? d.td.train : d.td.val, B, T, rng);
  else
    sample_mqar(b, d.mqar, B, T, rng);
}

struct EvalResult {
  double loss = 0, top1 = 0;
};

/// The same held-out batches every time (their own fixed stream).
EvalResult evaluate(Gpt<float>& m, const Data& d, int64_t batches) {
  TrainRng rng(0, "gpt-eval", d.text ? "text" : "mqar");
  Batch b;
  double loss = 0;
  int64_t count = 0, correct = 0;
  for (int64_t i = 0; i < batches; ++i) {
    sample_batch(b, d, false, m.batch(), m.config().context, rng);
    const auto st = m.step(b.x.data(), b.y.data(), false);
    loss += st.loss_sum;
    count += st.count;
    correct += st.correct;
  }
  EvalResult r;
  r.loss = count ? loss / double(count) : 0;
  r.top1 = count ? double(correct) / double(count) : 0;
  return r;
}

json block_json(const BlockOptions& b) {
  return {{"gate", b.gate},
          {"value_residual", value_residual_name(b.value_residual)},
          {"layer_scale", b.layer_scale},
          {"glu", b.glu}};
}

json run_config(const TrainSuite& s, const Data& d, AttentionKind k, uint64_t seed) {
  json c{{"attention", attention_kind_name(k)},
              {"seed", seed},
              {"vocab", d.vocab},
              {"d", s.d},
              {"heads", s.heads},
              {"layers", s.layers},
              {"rope", s.rope},
              {"context", s.context},
              {"batch", s.batch},
              {"lr", s.lr},
              {"data", d.fingerprint}};
  if (k == AttentionKind::window) c["window"] = s.window;  // (absent otherwise: earlier checkpoints stay valid)
  if (s.block.any()) c["block"] = block_json(s.block);     // (likewise)
  return c;
}

GptConfig gpt_config_from(const json& c, const std::string& where) {
  GptConfig g;
  try {
    g.vocab = c.at("vocab").get<int64_t>();
    g.d = c.at("d").get<int64_t>();
    g.heads = c.at("heads").get<int64_t>();
    g.layers = c.at("layers").get<int64_t>();
    g.context = c.at("context").get<int64_t>();
    g.rope = c.at("rope").get<bool>();
    g.attention = parse_attention_kind(c.at("attention").get<std::string>(), where + ": config.attention");
    g.window = c.value("window", int64_t(0));
    if (c.contains("block")) {
      const json& b = c.at("block");
      g.block.gate = b.at("gate").get<bool>();
      g.block.value_residual =
          parse_value_residual(b.at("value_residual").get<std::string>(), where + ": config.block.value_residual");
      g.block.layer_scale = b.at("layer_scale").get<double>();
      g.block.glu = b.at("glu").get<bool>();
    }
  } catch (const json::exception& e) {
    throw InputError(where + ": corrupt checkpoint config: " + e.what());
  }
  if (g.vocab < 1 || g.d < 2 || g.heads < 1 || g.layers < 0 || g.context < 1 || g.d % g.heads != 0 ||
      g.vocab > (1 << 22) || g.d > 4096 || g.layers > 256 || g.context > 65536 ||
      (g.attention == AttentionKind::window && g.window < 1) || !(g.block.layer_scale >= 0))
    throw InputError(where + ": corrupt checkpoint config: " + c.dump());
  return g;
}

std::string ckpt_path(const std::string& dir, const std::string& run) { return dir + "/" + run + ".safetensors"; }

void save_checkpoint(const std::string& path, Gpt<float>& m, const json& config, int64_t step, const TrainRng& rng,
                     const Data& d) {
  TensorMap t;
  auto put = [&](const std::string& name, const ParamInfo& pi, const float* base) {
    Tensor x(DType::f32, Shape(pi.shape.begin(), pi.shape.end()));
    std::copy(base + pi.offset, base + pi.offset + pi.numel, x.data<float>());
    t.emplace(name, std::move(x));
  };
  for (const ParamInfo& pi : m.layout()) {
    put(pi.name, pi, m.params());
    put("adam_m." + pi.name, pi, m.adam_m());
    put("adam_v." + pi.name, pi, m.adam_v());
  }
  std::map<std::string, std::string> meta{{"format", "attnbench-gpt-checkpoint-1"},
                                          {"config", config.dump()},
                                          {"step", std::to_string(step)},
                                          {"rng_state", std::to_string(rng.state)}};
  if (d.text) meta["vocabulary"] = d.td.tok.vocabulary_utf8();
  write_safetensors(path, t, meta);
}

const std::string& meta_field(const SafetensorsFile& f, const std::string& key, const std::string& path) {
  const auto it = f.metadata.find(key);
  if (it == f.metadata.end()) throw InputError(path + ": not an attnbench train checkpoint (no metadata '" + key + "')");
  return it->second;
}

uint64_t parse_u64(const std::string& s, const std::string& where) {
  if (s.empty() || s.size() > 20 || s.find_first_not_of("0123456789") != std::string::npos)
    throw InputError(where + ": expected a non-negative integer, got '" + s + "'");
  return std::stoull(s);
}

/// Restores m (params, moments), returns the step and sets rng; rejects a
/// checkpoint of another configuration naming the first differing field.
int64_t load_checkpoint(const std::string& path, Gpt<float>& m, const json& expect, TrainRng& rng) {
  const SafetensorsFile f = read_safetensors(path);
  if (meta_field(f, "format", path) != "attnbench-gpt-checkpoint-1")
    throw InputError(path + ": unknown checkpoint format '" + meta_field(f, "format", path) + "'");
  json cfg;
  try {
    cfg = json::parse(meta_field(f, "config", path));
  } catch (const json::exception& e) {
    throw InputError(path + ": corrupt checkpoint config: " + e.what());
  }
  for (const auto& [k, v] : expect.items()) {
    if (!cfg.contains(k)) throw InputError(path + ": checkpoint config has no field '" + k + "'");
    if (cfg.at(k) != v)
      throw InputError(path + ": checkpoint from another configuration: field '" + k + "' is " + cfg.at(k).dump() +
                       " in the checkpoint, " + v.dump() + " in the suite");
  }
  const int64_t step = int64_t(parse_u64(meta_field(f, "step", path), path + ": metadata step"));
  const uint64_t state = parse_u64(meta_field(f, "rng_state", path), path + ": metadata rng_state");
  auto get = [&](const std::string& name, const ParamInfo& pi, float* base) {
    const Tensor& t = require_shape(f.tensors, name, Shape(pi.shape.begin(), pi.shape.end()), path);
    if (t.dtype() != DType::f32) throw InputError(path + ": tensor '" + name + "': expected f32");
    std::copy(t.data<float>(), t.data<float>() + pi.numel, base + pi.offset);
  };
  for (const ParamInfo& pi : m.layout()) {
    get(pi.name, pi, m.params());
    get("adam_m." + pi.name, pi, m.adam_m());
    get("adam_v." + pi.name, pi, m.adam_v());
  }
  rng.state = state;
  return step;
}

/// Keeps the log lines of steps ≤ step (a run killed after its last checkpoint
/// logged steps the resumed run repeats).
void truncate_log(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step") || !j["step"].is_number_integer()) continue;
    if (j["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  write_text_atomic(path, kept);
}

struct RunResult {
  bool interrupted = false;
  json record;
};

RunResult train_one(const TrainSuite& s, const Data& d, AttentionKind kind, uint64_t seed, const TrainOptions& opt,
                    int threads) {
  const std::string run = run_name(kind, seed);
  const std::string ck = ckpt_path(opt.out_dir, run), log_path = opt.out_dir + "/" + run + ".jsonl";
  GptConfig cfg;
  cfg.vocab = d.vocab;
  cfg.d = s.d;
  cfg.heads = s.heads;
  cfg.layers = s.layers;
  cfg.context = s.context;
  cfg.rope = s.rope;
  cfg.attention = kind;
  cfg.window = kind == AttentionKind::window ? s.window : 0;
  cfg.block = s.block;
  const json config = run_config(s, d, kind, seed);
  Gpt<float> m(cfg, s.batch, threads);
  m.init(seed);
  TrainRng rng(seed, "gpt", "batches");
  int64_t step = 0;
  if (fs::exists(ck)) {
    if (!opt.resume)
      throw InputError(ck + ": exists: pass --resume to continue it, or choose another --out");
    step = load_checkpoint(ck, m, config, rng);
    truncate_log(log_path, step);
  } else {
    write_text_atomic(log_path, "");
  }
  std::ofstream log(log_path, std::ios::app);
  if (!log) throw InputError(log_path + ": cannot write");

  const int64_t tokens_per_step = s.batch * s.context;
  const auto t_run = std::chrono::steady_clock::now();
  double train_s = 0;
  int64_t trained = 0;
  Batch b;
  EvalResult ev;
  bool have_eval = false;
  bool interrupted = false;
  double last_loss = 0;
  while (step < s.steps) {
    const auto t0 = std::chrono::steady_clock::now();
    sample_batch(b, d, true, s.batch, s.context, rng);
    const auto st = m.step(b.x.data(), b.y.data(), true);
    ++step;
    gpt::AdamParams a;
    a.lr = s.lr;
    a.step = step;
    m.update(a);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    train_s += dt;
    ++trained;
    last_loss = st.count ? st.loss_sum / double(st.count) : 0;
    const double tps = double(trained * tokens_per_step) / train_s;
    json rec{{"step", step}, {"loss", last_loss}, {"step_s", dt}, {"tokens_per_s", tps}};
    const bool do_eval = step % s.eval_interval == 0 || step == s.steps;
    if (do_eval) {
      ev = evaluate(m, d, s.eval_batches);
      have_eval = true;
      rec["eval_loss"] = ev.loss;
      rec["eval_top1"] = ev.top1;
    }
    log << rec.dump() << "\n";
    log.flush();
    if (!opt.quiet && (do_eval || step % 10 == 0 || step == 1)) {
      const double eta = train_s / double(trained) * double(s.steps - step);
      std::string line = fmt::format("[{}] step {}/{} loss {:.4f} tokens/s {:.0f} ETA {}", run, step, s.steps,
                                     last_loss, tps, fmt_duration(eta));
      if (do_eval) line += fmt::format(" | eval loss {:.4f} top-1 {:.4f}", ev.loss, ev.top1);
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    const bool stop = g_interrupted || (opt.stop_after >= 0 && step >= opt.stop_after && step < s.steps);
    if (stop || (s.checkpoint_interval > 0 && step % s.checkpoint_interval == 0) || step == s.steps)
      save_checkpoint(ck, m, config, step, rng, d);
    if (stop) {
      interrupted = true;
      break;
    }
  }
  RunResult r;
  r.interrupted = interrupted;
  if (interrupted) {
    std::fprintf(stderr, "attnbench: interrupted: checkpoint %s (step %lld); continue with --resume\n", ck.c_str(),
                 (long long)step);
    return r;
  }
  if (!have_eval) ev = evaluate(m, d, s.eval_batches);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_run).count();
  r.record = json{{"attention", attention_kind_name(kind)},
                  {"seed", seed},
                  {"params", m.num_params()},
                  {"steps", s.steps},
                  {"eval_loss", ev.loss},
                  {"eval_top1", ev.top1},
                  {"final_train_loss", last_loss},
                  {"wall_s", wall},
                  {"train_s", train_s},
                  {"steps_timed", trained},
                  {"tokens_per_s", trained ? double(trained * tokens_per_step) / train_s : 0.0},
                  {"step_s", trained ? train_s / double(trained) : 0.0},
                  {"threads", threads}};
  if (d.text) r.record["eval_unknown_chars"] = d.td.val_unknown;
  return r;
}

}  // namespace

void mean_ci95(const std::vector<double>& xs, double& mean, double& half) {
  static const double t975[] = {0,     12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                                2.201, 2.179,  2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080,
                                2.074, 2.069,  2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042};
  const size_t n = xs.size();
  mean = 0;
  half = 0;
  if (n == 0) return;
  for (double x : xs) mean += x;
  mean /= double(n);
  if (n < 2) return;
  double ss = 0;
  for (double x : xs) ss += (x - mean) * (x - mean);
  const double sd = std::sqrt(ss / double(n - 1));
  const size_t df = n - 1;
  const double t = df <= 30 ? t975[df] : 1.96;
  half = t * sd / std::sqrt(double(n));
}

TrainSuite parse_train_suite(const json& j, const std::string& where) {
  check_keys(j, {"name", "description", "kind", "data", "model", "attention", "seeds", "steps", "batch", "context",
                 "lr", "eval_interval", "eval_batches", "checkpoint_interval", "threads"},
             where);
  TrainSuite s;
  s.where = where;
  if (j.contains("kind") && j.at("kind") != "train")
    throw InputError(where + ".kind: expected \"train\", got " + j.at("kind").dump());
  s.name = get_string(j, "name", fs::path(where).stem().string(), where);
  if (s.name.empty() || s.name[0] == '.' || s.name.find_first_of("/\\") != std::string::npos ||
      s.name.find('\0') != std::string::npos)
    throw InputError(where + ".name: expected a file name (no '/', '\\', NUL or leading '.'), got " + json(s.name).dump());
  s.description = get_string(j, "description", "", where);
  if (j.contains("data")) {
    const json& dj = j.at("data");
    const std::string w = where + ".data";
    check_keys(dj, {"kind", "path", "val_fraction", "pairs", "keys", "values"}, w);
    s.data_kind = get_string(dj, "kind", "mqar", w);
    if (s.data_kind == "text") {
      for (const char* k : {"pairs", "keys", "values"})
        if (dj.contains(k)) throw InputError(w + "." + k + ": only for kind \"mqar\"");
      if (!dj.contains("path")) throw InputError(w + ".path: required for kind \"text\" (or pass --data)");
      s.data_path = get_string(dj, "path", "", w);
      if (fs::path(s.data_path).is_relative()) s.data_path = (fs::path(where).parent_path() / s.data_path).string();
      s.val_fraction = get_double(dj, "val_fraction", 0.1, 0.0, 0.5, w);
    } else if (s.data_kind == "mqar") {
      for (const char* k : {"path", "val_fraction"})
        if (dj.contains(k)) throw InputError(w + "." + k + ": only for kind \"text\"");
      s.mqar.pairs = get_int(dj, "pairs", 8, 1, 4096, w);
      s.mqar.keys = get_int(dj, "keys", 64, 1, 1 << 20, w);
      s.mqar.values = get_int(dj, "values", 64, 1, 1 << 20, w);
      if (s.mqar.keys < s.mqar.pairs) throw InputError(w + ".keys: expected at least pairs (" + std::to_string(s.mqar.pairs) + ") keys");
    } else {
      throw InputError(w + ".kind: expected \"text\" or \"mqar\", got \"" + s.data_kind + "\"" +
                       did_you_mean(s.data_kind, {"text", "mqar"}));
    }
  }
  if (j.contains("model")) {
    const json& mj = j.at("model");
    const std::string w = where + ".model";
    check_keys(mj, {"d", "heads", "layers", "rope", "window", "gate", "value_residual", "layer_scale", "glu"}, w);
    s.d = get_int(mj, "d", 64, 2, 4096, w);
    s.heads = get_int(mj, "heads", 2, 1, 256, w);
    s.layers = get_int(mj, "layers", 4, 0, 256, w);
    s.rope = get_bool(mj, "rope", true, w);
    s.window = get_int(mj, "window", 64, 1, 65536, w);
    s.block.gate = get_bool(mj, "gate", false, w);
    s.block.value_residual = parse_value_residual(get_string(mj, "value_residual", "none", w), w + ".value_residual");
    s.block.layer_scale = get_double(mj, "layer_scale", 0.0, 0.0, 1e3, w);
    s.block.glu = get_bool(mj, "glu", false, w);
    if (s.d % s.heads != 0) throw InputError(w + ".heads: expected a divisor of d (" + std::to_string(s.d) + ")");
    if (s.rope && (s.d / s.heads) % 2 != 0) throw InputError(w + ".rope: needs an even d / heads");
  }
  if (j.contains("attention")) {
    const json& a = j.at("attention");
    if (!a.is_array() || a.empty()) throw InputError(where + ".attention: expected a non-empty array of kinds");
    s.attention.clear();
    for (size_t i = 0; i < a.size(); ++i) {
      const std::string w = where + ".attention[" + std::to_string(i) + "]";
      if (!a[i].is_string()) throw InputError(w + ": expected a string");
      s.attention.push_back(parse_attention_kind(a[i].get<std::string>(), w));
    }
  }
  if (s.block.value_residual != ValueResidual::none)
    for (AttentionKind k : s.attention)
      if (!has_shared_values(k))
        throw InputError(where + ".model.value_residual: needs standard or window attention; the suite trains '" +
                         attention_kind_name(k) + "', whose values are made per query");
  if (j.contains("seeds")) {
    const json& a = j.at("seeds");
    if (!a.is_array() || a.empty()) throw InputError(where + ".seeds: expected a non-empty array of integers");
    s.seeds.clear();
    std::set<uint64_t> seen;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].is_number_integer() || (!a[i].is_number_unsigned() && a[i].get<int64_t>() < 0))
        throw InputError(where + ".seeds[" + std::to_string(i) + "]: expected a non-negative integer");
      const uint64_t x = a[i].get<uint64_t>();
      if (!seen.insert(x).second) throw InputError(where + ".seeds[" + std::to_string(i) + "]: seed repeated");
      s.seeds.push_back(x);
    }
  }
  s.steps = get_int(j, "steps", 100, 1, int64_t(1) << 40, where);
  s.batch = get_int(j, "batch", 16, 1, 1 << 16, where);
  s.context = get_int(j, "context", 300, 2, 1 << 16, where);
  s.lr = get_double(j, "lr", 1e-4, 0.0, 10.0, where);
  s.eval_interval = get_int(j, "eval_interval", 50, 1, int64_t(1) << 40, where);
  s.eval_batches = get_int(j, "eval_batches", 4, 1, 1 << 20, where);
  s.checkpoint_interval = get_int(j, "checkpoint_interval", 0, 0, int64_t(1) << 40, where);
  s.threads = int(get_int(j, "threads", 0, 0, 4096, where));
  return s;
}

TrainSuite load_train_suite(const std::string& path) { return parse_train_suite(read_json_file(path), path); }

int run_train_suite(TrainSuite s, const TrainOptions& opt) {
  if (!opt.data.empty()) {
    s.data_kind = "text";
    s.data_path = opt.data;
  }
  if (opt.out_dir.empty()) throw InputError("--out: required");
  // Checked here, not in the parser: --data replaces the suite's MQAR data.
  if (s.data_kind == "mqar" && s.context < 2 * s.mqar.pairs + 2)
    throw InputError(s.where + ".context: MQAR with " + std::to_string(s.mqar.pairs) + " pairs needs context ≥ " +
                     std::to_string(2 * s.mqar.pairs + 2));
  const Data d = load_data(s);  // every data error before anything is written
  const int threads = opt.threads > 0 ? opt.threads : s.threads > 0 ? s.threads : omp_get_max_threads();
  std::error_code ec;
  fs::create_directories(opt.out_dir, ec);
  if (ec) throw InputError(opt.out_dir + ": cannot create the output folder: " + ec.message());
  // Refuse to clobber: without --resume, no run's checkpoint may exist yet.
  if (!opt.resume)
    for (AttentionKind k : s.attention)
      for (uint64_t seed : s.seeds)
        if (fs::exists(ckpt_path(opt.out_dir, run_name(k, seed))))
          throw InputError(ckpt_path(opt.out_dir, run_name(k, seed)) +
                           ": exists: pass --resume to continue it, or choose another --out");

  g_interrupted = 0;
  auto prev = std::signal(SIGINT, on_sigint);
  struct Restore {
    decltype(prev) p;
    ~Restore() { std::signal(SIGINT, p); }
  } restore{prev};

  json runs = json::array();
  for (AttentionKind k : s.attention) {
    for (uint64_t seed : s.seeds) {
      const std::string run = run_name(k, seed);
      const std::string done = opt.out_dir + "/" + run + ".result.json";
      if (opt.resume && fs::exists(done)) {
        runs.push_back(read_json_file(done));
        continue;
      }
      RunResult r = train_one(s, d, k, seed, opt, threads);
      if (r.interrupted) return 130;
      write_text_atomic(done, r.record.dump(2) + "\n");
      runs.push_back(r.record);
    }
  }

  // The seed's table: per kind, mean ± 95 % interval over seeds.
  json table = json::array();
  std::string text = fmt::format("{:<24} {:>8} {:>20} {:>20} {:>16} {:>18}\n", "attention", "params",
                                 "eval loss", "top-1", "wall s", "tokens/s");
  for (AttentionKind k : s.attention) {
    std::vector<double> loss, top1, wall, tps;
    int64_t params = 0;
    for (const json& r : runs)
      if (r.at("attention") == attention_kind_name(k)) {
        loss.push_back(r.at("eval_loss").get<double>());
        top1.push_back(r.at("eval_top1").get<double>());
        wall.push_back(r.at("wall_s").get<double>());
        tps.push_back(r.at("tokens_per_s").get<double>());
        params = r.at("params").get<int64_t>();
      }
    json row{{"attention", attention_kind_name(k)}, {"params", params}, {"seeds", loss.size()}};
    std::string cells;
    for (auto [name, xs, prec] : {std::tuple{"eval_loss", &loss, 4}, std::tuple{"eval_top1", &top1, 4},
                                  std::tuple{"wall_s", &wall, 1}, std::tuple{"tokens_per_s", &tps, 0}}) {
      double mean, half;
      mean_ci95(*xs, mean, half);
      row[name] = {{"mean", mean}, {"ci95", half}};
      cells += fmt::format(" {:>20}", fmt::format("{:.{}f} ± {:.{}f}", mean, prec, half, prec));
    }
    table.push_back(row);
    text += fmt::format("{:<24} {:>8}{}\n", attention_kind_name(k), params, cells);
  }
  const json result{{"kind", "train"},
                    {"suite", s.name},
                    {"data", d.fingerprint},
                    {"steps", s.steps},
                    {"batch", s.batch},
                    {"context", s.context},
                    {"model",
                     {{"d", s.d},
                      {"heads", s.heads},
                      {"layers", s.layers},
                      {"rope", s.rope},
                      {"window", s.window},
                      {"block", block_json(s.block)}}},
                    {"lr", s.lr},
                    {"threads", threads},
                    {"runs", runs},
                    {"table", table}};
  write_text_atomic(opt.out_dir + "/train.json", result.dump(2) + "\n");
  std::fprintf(stdout, "%s", text.c_str());
  std::fprintf(stdout, "(mean ± 95%% interval over %zu seed(s); results in %s/train.json)\n", s.seeds.size(),
               opt.out_dir.c_str());
  return 0;
}

LoadedCheckpoint load_checkpoint_model(const std::string& path) {
  const SafetensorsFile f = read_safetensors(path);
  if (meta_field(f, "format", path) != "attnbench-gpt-checkpoint-1")
    throw InputError(path + ": unknown checkpoint format '" + meta_field(f, "format", path) + "'");
  LoadedCheckpoint ck;
  try {
    ck.meta = json::parse(meta_field(f, "config", path));
  } catch (const json::exception& e) {
    throw InputError(path + ": corrupt checkpoint config: " + e.what());
  }
  ck.cfg = gpt_config_from(ck.meta, path);
  const auto v = f.metadata.find("vocabulary");
  if (v != f.metadata.end()) {
    ck.text = true;
    ck.tok = Tokenizer::from_vocabulary_utf8(v->second);
    if (ck.tok.size() != ck.cfg.vocab)
      throw InputError(path + ": vocabulary has " + std::to_string(ck.tok.size()) + " ids, config.vocab " +
                       std::to_string(ck.cfg.vocab));
  }
  const auto layout = gpt_param_layout(ck.cfg);
  const std::pair<std::vector<float>*, const char*> parts[] = {
      {&ck.params, ""}, {&ck.adam_m, "adam_m."}, {&ck.adam_v, "adam_v."}};
  for (const auto& [dst, prefix] : parts) {
    dst->assign(size_t(gpt_param_count(ck.cfg)), 0.f);
    for (const ParamInfo& pi : layout) {
      const std::string name = prefix + pi.name;
      const Tensor& t = require_shape(f.tensors, name, Shape(pi.shape.begin(), pi.shape.end()), path);
      if (t.dtype() != DType::f32) throw InputError(path + ": tensor '" + name + "': expected f32");
      std::copy(t.data<float>(), t.data<float>() + pi.numel, dst->begin() + pi.offset);
    }
  }
  ck.step = int64_t(parse_u64(meta_field(f, "step", path), path + ": metadata step"));
  return ck;
}

namespace {

/// The fixed batch of `gpt-steps`: B rows of T ids each for tokens and targets.
void read_fixed_batch(const std::string& path, const GptConfig& c, std::vector<int32_t>& x, std::vector<int32_t>& y,
                      int64_t& B) {
  const json j = read_json_file(path);
  if (!j.is_object()) throw InputError(path + ": expected an object with \"tokens\" and \"targets\"");
  check_keys(j, {"tokens", "targets"}, path);
  B = -1;
  const std::tuple<const char*, std::vector<int32_t>*, int64_t> parts[] = {{"tokens", &x, 0}, {"targets", &y, -1}};
  for (const auto& [key, out, lo] : parts) {
    const std::string w = path + "." + key;
    if (!j.contains(key) || !j.at(key).is_array() || j.at(key).empty())
      throw InputError(w + ": expected a non-empty array of rows");
    const json& rows = j.at(key);
    if (B >= 0 && int64_t(rows.size()) != B)
      throw InputError(w + ": expected " + std::to_string(B) + " rows (as tokens), got " + std::to_string(rows.size()));
    B = int64_t(rows.size());
    out->clear();
    for (size_t r = 0; r < rows.size(); ++r) {
      const std::string wr = w + "[" + std::to_string(r) + "]";
      if (!rows[r].is_array() || int64_t(rows[r].size()) != c.context)
        throw InputError(wr + ": expected an array of context (" + std::to_string(c.context) + ") ids");
      for (const json& v : rows[r]) {
        if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() >= c.vocab)
          throw InputError(wr + ": expected ids in [" + std::to_string(lo) + ", " + std::to_string(c.vocab) +
                           "), got " + v.dump());
        out->push_back(int32_t(v.get<int64_t>()));
      }
    }
  }
}

}  // namespace

void run_fixed_batch_steps(const std::string& checkpoint, const std::string& batch_path, int64_t steps,
                           const std::string& out_path, int threads) {
  const LoadedCheckpoint ck = load_checkpoint_model(checkpoint);
  std::vector<int32_t> x, y;
  int64_t B = 0;
  read_fixed_batch(batch_path, ck.cfg, x, y, B);
  Gpt<float> m(ck.cfg, B, threads > 0 ? threads : omp_get_max_threads());
  std::copy(ck.params.begin(), ck.params.end(), m.params());
  std::copy(ck.adam_m.begin(), ck.adam_m.end(), m.adam_m());
  std::copy(ck.adam_v.begin(), ck.adam_v.end(), m.adam_v());
  gpt::AdamParams a;
  try {
    a.lr = ck.meta.at("lr").get<double>();
  } catch (const json::exception& e) {
    throw InputError(checkpoint + ": corrupt checkpoint config: " + e.what());
  }
  TensorMap out;
  Tensor losses(DType::f64, Shape{steps});
  for (int64_t k = 0; k < steps; ++k) {
    const gpt::CrossEntropyStats st = m.step(x.data(), y.data(), true);
    losses.data<double>()[k] = st.count ? st.loss_sum / double(st.count) : 0.0;
    if (k == 0) {
      const int64_t rows = B * ck.cfg.context;
      Tensor logits(DType::f32, Shape{rows, ck.cfg.vocab});
      std::copy(m.logits(), m.logits() + rows * ck.cfg.vocab, logits.data<float>());
      out.emplace("logits", std::move(logits));
      for (const ParamInfo& pi : m.layout()) {
        Tensor g(DType::f32, Shape(pi.shape.begin(), pi.shape.end()));
        std::copy(m.grads() + pi.offset, m.grads() + pi.offset + pi.numel, g.data<float>());
        out.emplace("grad." + pi.name, std::move(g));
      }
    }
    a.step = ck.step + 1 + k;
    m.update(a);
  }
  out.emplace("losses", std::move(losses));
  write_safetensors(out_path, out, {{"format", "attnbench-gpt-steps-1"}, {"config", ck.meta.dump()}});
}

std::string sample_text_from(const LoadedCheckpoint& ck, const std::string& prompt, int64_t length,
                             double temperature, uint64_t seed, int threads) {
  if (!ck.text) throw InputError("sample: the checkpoint is of an MQAR run (no vocabulary): nothing to write");
  Gpt<float> m(ck.cfg, 1, threads > 0 ? threads : omp_get_max_threads());
  std::copy(ck.params.begin(), ck.params.end(), m.params());
  std::vector<uint32_t> cps;
  size_t bad = 0;
  if (!decode_utf8(prompt, cps, &bad)) throw InputError("--prompt: not UTF-8 at byte " + std::to_string(bad));
  std::vector<int32_t> ids = ck.tok.encode(cps);
  if (ids.empty()) ids.push_back(ck.tok.encode({'\n'})[0] > 0 ? ck.tok.encode({'\n'})[0] : 1);
  const int64_t T = ck.cfg.context, V = ck.cfg.vocab;
  std::vector<int32_t> x(static_cast<size_t>(T)), y(static_cast<size_t>(T), -1);
  TrainRng rng(seed, "gpt", "sample");
  std::vector<double> p(static_cast<size_t>(V));
  for (int64_t g = 0; g < length; ++g) {
    const int64_t n = std::min<int64_t>(int64_t(ids.size()), T);
    std::fill(x.begin(), x.end(), 0);
    std::copy(ids.end() - n, ids.end(), x.begin());
    m.step(x.data(), y.data(), false);
    const float* l = m.logits() + (n - 1) * V;
    int64_t next = 0;
    if (temperature <= 0) {
      for (int64_t v = 1; v < V; ++v)
        if (l[v] > l[next]) next = v;
    } else {
      double mx = l[0];
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(l[v]));
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += p[size_t(v)] = std::exp((double(l[v]) - mx) / temperature);
      double u = rng.uniform() * sum;
      for (next = 0; next < V - 1; ++next) {
        u -= p[size_t(next)];
        if (u < 0) break;
      }
    }
    ids.push_back(int32_t(next));
  }
  return ck.tok.decode(ids);
}

}  // namespace attnbench::train
