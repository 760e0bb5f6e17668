#!/usr/bin/env bash
# Checks the wheel scripts/wheel.sh left in dist/: auditwheel must tag it with a manylinux
# policy, and in a fresh virtual environment outside the source tree (the wheel and its
# requirements alone, no torch) scripts/wheel_smoke.py must find every library of the
# extension in the wheel or the policy, and get right answers from every build of its
# CPU kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
shopt -s nullglob
wheels=(dist/kvpack-*.whl)
((${#wheels[@]} == 1)) || {
  echo "wheel test: expected one dist/kvpack-*.whl (bash scripts/wheel.sh), found ${#wheels[@]}" >&2
  exit 1
}
wheel=$root/${wheels[0]}
case "$(basename "$wheel")" in
  *manylinux_*) ;;
  *)
    echo "wheel test: $(basename "$wheel") is not tagged with a manylinux policy" >&2
    exit 1
    ;;
esac
show=$(build/wheel-tools/bin/auditwheel show "$wheel")
echo "$show"
grep -q 'platform tag: *"manylinux_' <<<"$show" || {
  echo "wheel test: auditwheel finds no manylinux policy for $(basename "$wheel")" >&2
  exit 1
}
size=$(stat -c %s "$wheel")
((size < 20 * 1024 * 1024)) || {
  echo "wheel test: $(basename "$wheel") is $((size / 1024 / 1024)) MiB, over 20 MiB" >&2
  exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check \
  -c scripts/constraints.txt "$wheel"
cp scripts/wheel_smoke.py "$work/"
# -I: neither the working directory nor PYTHONPATH nor user site-packages is searched,
# and the working directory is not the source tree.
(cd "$work" && env -u PYTHONPATH "$work/venv/bin/python" -I wheel_smoke.py)
