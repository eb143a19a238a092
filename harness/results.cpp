#include "harness/results.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "harness/errors.hpp"
#include "harness/json_file.hpp"
#include "harness/version.hpp"
#include "harness/roofline.hpp"
#include "impls/cpu/cpu_features.hpp"
#include "harness/system.hpp"
#include "harness/variant.hpp"

#if ATTNBENCH_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace attnbench {

using nlohmann::json;

namespace {
std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

json cuda_device() {
#if ATTNBENCH_HAVE_CUDA
  if (cuda_usable()) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) return prop.name;
  }
#endif
  return nullptr;
}
}  // namespace

json run_context(int threads) {
  const Roofline r = roofline(threads);
  return {{"date", utc_now()},
          {"host", host_name()},
          {"cpu_model", cpu_model()},
          {"threads", threads},
          {"peak_gflops", r.peak_gflops},
          {"bf16_dot_gflops", r.bf16_dot_gflops},
          {"amx_bf16_gflops", r.amx_bf16_gflops},
          {"roofline_load_average", r.load_average},
          {"roofline_measured_at", r.measured_at},
          {"roofline_warnings", r.warnings},
          {"mem_bandwidth_gbs", r.bandwidth_gbs},
          {"memory_bytes", total_memory_bytes()},
          {"compiler", compiler_flags()},
          {"git_sha", git_sha()},
          {"cuda_device", cuda_device()},
          {"cpu_features", cpu::cpu_features().names()},
          {"cpu_paths", cpu::cpu_paths_available()},
          {"cpu_path_limit", cpu::cpu_path_limit().empty() ? json(nullptr) : json(cpu::cpu_path_limit())},
          {"cpu_amx_note", cpu::cpu_features().amx_note.empty() ? json(nullptr) : json(cpu::cpu_features().amx_note)},
          {"version", version()}};
}

json summarize(const json& records) {
  int ok = 0, failed = 0, skipped = 0, checks_failed = 0;
  for (const auto& r : records) {
    const auto status = r.at("status").get<std::string>();
    ok += status == "ok";
    failed += status == "failed";
    skipped += status == "skipped";
    if (r.contains("checks"))
      for (const auto& [name, c] : r["checks"].items()) checks_failed += !c.at("passed").get<bool>();
  }
  return {{"ok", ok}, {"failed", failed}, {"skipped", skipped}, {"checks_failed", checks_failed}};
}

void write_json_atomic(const std::string& path, const json& doc) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  check_output_path(path, path);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp);
    if (!f) throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
    f << doc.dump(1) << '\n';
    f.flush();
    if (!f) {
      f.close();
      fs::remove(tmp);
      throw InputError(path + ": write failed (" + std::strerror(errno) + ")");
    }
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {  // e.g. a directory appeared at `path`: leave no temporary behind
    fs::remove(tmp);
    throw InputError(path + ": cannot write (" + ec.message() + ")");
  }
}

json load_results(const std::string& path) {
  json doc = read_json_file(path);
  auto fail = [&](const std::string& field, const std::string& what) {
    throw InputError(path + ": " + field + ": " + what);
  };
  if (!doc.is_object()) fail("(top level)", "expected an object");
  if (!doc.contains("schema") || doc["schema"] != kResultsSchema)
    fail("schema", std::string("expected \"") + kResultsSchema + "\"");
  if (!doc.contains("context") || !doc["context"].is_object()) fail("context", "expected an object");
  for (const char* k : {"host", "cpu_model", "git_sha"})
    if (!doc["context"].contains(k) || !doc["context"][k].is_string()) fail(std::string("context.") + k, "expected a string");
  if (!doc["context"].contains("peak_gflops") || !doc["context"]["peak_gflops"].is_number())
    fail("context.peak_gflops", "expected a number");
  if (!doc.contains("suite") || !doc["suite"].is_object()) fail("suite", "expected an object");
  for (const char* k : {"name", "file", "shard", "filter"})
    if (doc["suite"].contains(k) && !doc["suite"][k].is_string()) fail(std::string("suite.") + k, "expected a string");
  for (const char* k : {"quick", "complete"})
    if (doc["suite"].contains(k) && !doc["suite"][k].is_boolean()) fail(std::string("suite.") + k, "expected true or false");
  if (!doc.contains("records") || !doc["records"].is_array()) fail("records", "expected an array");
  auto& recs = doc["records"];
  for (size_t i = 0; i < recs.size(); ++i) check_record(recs[i], path + ": records[" + std::to_string(i) + "]");
  return doc;
}

