#!/usr/bin/env bash
# The paper's workflow as one resumable sweep:
#   bash scripts.sh iv-grid     IV grid on validation: ext-shot x ext-strength x strength, one extraction per
#                               (ext-shot, ext-strength) serving every strength
#   bash scripts.sh baselines   every other method on validation (TV/DT choose their layer/steps there); a method
#                               with a fitted state saves it in VECTORS, and test loads it instead of refitting
#   bash scripts.sh test        each method's best validation setting (iv.py select) re-run on test: those of
#                               the MODELS and TASKS given, or every choice in RESULTS when neither is given
#   bash scripts.sh report      table (markdown + CSV), heatmaps and bar charts into $REPORT
#   bash scripts.sh all         the four in order
#   bash scripts.sh array DIR   for a SLURM cluster: DIR/cells.txt (one line per iv.py command of iv-grid and
#                               baselines), DIR/grid.sbatch (a job array, task i runs line i), DIR/test.sbatch
#                               (test + report once the whole array succeeded) and DIR/submit.sh; prints how to submit
#   bash scripts.sh cell FILE I runs line I (from 0) of a cells file: what each array task does
# Every run passes --resume: a run whose record is already in $RESULTS is skipped, so an interrupted
# sweep is restarted with the same command. Settings below can be overridden from the environment:
#   CONFIG GPU MODELS TASKS RESULTS REPORT VECTORS EXT_SHOTS EXT_STRENGTHS STRENGTHS EPISODES
#   TEST_EPISODES EXT_BATCH BASELINES METRIC EXTRA SEEDS (e.g. "1 2 3": every run, and the test step, once per
#   seed; the report then shows each method's mean and sd over them; default: iv.py's own seed, 42), PY: the Python that runs iv.py (default: the
#   checkout's .venv/bin/python when there is one, else `python` on the PATH), so no venv activation is needed,
#   and LAUNCH: a launcher put in front of every run's iv.py instead of $PY, e.g.
#   LAUNCH="torchrun --nproc-per-node 2" or LAUNCH="accelerate launch --num_processes 8" (see README "Scaling out";
#   a launcher not on the PATH is looked for next to $PY, e.g. .venv/bin/torchrun).
# EXTRA and LAUNCH are split into words as a shell splits a command line (quotes group, a backslash escapes:
# EXTRA='--label-words "very good" bad' is three words), but nothing in them is ever expanded or run:
# EXTRA='--quiet; touch x' passes the words `--quiet;` `touch` `x` to iv.py, which refuses them. No value
# of any setting is globbed either (set -f).
set -euo pipefail -f
CALLER_DIR="$PWD"                      # array's DIR and cell's FILE are read from where the command was given
cd "$(dirname "$0")"

CONFIG="${CONFIG:-}"                   # a -c file merged over the base registry; empty: the base alone
GPU="${GPU:--1}"
SWEEP_MODELS="${MODELS:-}" SWEEP_TASKS="${TASKS:-}"  # as given: `test` then tests only these (see test_best)
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
SEEDS="${SEEDS:-}"                     # e.g. "1 2 3": each run once per seed; empty: no --seed (iv.py's default)
PY="${PY:-python}"                     # the Python with ivlib's requirements: the project's .venv when there is one
[ "$PY" = python ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
LAUNCH="${LAUNCH:-}"                   # e.g. "torchrun --nproc-per-node 2": replaces "$PY" in front of iv.py

# The one way a text becomes words here (EXTRA, LAUNCH, select's test commands, a cells file's lines): Python's
# shlex.split, POSIX shell quoting without any expansion, so nothing in a value is run. `split_words ARRAY WHAT
# TEXT` fills ARRAY; a text it cannot split (an unclosed quote) is one line naming WHAT, exit 2.
SPLIT_PY='import shlex, sys
try:
    words = shlex.split(sys.argv[1])
except ValueError as exc:
    sys.exit(f"scripts.sh: {sys.argv[2]} {sys.argv[1]!r} cannot be split into words ({exc}); accepted: closed quotes")
sys.stdout.write("".join(w + "\0" for w in ["ok", *words]))'
split_words() {
  local -n split_into="$1"
  mapfile -d '' -t split_into < <("$PY" -c "$SPLIT_PY" "$3" "$2")
  [ "${split_into[0]:-}" = ok ] || exit 2
  split_into=("${split_into[@]:1}")
}
# one word as shlex.quote writes it (bare when safe, else in single quotes), so split_words reads it back
quote_word() {
  local q="'\"'\"'"
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/$q}"; fi
}

