// attnbench list / attnbench roofline.
#include <omp.h>

#include <fmt/format.h>

#include "harness/cli/commands.hpp"
#include "harness/roofline.hpp"
#include "harness/system.hpp"
#include "harness/variant.hpp"

namespace attnbench::cli {

void add_list(CLI::App& app, int& exit_code) {
  auto* c = app.add_subcommand("list", "Variants, their shape parameters and implementations");
  c->callback([&exit_code] {
    fmt::print("CUDA: {}\n\n", cuda_usable() ? "usable" : "not usable here (" + cuda_unusable_reason() + ")");
    for (const Variant* v : variants()) {
      fmt::print("{}: {}\n  parameters:\n", v->name(), v->summary());
      for (const auto& p : v->params())
        fmt::print("    {:<14} default {:<8} {}\n", p.name, p.default_value.dump(), p.help);
      fmt::print("  implementations:\n");
      for (const auto& i : v->impls()) {
        std::string dts;
        for (DType d : i.dtypes) dts += (dts.empty() ? "" : ", ") + std::string(dtype_name(d));
        const bool usable = i.device == Device::cpu || cuda_usable();
        fmt::print("    {:<14} {:<5} {}{}\n", i.name, i.device == Device::cpu ? "cpu" : "cuda", dts,
                   usable ? "" : "  (not usable here)");
      }
      fmt::print("\n");
    }
    exit_code = 0;
  });
}

void add_roofline(CLI::App& app, int& exit_code) {
  auto threads = std::make_shared<int>(0);
  auto* c = app.add_subcommand("roofline", "Measure this machine's FP32 FMA peak and memory bandwidth (cached for run)");
  c->add_option("--threads", *threads, "Threads (default: all)")->check(CLI::PositiveNumber);
  c->callback([threads, &exit_code] {
    const int t = resolve_threads(*threads, "--threads");
    const Roofline r = roofline(t, /*remeasure=*/true);
    fmt::print("threads        {}\nsimd           {}\nFMA peak       {:.1f} GFLOP/s (FP32, all threads)\n"
               "per thread     {:.1f} GFLOP/s\nbandwidth      {:.1f} GB/s (STREAM triad)\nbalance        {:.1f} FLOP/byte\n",
               t, r.simd, r.peak_gflops, r.peak_gflops / t, r.bandwidth_gbs, r.peak_gflops / r.bandwidth_gbs);
    exit_code = 0;
  });
}

}  // namespace attnbench::cli
