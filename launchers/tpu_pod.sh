#!/usr/bin/env bash
# From nothing to a running scale_ssl job on a Cloud TPU pod slice (default: v3-128, 16 hosts x 8
# cores = 128 XLA replicas).
#
#   launchers/tpu_pod.sh --tpu NAME --zone ZONE --config configs/simclr/imagenet_tpu_v3_128.yaml [--dry-run]
#
# Steps (each a gcloud command; --dry-run prints them all and runs none):
#   1. create   gcloud compute tpus tpu-vm create (skipped with --skip-create, e.g. an existing slice)
#   2. install  on every host: clone the repo at this commit, make a virtualenv, pip install
#               torch / torch_xla[tpu] (libtpu) / our pinned requirements, install scale_ssl
#   3. sync     copy the local config file to every host (so an uncommitted edit is what runs)
#   4. run      on every host at once: PJRT_DEVICE=TPU scale-ssl fit --config ... ; the fit command
#               starts one replica per TPU chip with torch_xla.launch; each host streams its own
#               subset of the shards (gs://...), the same equal-steps-per-replica plan as DDP; each
#               host tees its output to scale_ssl/logs/fit.log
#   5. collect  copy every host's fit.log to --log-dir/worker-<i>.log, also when the run failed
#   6. delete   only with --delete-after (the slice costs money while it exists)
#
# This script cannot be exercised here (no TPU, no gcloud project); the XLA code paths it starts
# are tested on XLA:CPU devices (tests/xla). Resume after a preemption: rerun with --skip-create
# --skip-install and the override trainer.ckpt_path=last (checkpoints need a shared path such as a
# mounted bucket in trainer.default_root_dir).
set -euo pipefail

TPU_NAME=""
ZONE=""
CONFIG=""
ACCELERATOR_TYPE="v3-128"
RUNTIME_VERSION="tpu-ubuntu2204-base"
PROJECT=""
REPO_URL="$(git -C "$(dirname "$0")/.." config --get remote.origin.url 2>/dev/null || echo "https://github.com/YOUR_ORG/scale_ssl.git")"
REVISION="$(git -C "$(dirname "$0")/.." rev-parse HEAD 2>/dev/null || echo main)"
TORCH_VERSION="2.9.0"
TORCHVISION_VERSION="0.24.0"
TORCH_XLA_VERSION="2.9.0"
DRY_RUN=0
SKIP_CREATE=0
SKIP_INSTALL=0
DELETE_AFTER=0
PREEMPTIBLE=0
LOG_DIR=""
NUM_HOSTS=""
OVERRIDES=()

usage() {
    cat <<EOF
Usage: $(basename "$0") --tpu NAME --zone ZONE --config CONFIG [options] [-- key=value ...]

Create a Cloud TPU VM pod slice, install scale_ssl on every host, and run
'scale-ssl fit --config CONFIG trainer.strategy=xla' on all hosts at once.

Required:
  --tpu NAME              TPU VM name
  --zone ZONE             e.g. europe-west4-a (v3 pods), us-central2-b (v4)
  --config PATH           run config, e.g. configs/simclr/imagenet_tpu_v3_128.yaml

Options:
  --accelerator-type T    slice type (default: $ACCELERATOR_TYPE; 8 cores per v3 host)
  --version V             TPU VM runtime image (default: $RUNTIME_VERSION)
  --project P             gcloud project (default: gcloud's configured one)
  --repo URL              git URL to clone on the hosts (default: this checkout's origin)
  --revision REV          commit/branch to run (default: this checkout's HEAD)
  --preemptible           create a preemptible (spot) slice
  --skip-create           use an existing slice
  --skip-install          hosts are already set up
  --delete-after          delete the slice when the run ends
  --log-dir DIR           where every host's log is collected (default: runs/tpu_logs/NAME-TIME)
  --hosts N               hosts in the slice (default: cores / 8 from --accelerator-type, v2-v4)
  --dry-run               print every command, run nothing
  -h, --help              this help
  -- key=value ...        config overrides passed to scale-ssl fit (e.g. trainer.max_steps=100)
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tpu) TPU_NAME="$2"; shift 2 ;;
        --zone) ZONE="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --accelerator-type) ACCELERATOR_TYPE="$2"; shift 2 ;;
        --version) RUNTIME_VERSION="$2"; shift 2 ;;
        --project) PROJECT="$2"; shift 2 ;;
        --repo) REPO_URL="$2"; shift 2 ;;
        --revision) REVISION="$2"; shift 2 ;;
        --preemptible) PREEMPTIBLE=1; shift ;;
        --skip-create) SKIP_CREATE=1; shift ;;
        --skip-install) SKIP_INSTALL=1; shift ;;
        --delete-after) DELETE_AFTER=1; shift ;;
        --log-dir) LOG_DIR="$2"; shift 2 ;;
        --hosts) NUM_HOSTS="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) echo "tpu_pod.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

missing=()
[[ -n "$TPU_NAME" ]] || missing+=("--tpu NAME")
[[ -n "$ZONE" ]] || missing+=("--zone ZONE")
[[ -n "$CONFIG" ]] || missing+=("--config PATH")
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "tpu_pod.sh: error: missing ${missing[*]} (see --help)" >&2
    exit 2
