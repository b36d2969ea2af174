#!/usr/bin/env bash
# Train the candidate replacement of models/layerskip-stdlib (issue 23) on a CPU, in the
# background at the lowest priority, resumable: run it again after any interruption and it
# continues from runs/<name>/checkpoint.
#
#   bash benchmarks/train_shipped_model.sh            # LayerSkip recipe -> runs/layerskip-code
#   bash benchmarks/train_shipped_model.sh twin       # same tokens, no recipe -> runs/baseline-code
#
# MAX_TOKENS and MAX_MINUTES override the budget (MAX_TOKENS fixes the learning-rate
# schedule; MAX_MINUTES only stops the run). Then evaluate with
#   python benchmarks/heldout_accuracy.py --model runs/layerskip-code
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${1:-recipe}
case $kind in
  recipe) name=layerskip-code
          recipe=(--layer_dropout_p_max 0.1 --layer_dropout_shape exponential
                  --layer_dropout_schedule constant --early_exit_loss True
                  --early_exit_scale linear --early_exit_e_scale 1.0
                  --early_exit_curriculum none --early_exit_position_fraction 0.125) ;;
  twin)   name=baseline-code
          recipe=(--layer_dropout_p_max 0 --early_exit_loss False) ;;
  *) echo "train_shipped_model.sh: error: give 'recipe' or 'twin', got '$kind'" >&2; exit 2 ;;
esac

corpus=runs/corpus/train.jsonl
[ -s "$corpus" ] || python benchmarks/build_corpus.py --output "$corpus"

resume=()
[ -d "runs/$name/checkpoint" ] && resume=(--resume True)
mkdir -p runs
# setsid: its own scheduling group, so that lowering it does not lower the calling shell.
setsid nohup python train.py --config_file configs/layerskip-code-16x256.json --data "$corpus" \
  --vocab_size 4096 --seq_len 512 --batch_size 4 --learning_rate 2e-3 --warmup_steps 100 \
  --max_tokens "${MAX_TOKENS:-8000000}" --max_minutes "${MAX_MINUTES:-0}" --num_threads 2 \
  --seed 42 "${recipe[@]}" --log_every 20 --save_every_minutes 10 \
  --exit_layer 4 --num_speculations 4 --output_dir "runs/$name" "${resume[@]}" \
  >> "runs/$name.log" 2>&1 < /dev/null &
pid=$!
# Lower the new scheduling group only once setsid has made it: written before, it would
# lower this shell's group (and every later command of the caller) instead.
for _ in $(seq 50); do
  [ "$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] && break
  sleep 0.1
done
if [ "$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ]; then
  echo 19 > "/proc/$pid/autogroup" 2>/dev/null || echo "could not lower the priority of $pid" >&2
else
  echo "training $pid did not start its own session; its priority is unchanged" >&2
fi
echo "training pid $pid, log runs/$name.log"
