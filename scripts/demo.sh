#!/usr/bin/env bash
# The main job: set up, then run kvpack's demo on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m kvpack demo "$@"