fi
if [[ ! -f "$(dirname "$0")/../$CONFIG" && ! -f "$CONFIG" ]]; then
    echo "tpu_pod.sh: error: --config $CONFIG does not exist (give a path relative to the repository root)" >&2
    exit 2
fi

if [[ -z "$NUM_HOSTS" ]]; then
    # v2/v3/v4 slice names count TensorCores, 8 per host VM (v3-128 and v4-128: 16 hosts).
    if [[ "$ACCELERATOR_TYPE" =~ ^v[234]-([0-9]+)$ ]] && (( BASH_REMATCH[1] >= 8 )); then
        NUM_HOSTS=$(( BASH_REMATCH[1] / 8 ))
    else
        echo "tpu_pod.sh: error: cannot infer the host count of --accelerator-type $ACCELERATOR_TYPE; pass --hosts N" >&2
        exit 2
    fi
elif ! [[ "$NUM_HOSTS" =~ ^[1-9][0-9]*$ ]]; then
    echo "tpu_pod.sh: error: --hosts must be a positive integer, got '$NUM_HOSTS'" >&2
    exit 2
fi
[[ -n "$LOG_DIR" ]] || LOG_DIR="runs/tpu_logs/$TPU_NAME-$(date -u +%Y%m%dT%H%M%SZ)"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project "$PROJECT")

shell_quote() {
    # 'word' quoting that a shell reads back exactly (printf %q is correct but hard to read).
    if [[ "$1" =~ ^[A-Za-z0-9_./=:,@+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {
    # Print the command as it would be typed; run it unless --dry-run.
    printf '+'; for arg in "$@"; do printf ' '; shell_quote "$arg"; done; printf '\n'
    if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

on_all_hosts() {
    run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command "$1"
}

# 1. create
if [[ $SKIP_CREATE -eq 0 ]]; then
    create=("${GCLOUD_TPU[@]}" create "$TPU_NAME" "${LOCATION[@]}" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
    [[ $PREEMPTIBLE -eq 1 ]] && create+=(--preemptible)
    run "${create[@]}"
fi

# 2. install (same versions as requirements-xla.txt, with libtpu instead of XLA:CPU)
if [[ $SKIP_INSTALL -eq 0 ]]; then
    on_all_hosts "set -e; sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv git; \
rm -rf scale_ssl && git clone -q $REPO_URL scale_ssl && cd scale_ssl && git checkout -q $REVISION; \
python3 -m venv .venv-xla && .venv-xla/bin/pip install -q --upgrade pip; \
.venv-xla/bin/pip install -q torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION 'torch_xla[tpu]==$TORCH_XLA_VERSION' \
-f https://storage.googleapis.com/libtpu-releases/index.html; \
grep -v -E '^(torch|torchvision|torch-xla)==' requirements-xla.txt > /tmp/requirements-rest.txt; \
.venv-xla/bin/pip install -q -r /tmp/requirements-rest.txt && .venv-xla/bin/pip install -q --no-deps -e ."
fi

# 3. sync: the config as it is here, uncommitted edits included.
LOCAL_CONFIG="$CONFIG"
[[ -f "$LOCAL_CONFIG" ]] || LOCAL_CONFIG="$(dirname "$0")/../$CONFIG"
run "${GCLOUD_TPU[@]}" scp "$LOCAL_CONFIG" "$TPU_NAME:scale_ssl/$CONFIG" "${LOCATION[@]}" --worker=all

# 4. run: every host at once; scale-ssl fit starts one replica per chip with torch_xla.launch.
# pipefail keeps fit's exit status through tee; the status decides this script's exit code after
# the logs are collected.
overrides=""
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do overrides+=" $(printf '%q' "$o")"; done
fit_status=0
on_all_hosts "set -o pipefail; cd scale_ssl && mkdir -p logs && PJRT_DEVICE=TPU .venv-xla/bin/scale-ssl fit --config $CONFIG trainer.strategy=xla$overrides 2>&1 | tee logs/fit.log" || fit_status=$?

# 5. collect: one file per host (same remote name on every host, so one scp per worker).
[[ $DRY_RUN -eq 1 ]] || mkdir -p "$LOG_DIR"
for (( worker = 0; worker < NUM_HOSTS; worker++ )); do
    run "${GCLOUD_TPU[@]}" scp "$TPU_NAME:scale_ssl/logs/fit.log" "$LOG_DIR/worker-$worker.log" "${LOCATION[@]}" --worker="$worker" \
        || echo "tpu_pod.sh: warning: could not copy the log of worker $worker" >&2
done
echo "tpu_pod.sh: logs of $NUM_HOSTS hosts in $LOG_DIR" >&2

# 6. delete
if [[ $DELETE_AFTER -eq 1 ]]; then
    run "${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet
fi

if [[ $fit_status -ne 0 ]]; then
    echo "tpu_pod.sh: error: the fit exited with status $fit_status on at least one host (logs: $LOG_DIR)" >&2
    exit "$fit_status"
fi
