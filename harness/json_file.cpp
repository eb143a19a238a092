#include "harness/json_file.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "harness/errors.hpp"

namespace attnbench {

using nlohmann::json;

uint64_t regular_file_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw InputError(path + ": cannot open file (" + std::strerror(errno) + ")");
  if (S_ISDIR(st.st_mode)) throw InputError(path + ": is a directory, expected a file");
  if (!S_ISREG(st.st_mode)) throw InputError(path + ": not a regular file (pipes and devices are not read)");
  return uint64_t(st.st_size);
}

std::string read_regular_file(const std::string& path, uint64_t max_bytes) {
  const uint64_t size = regular_file_size(path);
  if (size > max_bytes)
    throw InputError(path + ": " + std::to_string(size) + " bytes, more than the " + std::to_string(max_bytes >> 20) +
                     " MiB read");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open file (" + std::strerror(errno) + ")");
  // Read the size stat gave, no more: a file that grows meanwhile is refused.
  std::string text(size_t(size), '\0');
  f.read(text.data(), std::streamsize(text.size()));
  text.resize(size_t(f.gcount()));
  if (f.peek() != std::ifstream::traits_type::eof())
    throw InputError(path + ": grew while being read; expected a file that stays put");
  return text;
}

json parse_json_text(const std::string& text, const std::string& where) {
  // The callback sees every container start with its depth: refuse deep
  // nesting before it is built.
  const json::parser_callback_t limit = [&](int depth, json::parse_event_t event, json&) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= kMaxJsonDepth)
      throw InputError(where + ": invalid JSON: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    return true;
  };
  try {
    return json::parse(text, limit);
  } catch (const json::exception& e) {
    // parse_error and out_of_range ("number overflow parsing '1e400'") alike;
    // drop nlohmann's "[json.exception.parse_error.101] " prefix.
    std::string msg = e.what();
    const auto close = msg.find("] ");
    if (close != std::string::npos) msg = msg.substr(close + 2);
    throw InputError(where + ": invalid JSON: " + msg);
  }
}

json read_json_file(const std::string& path, uint64_t max_bytes) {
  return parse_json_text(read_regular_file(path, max_bytes), path);
}

}  // namespace attnbench
