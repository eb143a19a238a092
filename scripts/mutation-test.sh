#!/usr/bin/env bash
# Mutation test of the correctness gate (GitHub issue 10): every mutant below is a
# deliberately broken CPU kernel, and `attnbench run suites/ci.json` must FAIL on
# each. A mutant lives in its kernel's source behind `#if defined(ATTNBENCH_MUTANT_<name>)`
# and is switched on by the CMake cache variable ATTNBENCH_MUTANT, which defines it on
# that one file (CMakeLists.txt): shipped builds never compile it, and switching
# mutants rebuilds an object or two (a mutant build compiles the kernels for this machine's
# Highway target alone). Each mutant runs
# only its variant's ci.json group (--filter), so the whole test costs one build (none when
# MUTANT_BUILD names an existing one, as in .ci/run) plus a few minutes.
#
# Usage: scripts/mutation-test.sh [mutant ...]   (default: all; build dir $MUTANT_BUILD)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MUTANT_BUILD:-build-mutants}

# name  --filter of the ci.json cases that must catch it. (Dropping linear_b's bias is
# no mutant: a per-head constant along every softmax row changes nothing.)
all=(
  "sdpa_p_bf16           variant=sdpa,impl=cpu,dtype=bf16"
  "sdpa_scale_bf16       variant=sdpa,impl=cpu,dtype=bf16"
  "sdpa_drop_key         variant=sdpa,impl=cpu,dtype=f32"
  "sdpa_rope_pair        variant=sdpa,impl=cpu,dtype=f32"
  "sdpa_f16_lossy        variant=sdpa,impl=cpu,dtype=f16"
  "masked_ignore_mask    variant=masked,impl=cpu,dtype=f32"
  "masked_p_bf16         variant=masked,impl=cpu,dtype=bf16"
  "masked_key_mask_batch0 variant=masked,impl=cpu,dtype=f32"
  "ipa_ignore_mask       variant=ipa,impl=cpu,dtype=f32"
  "ipa_no_point_term     variant=ipa,impl=cpu,dtype=f32"
  "ipa_pair_scale_bf16   variant=ipa,impl=cpu,dtype=bf16"
  "triangle_ignore_mask  variant=triangle_attention,impl=cpu,dtype=f32"
  "triangle_no_gate_bias variant=triangle_attention,impl=cpu,dtype=f32"
  "triangle_bwd_no_bias_grad variant=triangle_attention,impl=cpu,dtype=f32,pass=bwd"
  "trimul_ignore_mask    variant=trimul,impl=cpu,dtype=f32"
  "transition_no_silu    variant=transition,impl=cpu,dtype=f32"
  "pairbias_ignore_mask  variant=attention_pair_bias,impl=cpu,dtype=f32"
  "pairbias_bwd_delta_gated variant=attention_pair_bias,impl=cpu,dtype=f32,pass=bwd"
  "doubleattn_unnormalized_distribute variant=double_attention,impl=cpu,dtype=f32"
)
selected=()
if (($#)); then
  for want in "$@"; do
    found=
    for m in "${all[@]}"; do [[ ${m%% *} == "$want" ]] && selected+=("$m") && found=1; done
    [[ -n $found ]] || { echo "mutation-test: unknown mutant '$want'" >&2; exit 2; }
  done
else
  selected=("${all[@]}")
fi

launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
configure() {
  if [[ -f $build/CMakeCache.txt ]]; then  # an existing build (CI passes the release one): keep its settings
    cmake -S . -B "$build" -DATTNBENCH_MUTANT="$1" >/dev/null
  else
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTNBENCH_CUDA=OFF "${launcher[@]}" \
      -DATTNBENCH_MUTANT="$1" >/dev/null
  fi
  [[ ${2:-} == --no-build ]] || cmake --build "$build" --target attnbench >/dev/null
}
out=$(mktemp -d)
# At the end the mutant is switched off; MUTANT_NO_REBUILD=1 (CI, done with the build) leaves
# the rebuild of the real kernels to the next `cmake --build`.
trap 'rm -rf "$out"; configure "" ${MUTANT_NO_REBUILD:+--no-build} || true' EXIT

start=$(date +%s)
configure ""
# The unmutated kernels pass the same cases: a failure below is the mutant's.
for filter in $(for m in "${selected[@]}"; do read -r _ f <<<"$m"; echo "$f"; done | sort -u); do
  if ! "$build/attnbench" run suites/ci.json --filter "$filter" --out "$out/base.json" >"$out/base.log" 2>&1; then
    cat "$out/base.log"
    echo "mutation-test: the unmutated build fails --filter $filter" >&2
    exit 1
  fi
done

survived=()
for m in "${selected[@]}"; do
  read -r name filter <<<"$m"
  family=${name%%_*}
  # A misspelt name would build the real kernel and "survive" for the wrong reason. A mutant
  # lives in its family's file or in the shared tile loop that file includes (attention-inl.h);
  # either way the define is set on impls/cpu/$family.cpp alone.
  grep -q "ATTNBENCH_MUTANT_${name}\b" "impls/cpu/$family.cpp" impls/cpu/attention-inl.h ||
    { echo "mutation-test: no ATTNBENCH_MUTANT_$name in impls/cpu/$family.cpp or attention-inl.h" >&2; exit 2; }
  configure "$name"
  set +e
  "$build/attnbench" run suites/ci.json --filter "$filter" --out "$out/$name.json" >"$out/$name.log" 2>&1
  rc=$?
  set -e
  failed=$(grep -c '^  \[.*FAIL\|^  \[.*failed' "$out/$name.log" || true)
  if ((rc == 1)); then
    printf 'caught    %-22s %3d failing records  (--filter %s)\n' "$name" "$failed" "$filter"
  else
    printf 'SURVIVED  %-22s exit %d  (--filter %s)\n' "$name" "$rc" "$filter"
    survived+=("$name")
  fi
done
echo "mutation-test: ${#selected[@]} mutants, ${#survived[@]} survived, $(($(date +%s) - start)) s"
((${#survived[@]} == 0))
