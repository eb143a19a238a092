// attnbench: check, time and compare attention implementations.
#include <cstdio>
#include <exception>
#include <new>

#include <CLI/CLI.hpp>

#include "harness/cli/commands.hpp"
#include "harness/errors.hpp"
#include "harness/version.hpp"

int main(int argc, char** argv) {
  CLI::App app{"attnbench: a research harness for attention variants. Checks optimized CPU and CUDA\n"
               "implementations against Eigen references, times them and writes results for plots.",
               "attnbench"};
  app.set_version_flag("--version", attnbench::version());
  app.require_subcommand(1);
  int exit_code = 0;
  namespace cli = attnbench::cli;
  cli::add_run(app, exit_code);
  cli::add_list(app, exit_code);
  cli::add_compare(app, exit_code);
  cli::add_roofline(app, exit_code);
  cli::add_export(app, exit_code);
  cli::add_verify(app, exit_code);
  cli::add_merge(app, exit_code);
  cli::add_report(app, exit_code);
  cli::add_mask(app, exit_code);
  cli::add_train(app, exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const attnbench::InputError& e) {
    std::fprintf(stderr, "attnbench: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    // Sizes come from the input (shapes, case files): running out is the input's doing.
    std::fprintf(stderr, "attnbench: error: out of memory (is a shape too large for this machine?)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attnbench: internal error: %s\n", e.what());
    return 3;
  }
  return exit_code;
}
