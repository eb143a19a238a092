// One exception type for bad user input: its message is the one line printed.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace attnbench {

/// Invalid input (suite, case file, command line, shape). The message names the
/// file, the field and what was expected; the CLI prints it and exits with 2.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// " (did you mean 'x'?)" when a candidate is within a small edit distance, else "".
std::string did_you_mean(std::string_view word, const std::vector<std::string>& candidates);

}  // namespace attnbench
