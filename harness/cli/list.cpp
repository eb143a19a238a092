// attnbench list / attnbench roofline.
#include <omp.h>

#include <algorithm>

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
  auto* c = app.add_subcommand("roofline", "Measure this machine's peaks per CPU path (FP32 FMA, bf16 dot, AMX) and memory bandwidth (cached for run)");
  c->add_option("--threads", *threads, "Threads (default: all)")->check(CLI::PositiveNumber);
  c->callback([threads, &exit_code] {
    const int t = resolve_threads(*threads, "--threads");
    const Roofline r = roofline(t, /*remeasure=*/true);
    fmt::print("threads        {}\nsimd           {}\nFMA peak       {:.1f} GFLOP/s (FP32, all threads; avx512-f32 and "
               "Highway paths)\nper thread     {:.1f} GFLOP/s\n",
               t, r.simd, r.peak_gflops, r.peak_gflops / t);
    auto path_line = [&](const char* label, double v, const char* path, const char* what) {
      if (v > 0)
        fmt::print("{:<15}{:.1f} GFLOP/s ({}; {:.0f}% of the theoretical {:.0f})\n", label, v, what,
                   100 * v / std::max(1e-9, theoretical_gflops(path, t)), theoretical_gflops(path, t));
      else
        fmt::print("{:<15}none ({} not on this machine)\n", label, path);
    };
    path_line("bf16 dot peak", r.bf16_dot_gflops, "avx512bf16", "VDPBF16PS, avx512bf16 path");
    path_line("AMX bf16 peak", r.amx_bf16_gflops, "amx-bf16", "TDPBF16PS, amx-bf16 path");
    fmt::print("bandwidth      {:.1f} GB/s (STREAM triad)\nbalance        {:.1f} FLOP/byte\n"
               "load average   {:.2f} (1 min, when measured; best of 7 short runs per peak)\n",
               r.bandwidth_gbs, r.peak_gflops / r.bandwidth_gbs, r.load_average);
    exit_code = 0;
  });
}

}  // namespace attnbench::cli
