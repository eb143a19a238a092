#!/usr/bin/env bash
# Fresh machine to built tree: installs the Debian dependencies (idempotent),
# configures with the `release` preset (CUDA when nvcc is found) and builds.
# Usage: scripts/build.sh [preset]   (release | cpu | debug)
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-release}
bash scripts/setup.sh
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset"
