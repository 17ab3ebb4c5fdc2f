#!/usr/bin/env bash
# The paper's workflow as one resumable sweep:
#   bash scripts.sh iv-grid     IV grid on validation: ext-shot x ext-strength x strength, one extraction per
#                               (ext-shot, ext-strength) serving every strength
#   bash scripts.sh baselines   zero-shot, ICL, TV, FV and DT on validation (TV/DT choose their layer/steps there)
#   bash scripts.sh test        each method's best validation setting (iv.py select) re-run on test
#   bash scripts.sh report      table (markdown + CSV), heatmaps and bar charts into $REPORT
#   bash scripts.sh all         the four in order
# Every run passes --resume: a run whose record is already in $RESULTS is skipped, so an interrupted
# sweep is restarted with the same command. Settings below can be overridden from the environment:
#   CONFIG GPU MODELS TASKS RESULTS REPORT VECTORS EXT_SHOTS EXT_STRENGTHS STRENGTHS EPISODES
#   TEST_EPISODES EXT_BATCH BASELINES METRIC EXTRA, and PY: the Python that runs iv.py (default: the
#   checkout's .venv/bin/python when there is one, else `python` on the PATH), so no venv activation is needed.
set -euo pipefail
cd "$(dirname "$0")"

CONFIG="${CONFIG:-}"                   # a -c file merged over the base registry; empty: the base alone
GPU="${GPU:--1}"
MODELS="${MODELS:-smollm2-135m}"
TASKS="${TASKS:-review_sentiment}"
RESULTS="${RESULTS:-results/runs.jsonl}"
REPORT="${REPORT:-report}"
VECTORS="${VECTORS:-results/vectors}"
EXT_SHOTS="${EXT_SHOTS:-1 2 3 4}"
EXT_STRENGTHS="${EXT_STRENGTHS:-0.1 0.3 0.5 0.7 0.9}"
STRENGTHS="${STRENGTHS:-0.1 0.3 0.5 0.7 0.9}"
EPISODES="${EPISODES:-200}"            # extraction episodes, and validation episodes of every search
TEST_EPISODES="${TEST_EPISODES:-1000}"
EXT_BATCH="${EXT_BATCH:-10}"
BASELINES="${BASELINES:-}"            # default: every registered method but iv (python iv.py methods)
METRIC="${METRIC:-macro}"
EXTRA="${EXTRA:-}"                     # more iv.py flags for every run, e.g. "--batch-size 32 --no-half"
PY="${PY:-python}"                     # the Python with ivlib's requirements: the project's .venv when there is one
[ "$PY" = python ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
[ -n "$BASELINES" ] || BASELINES="$("$PY" iv.py methods | grep -vx iv | tr '\n' ' ')"

config_flag=()
[ -n "$CONFIG" ] && config_flag=(-c "$CONFIG")
# shellcheck disable=SC2086  # EXTRA is a list of flags
run() { "$PY" iv.py "${config_flag[@]}" -g "$GPU" --results "$RESULTS" --resume --quiet $EXTRA "$@"; }

iv_grid() {
  mkdir -p "$VECTORS"
  # EXTRA may change what is fitted (--seed, --max-example-tokens): its checksum keeps such vectors apart
  local tag=""
  [ -n "$EXTRA" ] && tag="_x$(printf '%s' "$EXTRA" | cksum | cut -d' ' -f1)"
  for model in $MODELS; do for task in $TASKS; do
    for s in $EXT_SHOTS; do for a1 in $EXT_STRENGTHS; do
      vec="$VECTORS/${model}__${task//\//_}__s${s}_a${a1}_b${EXT_BATCH}_e${EPISODES}${tag}.safetensors"
      # shellcheck disable=SC2086  # STRENGTHS is a list
      if [ -f "$vec" ]; then state=(--load-vectors "$vec"); else state=(--save-vectors "$vec"); fi
      run -m "$model" -t "$task" -s "$s" --ext-strength "$a1" --strength $STRENGTHS --ext-batch "$EXT_BATCH" \
          -e "$EPISODES" -n "$EPISODES" "${state[@]}"
    done; done
  done; done
}

baselines() {
  for model in $MODELS; do for task in $TASKS; do for method in $BASELINES; do
    run -m "$model" -t "$task" --method "$method" -e "$EPISODES" --select-episodes "$EPISODES" -n "$EPISODES"
  done; done; done
}

test_best() {
  local commands
  commands="$("$PY" iv.py select --results "$RESULTS" --metric "$METRIC" --commands -n "$TEST_EPISODES")"
  grep '^python iv.py' <<<"$commands" | while read -r line; do
    eval "\"\$PY\" ${line#python } -g \"\$GPU\" --resume --quiet $EXTRA"
  done
}

report() { "$PY" iv.py report --results "$RESULTS" --metric "$METRIC" --out "$REPORT"; }

case "${1:-}" in
  iv-grid) iv_grid ;;
  baselines) baselines ;;
  test) test_best ;;
  report) report ;;
  all) iv_grid; baselines; test_best; report ;;
  *) echo "usage: bash scripts.sh iv-grid|baselines|test|report|all" >&2; exit 2 ;;
esac
