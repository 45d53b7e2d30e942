#!/usr/bin/env bash
# Regenerate the shipped base world model models/mini_droid_base.pt on this machine (CPU):
# render the default dataset if needed, train with `persistworld train-base` (the defaults in
# conf/train_base.yaml and conf/world_model/embedded.yaml are the recipe), then export a
# float16 copy with the data settings and this command recorded.
# Resumable: rerun the same command after an interruption (kill -9 included) and training
# continues from the newest checkpoint in RUN_DIR with bit-identical results on CPU.
# Extra arguments are `persistworld train-base` overrides, e.g. trainer.device=cuda.
#   RUN_DIR (default runs/base/mini_droid), OUT (default models/mini_droid_base.pt)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
[ -x .venv/bin/persistworld ] || bash scripts/install.sh
run_dir="${RUN_DIR:-runs/base/mini_droid}"
out="${OUT:-models/mini_droid_base.pt}"
start=$(date +%s)
.venv/bin/persistworld render
.venv/bin/persistworld train-base run_dir="$run_dir" "$@"
.venv/bin/persistworld export-model "$run_dir" "$out" \
  --command "bash scripts/train_base_model.sh${*:+ $*}"
echo "train_base_model.sh: $out from $run_dir in $(( $(date +%s) - start )) s"
