#!/usr/bin/env bash
# A recipe change, tried cheaply: continue the shipped model for TOKENS more tokens under its
# own recipe (the control) and under a variant that weighs the early exits more, then compare
# both on held-out accuracy / agreement per exit and on what drafting can gain
# (benchmarks/drafting_bound.py). Runs one after the other in the foreground; every file
# goes to runs/pilot-<name>/ (resumable: run again after an interruption).
#
#   bash benchmarks/recipe_pilot.sh                 # 600k tokens each
#   TOKENS=200000 bash benchmarks/recipe_pilot.sh
#
# Control: linear exit scale (e(l) = l), e_scale 1, 12.5 % of positions supervised at the
# early exits (the shipped recipe). Variant "early": every exit weighted alike (uniform) and
# half of the positions supervised, so that exits 4-6 get about 3x the signal.
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=${TOKENS:-600000}
base=${BASE_MODEL:-models/layerskip-stdlib}
corpus=runs/corpus/train.jsonl
[ -s "$corpus" ] || python benchmarks/build_corpus.py --output "$corpus"

common=(--model "$base" --data "$corpus" --seq_len 512 --batch_size 4 --learning_rate 3e-4
        --warmup_steps 20 --max_tokens "$tokens" --num_threads 2 --seed 7
        --layer_dropout_p_max 0.1 --layer_dropout_shape exponential --early_exit_loss True
        --log_every 20 --save_every_minutes 5 --exit_layer 6 --num_speculations 3)
declare -A recipes=(
  [control]="--early_exit_scale linear --early_exit_e_scale 1.0 --early_exit_position_fraction 0.125"
  [early]="--early_exit_scale uniform --early_exit_e_scale 1.0 --early_exit_position_fraction 0.5"
)
for name in control early; do
  out=runs/pilot-$name
  resume=()
  [ -d "$out/checkpoint" ] && resume=(--resume True)
  if [ ! -s "$out/model.safetensors" ]; then
    # shellcheck disable=SC2086
    python train.py "${common[@]}" ${recipes[$name]} --output_dir "$out" "${resume[@]}" \
      >> "runs/pilot-$name.log" 2>&1
  fi
  python benchmarks/heldout_accuracy.py --model "$out" --output "$out/heldout.json" \
    > "$out/heldout.txt"
  python benchmarks/drafting_bound.py --model "$out" --output "$out/bound.json" \
    > "$out/bound.txt" 2>&1
  echo "== $name"; tail -2 "$out/bound.txt"
done
