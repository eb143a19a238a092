// Reading user input files (suites, DAGs, results, case-file headers): the one
// place that bounds what a hostile file can make the harness do. A file must be
// a regular file (not a FIFO, /dev/stdin or /dev/zero, which would block or never
// end) of bounded size, and its JSON at most kMaxJsonDepth deep (error messages
// and dump() recurse) with every number finite. Every failure is an InputError
// "<where>: ...".
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace attnbench {

/// Deeper nesting is refused: no attnbench file needs more than a handful of levels.
inline constexpr int kMaxJsonDepth = 64;
/// Largest JSON input file read (results files of big sweeps stay far below).
inline constexpr uint64_t kMaxJsonBytes = 256ull << 20;

/// Size of `path`, which must be a regular file (InputError otherwise).
uint64_t regular_file_size(const std::string& path);

/// The bytes of `path`, which must be a regular file of at most `max_bytes`.
std::string read_regular_file(const std::string& path, uint64_t max_bytes);

/// Parses JSON text; errors say "<where>: invalid JSON: ...".
nlohmann::json parse_json_text(const std::string& text, const std::string& where);

/// read_regular_file + parse_json_text, errors naming `path`.
nlohmann::json read_json_file(const std::string& path, uint64_t max_bytes = kMaxJsonBytes);

}  // namespace attnbench