void check_record(json& r, const std::string& where) {
  auto fail = [&](const std::string& field, const std::string& what) {
    throw InputError(where + (field.empty() ? "" : "." + field) + ": " + what);
  };
  if (!r.is_object()) fail("", "expected an object");
  for (const char* k : {"variant", "impl", "dtype", "status"})
    if (!r.contains(k) || !r[k].is_string()) fail(k, "expected a string");
  if (!r.contains("pass")) {
    r["pass"] = "fwd";  // written before the pass axis existed
  } else if (!r["pass"].is_string() || (r["pass"] != "fwd" && r["pass"] != "bwd" && r["pass"] != "fwd_bwd")) {
    fail("pass", "expected \"fwd\", \"bwd\" or \"fwd_bwd\", got " + r["pass"].dump());
  }
  const auto status = r["status"].get<std::string>();
  if (status != "ok" && status != "failed" && status != "skipped")
    fail("status", "expected ok, failed or skipped, got \"" + status + "\"");
  if (r.contains("reason") && !r["reason"].is_string()) fail("reason", "expected a string");
  if (!r.contains("shape") || !r["shape"].is_object()) fail("shape", "expected an object");
  if (r.contains("checks")) {
    if (!r["checks"].is_object()) fail("checks", "expected an object");
    for (const auto& [name, c] : r["checks"].items()) {
      if (!c.is_object() || !c.contains("passed") || !c["passed"].is_boolean())
        fail("checks." + name + ".passed", "expected a boolean");
      for (const char* k : {"max_abs", "max_rel", "bound"})
        if (c.contains(k) && !c[k].is_number() && !c[k].is_null())
          fail("checks." + name + "." + k, "expected a number or null");
    }
  }
  if (r.contains("bench")) {
    const auto& b = r["bench"];
    if (!b.is_object()) fail("bench", "expected an object");
    // Times are durations: a negative or zero median would make ratios meaningless.
    for (const char* k : {"median_s", "min_s"})
      if (!b.contains(k) || !b[k].is_number() || !(b[k].get<double>() > 0))
        fail(std::string("bench.") + k, "expected a number > 0");
    for (const char* k : {"gflops", "flops"})
      if (!b.contains(k) || !b[k].is_number() || !(b[k].get<double>() >= 0))
        fail(std::string("bench.") + k, "expected a number >= 0");
    if (!b.contains("samples_s") || !b["samples_s"].is_array() || b["samples_s"].empty())
      fail("bench.samples_s", "expected a non-empty array of times");
    for (const auto& x : b["samples_s"])
      if (!x.is_number() || !(x.get<double>() > 0)) fail("bench.samples_s", "expected times > 0, got " + x.dump());
    if (b.contains("pct_peak") && !b["pct_peak"].is_number() && !b["pct_peak"].is_null())
      fail("bench.pct_peak", "expected a number or null");
    if (b.contains("suspect") && !b["suspect"].is_string()) fail("bench.suspect", "expected a string");
  }
}

std::string record_key(const json& r) {
  return r["variant"].get<std::string>() + " " + r["impl"].get<std::string>() + " " + r["dtype"].get<std::string>() +
         " " + r.value("pass", std::string("fwd")) + " " + r["shape"].dump();
}

JsonlRecords read_jsonl(const std::string& path) {
  const std::string text = read_regular_file(path, kMaxJsonBytes);
  JsonlRecords out;
  size_t pos = 0, line_no = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    ++line_no;
    if (nl == std::string::npos) {  // cut short by a kill: not a record
      out.dropped_partial_line = true;
      break;
    }
    const std::string where = path + ": line " + std::to_string(line_no);
    if (nl > pos) {
      json r = parse_json_text(text.substr(pos, nl - pos), where);
      check_record(r, where);
      out.records.push_back(std::move(r));
    }
    pos = nl + 1;
    out.kept_bytes = pos;
  }
  return out;
}

void check_output_path(const std::string& path, const std::string& flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw InputError(flag + ": " + path + " is a directory, expected a file path");
  const fs::path parent = fs::path(path).has_parent_path() ? fs::path(path).parent_path() : fs::path(".");
  fs::create_directories(parent, ec);
  if (!fs::is_directory(parent))
    throw InputError(flag + ": cannot create the folder " + parent.string() + " (" +
                     (ec ? ec.message() : std::string("a file is in the way")) + ")");
  if (::access(parent.c_str(), W_OK | X_OK) != 0)
    throw InputError(flag + ": cannot write in " + parent.string() + " (" + std::strerror(errno) + ")");
}

JsonlWriter::JsonlWriter(const std::string& path) : path_(path) {
  check_output_path(path, path);
  // O_CLOEXEC: a run that re-executes itself (--timeout-per-case) drops the lock.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    throw InputError(path + ": another attnbench run is writing these results (the file is locked)");
  }
  if (!(f_ = ::fdopen(fd, "a"))) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    throw InputError(path + ": cannot write (" + why + ")");
  }
}

void JsonlWriter::start(uint64_t keep_bytes) {
  if (::ftruncate(fileno(f_), off_t(keep_bytes)) != 0 || std::fseek(f_, 0, SEEK_END) != 0)
    throw InputError(path_ + ": cannot write (" + std::strerror(errno) + ")");
}

JsonlWriter::~JsonlWriter() {
  if (f_) std::fclose(f_);
}

void JsonlWriter::append(const json& record) {
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    throw InputError(path_ + ": write failed (" + std::strerror(errno) + "); the records so far are kept");
}

}  // namespace attnbench
