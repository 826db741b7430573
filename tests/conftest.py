"""Shared test set-up: the real MLflow server fixture and quiet, single-threaded torch."""

import os

import pytest
import torch

pytest_plugins = ["tests.mlflow_server"]

# Two cores are shared between the test process and the ranks it spawns: one thread each keeps
# them from oversubscribing the CPU (a tiny model ran 40x slower with two threads under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# DeepSpeed compiles a small op on first start: keep it in the repo's cache (the Makefile's too).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions"))


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """Real Fashion-MNIST images packed by our writer: 600 train / 200 test in uneven shards."""
    from scale_ssl.data import FASHION_MNIST_ROOT, make_fashion_mnist_shards

    if not os.path.isdir(FASHION_MNIST_ROOT):
        pytest.fail(f"{FASHION_MNIST_ROOT} is missing: run `make test` (it installs dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist") / "shards"
    make_fashion_mnist_shards(out, shard_size=130, limit=600)
    return out


@pytest.fixture(scope="session")
def deepspeed_engines(tmp_path_factory):
    """(per-rank results, root) of tests/_deepspeed_engines.all_engines on 2 real gloo ranks;
    computed once and shared by the strategy matrix and tests/test_deepspeed.py."""
    pytest.importorskip("deepspeed")
    from tests._deepspeed_engines import all_engines
    from tests.distributed import run_on_ranks

    root = tmp_path_factory.mktemp("deepspeed")
    return run_on_ranks(all_engines, 2, str(root)), root


@pytest.fixture(scope="session")
def equivalence(request, tmp_path_factory):
    """The equivalence matrix's measurements (tests/_equivalence.py): each backend launched once,
    for the cells and DeepSpeed fix checks this session selected. When the whole matrix ran, its
    table replaces the main section of docs/EQUIVALENCE.md."""
    from tests import _equivalence as E
    from tests._equivalence_launch import Matrix
    from tests._equivalence_report import write_main_section

    items = request.session.items
    selected = [item.callspec.params["cell"] for item in items
                if getattr(item, "originalname", None) == "test_cell_equals_one_process"]
    deepspeed_checks = any(item.module.__name__.endswith("test_deepspeed_fixes") for item in items)
    matrix = Matrix(str(tmp_path_factory.mktemp("equivalence")), selected, deepspeed_checks)
    yield matrix
    # The whole matrix rewrites the section; a part of it only on request (it marks the cells it
    # did not run), so a `make test` subset never replaces a full measurement.
    whole = {c.id for c in E.ALL_CELLS} <= set(matrix.results)
    if matrix.results and (whole or os.environ.get("SCALE_SSL_WRITE_EQUIVALENCE") == "1"):
        write_main_section(list(matrix.results.values()))
