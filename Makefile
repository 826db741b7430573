# Every target creates the virtualenv and installs what it needs, so a fresh clone works with
# `make demo` or `make test` alone (as root, or with sudo for the one apt package).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_CONFIG := configs/simclr/fmnist_cpu.yaml
DEMO_RUN := runs/simclr_fmnist
# DeepSpeed compiles a small op on first start; keep it between runs.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-all install data clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(STAMP)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: install $(FMNIST)
	$(PY) -m scale_ssl make-shards fashion-mnist --out data/fashion-mnist --shard-size 5000 --skip-existing

# Pretrain SimCLR on 2 DDP ranks (gloo, CPU), then kNN-score it against two baselines.
demo: data
	rm -rf $(DEMO_RUN)/checkpoints
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m scale_ssl fit --config $(DEMO_CONFIG)
	$(PY) -m scale_ssl eval knn --ckpt $(DEMO_RUN)/checkpoints/last.ckpt --baselines

# The CI suite: everything but tests marked slow.
test: install $(FMNIST)
	$(PY) -m pytest -m "not slow" -q --durations=15

# Everything, including the slow tests.
test-all: install $(FMNIST)
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) .cache runs data .pytest_cache
