#!/usr/bin/env bash
# README command 2: run the test suite (installs .venv first if it is not there).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k metrics -x`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
source scripts/cpu_env.sh
[ -x .venv/bin/python ] || bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