extra=()
[ -z "$EXTRA" ] || split_words extra EXTRA "$EXTRA"
# what runs iv.py: "$PY", or the launcher's words (torchrun / accelerate launch take the script, not python)
launcher=("$PY")
if [ -n "$LAUNCH" ]; then
  split_words launcher LAUNCH "$LAUNCH"
  if ! command -v "${launcher[0]}" >/dev/null && [ -x "$(dirname "$PY")/${launcher[0]}" ]; then
    launcher[0]="$(dirname "$PY")/${launcher[0]}"
  fi
fi
config_flag=()
[ -n "$CONFIG" ] && config_flag=(-c "$CONFIG")
DRY_RUN=""                             # set by `array`: run() prints each command (one line) instead of running it
# the seeds to loop over: "default" stands for no --seed flag, so a sweep without SEEDS runs as it always did
seed_list() { if [ -n "$SEEDS" ]; then printf '%s\n' $SEEDS; else echo default; fi; }
seed_args() { if [ "$1" != default ]; then printf '%s\n' --seed "$1"; fi; }
run() {
  set -- "${launcher[@]}" iv.py "${config_flag[@]}" -g "$GPU" --results "$RESULTS" --resume --quiet "${extra[@]}" "$@"
  if [ -n "$DRY_RUN" ]; then  # one line per command, in the quoting split_words reads back
    local word line=""
    for word in "$@"; do
      if [[ "$word" == *$'\n'* ]]; then
        echo "array: the value $(printf %q "$word") holds a newline; accepted: values on one line" >&2
        exit 2
      fi
      line+="${line:+ }$(quote_word "$word")"
    done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

# EXTRA may change what is fitted (--seed, --max-example-tokens): its checksum keeps such vectors apart
extra_tag() { if [ -n "$EXTRA" ]; then printf '_x%s' "$(printf '%s' "$EXTRA" | cksum | cut -d' ' -f1)"; fi; }
# a fitted state's flag: --load-vectors once its file exists (an earlier attempt wrote it), else --save-vectors
state_flag() { if [ -f "$1" ]; then printf '%s\n' --load-vectors "$1"; else printf '%s\n' --save-vectors "$1"; fi; }

iv_grid() {
  mkdir -p "$VECTORS"
  local tag
  tag="$(extra_tag)"
  for model in $MODELS; do for task in $TASKS; do
    for s in $EXT_SHOTS; do for a1 in $EXT_STRENGTHS; do for seed in $(seed_list); do
      # another seed draws other extraction episodes: its own file (no suffix without SEEDS, as before)
      mapfile -t seeded < <(seed_args "$seed")
      stag="${seeded[1]:+_seed${seeded[1]}}"
      vec="$VECTORS/${model}__${task//\//_}__s${s}_a${a1}_b${EXT_BATCH}_e${EPISODES}${tag}${stag}.safetensors"
      mapfile -t state < <(state_flag "$vec")
      # shellcheck disable=SC2086  # STRENGTHS is a list
      run -m "$model" -t "$task" -s "$s" --ext-strength "$a1" --strength $STRENGTHS --ext-batch "$EXT_BATCH" \
          -e "$EPISODES" -n "$EPISODES" "${state[@]}" "${seeded[@]}"
    done; done; done
  done; done
}

baselines() {
  [ -n "$BASELINES" ] || BASELINES="$("$PY" iv.py methods | grep -vx iv | tr '\n' ' ')"
  # a method with a fitted state saves it, so the test step loads that fit instead of refitting (FV's, SV's...)
  local stateful tag
  stateful=" $("$PY" iv.py methods --with-state | tr '\n' ' ') " tag="$(extra_tag)"
  for model in $MODELS; do for task in $TASKS; do for method in $BASELINES; do for seed in $(seed_list); do
    mapfile -t seeded < <(seed_args "$seed")
    state=()
    if [[ "$stateful" == *" $method "* ]]; then
      mkdir -p "$VECTORS"
      mapfile -t state < <(state_flag "$VECTORS/${model}__${task//\//_}__${method}_e${EPISODES}${tag}${seeded[1]:+_seed${seeded[1]}}.safetensors")
    fi
    run -m "$model" -t "$task" --method "$method" -e "$EPISODES" --select-episodes "$EPISODES" -n "$EPISODES" \
        "${state[@]}" "${seeded[@]}"
  done; done; done; done
}

test_best() {
  # a setting run with several seeds is chosen by its mean over them, then tested with each seed (its test
  # command comes from that seed's validation run, so a saved state of that seed is the one loaded)
  # MODELS / TASKS, when given, limit it to their choices: two sweeps sharing one RESULTS (one per model, side
  # by side) each test their own, never the other's choice made on half its grid; neither given: every choice
  local commands seed only=()
  # shellcheck disable=SC2206  # lists of names, split as everywhere here (set -f: never globbed)
  [ -z "$SWEEP_MODELS" ] || only+=(--model $SWEEP_MODELS)
  # shellcheck disable=SC2206
  [ -z "$SWEEP_TASKS" ] || only+=(--task $SWEEP_TASKS)
  for seed in $(seed_list); do
    mapfile -t seeded < <(seed_args "$seed")
    commands="$("$PY" iv.py select --results "$RESULTS" --metric "$METRIC" --commands -n "$TEST_EPISODES" "${only[@]}" "${seeded[@]}")"
    grep '^python iv.py' <<<"$commands" | while read -r line; do
      split_words words "select's test command" "$line"  # python iv.py ARGS...: the launcher replaces python
      "${launcher[@]}" "${words[@]:1}" -g "$GPU" --resume --quiet "${extra[@]}" "${seeded[@]}"
    done
  done
}

# a path as given on the command line: relative to the caller's directory, not the checkout's
from_caller() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$CALLER_DIR/$1" ;; esac; }

array() {
  local dir repo n
  [ -n "${1:-}" ] || { echo "usage: bash scripts.sh array DIR" >&2; exit 2; }
  dir="$(from_caller "$1")"
  if [ -e "$dir" ] && [ ! -d "$dir" ]; then
    echo "array: '$dir' is a file, not a folder; accepted: a new or existing folder for the job files" >&2
    exit 2
  fi
  mkdir -p "$dir/logs" 2>/dev/null || {
    echo "array: cannot create the folder '$dir/logs'; accepted: a folder path you can write" >&2
    exit 2
  }
  dir="$(cd "$dir" && pwd)" repo="$(pwd)"
  # The very commands iv-grid and baselines run (relative paths are the checkout's: `cell` runs from it).
  # Running them all at once is safe: no two cells write the same vectors file, since iv-grid has one cell
  # per (model, task, ext-shot, ext-strength) row, each with its own file (which serves all its strengths),
  # and baselines save none; all cells append to one results file, whose appends are locked.
  DRY_RUN=1
  { iv_grid; baselines; } >"$dir/cells.txt"
  DRY_RUN=""
  n="$(wc -l <"$dir/cells.txt")"
  [ "$n" -gt 0 ] || { echo "array: no cells (MODELS, TASKS, EXT_SHOTS ... are empty?)" >&2; exit 2; }
  {
    echo '#!/usr/bin/env bash'
    echo '#SBATCH --job-name=ivlib-grid'
    echo "#SBATCH --array=0-$((n - 1))"
    echo "#SBATCH --output=$dir/logs/grid_%A_%a.out"
    echo "# Array task i runs line i (from 0) of cells.txt: $n cells, the commands of iv-grid and baselines."
    echo '# Cluster options (--partition, --gres=gpu:1, --time, a throttle such as --array=0-N%8) go here or'
    echo '# on the sbatch command line. No two cells write the same vectors file, so all may run at once.'
    echo 'set -euo pipefail'
    printf 'exec bash %q cell %q "$SLURM_ARRAY_TASK_ID"
' "$repo/scripts.sh" "$dir/cells.txt"
  } >"$dir/grid.sbatch"
  {
    echo '#!/usr/bin/env bash'
    echo '#SBATCH --job-name=ivlib-test'
    echo "#SBATCH --output=$dir/logs/test_%j.out"
    echo '# After the whole grid array succeeded: each method'"'"'s best validation setting on test, then the report.'
    echo 'set -euo pipefail'
    for var in CONFIG GPU RESULTS REPORT VECTORS TEST_EPISODES METRIC EXTRA SEEDS PY LAUNCH; do
      printf 'export %s=%q
' "$var" "${!var}"
    done
    printf 'bash %q test
' "$repo/scripts.sh"
    printf 'bash %q report
' "$repo/scripts.sh"
  } >"$dir/test.sbatch"
  {
    echo '#!/usr/bin/env bash'
    echo '# bash submit.sh [sbatch options for both jobs, e.g. --partition gpu --gres=gpu:1 --time 4:00:00]'
    echo 'set -euo pipefail'
    printf 'GRID_JOB="$(sbatch --parsable "$@" %q)"
' "$dir/grid.sbatch"
    printf 'TEST_JOB="$(sbatch --parsable "$@" --dependency=afterok:"${GRID_JOB%%%%;*}" %q)"
' "$dir/test.sbatch"
    echo "echo \"grid: array job \${GRID_JOB%%;*} ($n cells); test + report: job \${TEST_JOB%%;*}, once every cell succeeded\""
  } >"$dir/submit.sh"
  cat <<EOF_
wrote $n cells to $dir/cells.txt, the job array $dir/grid.sbatch and the test step $dir/test.sbatch
submit both (extra sbatch options, e.g. --partition gpu --gres=gpu:1 --time 4:00:00, apply to both jobs):
  bash $dir/submit.sh [sbatch options]
or by hand:
  GRID_JOB=\$(sbatch --parsable $dir/grid.sbatch)
  sbatch --dependency=afterok:\$GRID_JOB $dir/test.sbatch
every cell passes --resume: after a failure, submit again (finished cells are skipped), or rerun some
cells with sbatch --array=3,7 $dir/grid.sbatch; logs go to $dir/logs/
EOF_
}

cell() {
  local file="${1:-}" i="${2:-}" line j
  [[ -n "$file" && "$i" =~ ^[0-9]+$ ]] || { echo "usage: bash scripts.sh cell FILE I  (I from 0)" >&2; exit 2; }
  file="$(from_caller "$file")"
  line="$(sed -n "$((i + 1))p" "$file")"
  [ -n "$line" ] || { echo "cell $i: $file has no line $((i + 1))" >&2; exit 2; }
  local -a cmd
  split_words cmd "line $((i + 1)) of $file" "$line"
  # iv-grid's choice, made when the cell runs: a vectors file an earlier attempt of this cell wrote is loaded
  for j in "${!cmd[@]}"; do
    case "${cmd[j]}" in
      --save-vectors | --load-vectors) if [ -f "${cmd[j + 1]}" ]; then cmd[j]=--load-vectors; else cmd[j]=--save-vectors; fi ;;
    esac
  done
  "${cmd[@]}"
}

report() { "$PY" iv.py report --results "$RESULTS" --metric "$METRIC" --out "$REPORT"; }

case "${1:-}" in
  iv-grid) iv_grid ;;
  baselines) baselines ;;
  test) test_best ;;
  report) report ;;
  all) iv_grid; baselines; test_best; report ;;
  array) array "${2:-}" ;;
  cell) cell "${2:-}" "${3:-}" ;;
  *) echo "usage: bash scripts.sh iv-grid|baselines|test|report|all|array DIR|cell FILE I" >&2; exit 2 ;;
esac
