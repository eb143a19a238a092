#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan; build-fuzz/) and fuzzes each
# for a fixed time, starting from its committed seeds in fuzz/corpus/<target>.
# Findings (crash-*, timeout-*, oom-*) land in build-fuzz/findings/<target>/ and
# fail the script. New corpus entries go to build-fuzz/corpus/ (not committed).
# Usage: scripts/fuzz.sh [seconds per target (default 30)] [target ...]
#        FUZZ_RUNS=1000000 scripts/fuzz.sh 0 dag     # a fixed number of executions instead
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(suite safetensors dag results)

# The targets fuzz parsers, not kernels: the kernels compile for Highway's portable
# baseline alone (ATTNBENCH_HWY_TARGETS=baseline). That is also what keeps clang 14's backend
# off its crash on impls/cpu/trimul.cpp's AVX2 and AVX-512 code ("Do not know how to split
# the result of this operator!", with or without sanitizers).
cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DATTNBENCH_FUZZ=ON \
  -DATTNBENCH_HWY_TARGETS=baseline -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS_RELEASE="-O1 -gline-tables-only" >/dev/null
cmake --build build-fuzz --target "${targets[@]/#/fuzz_}"

# A leak at exit is not a finding here (the loaders keep no global state).
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1
status=0
for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t" "build-fuzz/findings/$t"
  limit=(-max_total_time="$seconds")
  [[ -n ${FUZZ_RUNS:-} ]] && limit=(-runs="$FUZZ_RUNS")
  # -rss_limit_mb and -timeout: a slow or memory-hungry input is a finding too.
  if ! "build-fuzz/fuzz_$t" "${limit[@]}" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="build-fuzz/findings/$t/" -print_final_stats=1 \
      "build-fuzz/corpus/$t" "fuzz/corpus/$t" 2>"build-fuzz/fuzz_$t.log"; then
    echo "fuzz: $t found a crash; see build-fuzz/fuzz_$t.log and build-fuzz/findings/$t/" >&2
    tail -40 "build-fuzz/fuzz_$t.log" >&2
    status=1
  fi
  echo "fuzz: $t: $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "build-fuzz/fuzz_$t.log" | grep -o '[0-9]*$') executions"
done
exit $status
