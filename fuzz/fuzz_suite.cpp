// libFuzzer target: suite files (load_suite, expand, --filter).
#include "fuzz/fuzz_input.hpp"
#include "harness/suite.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = attnbench::fuzz::write_input(data, size, ".json");
  return attnbench::fuzz::accept_input_errors([&] {
    for (bool quick : {false, true}) {
      const attnbench::Suite s = attnbench::load_suite(path, quick);
      const auto cases = attnbench::expand(s);
      const attnbench::CaseFilter filter("N<=64,impl!=cpu");
      for (const auto& c : cases) (void)filter.matches(c.spec);
    }
  });
}
