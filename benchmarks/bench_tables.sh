#!/usr/bin/env bash
# The embedded benchmark's ablations (issue 8): Table 6 (group size / best-of-N;
# its k16_bo2 row is `experiment=bench` itself, i.e. Table 1) and Table 5 (prefix strategy),
# 3 seeds, plus the base model as the tables' reference row. Each run is one
# `persistworld sweep TABLE row=TABLE/ROW seed=S experiment=bench` (pre-flight, skip if done,
# resume if interrupted), P of them at a time, seed-major so that a stopped batch leaves whole
# seeds; a job that would start after END_S seconds is skipped (rerun the script to continue:
# completed runs are skipped).
#
#   DEV=cuda P=15 bash benchmarks/bench_tables.sh              # one GPU (H100: see the README)
#   DEV=cpu P=2 JOBS="group_size k16_bo2 1" bash benchmarks/bench_tables.sh  # chosen jobs
#
# Environment: DEV (cuda|cpu), P (parallel jobs), MIN_LEFT (s a job needs to start, default 60), OUT_DIR (sweep.out, default sweeps_out/bench),
# DATA (data.root), SEEDS, JOBS (lines "TABLE ROW SEED"; default: both tables x SEEDS), END_S,
# EXTRA (more Hydra overrides for every run), PY (python).
set -uo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
T0=$(date +%s); export END=$((T0 + ${END_S:-86400}))
P=${P:-2}; DEV=${DEV:-cpu}; export PY=${PY:-python3}
SW=${OUT_DIR:-sweeps_out/bench}; DATA=${DATA:-data/mini_droid}; BASE=${BASE:-models/mini_droid_base.pt}
# the inputs every job needs, checked once before anything starts or is written
[ -f "$DATA/manifest.json" ] || { echo "bench_tables.sh: DATA=$DATA: no dataset (manifest.json missing); render it with \`persistworld render data.root=$DATA\`" >&2; exit 2; }
[ -f "$BASE" ] || [ -f "$BASE/model.pt" ] || { echo "bench_tables.sh: BASE=$BASE: no model file there" >&2; exit 2; }
export LOGS=$SW/logs; mkdir -p "$LOGS"
export COMMON="data.root=$DATA base_model=$BASE experiment=bench trainer.device=$DEV trainer.num_threads=1 trainer.progress=false sweep.out=$SW eval.num_videos=0 eval.batch_size=20 ${EXTRA:-}"

# the base model as the reference row, evaluated as each run's own final evaluation
B=$SW/base_ref/$DEV
if [ ! -f "$B/status.json" ]; then
  mkdir -p "$B"
  printf 'sweep:\n  row: base (no post-training)\nseed: 0\nrun_dir: %s\nsource: %s\ndevice: %s\n' "$B" "$BASE" "$DEV" > "$B/config.yaml"
  ( $PY -m persistworld.cli evaluate data.root=$DATA model=$BASE eval.num_chunks=14 eval.num_steps=10 \
      eval.num_videos=0 eval.batch_size=20 device=$DEV out_dir=$B/eval/autoregressive_14 \
      > "$LOGS/base_ref_$DEV.log" 2>&1 && echo '{"state": "completed", "step": 0}' > "$B/status.json" \
    || echo "bench_tables.sh: the base reference evaluation failed; see $LOGS/base_ref_$DEV.log" >&2 ) &
fi

if [ -n "${JOBS:-}" ]; then printf '%s\n' "$JOBS"; else
  for s in ${SEEDS:-0 1 2}; do             # heaviest first within a seed
    for r in fixed6 uniform0-9 curriculum uniform0-4 fixed3; do echo "prefix_strategy $r $s"; done
    for r in k16_bo5 k16_bo2 k16 k8 k4; do echo "group_size $r $s"; done
  done
fi > "$LOGS/jobs.txt"

run_one() {
  local left=$((END - $(date +%s))) t=$(date +%s)
  if [ $left -lt ${MIN_LEFT:-60} ]; then echo "$1 $2 $3 skipped (time)" | tee -a "$LOGS/times.txt"; return 0; fi
  timeout $left $PY -m persistworld.cli sweep "$1" "row=$1/$2" "seed=$3" $COMMON > "$LOGS/$1_$2_$3.log" 2>&1
  echo "$1 $2 $3 rc=$? $(( $(date +%s) - t )) s" | tee -a "$LOGS/times.txt"   # one line per finished run
}
export -f run_one
echo "$(wc -l < "$LOGS/jobs.txt") runs, $P at a time on $DEV; per-run logs in $LOGS/, progress below"
xargs -P "$P" -L 1 bash -c 'run_one "$@"' _ < "$LOGS/jobs.txt"
wait
echo "done in $(( $(date +%s) - T0 )) s: $(grep -c "rc=0" "$LOGS/times.txt") completed runs in $LOGS/times.txt (this and earlier invocations)"
