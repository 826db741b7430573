#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo): torchrun starts one scale_ssl rank per device.
#
#   launchers/torchrun_node.sh --config configs/simclr/imagenet_64gpu.yaml --nproc-per-node 8 [--dry-run] [-- key=value ...]
#
# torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR for every rank; the ddp and deepspeed
# strategies read them. The config names the global batch; the per-device batch is
# global / (ranks x accumulation), checked at start-up (see `scale-ssl plan`).
set -euo pipefail

CONFIG=""
NPROC=""
TORCHRUN="${TORCHRUN:-torchrun}"
DRY_RUN=0
OVERRIDES=()

usage() {
    cat <<USAGE
Usage: $(basename "$0") --config CONFIG --nproc-per-node N [--dry-run] [-- key=value ...]

Run 'scale-ssl fit' on this node with N ranks (torchrun --standalone).

Required:
  --config PATH          run config, e.g. configs/simclr/imagenet_64gpu.yaml
  --nproc-per-node N     ranks on this node (GPUs; or CPU processes for strategy ddp on gloo)

Options:
  --dry-run              print the command, run nothing
  -h, --help             this help
  -- key=value ...       config overrides (e.g. trainer.max_steps=100)

Environment: TORCHRUN (default: torchrun on PATH).
USAGE
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) CONFIG="${2:-}"; shift 2 ;;
        --nproc-per-node) NPROC="${2:-}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) echo "torchrun_node.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

missing=()
[[ -n "$CONFIG" ]] || missing+=("--config PATH")
[[ -n "$NPROC" ]] || missing+=("--nproc-per-node N")
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "torchrun_node.sh: error: missing ${missing[*]} (see --help)" >&2
    exit 2
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "torchrun_node.sh: error: --nproc-per-node must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
if [[ ! -f "$CONFIG" ]]; then
    echo "torchrun_node.sh: error: --config $CONFIG does not exist" >&2
    exit 2
fi

cmd=("$TORCHRUN" --standalone --nnodes 1 --nproc_per_node "$NPROC" -m scale_ssl fit --config "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
if [[ $DRY_RUN -eq 0 ]]; then
    exec "${cmd[@]}"
fi
