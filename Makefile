# Every target creates the virtualenv and installs what it needs, so a fresh clone works with
# `make demo` or `make test` alone (as root, or with sudo for the one apt package).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch_xla 2.9 imports only beside torch 2.9, so the XLA tests get their own virtualenv.
XLA_VENV := .venv-xla
XLA_PY := $(XLA_VENV)/bin/python
XLA_STAMP := $(XLA_VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
MATE_PHOTOS := /usr/share/backgrounds/mate/nature
SHELLCHECK := /usr/bin/shellcheck
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_CONFIG := configs/simclr/fmnist_cpu.yaml
DEMO_RUN := runs/simclr_fmnist
# DeepSpeed compiles a small op on first start; keep it between runs.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1
# CI reaches PyPI over a network that sometimes cuts a long download (seen: a 594 MB CUDA wheel of
# the XLA virtualenv stopped at 440 MB six times in a row). pip resumes a cut download; if it still
# gives up, the whole install is tried again, up to three times, before make fails. (The venv's
# first pip, which upgrades itself, predates --resume-retries.)
PIP_FLAGS := --quiet --retries 10 --timeout 60 --resume-retries 30
define pip_install
ok=; for attempt in 1 2 3; do \
  if $(1) -m pip install $(PIP_FLAGS) $(2); then ok=1; break; fi; \
  echo "pip install $(2) failed (attempt $$attempt of 3)" >&2; sleep 20; \
done; test -n "$$ok"
endef

.PHONY: demo test test-all install xla-install data clean bench bench-install

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --retries 10 --timeout 60 --upgrade pip
	$(call pip_install,$(PY),-r requirements.txt)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(STAMP)

$(XLA_STAMP): requirements-xla.txt pyproject.toml
	test -x $(XLA_PY) || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install --quiet --retries 10 --timeout 60 --upgrade pip
	$(call pip_install,$(XLA_PY),-r requirements-xla.txt)
	$(XLA_PY) -m pip install --quiet --no-deps -e .
	touch $@

xla-install: $(XLA_STAMP)

# The benchmarks' own virtualenv: the peer (Lightning + lightly) is never a dependency of scale_ssl.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_PYTHON ?= $(shell command -v python3.11 || echo $(PYTHON))
# The issue's workload (ResNet-18, global batch 128 of 32 px); override for a quicker look, e.g.
# make bench BENCH_ARGS="--global-batch 32 --repeats 3"
BENCH_ARGS ?= --suites rank1 rank2 rank4 --arch resnet18 --global-batch 128 --steps 3 --warmup 1 --repeats 2

$(BENCH_STAMP): benchmarks/requirements-bench.txt pyproject.toml
	test -x $(BENCH_PY) || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --retries 10 --timeout 60 --upgrade pip
	$(call pip_install,$(BENCH_PY),-r benchmarks/requirements-bench.txt)
	$(BENCH_PY) -m pip install --quiet --no-deps -e .
	touch $@

bench-install: $(BENCH_STAMP)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# tests/test_launchers.py lints the launch scripts with it.
$(SHELLCHECK):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq shellcheck

data: install $(FMNIST)
	$(PY) -m scale_ssl make-shards fashion-mnist --out data/fashion-mnist --shard-size 5000 --skip-existing

# Pretrain SimCLR on 2 DDP ranks (gloo, CPU), then score it (kNN and linear probe) against raw pixels
# and a random-init encoder; the table and its figures go to the run in MLflow.
demo: data
	rm -rf $(DEMO_RUN)/checkpoints
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m scale_ssl fit --config $(DEMO_CONFIG)
	$(PY) -m scale_ssl eval report --ckpt $(DEMO_RUN)/checkpoints/last.ckpt

# The CI suite: everything but tests marked slow.
test: install xla-install $(FMNIST) $(SHELLCHECK)
	$(PY) -m pytest -m "not slow and not xla" -q --durations=15
	$(XLA_PY) -m pytest -m "xla and not slow" tests/xla -q --durations=15

# Everything, including the slow tests.
test-all: install xla-install $(FMNIST) $(SHELLCHECK)
	$(PY) -m pytest -m "not xla" -q --durations=25
	$(XLA_PY) -m pytest -m xla tests/xla -q --durations=25

# Real photographs for the augmentation benchmark (benchmarks/photos.py): Debian's mate-backgrounds.
$(MATE_PHOTOS):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq mate-backgrounds

# The performance benchmarks (about an hour and a half on 2 idle cores; not CI). Each rewrites its
# own tables in docs/BENCHMARKS.md with the date, the machine (cores, CPU, load average) and its
# command line. The issue #20 benchmarks: (a)+(b) augment_throughput.py, (c) the pipeline suite of
# fit_throughput_memory.py, (d) the step suite of trainer_overhead.py.
bench: install $(BENCH_STAMP) $(MATE_PHOTOS) $(FMNIST)
	$(BENCH_PY) benchmarks/augment_throughput.py --images 64 --repeats 3 --batch 32 --json runs/bench/augment_throughput.json --write-doc
	$(BENCH_PY) benchmarks/trainer_overhead.py --suites step --arch resnet18 --global-batch 128 --steps 4 --warmup 1 --repeats 3 --json runs/bench/trainer_step.json --write-doc
	$(BENCH_PY) benchmarks/trainer_overhead.py $(BENCH_ARGS) --json runs/bench/trainer_overhead.json --write-doc
	$(BENCH_PY) benchmarks/trainer_overhead.py --profile $(BENCH_ARGS) --write-doc
	$(PY) benchmarks/data_throughput.py --images 96 --repeats 3
	$(PY) benchmarks/data_sources.py --images 384 --repeats 5 --workers 0 2
	$(PY) benchmarks/fit_throughput_memory.py --batch 64 --steps 4 --warmup 2 --repeats 3 --json runs/bench/fit_throughput_memory.json --write-doc

clean:
	rm -rf $(VENV) $(XLA_VENV) $(BENCH_VENV) .cache runs data .pytest_cache
