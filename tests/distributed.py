"""Run a function on N real gloo ranks (``torch.multiprocessing``) and collect what each returns.

Each rank gets the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so strategies initialise their process group exactly as in a real
launch. Results travel back through files (``torch.save``), and a rank that raises makes the whole
run fail with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    import faulthandler

    faulthandler.enable()  # a rank killed by a signal (SIGABRT/SIGSEGV) prints its Python stack
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        raise
    finally:
        _destroy_group_made_by_the_test()
    # The rank then leaves through the interpreter's normal exit, like a user's script: a process
    # group a strategy created is destroyed by the package's own exit hook (strategies/ddp.py).


def _destroy_group_made_by_the_test() -> None:
    """A group ``fn`` created itself with ``init_process_group`` is the test's to destroy; one a
    strategy created is left to the package, whose clean exit is what the tests check."""
    import torch.distributed as dist

    from scale_ssl.strategies.ddp import destroy_process_group_and_threads, strategy_created_the_group

    if dist.is_initialized() and not strategy_created_the_group():
        destroy_process_group_and_threads()


def run_on_ranks(fn, world_size: int, *args, start_method: str = "spawn") -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results.

    ``spawn`` (the default) gives each rank a fresh interpreter, as a real launch does; each then
    imports torch (~2-4 s of CPU and ~200-300 MB of its own memory). ``fork`` starts the ranks
    from this process's already imported modules, copy-on-write: what lets 16-32 ranks of tensor-
    level work start in a second on a 2-core machine. A forked rank runs with one intra-op thread
    (set in ``_entry``, as DataLoader workers do), and the parent must not have initialised a
    process group itself."""
    if start_method == "fork":
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError(
                "run_on_ranks(start_method='fork'): this process has a process group; forked ranks would inherit it"
            )
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(
                _entry, args=(world_size, port, out_dir, fn, args), nprocs=world_size, join=True, start_method=start_method
            )
        except Exception as err:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"rank{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {r} ---\n{rec['error']}")
            raise AssertionError("a rank failed:\n" + ("\n".join(errors) or str(err))) from None
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
