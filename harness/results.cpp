#include "harness/results.hpp"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "harness/errors.hpp"
#include "harness/version.hpp"
#include "harness/roofline.hpp"
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
          {"mem_bandwidth_gbs", r.bandwidth_gbs},
          {"memory_bytes", total_memory_bytes()},
          {"compiler", compiler_flags()},
          {"git_sha", git_sha()},
          {"cuda_device", cuda_device()},
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
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp);
    if (!f) throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
    f << doc.dump(1) << '\n';
    f.flush();
    if (!f) {
      fs::remove(tmp);
      throw InputError(path + ": write failed");
    }
  }
  fs::rename(tmp, target);
}

json load_results(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw InputError(path + ": cannot open file");
  std::stringstream ss;
  ss << f.rdbuf();
  json doc;
  try {
    doc = json::parse(ss.str());
  } catch (const json::parse_error& e) {
    std::string msg = e.what();
    throw InputError(path + ": invalid JSON: " + msg.substr(msg.find(']') + 2));
  }
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
  if (!doc.contains("records") || !doc["records"].is_array()) fail("records", "expected an array");
  auto& recs = doc["records"];
  for (size_t i = 0; i < recs.size(); ++i) {
    auto& r = recs[i];
    const std::string at = "records[" + std::to_string(i) + "]";
    if (!r.is_object()) fail(at, "expected an object");
    for (const char* k : {"variant", "impl", "dtype", "status"})
      if (!r.contains(k) || !r[k].is_string()) fail(at + "." + k, "expected a string");
    if (!r.contains("pass")) {
      r["pass"] = "fwd";
    } else if (!r["pass"].is_string() ||
               (r["pass"] != "fwd" && r["pass"] != "bwd" && r["pass"] != "fwd_bwd")) {
      fail(at + ".pass", "expected \"fwd\", \"bwd\" or \"fwd_bwd\", got " + r["pass"].dump());
    }
    const auto status = r["status"].get<std::string>();
    if (status != "ok" && status != "failed" && status != "skipped")
      fail(at + ".status", "expected ok, failed or skipped, got \"" + status + "\"");
    if (!r.contains("shape") || !r["shape"].is_object()) fail(at + ".shape", "expected an object");
    if (r.contains("checks")) {
      if (!r["checks"].is_object()) fail(at + ".checks", "expected an object");
      for (const auto& [name, c] : r["checks"].items())
        if (!c.is_object() || !c.contains("passed") || !c["passed"].is_boolean())
          fail(at + ".checks." + name + ".passed", "expected a boolean");
    }
    if (r.contains("bench")) {
      const auto& b = r["bench"];
      for (const char* k : {"median_s", "min_s", "gflops", "flops"})
        if (!b.contains(k) || !b[k].is_number()) fail(at + ".bench." + k, "expected a number");
      if (!b.contains("samples_s") || !b["samples_s"].is_array()) fail(at + ".bench.samples_s", "expected an array");
    }
  }
  return doc;
}

std::string record_key(const json& r) {
  return r["variant"].get<std::string>() + " " + r["impl"].get<std::string>() + " " + r["dtype"].get<std::string>() +
         " " + r.value("pass", std::string("fwd")) + " " + r["shape"].dump();
}

JsonlWriter::JsonlWriter(const std::string& path) {
  namespace fs = std::filesystem;
  if (fs::path(path).has_parent_path()) fs::create_directories(fs::path(path).parent_path());
  f_ = std::fopen(path.c_str(), "w");
  if (!f_) throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
}

JsonlWriter::~JsonlWriter() {
  if (f_) std::fclose(f_);
}

void JsonlWriter::append(const json& record) {
  const std::string line = record.dump() + "\n";
  std::fwrite(line.data(), 1, line.size(), f_);
  std::fflush(f_);
}

}  // namespace attnbench
