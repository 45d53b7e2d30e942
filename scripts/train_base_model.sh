#!/usr/bin/env bash
# Regenerate the shipped base world model models/mini_droid_base.pt on this machine (CPU), in
# four `persistworld train-base` stages (models/README.md):
#   1. the frames-in-channels model from scratch (the defaults in conf/train_base.yaml and
#      conf/world_model/embedded.yaml), exported as float16 like every shipped file;
#   2. from those weights: the robot-silhouette decoder (world_model.silhouettes) fitted alone
#      for 500 steps, then 600 steps of the whole model around the composite anchor
#      (world_model.x0_anchor=composite) at the sampler's noise levels;
#   3. from stage 2: 2,000 steps with the output gate (world_model.output_gate), which copies
#      the anchor where the scene does not change;
#   4. from stage 3: 3,000 more steps at half the learning rate (1.5e-4);
# then export a float16 copy with the data settings and this command recorded.
# Resumable: rerun the same command after an interruption (kill -9 included); each stage
# continues from its newest checkpoint with bit-identical results on CPU (a completed stage
# is not redone). Extra arguments are `persistworld train-base` overrides for every stage,
# e.g. trainer.device=cuda.
#   RUN_DIR (default runs/base/mini_droid), OUT (default models/mini_droid_base.pt)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
source scripts/cpu_env.sh
[ -x .venv/bin/persistworld ] || bash scripts/install.sh
run_dir="${RUN_DIR:-runs/base/mini_droid}"
out="${OUT:-models/mini_droid_base.pt}"
start=$(date +%s)
.venv/bin/persistworld render
.venv/bin/persistworld train-base run_dir="$run_dir/stage1" "$@"
.venv/bin/persistworld export-model "$run_dir/stage1" "$run_dir/stage1.pt"
.venv/bin/persistworld train-base run_dir="$run_dir/stage2" trainer.init_from="$run_dir/stage1.pt" \
  world_model.silhouettes=true world_model.x0_anchor=composite \
  world_model.p_mean=1.15 world_model.p_std=0.7 trainer.steps=1100 \
  trainer.aux_warmup_steps=500 trainer.warmup_steps=550 trainer.lr=3e-4 \
  trainer.aux_lr_scale=10 trainer.num_threads=2 trainer.eval_every=275 "$@"
.venv/bin/persistworld export-model "$run_dir/stage2" "$run_dir/stage2.pt"
.venv/bin/persistworld train-base run_dir="$run_dir/stage3" trainer.init_from="$run_dir/stage2.pt" \
  world_model.silhouettes=true world_model.x0_anchor=composite world_model.output_gate=true \
  world_model.p_mean=1.15 world_model.p_std=0.7 trainer.steps=2000 trainer.warmup_steps=50 \
  trainer.lr=3e-4 trainer.num_threads=2 trainer.eval_every=400 "$@"
.venv/bin/persistworld export-model "$run_dir/stage3" "$run_dir/stage3.pt"
.venv/bin/persistworld train-base run_dir="$run_dir/stage4" trainer.init_from="$run_dir/stage3.pt" \
  world_model.silhouettes=true world_model.x0_anchor=composite world_model.output_gate=true \
  world_model.p_mean=1.15 world_model.p_std=0.7 trainer.steps=3000 trainer.warmup_steps=50 \
  trainer.lr=1.5e-4 trainer.num_threads=2 trainer.eval_every=500 "$@"
.venv/bin/persistworld export-model "$run_dir/stage4" "$out" \
  --command "bash scripts/train_base_model.sh${*:+ $*}"
echo "train_base_model.sh: $out from $run_dir in $(( $(date +%s) - start )) s"
