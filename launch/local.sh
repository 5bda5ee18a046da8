#!/usr/bin/env bash
# Local runner: train a cascade config on this machine's devices (CPU or GPUs), then
# sample a few prompts from it. Pod slices: launch/tpu.py; several GPU nodes: launch/gpu.py.
#   launch/local.sh [CONFIG] [WORKDIR] [--config.x=y ...]
#   DRY_RUN=1 launch/local.sh ...   # print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/shapes.py}
WORKDIR=${2:-runs/shapes}
run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}
run python -m imagen_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${@:3}"
run python -m imagen_jax.sample --workdir="$WORKDIR" --output_dir="$WORKDIR/samples" \
  --prompt="a red circle at the top" --prompt="two blue squares" \
  --prompt="a green triangle left of a yellow circle" --num_per_prompt=4
