// Run-time CPU feature detection and the choice of CPU kernel path (issue 13
// item 1). One build runs on every x86-64 machine: the features come from
// cpuid and XCR0 (what the OS saves on a context switch), AMX also needs the
// Linux permission request for the tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), and a kernel takes the best path
// the machine has at or below the process-wide limit (set_cpu_path_limit,
// from `--cpu-path` / ATTNBENCH_CPU_PATH in the harness).
//
// Paths, best first:
//   amx-bf16     bf16 inputs: Q·Kᵀ and P·V on AMX tiles (TDPBF16PS)
//   avx512bf16   bf16 inputs: Q·Kᵀ on VDPBF16PS (AVX512-BF16), P·V in f32
//   avx512-f32   every dtype widened to f32, Highway's AVX-512 target (AVX3)
//   AVX2, SSE4, SSSE3, EMU128 …: Highway's lower targets (f32), by their Highway names
// A bf16 kernel that cannot use a bf16 path for a call (RoPE, need_weights)
// takes the f32 one and says so in its path name.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace attnbench::cpu {

struct CpuFeatures {
  bool avx2 = false, fma = false;
  bool avx512f = false, avx512dq = false, avx512bw = false, avx512vl = false;
  bool avx512_bf16 = false, avx512_fp16 = false;
  bool amx_tile = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0: the OS saves the state
  bool amx_permitted = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeded
  std::string amx_note;        // why AMX is not usable, when the CPU has it
  /// The flags present, in lscpu's spelling (avx512f, avx512_bf16, amx_bf16, …).
  std::vector<std::string> names() const;
  bool avx512_usable() const { return avx512f && avx512bw && avx512vl && avx512dq && os_avx512; }
  bool bf16_usable() const { return avx512_usable() && avx512_bf16; }
  bool amx_usable() const { return bf16_usable() && amx_tile && amx_bf16 && os_amx && amx_permitted; }
};

/// Detected once (the AMX permission request is made then).
const CpuFeatures& cpu_features();

/// The paths this machine has, best first (amx-bf16, avx512bf16, avx512-f32 or
/// the best Highway target's name, then the lower Highway targets).
std::vector<std::string> cpu_paths_available();

/// Limits every CPU kernel to `path` and below (a name of cpu_paths_available,
/// case-insensitive; empty = no limit). Lowers Highway's targets too (paths
/// below avx512-f32). Throws std::invalid_argument naming the paths there are
/// when the machine lacks `path`. Process-wide; call before running kernels.
void set_cpu_path_limit(std::string_view path);

/// The current limit's name ("" = none).
std::string cpu_path_limit();

/// Whether the bf16 kernels may use AMX / AVX512-BF16 now (machine and limit).
bool amx_bf16_enabled();
bool avx512bf16_enabled();

/// The path the f32 kernels take now: avx512-f32 on Highway's AVX3 targets,
/// else the Highway target's name.
std::string f32_kernel_path();

}  // namespace attnbench::cpu
