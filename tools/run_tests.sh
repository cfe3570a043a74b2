#!/usr/bin/env bash
# The whole test suite: starts the one-node local Slurm cluster the Slurm tests use (tools/local_slurm.sh,
# needs root and Debian's slurm packages), then runs pytest. Without a cluster the Slurm tests are SKIPPED
# (pytest lists them under "skipped" with the reason), unless $CI is set: then they FAIL, so CI cannot pass
# without having run them.
set -euo pipefail
PY=${1:-.venv/bin/python}; shift || true
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
if [ -x tools/local_slurm.sh ]; then
  if ! bash tools/local_slurm.sh start; then
    if [ -n "${CI:-}" ]; then
      echo "error: the local Slurm cluster did not start; with \$CI set the Slurm tests will fail" >&2
    else
      echo "warning: the local Slurm cluster did not start; the Slurm tests will be skipped (set CI=1 to fail them instead)" >&2
    fi
  fi
fi
exec "$PY" -m pytest -q "$@"
