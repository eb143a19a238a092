// Facts about this machine, read from /proc.
#pragma once

#include <cstdint>
#include <string>

namespace attnbench {

int64_t available_memory_bytes();  // MemAvailable, or less under set_memory_limit
/// `run --max-memory`: the most memory cases may use; the runner skips a case
/// whose memory model needs more, before allocating anything (0: no limit).
/// While a case runs the limit is also enforced (MemoryLimitScope in
/// harness/workspace.hpp): an allocation past it fails the case.
void set_memory_limit(int64_t bytes);
int64_t memory_limit();            // set_memory_limit's bytes (0: none)
int64_t total_memory_bytes();      // MemTotal
std::string cpu_model();
std::string host_name();
std::string gib(double bytes);     // "1.23 GiB"
int core_count();                  // online processors

/// Threads for a `--threads` flag: 0 means OpenMP's default (one per core); more than 4 per core
/// is an InputError (tens of thousands crash the OpenMP runtime); more than one
/// per core is allowed with a warning on stderr (timings will be unreliable).
int resolve_threads(int requested, const std::string& flag);

/// `--cpu-path` (or, when the flag is empty, the environment variable
/// ATTNBENCH_CPU_PATH): limits the CPU kernels to that path and below
/// (impls/cpu/cpu_features.hpp). A path the machine lacks is an InputError
/// naming the flag (or the variable) and the paths there are. Empty both: no limit.
void apply_cpu_path(const std::string& flag_value);

/// The 1-, 5- and 15-minute load averages (/proc/loadavg; -1 where unreadable).
struct LoadAverage {
  double m1 = -1, m5 = -1, m15 = -1;
};
LoadAverage load_average();

}  // namespace attnbench
