#!/usr/bin/env bash
# Sweeps over the paper's grid. Usage: bash scripts.sh iv-grid | baselines
# Edit the variables below (or set them in the environment) for your config, GPU, models and tasks.
# Selecting the best validation setting and the report table are not automated yet: read the
# records in $RESULTS (one JSON object per run).
set -euo pipefail
cd "$(dirname "$0")"

CONFIG="${CONFIG:-config/base.yaml}"
GPU="${GPU:--1}"
MODELS="${MODELS:-smollm2-135m}"
TASKS="${TASKS:-review_sentiment}"
RESULTS="${RESULTS:-results/runs.jsonl}"
EXT_SHOTS="${EXT_SHOTS:-1 2 3 4}"
STRENGTHS="${STRENGTHS:-0.1 0.3 0.5 0.7 0.9}"
EPISODES="${EPISODES:-200}"        # extraction episodes and validation episodes of the search
EXT_BATCH="${EXT_BATCH:-10}"
PY="${PY:-python}"

run() { "$PY" iv.py -c "$CONFIG" -g "$GPU" --results "$RESULTS" --quiet "$@"; }

iv_grid() {
  mkdir -p results/vectors
  for model in $MODELS; do for task in $TASKS; do
    for s in $EXT_SHOTS; do for a1 in $STRENGTHS; do
      vec="results/vectors/${model}__${task//\//_}__s${s}_a${a1}_b${EXT_BATCH}_e${EPISODES}.safetensors"
      first=1
      for a2 in $STRENGTHS; do
        if [ "$first" = 1 ] && [ ! -f "$vec" ]; then   # one extraction serves the whole a2 row
          run -m "$model" -t "$task" -s "$s" --ext-strength "$a1" --strength "$a2" --ext-batch "$EXT_BATCH" \
              -e "$EPISODES" -n "$EPISODES" --save-vectors "$vec"
        else
          run -m "$model" -t "$task" -s "$s" --ext-strength "$a1" --strength "$a2" --ext-batch "$EXT_BATCH" \
              -e "$EPISODES" -n "$EPISODES" --load-vectors "$vec"
        fi
        first=0
      done
    done; done
  done; done
}

baselines() {
  for model in $MODELS; do for task in $TASKS; do
    for split in "" "--run-test"; do
      run -m "$model" -t "$task" --method zero-shot -n "$EPISODES" $split
      run -m "$model" -t "$task" --method icl -n "$EPISODES" $split
      run -m "$model" -t "$task" --method tv -e "$EPISODES" -n "$EPISODES" $split
      run -m "$model" -t "$task" --method fv -e "$EPISODES" -n "$EPISODES" $split
    done
  done; done
}

case "${1:-}" in
  iv-grid) iv_grid ;;
  baselines) baselines ;;
  *) echo "usage: bash scripts.sh iv-grid|baselines" >&2; exit 2 ;;
esac
