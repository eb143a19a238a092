// Results files (docs/results.md): the run context, the streaming JSONL
// writer and the final JSON (temp file + rename), and a validating loader.
#pragma once

#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

namespace attnbench {

inline constexpr const char* kResultsSchema = "attnbench.results/1";

/// date, host, cpu model, threads, peak GFLOP/s, compiler, git sha, cuda device, version.
nlohmann::json run_context(int threads);

/// Loads and validates a results file (schema, context, every record's
/// required fields and types). Records written before the pass axis existed
/// get "pass": "fwd". Throws InputError naming the file and field.
nlohmann::json load_results(const std::string& path);

/// "variant impl dtype pass {shape}": what identifies a case across results
/// files (compare, merge and report pair records by it; never across passes).
std::string record_key(const nlohmann::json& record);

/// Writes `doc` to `path` atomically (temp file in the same folder + rename).
void write_json_atomic(const std::string& path, const nlohmann::json& doc);

/// {"ok": n, "failed": n, "skipped": n, "checks_failed": n} over records.
nlohmann::json summarize(const nlohmann::json& records);

/// Appends records to a .jsonl file, one flushed line each.
class JsonlWriter {
 public:
  explicit JsonlWriter(const std::string& path);
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;
  void append(const nlohmann::json& record);

 private:
  std::FILE* f_ = nullptr;
};

}  // namespace attnbench
