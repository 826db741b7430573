#!/usr/bin/env bash
# DeepSpeed's own launcher (pdsh/ssh to the hosts of a hostfile) running scale_ssl with
# trainer.strategy=deepspeed. torchrun works too (launchers/torchrun_*.sh with a deepspeed config):
# our strategy reads the same RANK / WORLD_SIZE / LOCAL_RANK variables from either.
#
#   launchers/deepspeed.sh --hostfile HOSTFILE --num-gpus 8 --config configs/swav/imagenet_64gpu_deepspeed.yaml [--dry-run]
#
# HOSTFILE lists one "hostname slots=8" line per node (see DeepSpeed's docs); without --hostfile
# the job runs on this node alone.
set -euo pipefail

CONFIG=""
HOSTFILE=""
NUM_GPUS=""
MASTER_ADDR_ARG=""
MASTER_PORT_ARG="29500"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
DRY_RUN=0
OVERRIDES=()

usage() {
    cat <<USAGE
Usage: $(basename "$0") --config CONFIG --num-gpus G [--hostfile FILE] [--master-addr HOST] [--dry-run] [-- key=value ...]

Run 'scale-ssl fit CONFIG trainer.strategy=deepspeed' with the deepspeed launcher.

Required:
  --config PATH          run config with trainer.strategy=deepspeed, e.g. configs/swav/imagenet_64gpu_deepspeed.yaml
  --num-gpus G           GPUs per node

Options:
  --hostfile FILE        DeepSpeed hostfile ("host slots=G" per line); default: this node only
  --master-addr HOST     address of the first host (default: DeepSpeed picks the first in the hostfile)
  --master-port P        default 29500
  --dry-run              print the command, run nothing
  -h, --help             this help
  -- key=value ...       config overrides

Environment: DEEPSPEED (default: deepspeed on PATH).
USAGE
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) CONFIG="${2:-}"; shift 2 ;;
        --hostfile) HOSTFILE="${2:-}"; shift 2 ;;
        --num-gpus) NUM_GPUS="${2:-}"; shift 2 ;;
        --master-addr) MASTER_ADDR_ARG="${2:-}"; shift 2 ;;
        --master-port) MASTER_PORT_ARG="${2:-}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) echo "deepspeed.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "deepspeed.sh: error: $*" >&2; exit 2; }
missing=()
[[ -n "$CONFIG" ]] || missing+=("--config PATH")
[[ -n "$NUM_GPUS" ]] || missing+=("--num-gpus G")
[[ ${#missing[@]} -eq 0 ]] || fail "missing ${missing[*]} (see --help)"
[[ -f "$CONFIG" ]] || fail "--config $CONFIG does not exist"
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || fail "--num-gpus must be a positive integer, got '$NUM_GPUS'"
[[ -z "$HOSTFILE" || -f "$HOSTFILE" ]] || fail "--hostfile $HOSTFILE does not exist"

# --no_local_rank: our CLI takes no --local_rank argument (the strategy reads LOCAL_RANK).
cmd=("$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT_ARG" --no_local_rank)
[[ -n "$HOSTFILE" ]] && cmd+=(--hostfile "$HOSTFILE")
[[ -n "$MASTER_ADDR_ARG" ]] && cmd+=(--master_addr "$MASTER_ADDR_ARG")
cmd+=(--module scale_ssl fit --config "$CONFIG" trainer.strategy=deepspeed "${OVERRIDES[@]+"${OVERRIDES[@]}"}")

printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
if [[ $DRY_RUN -eq 0 ]]; then
    exec "${cmd[@]}"
fi
