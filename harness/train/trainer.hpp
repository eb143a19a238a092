// attnbench train: the training suite (docs/train.md), the training loop with
// periodic evaluation, the JSONL log, safetensors checkpoints that resume
// bit-identically, and the per-kind table over seeds.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/train/data.hpp"
#include "harness/train/gpt.hpp"

namespace attnbench::train {

struct TrainSuite {
  std::string name, description, where;  // where: the suite file (errors name it)
  // data
  std::string data_kind = "mqar";  // "text" or "mqar"
  std::string data_path;           // text: resolved path
  double val_fraction = 0.1;
  MqarConfig mqar;
  // model (vocab comes from the data)
  int64_t d = 64, heads = 2, layers = 4;
  bool rope = true;
  int64_t window = 64;  // `window` attention: keys each query sees
  BlockOptions block;   // the same for every attention kind of the suite
  std::vector<AttentionKind> attention{AttentionKind::standard, AttentionKind::selective};
  std::vector<uint64_t> seeds{1};
  int64_t steps = 100, batch = 16, context = 300;
  double lr = 1e-4;
  int64_t eval_interval = 50, eval_batches = 4, checkpoint_interval = 0;  // 0: only at the end and on Ctrl-C
  int threads = 0;                                                       // 0: every OpenMP thread
};

/// Validates a training suite (unknown keys rejected with did-you-mean, types
/// and ranges checked); relative data paths are resolved against the suite's folder.
TrainSuite parse_train_suite(const nlohmann::json& j, const std::string& where);
TrainSuite load_train_suite(const std::string& path);

struct TrainOptions {
  std::string out_dir;     // per-run logs and checkpoints, train.json
  std::string data;        // --data: a UTF-8 text file replacing the suite's data
  bool resume = false;     // continue each run from its checkpoint in out_dir
  int64_t stop_after = -1; // testing: behave as on Ctrl-C after this step
  int threads = 0;         // overrides the suite's when > 0
  bool quiet = false;      // no progress lines
};

/// Runs every (attention kind, seed) of the suite; 0 when done, 130 when
/// interrupted (Ctrl-C or stop_after: the running run's checkpoint is saved).
int run_train_suite(TrainSuite suite, const TrainOptions& opt);

/// Mean and half-width of the 95 % Student-t interval of `xs` (0 for one value).
void mean_ci95(const std::vector<double>& xs, double& mean, double& half);

/// Loads a checkpoint's model (for `attnbench sample` and `gpt-steps`): config
/// and tokenizer (text checkpoints only), the f32 parameters, Adam's moments
/// and the step they were saved after.
struct LoadedCheckpoint {
  GptConfig cfg;
  nlohmann::json meta;
  Tokenizer tok;
  bool text = false;
  std::vector<float> params, adam_m, adam_v;
  int64_t step = 0;
};
LoadedCheckpoint load_checkpoint_model(const std::string& path);

/// `attnbench gpt-steps` (llm.c's test_gpt2 pattern; tests/torch_gpt_parity_test.py
/// compares it with PyTorch): `steps` training steps of the checkpoint's model
/// on one fixed batch, Adam continuing the checkpoint's moments and step count
/// at its config's lr. `batch_path`: JSON {"tokens": [[…], …], "targets": [[…], …]},
/// B rows of `context` ids (targets −1 = not counted). Writes `out_path`
/// (safetensors): `logits` (B·T, V) and `grad.<param>` of the first step,
/// `losses` (steps, f64: each step's mean loss before its update).
void run_fixed_batch_steps(const std::string& checkpoint, const std::string& batch_path, int64_t steps,
                           const std::string& out_path, int threads);

/// Generates `length` characters after `prompt` (temperature sampling; 0 = argmax).
std::string sample_text_from(const LoadedCheckpoint& ck, const std::string& prompt, int64_t length,
                             double temperature, uint64_t seed, int threads);

}  // namespace attnbench::train
