// Helpers shared by the per-variant tests: run one implementation directly,
// widen tensors, and compare them elementwise.
#pragma once

#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "harness/variant.hpp"

namespace attnbench::test {

inline TensorMap to_f64(const TensorMap& m) {
  TensorMap out;
  for (const auto& [name, t] : m) out.emplace(name, t.to(DType::f64));
  return out;
}

/// Runs implementation `impl` of `v` in `dtype` on the given (already cast)
/// inputs, with NaN-filled outputs; the ImplArgs outlive the instance, as in
/// the harness.
inline TensorMap run_impl(const Variant& v, const std::string& impl, const Params& p, DType dtype,
                          const TensorMap& inputs) {
  TensorMap out;
  for (const auto& o : v.outputs(p, dtype)) out.emplace(o.name, Tensor(o.dtype, o.shape));
  for (auto& [name, t] : out) t.fill_nan();
  Workspace ws;
  const ImplArgs args{p, dtype, inputs, out, ws};
  auto inst = v.find_impl(impl)->make(args);
  inst->run();
  inst->finish();
  return out;
}

inline double max_abs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.get(i)));
  return m;
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a.get(i) - b.get(i)));
  return m;
}

inline bool all_finite(const Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(t.get(i))) return false;
  return true;
}

struct CommandOutput {
  int code;          // exit status, -1 when the command did not exit normally
  std::string text;  // stdout + stderr
};

/// Runs the attnbench binary with `args` (a shell fragment) and collects its output.
inline CommandOutput run_attnbench(const std::string& args) {
  const std::string cmd = std::string(ATTNBENCH_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
}

/// `attnbench ARGS`: the end-to-end tests' short name for run_attnbench.
inline CommandOutput run(const std::string& args) { return run_attnbench(args); }

/// A fresh, empty folder attnbench_<name>_<pid> in the temporary directory
/// (the pid keeps tests run in parallel by CTest apart).
inline std::filesystem::path temp_dir(const std::string& name) {
  const std::filesystem::path d =
      std::filesystem::temp_directory_path() / ("attnbench_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

/// Writes `text` to `p` (replacing it).
inline void write(const std::filesystem::path& p, const std::string& text) { std::ofstream(p) << text; }

/// Non-empty lines of the file `p` (JSONL records).
inline int count_lines(const std::filesystem::path& p) {
  std::ifstream f(p);
  std::string line;
  int n = 0;
  while (std::getline(f, line)) n += !line.empty();
  return n;
}

}  // namespace attnbench::test
