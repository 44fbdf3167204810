#!/usr/bin/env bash
# The GPU benchmark in one command, offline (docs/benchmarks.md, `gpu_step.py`).
#
#   make gpu-wheels                     # where there is network: benchmarks/gpu/wheels/ (git-ignored)
#   bash benchmarks/gpu/run.sh [ARGS]   # on the GPU machine, that folder carried with the tree
#
# Installs the carried wheels without an index into two throwaway folders, one per side
# (microsoft-aurora's package is also called `aurora`), then runs benchmarks/gpu_step.py with ARGS
# (e.g. --smoke) within a budget of $BUDGET_S seconds (default 480) that counts the installation.
# JAX must not preallocate GPU memory: the microsoft-aurora process after it needs the device.
# With $OUT set, every figure goes to $OUT/gpu_step.json and the report to $OUT/gpu_step.log.
# $PYTHON (default python3, else python) runs both sides; $TORCH_PYTHON, if set, the
# microsoft-aurora side.
set -euo pipefail
start=$(date +%s)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-$(command -v python3 || command -v python)}
wheels=${GPU_WHEELS:-$here/wheels}
if [ ! -d "$wheels" ]; then
  echo "$wheels is missing: run 'make gpu-wheels' where there is network and carry it along" >&2
  exit 2
fi
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
for side in jax torch; do
  "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --find-links "$wheels" --target "$site/$side" -r "$here/requirements-$side.txt"
done
echo "installed the carried wheels in $(($(date +%s) - start)) s"

export XLA_PYTHON_CLIENT_PREALLOCATE=false
args=(--start "$start" --budget-s "${BUDGET_S:-480}"
  --torch-python "${TORCH_PYTHON:-$python}" --torch-path "$site/torch")
log=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  args+=(--out "$OUT/gpu_step.json")
  log=$OUT/gpu_step.log
fi
PYTHONPATH="$site/jax${PYTHONPATH:+:$PYTHONPATH}" \
  "$python" "$here/../gpu_step.py" "${args[@]}" "$@" 2>&1 | tee "$log"
