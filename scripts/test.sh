#!/usr/bin/env bash
# Every test of kvpack: format and lint gates, the C++ suite (warnings as errors, then
# again under AddressSanitizer + UBSan), and the Python suite against the built package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)
# OpenMP workers that spin while they wait take turns with any other busy process on the
# cores; sleeping instead keeps the suite's time steady on a shared machine (a notebook
# cell of store puts: 441 s spinning against 9 s sleeping, 2 cores with one other job).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

echo "== format and lint"
git ls-files -- '*.h' '*.cpp' '*.cu' '*.cuh' | xargs clang-format --dry-run --Werror
python3 -m ruff check python tests_py benchmarks
python3 -m ruff format --check python tests_py benchmarks

echo "== C++ tests (-Wall -Wextra -Werror)"
cmake -S . -B build/tests -G Ninja -DKVPACK_WERROR=ON >/dev/null
cmake --build build/tests -j "$jobs"
ctest --test-dir build/tests --output-on-failure

echo "== C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build/sanitize -G Ninja -DKVPACK_SANITIZE=ON -DKVPACK_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/sanitize -j "$jobs"
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build/sanitize --output-on-failure

echo "== type stubs match the built module"
python3 scripts/stubs.py --check

echo "== Python tests"
python3 -m pytest

echo "== the wheel: build, repair, then a fresh environment outside the source tree"
bash scripts/wheel.sh
bash scripts/wheel_test.sh
