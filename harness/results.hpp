// Results files (docs/results.md): the run context, the streaming JSONL
// writer and the final JSON (temp file + rename), and a validating loader.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

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

/// Checks one record's required fields and types (a missing "pass" becomes
/// "fwd"); errors say "<where>.<field>: ...".
void check_record(nlohmann::json& r, const std::string& where);

/// The records of a results stream (OUT.jsonl), for `run --resume`. Every
/// complete line must be a valid record; a last line without its newline (the
/// run was killed mid-write) is left out and `kept_bytes` ends before it.
struct JsonlRecords {
  std::vector<nlohmann::json> records;
  uint64_t kept_bytes = 0;
  bool dropped_partial_line = false;
};
JsonlRecords read_jsonl(const std::string& path);

/// Before any case runs: `path` (a results JSON or its JSONL) must not be a
/// directory and its folder must exist or be creatable and writable.
void check_output_path(const std::string& path, const std::string& flag);

/// Writes `doc` to `path` atomically (temp file in the same folder + rename).
void write_json_atomic(const std::string& path, const nlohmann::json& doc);

/// {"ok": n, "failed": n, "skipped": n, "checks_failed": n} over records.
nlohmann::json summarize(const nlohmann::json& records);

/// Appends records to a .jsonl file, one flushed line each. The file is locked
/// for the writer's lifetime (a second run to the same --out is an InputError,
/// not interleaved records); nothing in it changes until `start`. A failed
/// write (disk full) throws.
class JsonlWriter {
 public:
  explicit JsonlWriter(const std::string& path);
  /// Keeps the first `keep_bytes` of the file (0: starts empty; --resume keeps
  /// the earlier records) and appends after them.
  void start(uint64_t keep_bytes = 0);
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;
  void append(const nlohmann::json& record);

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace attnbench
