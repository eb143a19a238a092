// The attnbench subcommands. Each file in harness/cli/ adds one subcommand to
// the CLI11 app (with its own --help) and sets the callback that runs it;
// callbacks throw InputError for bad input (main prints it as one line, exit 2)
// and return their exit code through `exit_code`.
#pragma once

#include <CLI/CLI.hpp>

namespace attnbench::cli {

void add_run(CLI::App& app, int& exit_code);
void add_list(CLI::App& app, int& exit_code);
void add_compare(CLI::App& app, int& exit_code);
void add_roofline(CLI::App& app, int& exit_code);
void add_export(CLI::App& app, int& exit_code);
void add_verify(CLI::App& app, int& exit_code);
void add_merge(CLI::App& app, int& exit_code);
void add_report(CLI::App& app, int& exit_code);
void add_mask(CLI::App& app, int& exit_code);
void add_train(CLI::App& app, int& exit_code);  // train, sample and gpt-steps

}  // namespace attnbench::cli
