// libFuzzer target: DAG prompt files (load_dag, layout_dag).
#include "fuzz/fuzz_input.hpp"
#include "harness/dag.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = attnbench::fuzz::write_input(data, size, ".json");
  return attnbench::fuzz::accept_input_errors([&] {
    const attnbench::Dag dag = attnbench::load_dag(path, "fuzz");
    for (bool ancestors : {false, true}) (void)attnbench::layout_dag(dag, ancestors);
  });
}
