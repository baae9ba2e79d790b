#!/usr/bin/env bash
# Launch training on every slot of a hostfile through the real `deepspeed` runner.
#
#   ./launch.sh                      2 ranks on this machine: sample data, tiny BERT, ZeRO-2 (the default run)
#   ./launch.sh --hostfile hostfiles/H --ds-config ds_configs/X.json [launch options] [training options]
#
# Launch options (./launch.sh --help): --launcher pdsh|openmpi, --include/--exclude, --master-addr,
# --master-port, --env-file, --launcher-args, --rank-logs, --no-doctor. The hostfile, env file and
# launcher options are checked here and every host by `python -m pipeline doctor` before any rank
# starts. Other options are training options (`python -m pipeline train --help`). Without a GPU the
# ranks run on DeepSpeed's CPU accelerator (gloo).
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pipeline launch "$@"
