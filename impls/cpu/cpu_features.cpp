// CPU feature detection and kernel-path limit (impls/cpu/cpu_features.hpp).
#include "impls/cpu/cpu_features.hpp"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <mutex>
#include <stdexcept>

#include "hwy/highway.h"
#include "hwy/targets.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define ATTNBENCH_X86 1
#else
#define ATTNBENCH_X86 0
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace attnbench::cpu {
namespace {

#if ATTNBENCH_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) { __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]); }
unsigned long long xgetbv0() {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
bool bit(unsigned x, int b) { return (x >> b) & 1u; }
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if ATTNBENCH_X86
  unsigned r[4] = {0, 0, 0, 0};
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  cpuid(1, 0, r);
  const bool osxsave = bit(r[2], 27);
  f.fma = bit(r[2], 12);
  const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;                      // SSE, AVX state
  f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;     // opmask, ZMM_Hi256, Hi16_ZMM
  f.os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);   // XTILECFG, XTILEDATA
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    const unsigned max_sub = r[0];
    f.avx2 = bit(r[1], 5);
    f.avx512f = bit(r[1], 16);
    f.avx512dq = bit(r[1], 17);
    f.avx512bw = bit(r[1], 30);
    f.avx512vl = bit(r[1], 31);
    f.avx512_fp16 = bit(r[3], 23);
    f.amx_bf16 = bit(r[3], 22);
    f.amx_tile = bit(r[3], 24);
    if (max_sub >= 1) {
      cpuid(7, 1, r);
      f.avx512_bf16 = bit(r[0], 5);
    }
  }
  if (f.amx_tile) {
    if (!f.os_amx) {
      f.amx_note = "the OS does not enable the tile state (XCR0)";
    } else {
#if defined(__linux__)
      constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
      if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0)
        f.amx_permitted = true;
      else
        f.amx_note = "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) was refused";
#else
      f.amx_note = "no tile-data permission request on this OS";
#endif
    }
  }
#endif
  return f;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool is_avx512_target(int64_t t) { return t == HWY_AVX3 || t == HWY_AVX3_DL; }

/// Highway's targets this build has and the CPU supports, before any limit, best first.
const std::vector<int64_t>& hwy_targets() {
  static const std::vector<int64_t> t = hwy::SupportedAndGeneratedTargets();
  return t;
}

/// A path: bf16 levels (2 = amx, 1 = avx512bf16) or a Highway target (level 0).
struct PathRef {
  std::string name;
  int bf16_level;
  int64_t target;  // the best Highway target allowed (0: the best there is)
};

std::vector<PathRef> paths() {
  std::vector<PathRef> out;
  const CpuFeatures& f = cpu_features();
  if (f.amx_usable()) out.push_back({"amx-bf16", 2, 0});
  if (f.bf16_usable()) out.push_back({"avx512bf16", 1, 0});
  bool avx512_named = false;
  for (int64_t t : hwy_targets()) {
    if (is_avx512_target(t)) {
      if (avx512_named) continue;
      avx512_named = true;
      out.push_back({"avx512-f32", 0, t});
    } else {
      out.push_back({hwy::TargetName(t), 0, t});
    }
  }
  return out;
}

std::mutex g_mu;
std::string g_limit;                 // "" = none
std::atomic<int> g_bf16_level{2};    // highest bf16 level allowed by the limit

}  // namespace

std::vector<std::string> CpuFeatures::names() const {
  std::vector<std::string> n;
  auto add = [&](bool on, const char* s) {
    if (on) n.emplace_back(s);
  };
  add(avx2, "avx2"), add(fma, "fma"), add(avx512f, "avx512f"), add(avx512dq, "avx512dq");
  add(avx512bw, "avx512bw"), add(avx512vl, "avx512vl"), add(avx512_bf16, "avx512_bf16");
  add(avx512_fp16, "avx512_fp16"), add(amx_tile, "amx_tile"), add(amx_bf16, "amx_bf16");
  add(os_avx512, "os_avx512"), add(os_amx, "os_amx"), add(amx_permitted, "amx_permitted");
  return n;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

std::vector<std::string> cpu_paths_available() {
  std::vector<std::string> n;
  for (const auto& p : paths()) n.push_back(p.name);
  return n;
}

void set_cpu_path_limit(std::string_view path) {
  const std::lock_guard<std::mutex> lock(g_mu);
  if (path.empty()) {
    hwy::DisableTargets(0);
    g_bf16_level = 2;
    g_limit.clear();
    return;
  }
  const std::vector<PathRef> all = paths();
  const std::string want = lower(path);
  const auto it = std::find_if(all.begin(), all.end(), [&](const PathRef& p) { return lower(p.name) == want; });
  if (it == all.end()) {
    std::string have;
    for (const auto& p : all) have += (have.empty() ? "" : ", ") + p.name;
    throw std::invalid_argument("'" + std::string(path) + "' is not a CPU path of this machine (it has: " + have + ")");
  }
  g_bf16_level = it->bf16_level;
  // Highway: disable every target better than the path's (lower bits are better).
  hwy::DisableTargets(it->target ? (it->target - 1) : 0);
  g_limit = it->name;
}

std::string cpu_path_limit() {
  const std::lock_guard<std::mutex> lock(g_mu);
  return g_limit;
}

bool amx_bf16_enabled() { return cpu_features().amx_usable() && g_bf16_level >= 2; }
bool avx512bf16_enabled() { return cpu_features().bf16_usable() && g_bf16_level >= 1; }

std::string f32_kernel_path() {
  const int64_t supported = hwy::SupportedTargets() & HWY_TARGETS;
  const int64_t best = supported & -supported;
  if (is_avx512_target(best)) return "avx512-f32";
  return hwy::TargetName(best);
}

}  // namespace attnbench::cpu
