#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), fetch the held-out novel the real-model tests read (Persuasion, into
# books/, never committed), and run the whole test suite, including the tests marked `model`.
# .ci/run calls exactly this; there (CI=true) a skipped `model` test is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/fetch_book.py persuasion -o books >&2 || {
  [ "${CI:-}" != true ] && echo "warning: could not fetch Persuasion; the real-model tests that read it are skipped" >&2; }
.venv/bin/ruff check longctx tests benchmarks scripts examples >&2
.venv/bin/mypy >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
