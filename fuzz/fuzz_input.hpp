// Shared by the libFuzzer targets: the loaders read paths, so each input is
// written to a per-process temporary file first (which also exercises the
// file checks). A loader may reject any input with an InputError (a one-line
// error, exit 2); anything else escaping is a bug, and libFuzzer reports it.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "harness/errors.hpp"

namespace attnbench::fuzz {

inline std::string write_input(const uint8_t* data, size_t size, const char* ext) {
  static const std::string path = "/tmp/attnbench-fuzz-" + std::to_string(::getpid()) + ext;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) __builtin_trap();
  if (size && std::fwrite(data, 1, size, f) != size) __builtin_trap();
  std::fclose(f);
  return path;
}

template <class F>
int accept_input_errors(F&& f) {
  try {
    f();
  } catch (const InputError&) {
  }
  return 0;
}

}  // namespace attnbench::fuzz
