#!/usr/bin/env bash
# `zero-pipeline launch` without installing: check a launch, then start `train` on every slot through
# the real `deepspeed` runner. Paths are the caller's: run it from anywhere.
#
#   ./launch.sh                      the default run: sample data, tiny BERT, ZeRO-2, every local GPU (2 CPU ranks without)
#   ./launch.sh run.yaml             a run file (every run directory holds one: RUN_DIR/run.yaml repeats that run)
#   ./launch.sh --hostfile hostfiles/H --ds-config ds_configs/X.json [launch options] [training options]
#
# Launch options: ./launch.sh --help. Training options: zero-pipeline train --help.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pipeline launch "$@"
