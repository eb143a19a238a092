// Facts about this machine, read from /proc.
#pragma once

#include <cstdint>
#include <string>

namespace attnbench {

int64_t available_memory_bytes();  // MemAvailable
int64_t total_memory_bytes();      // MemTotal
std::string cpu_model();
std::string host_name();
std::string gib(double bytes);     // "1.23 GiB"

}  // namespace attnbench
