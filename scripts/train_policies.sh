#!/usr/bin/env bash
# The five behaviour-cloning policy levels kept in models/policies/ (models/README.md):
# graded by training episodes and steps. About 15 min on 2 cores.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_env.sh"
DATA=${1:-data/mini_droid}
PY=${PY:-.venv/bin/persistworld}
for level in "1 10 100" "2 30 250" "3 90 500" "4 180 700" "5 180 1200"; do
  set -- $level
  out=models/policies/bc_L$1.pt
  [ -f "$out" ] && { echo "$out exists"; continue; }
  $PY train-policy --data "$DATA" --episodes "$2" --steps "$3" --out "$out"
done
