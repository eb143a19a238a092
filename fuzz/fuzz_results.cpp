// libFuzzer target: results files (load_results, as compare, merge and report read them).
#include "fuzz/fuzz_input.hpp"
#include "harness/results.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = attnbench::fuzz::write_input(data, size, ".json");
  return attnbench::fuzz::accept_input_errors([&] {
    const nlohmann::json doc = attnbench::load_results(path);
    (void)attnbench::summarize(doc.at("records"));
  });
}
