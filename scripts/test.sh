#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite, including the tests marked `model`
# that use the real default model. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
