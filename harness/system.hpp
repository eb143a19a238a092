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

}  // namespace attnbench
