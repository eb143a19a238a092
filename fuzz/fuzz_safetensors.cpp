// libFuzzer target: the safetensors reader (case files).
#include "fuzz/fuzz_input.hpp"
#include "harness/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = attnbench::fuzz::write_input(data, size, ".safetensors");
  return attnbench::fuzz::accept_input_errors([&] {
    const attnbench::SafetensorsFile f = attnbench::read_safetensors(path);
    for (const auto& [name, t] : f.tensors)
      if (t.numel() > 0) (void)t.get(t.numel() - 1);  // the last element lies inside the data
  });
}
