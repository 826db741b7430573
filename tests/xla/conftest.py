"""XLA tests run only in the torch_xla virtualenv (.venv-xla; `make test` runs them there).

In the main virtualenv torch_xla is absent and this folder is skipped at collection without
importing anything from it. If torch_xla is installed but does not import (e.g. beside a torch it
was not built for) that is an error, not a skip: `make test` must not pass on an XLA suite that
never ran (pytest also exits non-zero when it collects nothing).
"""

import importlib.util
import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")

if importlib.util.find_spec("torch_xla") is None:
    collect_ignore_glob = ["*.py"]
else:
    import torch_xla  # noqa: F401  (an ImportError here fails the run loudly, by design)

    from tests.conftest import fmnist_shards  # noqa: F401  (the same real-shard fixture)

    def pytest_collection_modifyitems(config, items):
        here = os.path.dirname(__file__)
        for item in items:
            if str(item.fspath).startswith(here):
                item.add_marker(pytest.mark.xla)

    @pytest.fixture(scope="session", autouse=True)
    def xla_runtime():
        """Start the XLA runtime before any test runs a plain-CPU backward: torch's autograd
        engine sizes its per-device queues at the first backward of the process, and an XLA
        backward after that fails with an internal assert (device_ready_queues_)."""
        return torch_xla.device()
