#!/usr/bin/env bash
# The whole test suite: starts what the tests need (local Slurm cluster when the Slurm tests exist), runs pytest.
set -euo pipefail
PY=${1:-.venv/bin/python}; shift || true
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
if [ -x tools/local_slurm.sh ]; then
  bash tools/local_slurm.sh start || echo "warning: local Slurm cluster did not start; slurm tests will fail" >&2
fi
exec "$PY" -m pytest -q "$@"
