#!/usr/bin/env bash
# The GPU check in one command: builds kvpack for sm_90 (H100/H200), runs the C++ and
# Python CUDA tests, then the GPU benchmarks of the issue's targets, and leaves gpu.json,
# the test reports and this log in <out_dir>. About 8 minutes on a fresh 16-core machine.
# Usage: benchmarks/gpu.sh <out_dir>     (PYTHON=... picks the interpreter; default python3)
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: benchmarks/gpu.sh <out_dir>" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee "$out/gpu.log") 2>&1
python=${PYTHON:-python3}
jobs=$(nproc)
step() { printf '\n== %s  [%s]\n' "$*" "$(date +%T)"; }
fail() {
  echo "gpu.sh: $*" >&2
  exit 1
}

step "machine"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver here, so no GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
  fail "nvidia-smi sees no GPU"
command -v nvcc >/dev/null || fail "nvcc not found: the CUDA toolkit is needed to build for sm_90"
nvcc --version | tail -1
echo "cores: $jobs   python: $($python --version)"

step "configure and build the C++ tests for sm_90"
cmake -S . -B build/gpu -G Ninja -DKVPACK_WERROR=ON -DKVPACK_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release
grep -q '^CMAKE_CUDA_COMPILER:[A-Z]*=.\+' build/gpu/CMakeCache.txt ||
  fail "CMake found no CUDA compiler; the CUDA backend would not be built"
cmake --build build/gpu -j "$jobs"

step "C++ tests (the CUDA ones must run, not skip)"
ctest --test-dir build/gpu -j "$jobs" --output-on-failure --output-junit "$out/ctest.xml"
if ctest --test-dir build/gpu -N -R 'Cuda|Backends' | grep -q 'Total Tests: 0'; then
  fail "no CUDA tests were found"
fi
./build/gpu/tests_cpp/kvpack_tests --gtest_filter='Cuda*:Backends*' 2>&1 | tee "$out/cuda_tests.txt"
if grep -q '\[  SKIPPED \]' "$out/cuda_tests.txt"; then
  fail "CUDA tests skipped: kvpack_tests sees no device"
fi

step "build the Python extension for sm_90"
"$python" -m pip install -q --no-build-isolation --no-deps -e . \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C cmake.define.KVPACK_WERROR=ON \
  -C build-dir=build/gpu-python
"$python" -c 'import kvpack, sys; sys.exit(0 if kvpack.cuda_available() else 1)' ||
  fail "kvpack imports but its CUDA backend sees no GPU"

step "Python CUDA tests (every backend against the CPU reference)"
"$python" -m pytest -q -p no:cacheprovider -m cuda tests_py/test_cuda.py tests_py/test_backends.py \
  --junitxml "$out/pytest.xml"

step "GPU benchmarks"
timeout 300 "$python" -m benchmarks.gpu --out "$out"

step "done: $out"
ls -l "$out"
