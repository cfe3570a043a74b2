#!/usr/bin/env bash
# The whole test suite: starts what the tests need (local Slurm cluster when the Slurm tests exist), runs pytest.
set -euo pipefail
PY=${1:-.venv/bin/python}; shift || true
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# the test cluster is stopped at the end (nothing left running) unless LOCAL_SLURM_KEEP=1
if [ -x tools/local_slurm.sh ]; then
  if bash tools/local_slurm.sh start; then
    eval "$(bash tools/local_slurm.sh env)"
    [ "${LOCAL_SLURM_KEEP:-0}" = 1 ] || trap 'bash tools/local_slurm.sh stop' EXIT
  else
    echo "warning: local Slurm cluster did not start; slurm tests will fail" >&2
  fi
fi
"$PY" -m pytest -q "$@"
