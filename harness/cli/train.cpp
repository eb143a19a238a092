// attnbench train SUITE.json: trains the tiny GPT for every attention kind and
// seed of a training suite (docs/train.md); attnbench sample CHECKPOINT writes
// text with a trained text model; attnbench gpt-steps runs a checkpoint's
// model on one fixed batch (the PyTorch parity script's other half).
#include <cstdio>
#include <memory>
#include <string>

#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/train/trainer.hpp"

namespace attnbench::cli {

void add_train(CLI::App& app, int& exit_code) {
  struct Args {
    std::string suite;
    train::TrainOptions opt;
  };
  auto args = std::make_shared<Args>();
  auto* c = app.add_subcommand("train", "Train the tiny GPT per attention kind and seed of a training suite");
  c->add_option("suite", args->suite, "Training suite JSON (docs/train.md)")->required();
  c->add_option("--out", args->opt.out_dir,
                "Output folder: per-run JSONL logs and checkpoints, train.json (default results/train-<suite name>)");
  c->add_option("--data", args->opt.data, "A UTF-8 text file to train on instead of the suite's data");
  c->add_flag("--resume", args->opt.resume, "Continue every run from its checkpoint in --out (skipping finished runs)");
  c->add_option("--threads", args->opt.threads, "OpenMP threads (default: the suite's, else all)")
      ->check(CLI::Range(1, 4096));
  c->add_option("--stop-after", args->opt.stop_after,
                "Testing: after this step, save a checkpoint and exit 130 as on Ctrl-C")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 40));
  c->add_flag("--quiet", args->opt.quiet, "No progress lines");
  c->callback([args, &exit_code] {
    train::TrainSuite s = train::load_train_suite(args->suite);
    train::TrainOptions opt = args->opt;
    if (opt.out_dir.empty()) opt.out_dir = "results/train-" + s.name;
    exit_code = train::run_train_suite(std::move(s), opt);
  });

  struct SampleArgs {
    std::string checkpoint, prompt;
    int64_t length = 500;
    double temperature = 1.0;
    uint64_t seed = 1;
    int threads = 0;
  };
  auto sa = std::make_shared<SampleArgs>();
  auto* s = app.add_subcommand("sample", "Generate text with a checkpoint of `attnbench train` (text data)");
  s->add_option("checkpoint", sa->checkpoint, "Checkpoint (.safetensors) written by attnbench train")->required();
  s->add_option("--prompt", sa->prompt, "Text to continue (characters unseen in training map to the unknown id)");
  s->add_option("--length", sa->length, "Characters to generate")->check(CLI::Range(int64_t(0), int64_t(1) << 20));
  s->add_option("--temperature", sa->temperature, "Softmax temperature; 0 takes the most likely character")
      ->check(CLI::Range(0.0, 100.0));
  s->add_option("--seed", sa->seed, "Sampling seed");
  s->add_option("--threads", sa->threads, "OpenMP threads (default all)")->check(CLI::Range(1, 4096));
  s->callback([sa, &exit_code] {
    const train::LoadedCheckpoint ck = train::load_checkpoint_model(sa->checkpoint);
    const std::string text =
        train::sample_text_from(ck, sa->prompt, sa->length, sa->temperature, sa->seed, sa->threads);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fputc('\n', stdout);
    exit_code = 0;
  });

  struct StepsArgs {
    std::string checkpoint, batch, out;
    int64_t steps = 10;
    int threads = 0;
  };
  auto ga = std::make_shared<StepsArgs>();
  auto* g = app.add_subcommand("gpt-steps",
                               "Training steps of a checkpoint's model on one fixed batch: the first step's logits and "
                               "gradients, every step's loss (for tests/torch_gpt_parity_test.py)");
  g->add_option("checkpoint", ga->checkpoint, "Checkpoint (.safetensors) written by attnbench train")->required();
  g->add_option("--batch", ga->batch, "JSON {\"tokens\": [[...], ...], \"targets\": [[...], ...]}, rows of context ids")
      ->required();
  g->add_option("--steps", ga->steps, "Steps (Adam continues the checkpoint's moments at its lr)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  g->add_option("--out", ga->out, "Output safetensors: logits, grad.<param>, losses")->required();
  g->add_option("--threads", ga->threads, "OpenMP threads (default all)")->check(CLI::Range(1, 4096));
  g->callback([ga, &exit_code] {
    train::run_fixed_batch_steps(ga->checkpoint, ga->batch, ga->steps, ga->out, ga->threads);
    exit_code = 0;
  });
}

}  // namespace attnbench::cli
