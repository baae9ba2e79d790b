#!/usr/bin/env bash
# Launch training on every rank of a hostfile through the real `deepspeed` launcher.
#
#   ./launch.sh                      2 ranks on this machine: sample data, tiny BERT, ZeRO-2 (the default run)
#   ./launch.sh --hostfile hostfiles/H --ds-config ds_configs/X.json [training options]
#
# Training options are those of `python -m pipeline train --help` (e.g. --train-file, --model,
# --epochs). Without a GPU the ranks run on DeepSpeed's CPU accelerator (gloo).
set -euo pipefail
cd "$(dirname "$0")"

hostfile=hostfiles/localhost
ds_config=ds_configs/small_zero2.json
master_port=${MASTER_PORT:-29500}
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) hostfile=$2; shift 2 ;;
    --ds-config) ds_config=$2; shift 2 ;;
    --master-port) master_port=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) train_args+=("$1"); shift ;;
  esac
done

# The deepspeed runner only warns about a missing hostfile and then uses the local GPUs.
[ -f "$hostfile" ] || { echo "error: hostfile '$hostfile' not found" >&2; exit 2; }
[ -f "$ds_config" ] || { echo "error: DeepSpeed config '$ds_config' not found" >&2; exit 2; }

if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "launch: GPUs found; ranks use CUDA (NCCL)"
else
  export DS_ACCELERATOR=cpu
  # One thread per rank: several ranks share this machine's cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  echo "launch: no GPU found; ranks run on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo backend)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# A hostfile naming only this machine needs no ssh: skip the runner's ssh probe of "localhost".
launcher_args=()
if ! grep -vE '^\s*(#|$)' "$hostfile" | grep -qvE '^\s*(localhost|127\.0\.0\.1)\s'; then
  launcher_args+=(--no_ssh_check --master_addr 127.0.0.1)
fi

exec deepspeed --hostfile "$hostfile" --master_port "$master_port" "${launcher_args[@]}" \
  --module pipeline train --ds-config "$ds_config" "${train_args[@]}"
