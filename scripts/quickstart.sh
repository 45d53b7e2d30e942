#!/usr/bin/env bash
# README command 1: set up (CPU venv in .venv) and run the main job on the embedded default.
# Extra arguments are Hydra overrides for `persistworld pipeline`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
source scripts/cpu_env.sh
bash scripts/install.sh
exec .venv/bin/persistworld pipeline "$@"
