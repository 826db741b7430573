#!/usr/bin/env bash
# Several nodes with torchrun: run this script once on every node.
#
# Static (a fixed set of nodes, each told its rank):
#   launchers/torchrun_multinode.sh --config C --nnodes 8 --nproc-per-node 8 --node-rank K --master-addr HOST [--master-port 29500]
# Elastic (c10d rendezvous: nodes join at HOST:PORT; a failed rank restarts the whole group from the
# last checkpoint up to --max-restarts times; --nnodes MIN:MAX lets the job run on fewer nodes):
#   launchers/torchrun_multinode.sh --config C --nnodes 8 --nproc-per-node 8 --rdzv-endpoint HOST:29400 --max-restarts 3
#
# After a restart every rank resumes from trainer.ckpt_path (pass -- trainer.ckpt_path=last and a
# trainer.default_root_dir on a shared file system): same MLflow run, exact continuation. A
# different world size after an elastic resize re-derives the per-device batch from the global one.
set -euo pipefail

CONFIG=""
NNODES=""
NPROC=""
NODE_RANK=""
MASTER_ADDR_ARG=""
MASTER_PORT_ARG="29500"
RDZV_ENDPOINT=""
RDZV_ID="scale_ssl"
MAX_RESTARTS="0"
TORCHRUN="${TORCHRUN:-torchrun}"
DRY_RUN=0
OVERRIDES=()

usage() {
    cat <<USAGE
Usage: $(basename "$0") --config CONFIG --nnodes N --nproc-per-node G
         (--node-rank K --master-addr HOST [--master-port P] | --rdzv-endpoint HOST:PORT [--rdzv-id ID])
         [--max-restarts R] [--dry-run] [-- key=value ...]

Run 'scale-ssl fit' on N nodes x G ranks with torchrun. Run it on every node.

Required:
  --config PATH          run config, e.g. configs/swav/imagenet_64gpu.yaml
  --nnodes N             number of nodes (elastic: MIN:MAX)
  --nproc-per-node G     ranks per node (GPUs)
and one of:
  --node-rank K          this node's rank 0..N-1 (static), with --master-addr HOST (node 0's address)
  --rdzv-endpoint H:P    c10d rendezvous endpoint (elastic; any node's reachable address)

Options:
  --master-port P        static mode port (default 29500)
  --rdzv-id ID           job id shared by all nodes (default: scale_ssl)
  --max-restarts R       restarts of the worker group after a failure (default 0)
  --dry-run              print the command, run nothing
  -h, --help             this help
  -- key=value ...       config overrides (e.g. trainer.ckpt_path=last)

Environment: TORCHRUN (default: torchrun on PATH).
USAGE
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) CONFIG="${2:-}"; shift 2 ;;
        --nnodes) NNODES="${2:-}"; shift 2 ;;
        --nproc-per-node) NPROC="${2:-}"; shift 2 ;;
        --node-rank|--node_rank) NODE_RANK="${2:-}"; shift 2 ;;
        --master-addr) MASTER_ADDR_ARG="${2:-}"; shift 2 ;;
        --master-port) MASTER_PORT_ARG="${2:-}"; shift 2 ;;
        --rdzv-endpoint) RDZV_ENDPOINT="${2:-}"; shift 2 ;;
        --rdzv-id) RDZV_ID="${2:-}"; shift 2 ;;
        --max-restarts) MAX_RESTARTS="${2:-}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) echo "torchrun_multinode.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "torchrun_multinode.sh: error: $*" >&2; exit 2; }
missing=()
[[ -n "$CONFIG" ]] || missing+=("--config PATH")
[[ -n "$NNODES" ]] || missing+=("--nnodes N")
[[ -n "$NPROC" ]] || missing+=("--nproc-per-node G")
[[ ${#missing[@]} -eq 0 ]] || fail "missing ${missing[*]} (see --help)"
[[ -f "$CONFIG" ]] || fail "--config $CONFIG does not exist"
[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || fail "--nnodes must be N or MIN:MAX, got '$NNODES'"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || fail "--nproc-per-node must be a positive integer, got '$NPROC'"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || fail "--max-restarts must be an integer >= 0, got '$MAX_RESTARTS'"

cmd=("$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC" --max_restarts "$MAX_RESTARTS")
if [[ -n "$RDZV_ENDPOINT" && -n "$NODE_RANK" ]]; then
    fail "give either --node-rank (static) or --rdzv-endpoint (elastic), not both"
elif [[ -n "$RDZV_ENDPOINT" ]]; then
    [[ "$RDZV_ENDPOINT" == *:* ]] || fail "--rdzv-endpoint must be HOST:PORT, got '$RDZV_ENDPOINT'"
    cmd+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID")
elif [[ -n "$NODE_RANK" ]]; then
    [[ -n "$MASTER_ADDR_ARG" ]] || fail "--node-rank needs --master-addr HOST (the address of node 0)"
    [[ "$NNODES" != *:* ]] || fail "static mode needs a fixed --nnodes N (MIN:MAX is for --rdzv-endpoint)"
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || fail "--node-rank must be 0..$((NNODES - 1)), got '$NODE_RANK'"
    cmd+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR_ARG" --master_port "$MASTER_PORT_ARG")
else
    fail "missing --node-rank K with --master-addr HOST (static), or --rdzv-endpoint HOST:PORT (elastic) (see --help)"
fi
cmd+=(-m scale_ssl fit --config "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")

printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
if [[ $DRY_RUN -eq 0 ]]; then
    exec "${cmd[@]}"
fi
